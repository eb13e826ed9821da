"""The packer (`cfpo_jax.packing`) on hand-made lengths: every real token placed exactly once,
capacities never exceeded, row counts from a bounded set; the device gathers against numpy."""

import numpy as np
import pytest

from cfpo_jax import packing

P, N = 4, 8
W = P + N


def unpacked_rows(prompt_lengths, completion_lengths):
    """Token ids that name their own place: row b, column l holds 1000·b + l on real tokens, -1 on
    padding (left-padded prompt, right-padded completion)."""
    tokens = np.full((len(prompt_lengths), W), -1)
    for b, (p, n) in enumerate(zip(prompt_lengths, completion_lengths)):
        tokens[b, P - p:P + n] = 1000 * b + np.arange(P - p, P + n)
    return tokens


CASES = [
    # (prompt lengths, completion lengths, rows to pack)
    ([4, 4, 4, 4], [8, 8, 8, 8], [0, 1, 2, 3]),  # all full: one sequence a row
    ([2, 3, 1, 4, 4, 2, 1, 3], [1, 2, 8, 3, 1, 7, 2, 5], [5, 0, 7, 3, 1, 6, 2, 4]),
    ([1] * 16, [1, 2, 3, 4] * 4, list(range(16))),  # short: many sequences a row
    ([4, 2, 3, 1], [0, 5, 0, 8], [3, 2, 1, 0]),  # empty completions are left out
]


@pytest.mark.parametrize("prompt_lengths, completion_lengths, rows", CASES)
def test_every_token_placed_once_within_capacity(prompt_lengths, completion_lengths, rows):
    plan = packing.plan(prompt_lengths, completion_lengths, rows, prompt_width=P,
                        completion_width=N, granule=2, max_rows=len(rows))
    tokens = unpacked_rows(prompt_lengths, completion_lengths)
    R = plan.segment_RxW.shape[0]
    assert plan.shape == (R, W, N) and R % 2 == 0 and R <= len(rows)
    packed = tokens.reshape(-1)[plan.token_src_RxW]
    real = plan.segment_RxW > 0
    expected = sorted(t for b in rows if completion_lengths[b] > 0 for t in tokens[b] if t >= 0)
    assert sorted(packed[real]) == expected  # every real token of a kept sequence exactly once
    for r in range(R):
        # Each segment is one sequence, contiguous, in its order, positions from 0.
        for k in set(plan.segment_RxW[r][real[r]]):
            cols = np.flatnonzero(plan.segment_RxW[r] == k)
            assert np.all(np.diff(cols) == 1)
            b = packed[r, cols[0]] // 1000
            assert np.all(packed[r, cols] // 1000 == b)
            np.testing.assert_array_equal(plan.positions_RxW[r, cols], np.arange(len(cols)))
            assert len(cols) == prompt_lengths[b] + completion_lengths[b]
        # The completion layout: in-capacity, pointing at the completion tokens of the row.
        used = plan.comp_mask_RxN[r] == 1
        assert np.all(used[:used.sum()])  # a prefix
        cols = plan.comp_col_RxN[r, used]
        seqs = plan.comp_seq_RxN[r, used]
        owners = np.asarray(rows)[seqs]
        np.testing.assert_array_equal(packed[r, cols] // 1000, owners)
        np.testing.assert_array_equal(packed[r, cols] % 1000,
                                      P + plan.comp_src_RxN[r, used] % N)
        np.testing.assert_array_equal(plan.comp_src_RxN[r, used] // N, owners)
        # The predicting token (one column left) is in the same sequence.
        np.testing.assert_array_equal(plan.segment_RxW[r, cols - 1], plan.segment_RxW[r, cols])
    # Unpacking inverts the completion layout.
    for s, b in enumerate(rows):
        n = completion_lengths[b]
        flat = plan.unpack_SxN[s, :n]
        np.testing.assert_array_equal(plan.comp_src_RxN.reshape(-1)[flat], b * N + np.arange(n))


def test_first_fit_decreasing_respects_both_capacities():
    lengths = [9, 7, 5, 5, 4, 3, 3, 2, 1]
    completion = [1, 6, 4, 1, 4, 3, 1, 2, 1]
    bins = packing.first_fit_decreasing(lengths, completion, 10, 6)
    assert sorted(i for b in bins for i in b) == list(range(9))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 10 and sum(completion[i] for i in b) <= 6
    # Worked by hand: 7 fills its row's completion capacity (6), so no sequence with a
    # completion token joins it although 3 tokens are free; the last 1 goes back to 9's row.
    assert bins == [[0, 8], [1], [2, 3], [4, 6], [5, 7]]


def test_row_counts_come_from_a_bounded_ladder():
    assert packing.row_ladder(64, 4) == [4, 8, 12, 16, 24, 32, 48, 64]
    assert packing.row_ladder(8, 8) == [8]
    shapes = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        completion = rng.integers(0, N + 1, 64)
        prompt = rng.integers(1, P + 1, 64)
        plan = packing.plan(prompt, completion, np.arange(64), prompt_width=P,
                            completion_width=N, granule=4, max_rows=64)
        shapes.add(plan.shape)
        needed = len(packing.first_fit_decreasing(
            (prompt + completion)[completion > 0], completion[completion > 0], W, N))
        assert plan.shape[0] == min(r for r in packing.row_ladder(64, 4) if r >= needed)
    assert {s[0] for s in shapes} <= set(packing.row_ladder(64, 4))


def test_bad_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="prompt"):
        packing.plan([0, 2], [3, 3], [0, 1], prompt_width=P, completion_width=N, granule=1,
                     max_rows=2)
    with pytest.raises(ValueError, match="completion"):
        packing.plan([2, 2], [9, 3], [0, 1], prompt_width=P, completion_width=N, granule=1,
                     max_rows=2)
    with pytest.raises(ValueError, match="multiple"):
        packing.row_ladder(6, 4)


def test_device_gathers_match_numpy():
    import jax.numpy as jnp

    prompt, completion, rows = CASES[1]
    plan = packing.plan(prompt, completion, rows, prompt_width=P, completion_width=N, granule=2,
                        max_rows=8)
    tokens = unpacked_rows(prompt, completion)
    values_BxN = np.arange(8 * N, dtype=np.float32).reshape(8, N) + 1
    np.testing.assert_array_equal(packing.pack_rows(jnp.asarray(tokens), plan.token_src_RxW),
                                  tokens.reshape(-1)[plan.token_src_RxW])
    packed = packing.pack_completion(jnp.asarray(values_BxN), plan.comp_src_RxN, plan.comp_mask_RxN)
    np.testing.assert_array_equal(packed, np.where(plan.comp_mask_RxN, values_BxN.reshape(-1)[plan.comp_src_RxN], 0))
    mask_SxN = (np.arange(N)[None] < np.asarray(completion)[rows][:, None])
    unpacked = packing.unpack_completion(packed, plan.unpack_SxN, mask_SxN)
    np.testing.assert_array_equal(unpacked, np.where(mask_SxN, values_BxN[rows], 0))


# ---------------------------------------------------------------- packed = unpacked on a model
# The reference in each test is the unpacked path (`learner.completion_logprobs`, unpacked loss
# terms, `learner.make_update` on unpacked rows), float32 throughout.

B, BP, BN = 8, 8, 8  # rollout rows, prompt bucket, completion budget
PROMPTS = np.array([8, 3, 1, 5, 8, 2, 6, 4])
COMPLETIONS = np.array([8, 2, 5, 0, 1, 8, 3, 6])  # one empty row: it counts nowhere either way


def tiny_model(lora_rank=0):
    from flax import nnx

    from cfpo_jax import lora
    from cfpo_jax.models import ModelConfig, Transformer

    config = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                         attention="einsum")
    model = Transformer(config, rngs=nnx.Rngs(0))
    if not lora_rank:
        return nnx.split(model, nnx.Param, ...)
    model = lora.adapt(model, rank=lora_rank, alpha=8.0, targets=("q", "v", "up", "down"), seed=1)
    graphdef, adapters, frozen = lora.split(model)
    # B starts at zero; random B makes the adapters change the forward pass.
    rng = np.random.default_rng(2)
    adapters = __import__("jax").tree.map(
        lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), adapters)
    return graphdef, adapters, frozen


def rollout_batch(seed=0, beta=True):
    """An unpacked rollout as `learner.make_prepare` lays it out (a dict of its fields), with random old/ref logprobs
    around the model's (so ratios move off 1 and clipping acts) and advantages."""
    rng = np.random.default_rng(seed)
    L = BP + BN
    tokens = rng.integers(1, 64, (B, L)).astype(np.int32)
    attn = np.zeros((B, L), np.int32)
    for b in range(B):
        attn[b, BP - PROMPTS[b]:BP + COMPLETIONS[b]] = 1
    tokens = tokens * attn
    mask = attn[:, BP:].astype(np.float32)
    batch = dict(tokens=tokens, attn=attn, mask=mask,
                 adv=rng.normal(size=B).astype(np.float32),
                 old_logp=(-2.0 + 0.3 * rng.normal(size=(B, BN))).astype(np.float32) * mask)
    if beta:
        batch["ref_logp"] = (-2.0 + 0.3 * rng.normal(size=(B, BN))).astype(np.float32) * mask
    return batch


def device_plan(rows, granule=2):
    """(host plan, the plan on device) of rollout rows `rows`."""
    import jax

    plan = packing.plan(PROMPTS, COMPLETIONS, rows, prompt_width=BP, completion_width=BN,
                        granule=granule, max_rows=len(rows))
    return plan, jax.tree.map(jax.numpy.asarray, plan)


def as_batch(batch):
    """The rollout dict as the learner's typed unpacked batch."""
    import jax.numpy as jnp

    from cfpo_jax.batch import Batch

    return Batch(**{k: jnp.asarray(v) for k, v in batch.items()})


def packed_rows(batch, plan_dev):
    return packing.pack_minibatch(as_batch(batch), plan_dev)


@pytest.mark.parametrize("lora_rank", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_packed_logprobs_and_entropies_equal_unpacked(lora_rank):
    import jax
    from flax import nnx

    from cfpo_jax import learner

    graphdef, params, frozen = tiny_model(lora_rank)
    model = nnx.merge(graphdef, params, frozen)
    batch = rollout_batch()
    logp_ref, entropy_ref = learner.completion_logprobs(model, batch["tokens"], batch["attn"], BN, 1.3)
    rows = np.arange(B)
    plan, plan_dev = device_plan(rows)
    assert plan.shape[0] < B  # something was packed together
    logprobs = jax.jit(learner.make_packed_logprobs(graphdef, frozen, temperature=1.3,
                                                    micro_batch_size=2))
    packed = packed_rows(batch, plan_dev).replace(mask=plan_dev.comp_mask_RxN)
    logp_RxN, entropy_RxN = logprobs(params, packed)
    unpack = lambda x: packing.unpack_completion(x, plan_dev.unpack_SxN, batch["mask"])
    np.testing.assert_allclose(unpack(logp_RxN), logp_ref * batch["mask"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(unpack(entropy_RxN), entropy_ref * batch["mask"], atol=1e-5, rtol=0)
    assert np.abs(np.asarray(logp_ref) * batch["mask"]).max() > 1.0  # not trivially zero


def test_a_sequence_does_not_see_its_neighbour_in_the_packed_row():
    import jax
    from flax import nnx

    from cfpo_jax import learner

    graphdef, params, frozen = tiny_model()
    batch = rollout_batch()
    plan, plan_dev = device_plan(np.arange(B))
    logprobs = jax.jit(learner.make_packed_logprobs(graphdef, frozen, temperature=1.0,
                                                    micro_batch_size=0))
    # A row holding several sequences; change every token of its first sequence.
    r = next(r for r in range(plan.shape[0]) if plan.segment_RxW[r].max() >= 2)
    first = plan.token_src_RxW[r][plan.segment_RxW[r] == 1] // (BP + BN)
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][first[0]] = (batch["tokens"][first[0]] + 7) % 64 * batch["attn"][first[0]]

    def run(b):
        packed = packed_rows(b, plan_dev).replace(mask=plan_dev.comp_mask_RxN)
        return np.asarray(logprobs(params, packed)[0])

    before, after = run(batch), run(changed)
    neighbours = (plan.comp_seq_RxN[r] != np.flatnonzero(np.arange(B) == first[0])[0]) & \
        (plan.comp_mask_RxN[r] == 1)
    assert neighbours.any()
    np.testing.assert_allclose(after[r][neighbours], before[r][neighbours], atol=1e-6, rtol=0)
    own = (plan.comp_seq_RxN[r] == first[0]) & (plan.comp_mask_RxN[r] == 1)
    assert np.abs(after[r][own] - before[r][own]).max() > 1e-3


@pytest.mark.parametrize("objective, level", [("cfpo", "token"), ("ppo", "token"),
                                              ("cfpo", "sequence"), ("ppo", "sequence")])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
def test_every_loss_aggregation_equals_unpacked(objective, level, agg):
    import jax.numpy as jnp

    from cfpo_jax import losses

    rng = np.random.default_rng(3)
    batch = rollout_batch()
    logp = (batch["old_logp"] + 0.25 * rng.normal(size=(B, BN)).astype(np.float32)) * batch["mask"]
    rows = rng.permutation(B)
    plan, plan_dev = device_plan(rows)
    kwargs = dict(objective=objective, level=level, agg=agg, eps=0.2, eps_high=0.28, max_len=BN,
                  dual_clip=3.0 if objective == "ppo" else None)
    reference = losses.policy_loss_terms(logp[rows], batch["old_logp"][rows], batch["adv"][rows],
                                         batch["mask"][rows], **kwargs)
    pack = lambda x: packing.pack_completion(jnp.asarray(x), plan_dev.comp_src_RxN, plan_dev.comp_mask_RxN)
    seqs = dict(sequence_ids=plan_dev.comp_seq_RxN, num_sequences=B)
    packed = losses.policy_loss_terms(pack(logp), pack(batch["old_logp"]), batch["adv"][rows],
                                      pack(batch["mask"]), **kwargs, **seqs)
    for key in reference:
        np.testing.assert_allclose(packed[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(reference["clip_count"]) > 0 or level == "sequence"
    kl_ref = losses.kl_terms(logp[rows], batch["ref_logp"][rows], batch["mask"][rows], agg=agg,
                             max_len=BN)
    kl_packed = losses.kl_terms(pack(logp), pack(batch["ref_logp"]), pack(batch["mask"]), agg=agg,
                                max_len=BN,
                                sequence_sums=losses.segment_sums(plan_dev.comp_seq_RxN, B))
    for key in kl_ref:
        np.testing.assert_allclose(kl_packed[key], kl_ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


UPDATE_CASES = {
    # name: (rl overrides, micro-batch rows, lora rank)
    "cfpo-micro-kl-seqmean": (dict(agg="seq-mean-token-mean", beta=0.1), 2, 0),
    "ppo-sequence-dualclip-drgrpo": (dict(objective="ppo", level="sequence", dual_clip=3.0,
                                          eps_high=0.28, agg="seq-mean-token-sum-norm"), 2, 0),
    "cfpo-lora-micro-kl-tokensum": (dict(agg="seq-mean-token-sum", beta=0.1), 2, 4),
    # Slow (each case compiles two updates, ~10 s on 2 idle cores): what they add is covered in
    # part above (whole-minibatch micro-batch; the on-policy old = current logprobs).
    "cfpo-token-mean": (dict(), 0, 0),
    "ppo-on-policy": (dict(objective="ppo"), 0, 0),
}
SLOW_CASES = ("cfpo-token-mean", "ppo-on-policy")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                  for n in UPDATE_CASES])
def test_packed_update_equals_unpacked(name):
    """One update with plain SGD (lr 1, so the parameter change is minus the gradient): the
    gradient, loss and every metric of the packed minibatch equal the unpacked one's."""
    import jax
    import optax

    from cfpo_jax import config as config_lib
    from cfpo_jax import learner

    overrides, micro, lora_rank = UPDATE_CASES[name]
    rl = config_lib.base_config().rl
    # Off policy (old logprobs in the batch) but for the on-policy case
    rl.update(dict(num_epochs=1 if name == "ppo-on-policy" else 2, **overrides))
    graphdef, params, frozen = tiny_model(lora_rank)
    tx = optax.sgd(1.0)
    batch = rollout_batch(beta=rl.beta > 0)
    if name == "ppo-on-policy":  # old logprobs are the current ones; the sampler's feed metrics
        batch["sampler_logp"] = batch.pop("old_logp")
    rows = np.random.default_rng(4).permutation(B)
    _, plan_dev = device_plan(rows, granule=max(micro, 1))
    state = lambda: dict(params=jax.tree.map(jax.numpy.copy, params), opt_state=tx.init(params),
                         updates=np.int32(0), skipped_updates=np.int32(0))
    update = lambda packed: jax.jit(learner.make_update(
        graphdef, tx, lambda _: 1.0, rl, temperature=1.0, max_len=BN, micro_batch_size=micro,
        packed=packed))
    unpacked_state, reference = update(False)(state(), frozen,
                                              as_batch({k: v[rows] for k, v in batch.items()}))
    packed_state, metrics = update(True)(state(), frozen, packed_rows(batch, plan_dev))
    assert set(metrics) == set(reference)
    for key in reference:
        np.testing.assert_allclose(metrics[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
    grads_ref = [np.asarray(p - n) for p, n in zip(jax.tree.leaves(params), jax.tree.leaves(unpacked_state["params"]))]
    grads = [np.asarray(p - n) for p, n in zip(jax.tree.leaves(params), jax.tree.leaves(packed_state["params"]))]
    scale = max(np.abs(g).max() for g in grads_ref)
    assert scale > 1e-4
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)
