"""cfpo_jax.sampling.generate against transformers (greedy decoding, teacher-forced logprobs),
against numpy (top-k / top-p allowed sets on a fixed distribution), and against itself only for
invariances (seeds, batching, sharding, compile cache)."""

import functools
import os
import subprocess
import sys
import time

from tests.fixtures import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cfpo_jax import sampling
from cfpo_jax.models import ModelConfig, Transformer, from_pretrained, sequence_logprobs
from cfpo_jax.sharding import make_mesh

EOS = 2  # the fixtures' <|im_end|>
LENGTHS = (5, 11, 3)
NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = hf_fixtures.build_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"), tokenizer=False)
    return directory, from_pretrained(directory), hf_fixtures.reference_model(directory)


def make_prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, hf_fixtures.VOCAB_SIZE, n).tolist() for n in lengths]


def transformers_greedy(ref, prompts, max_new_tokens, eos_token_id=EOS):
    """transformers' greedy generate on the left-padded batch, padded to max_new_tokens columns."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=0,
        )
    new = out[:, width:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])))


def test_greedy_matches_transformers(checkpoint):
    _, model, ref = checkpoint
    prompts = make_prompts()
    samples = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS)
    np.testing.assert_array_equal(np.asarray(samples.tokens), transformers_greedy(ref, prompts, NEW))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forced_forward(checkpoint, temperature):
    _, model, ref = checkpoint
    s = sampling.generate(
        model, make_prompts(), max_new_tokens=NEW, temperature=temperature, eos_token_ids=EOS, seed=3, n=2
    )
    tokens = jnp.concatenate([s.prompt_tokens, s.tokens], axis=1)
    mask = jnp.concatenate([s.prompt_mask, s.mask], axis=1)
    width = s.prompt_tokens.shape[1]
    got = np.where(s.mask, s.logprobs, 0.0)
    # The trainer's recomputation.
    logp, _ = sequence_logprobs(model, tokens, mask, temperature=temperature)
    np.testing.assert_allclose(got, np.where(s.mask, logp[:, width:], 0.0), atol=1e-4)
    # transformers' logits, log-softmaxed in float64 here.
    logits = hf_fixtures.reference_logits(ref, np.array(tokens), np.array(mask)).astype(np.float64)
    scaled = logits[:, width - 1 : -1] / temperature
    shifted = scaled - scaled.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_probs, np.asarray(s.tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, np.where(s.mask, expected, 0.0), atol=1e-4)
    assert np.all(np.asarray(s.mask).sum(1) == np.asarray(s.lengths))


def test_same_seed_same_samples_other_seed_differs(checkpoint):
    _, model, _ = checkpoint
    run = functools.partial(
        sampling.generate, model, make_prompts(), max_new_tokens=NEW, temperature=1.0, eos_token_ids=EOS, n=2
    )
    a, b, c = run(seed=3), run(seed=3), run(seed=jax.random.key(4))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    # The two samples of a prompt are independent draws, not copies.
    assert not np.array_equal(a.tokens[0::2], a.tokens[1::2])
    # An int, its typed key and its raw uint32 key are one seed.
    for same in (run(seed=jax.random.key(3)), run(seed=jax.random.PRNGKey(3))):
        np.testing.assert_array_equal(same.tokens, a.tokens)


def test_every_seed_style_runs_the_decode_program_compiled_for_a_typed_key(checkpoint):
    """The trainer passes a typed key and `cfpo_jax.aot` compiles the decode chunk for one: an int
    or a raw uint32 key seed must reach the same compiled program, not a second one."""
    _, model, _ = checkpoint
    run = functools.partial(sampling.generate, model, make_prompts(), max_new_tokens=NEW, eos_token_ids=EOS)
    run(seed=jax.random.key(5))
    compiled = sampling.decode_program._cache_size()
    run(seed=5)
    run(seed=jax.random.PRNGKey(5))
    assert sampling.decode_program._cache_size() == compiled


def test_timings_split_the_call(checkpoint):
    _, model, _ = checkpoint
    timings = {}
    start = time.perf_counter()
    sampling.generate(model, make_prompts(), max_new_tokens=NEW, eos_token_ids=EOS, n=2, max_concurrent=3,
                      timings=timings)
    wall = time.perf_counter() - start
    assert set(timings) == {"prefill", "decode", "host"}
    assert timings["prefill"] > 0 and timings["decode"] > 0 and timings["host"] >= 0
    assert sum(timings.values()) <= wall


def test_near_zero_temperature_is_greedy(checkpoint):
    _, model, _ = checkpoint
    prompts = make_prompts()
    greedy = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS)
    cold = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=1e-6, eos_token_ids=EOS, seed=5)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)


def test_rows_stop_at_eos_and_the_rest_is_masked(checkpoint):
    _, model, _ = checkpoint
    prompts = make_prompts()
    free = np.asarray(sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0).tokens)
    # Declare the token row 0 emits at step 3 to be the EOS (unless it appeared earlier).
    eos = int(free[0, 3])
    s = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=(EOS, eos), pad_id=1)
    tokens, mask, logprobs = map(np.asarray, (s.tokens, s.mask, s.logprobs))
    for row in range(len(prompts)):
        hits = np.flatnonzero(np.isin(free[row], (EOS, eos)))
        length = hits[0] + 1 if hits.size else NEW
        assert int(s.lengths[row]) == length and bool(s.eos[row]) == bool(hits.size)
        np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
        np.testing.assert_array_equal(mask[row], np.arange(NEW) < length)
        assert np.all(tokens[row, length:] == 1) and np.all(logprobs[row, length:] == 0)
        assert np.all(logprobs[row, :length] < 0)
    assert s.lengths[0] <= 4 and s.eos[0]


def test_prompt_alone_equals_prompt_in_a_padded_batch(checkpoint):
    _, model, _ = checkpoint
    prompt = make_prompts((6,), seed=7)[0]
    alone = sampling.generate(model, [prompt], max_new_tokens=NEW, temperature=0)  # bucket 8
    batch = make_prompts((13, 2), seed=8)
    inside = sampling.generate(model, [batch[0], prompt, batch[1]], max_new_tokens=NEW, temperature=0)  # 16
    np.testing.assert_array_equal(alone.tokens[0], inside.tokens[1])
    np.testing.assert_allclose(alone.logprobs[0], inside.logprobs[1], atol=1e-5)


def test_padded_array_prompts_equal_token_lists(checkpoint):
    _, model, _ = checkpoint
    prompts = make_prompts()
    padded = np.zeros((len(prompts), 12), np.int32)
    for row, p in enumerate(prompts):
        padded[row, : len(p)] = p
    a = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS)
    b = sampling.generate(model, (padded, np.array(LENGTHS)), max_new_tokens=NEW, temperature=0, eos_token_ids=EOS)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)


def test_new_prompt_lengths_in_the_bucket_reuse_the_compiled_sampler(checkpoint):
    _, model, _ = checkpoint
    run = functools.partial(sampling.generate, model, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS)
    run(make_prompts((9, 16, 10)))
    compiled = sampling.prefill_program._cache_size(), sampling.decode_program._cache_size()
    samples = run(make_prompts((12, 10, 15)))
    assert samples.prompt_tokens.shape == (3, 16)
    assert (sampling.prefill_program._cache_size(), sampling.decode_program._cache_size()) == compiled


def test_sharded_params_and_batch_give_the_unsharded_samples(checkpoint):
    directory, model, _ = checkpoint
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(directory, mesh=mesh)
    assert len(sharded.blocks.mlp.up_kernel[...].sharding.device_set) == 8
    prompts = make_prompts()
    plain = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS)
    split = sampling.generate(sharded, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS, mesh=mesh)
    np.testing.assert_array_equal(split.tokens, plain.tokens)
    np.testing.assert_allclose(split.logprobs, plain.logprobs, atol=1e-5)
    assert split.tokens.shape == (3, NEW)
    # Continuous batching on the mesh: 4 slots (one per batch shard) for 9 rows, rows of
    # different lengths (many EOS ids), against one device decoding every row at once.
    kwargs = dict(max_new_tokens=24, temperature=1.0, eos_token_ids=MANY_EOS, n=3, seed=5)
    plain = sampling.generate(model, prompts, **kwargs)
    split = sampling.generate(sharded, prompts, **kwargs, mesh=mesh, max_concurrent=4)
    assert len(set(np.asarray(plain.lengths).tolist())) > 2
    np.testing.assert_array_equal(split.tokens, plain.tokens)
    np.testing.assert_array_equal(split.lengths, plain.lengths)
    np.testing.assert_allclose(split.logprobs, plain.logprobs, atol=1e-5)


# ----------------------------------------------------------------------------- continuous batching

MANY_EOS = tuple(range(2, 12))  # ~4% of the vocabulary: rows end at very different steps


def test_results_do_not_depend_on_max_concurrent(checkpoint):
    _, model, _ = checkpoint
    prompts = make_prompts((5, 11, 3, 7, 1), seed=2)
    kwargs = dict(max_new_tokens=32, temperature=1.0, eos_token_ids=MANY_EOS, n=2, seed=9)
    runs = {k: sampling.generate(model, prompts, **kwargs, max_concurrent=k) for k in (1, 3, 8, None)}
    reference = runs.pop(None)  # the budget's default: every row at once
    lengths = np.asarray(reference.lengths)
    assert lengths.min() < 10 and lengths.max() > 25, lengths  # very different lengths in one call
    for k, s in runs.items():
        np.testing.assert_array_equal(s.tokens, reference.tokens, err_msg=f"max_concurrent={k}")
        np.testing.assert_array_equal(s.mask, reference.mask, err_msg=f"max_concurrent={k}")
        np.testing.assert_array_equal(s.eos, reference.eos, err_msg=f"max_concurrent={k}")
        np.testing.assert_allclose(s.logprobs, reference.logprobs, atol=1e-5, err_msg=f"max_concurrent={k}")


@pytest.mark.parametrize("attention", ["auto", "paged"])
def test_greedy_matches_transformers_through_refilled_slots(checkpoint, attention):
    """Two slots for five prompts of different lengths whose rows stop at different steps: every
    row after the first two goes into a slot another row has used. "paged" is the TPU decode
    kernel (jax's Pallas paged attention) in TPU interpret mode; it reads keys/values as bfloat16,
    which leaves these greedy tokens unchanged."""
    _, model, ref = checkpoint
    prompts = make_prompts((5, 11, 3, 9, 2), seed=4)
    free = transformers_greedy(ref, prompts, 16)
    # EOS ids that end row 0 after 3 tokens and row 3 after 7 (rows stop at their first hit).
    eos_ids = (EOS, int(free[0, 2]), int(free[3, 6]))
    expected = transformers_greedy(ref, prompts, 16, eos_token_id=list(eos_ids))
    s = sampling.generate(model, prompts, max_new_tokens=16, temperature=0, eos_token_ids=eos_ids,
                          max_concurrent=2, attention=attention)
    np.testing.assert_array_equal(np.asarray(s.tokens), expected)
    assert len(set(np.asarray(s.lengths).tolist())) >= 2
    assert s.lengths[0] <= 3 and s.lengths[3] <= 7


def test_paged_decode_kernel_on_a_mesh_matches_transformers(checkpoint):
    """The TPU decode kernel per batch shard (shard_map over data x fsdp, kv heads over tensor),
    FSDP-sharded weights, 4 slots for 5 rows: transformers' greedy tokens."""
    directory, _, ref = checkpoint
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    prompts = make_prompts((5, 11, 3, 9, 2), seed=4)
    s = sampling.generate(from_pretrained(directory, mesh=mesh), prompts, max_new_tokens=NEW, temperature=0,
                          eos_token_ids=EOS, max_concurrent=4, attention="paged", mesh=mesh)
    np.testing.assert_array_equal(np.asarray(s.tokens), transformers_greedy(ref, prompts, NEW))


def test_per_prompt_budgets_cut_each_row(checkpoint):
    _, model, _ = checkpoint
    prompts = make_prompts()
    kwargs = dict(temperature=1.0, eos_token_ids=MANY_EOS, n=2, seed=4, max_concurrent=3)
    full = sampling.generate(model, prompts, max_new_tokens=20, **kwargs)
    budgets = np.array([3, 20, 9])
    cut = sampling.generate(model, prompts, max_new_tokens=budgets, **kwargs)
    assert cut.tokens.shape == (6, 20)
    full_len, budget_R = np.asarray(full.lengths), np.repeat(budgets, 2)
    np.testing.assert_array_equal(cut.lengths, np.minimum(full_len, budget_R))
    np.testing.assert_array_equal(cut.eos, np.asarray(full.eos) & (full_len <= budget_R))
    keep = np.arange(20)[None] < np.asarray(cut.lengths)[:, None]
    np.testing.assert_array_equal(np.where(keep, cut.tokens, -1), np.where(keep, full.tokens, -1))
    assert np.all(np.asarray(cut.tokens)[~keep] == 0) and np.all(np.asarray(cut.logprobs)[~keep] == 0)
    with pytest.raises(ValueError, match="2 budgets for 3 prompts"):
        sampling.generate(model, prompts, max_new_tokens=[4, 5])


def test_default_concurrency_comes_from_the_cache_budget(capsys):
    config = ModelConfig(model_type="qwen2", vocab_size=32, hidden_size=32, intermediate_size=32,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32")
    per_slot = 2 * 2 * 2 * 100 * 16 * 4  # k and v, layers, kv heads, slots, head dim, float32
    assert sampling.kv_bytes_per_slot(config, 100) == per_slot
    assert sampling.slots_for_budget(config, 100, 1e-3) == 10**6 // per_slot
    mesh = make_mesh(data=2, fsdp=2, tensor=2)  # kv heads split in two, 4 batch shards
    assert sampling.slots_for_budget(config, 100, 1e-3, mesh) == 4 * (10**6 // (per_slot // 2))
    model = Transformer(config, rngs=nnx.Rngs(0))
    prompts = [[1, 2, 3]] * 7
    s = sampling.generate(model, prompts, max_new_tokens=61, kv_cache_gb=3 * 2 * 2 * 2 * 64 * 16 * 4 / 1e9)
    assert "sampling: 3 rows at a time (kv_cache_gb=" in capsys.readouterr().out
    assert s.tokens.shape == (7, 61)


MEMORY_SCRIPT = """
import sys
import time
import numpy as np
from flax import nnx
from cfpo_jax import sampling
from cfpo_jax.models import ModelConfig, Transformer
rows, k = int(sys.argv[1]), int(sys.argv[2])
# A small model with a large per-row cache: 8 kv heads x 128 dims, float32.
config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=64,
                     num_layers=4, num_heads=8, num_kv_heads=8, head_dim=128, dtype="float32")
model = Transformer(config, rngs=nnx.Rngs(0))
prompts = np.random.default_rng(0).integers(0, 64, (rows, 8)).tolist()
# A quarter of the vocabulary ends a row: rows are ~4 tokens long (some row of 32 passes 4 but for odds
# of 1 in 10^5), so 512 of them decode in seconds, while
# each slot still holds 128 cache columns.
s = sampling.generate(model, prompts, max_new_tokens=121, max_concurrent=k, seed=1, eos_token_ids=range(16))
assert int(s.lengths.max()) > 4
# VmHWM: this process's peak resident memory (ru_maxrss would carry the forking parent's peak).
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from Linux /proc")
def test_peak_memory_is_bounded_by_the_slots_not_the_rows():
    def peak_bytes(rows, k):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(rows), str(k)], env=env,
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip().splitlines()[-1])

    few, many = peak_bytes(32, 32), peak_bytes(512, 32)
    # The test can fail: 512 rows' caches would add 16x the 32 rows' (k and v x 4 layers x 8 heads
    # x 128 cache columns x 128 dims x 4 bytes = 4.2 MB per row: 134 MB for 32 rows, 2.1 GB for
    # 512), more than the whole 32-row process (0.92-0.96 GiB measured, most of it the runtime:
    # with 2 layers the margin was too thin for CI).
    per_row = 2 * 4 * 8 * 128 * 128 * 4
    assert 480 * per_row > 1.0 * few
    assert many <= 1.3 * few, (many / 2**20, few / 2**20)


# ----------------------------------------------------------------------------- a fixed distribution

PROBS = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.006, 0.004])


def fixed_logits_model(logits_V):
    """A real Transformer whose next-token logits are `logits_V` at every position: every token
    embeds to the same vector (ones), the blocks add nothing (zero output projections), and the
    head's column v is logits_V[v] / D, so that final-norm(ones) @ head = logits_V."""
    vocab, width = len(logits_V), 8
    config = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=width, intermediate_size=8,
                         num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4, dtype="float32",
                         tie_embeddings=False, rms_norm_eps=0.0)
    model = Transformer(config, rngs=nnx.Rngs(0))
    model.embedding[...] = jnp.ones((vocab, width))
    model.blocks.attn.o_kernel[...] = jnp.zeros_like(model.blocks.attn.o_kernel[...])
    model.blocks.mlp.down_kernel[...] = jnp.zeros_like(model.blocks.mlp.down_kernel[...])
    model.lm_head[...] = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32) / width, (width, vocab))
    return model


def allowed_distribution(temperature, top_k, top_p):
    """numpy: the renormalised distribution sampling must follow (top-k, then top-p over it)."""
    scaled = np.log(PROBS) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[:top_k] if top_k else order
    kept = probs[keep] / probs[keep].sum()
    keep = keep[(np.cumsum(kept) - kept) < top_p]
    out = np.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out, np.log(probs)


def test_inverse_cdf_draws_what_numpy_draws_at_the_same_uniforms():
    """Each row's token is the first index whose float64 cumulative softmax mass (numpy) exceeds its
    uniform, over several blocks of the two-level search and a vocabulary that is not a multiple of
    a block; -inf logits (a top-k / top-p cut) are never drawn; the logsumexp is numpy's; NaN logits
    still give a token inside the vocabulary."""
    rng = np.random.default_rng(0)
    vocab = 1000
    logits = rng.normal(0, 2, (4096, vocab)).astype(np.float32)
    logits[:, 300:340] = -np.inf
    logits[:, -7:] = -np.inf
    u = rng.random(4096).astype(np.float32)
    u[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]  # both ends of [0, 1)
    ours, log_mass = map(np.asarray, jax.jit(sampling.inverse_cdf)(u, logits))
    probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cdf = np.cumsum(probs, -1)
    expected = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u.astype(np.float64))])
    expected = np.minimum(expected, vocab - 8)  # a target past the float total: the last token with mass
    # Draws agree except where u falls within float32 rounding of a cumulative boundary.
    near = np.abs(cdf[np.arange(4096), np.minimum(expected, vocab - 1)] - u) < 1e-5
    near |= np.abs(cdf[np.arange(4096), np.maximum(expected - 1, 0)] - u) < 1e-5
    assert (ours == expected)[~near].all() and (~near).sum() > 4000
    assert not np.isin(ours, np.r_[300:340, vocab - 7:vocab]).any()
    assert len(set(ours)) > 700
    np.testing.assert_allclose(log_mass, np.log(np.exp(logits.astype(np.float64)).sum(-1)), rtol=1e-6)
    nan_rows = np.full((2, vocab), np.nan, np.float32)
    drawn, _ = sampling.inverse_cdf(u[:2], nan_rows)
    assert ((0 <= np.asarray(drawn)) & (np.asarray(drawn) < vocab)).all()


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.55), (0.7, 5, 0.75)]
)
def test_top_k_top_p_sample_only_the_allowed_set(temperature, top_k, top_p):
    expected, log_probs = allowed_distribution(temperature, top_k, top_p)
    model = fixed_logits_model(np.log(PROBS))
    s = sampling.generate(
        model, [[0]] * 512, max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, seed=11
    )
    tokens = np.asarray(s.tokens).ravel()
    assert set(tokens) == set(np.flatnonzero(expected)), (sorted(set(tokens)), np.flatnonzero(expected))
    freq = np.bincount(tokens, minlength=len(PROBS)) / tokens.size
    np.testing.assert_allclose(freq, expected, atol=0.03)
    # Logprobs are under the unrestricted softmax(logits / temperature): what the trainer recomputes.
    np.testing.assert_allclose(np.asarray(s.logprobs).ravel(), log_probs[tokens], atol=1e-5)


def test_n_samples_prefill_each_prompt_once(monkeypatch):
    from cfpo_jax.models import decoding

    traced = []
    prefill = decoding.prefill
    monkeypatch.setattr(decoding, "prefill", lambda w, t, m, **kw: traced.append(t.shape) or prefill(w, t, m, **kw))
    model = fixed_logits_model(np.log(PROBS))
    s = sampling.generate(model, [[3, 4], [5, 6, 7, 8]], max_new_tokens=5, n=3, seed=1)
    # Two prompts padded to 4, six rows in six slots: one prefill of 2 rows x 3 columns.
    assert traced == [(2, 3)]
    assert s.tokens.shape == (6, 5)
    np.testing.assert_array_equal(s.prompt_tokens, np.repeat([[0, 0, 3, 4], [5, 6, 7, 8]], 3, axis=0))
    np.testing.assert_array_equal(s.prompt_mask, np.repeat([[0, 0, 1, 1], [1, 1, 1, 1]], 3, axis=0))


def test_prefill_batches_are_capped_and_rows_stay_in_order(checkpoint, monkeypatch):
    from cfpo_jax.models import decoding

    _, model, _ = checkpoint
    prompts = make_prompts((3, 4, 2), seed=6)
    kwargs = dict(max_new_tokens=7, temperature=1.0, n=2, seed=3)
    whole = sampling.generate(model, prompts, **kwargs)
    traced = []
    prefill = decoding.prefill
    monkeypatch.setattr(decoding, "prefill", lambda w, t, m, **kw: traced.append(t.shape) or prefill(w, t, m, **kw))
    monkeypatch.setattr(sampling, "_PREFILL_TOKENS", 4)  # one prompt of the 4-token bucket per call
    capped = sampling.generate(model, prompts, **kwargs)
    assert traced == [(1, 3)]  # one prompt per prefill (traced once, called three times)
    np.testing.assert_array_equal(capped.tokens, whole.tokens)
    np.testing.assert_allclose(capped.logprobs, whole.logprobs, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=13), "top_k"),
        (dict(n=0), "samples per prompt"),
        (dict(eos_token_ids=(12,)), "eos_token_ids"),
        (dict(prompt_bucket=1), "prompt_bucket"),
        (dict(max_concurrent=0), "max_concurrent"),
        (dict(kv_cache_gb=0.0), "kv_cache_gb"),
        (dict(attention="flash"), "decode attention"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    model = fixed_logits_model(np.log(PROBS))
    with pytest.raises(ValueError, match=message):
        sampling.generate(model, [[1, 2]], **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="empty"):
        sampling.generate(model, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampling.generate(model, [[1, 99]], max_new_tokens=4)


def test_decode_step_neither_copies_a_layer_cache_nor_gathers_weights():
    """The compiled decode chunk on a data x fsdp x tensor mesh, with FSDP-sharded parameters:
    no copy or slice of a layer's cache (the old stacked cache was sliced per layer per step),
    and no all-gather as large as a layer's smallest weight (the weights were gathered once,
    before the loop)."""
    import re

    from cfpo_jax.models import decoding
    from cfpo_jax.sharding import shard_model

    config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=64,
                         num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = shard_model(Transformer(config, rngs=nnx.Rngs(0)), mesh)
    settings = sampling.Settings(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(1,),
                                 pad_id=0, mesh=mesh, attention="einsum")
    weights = decoding.gather_weights(model, mesh)
    slots, outputs = sampling.init_program(settings, config, 8, 27, 16)
    hlo = sampling.decode_program.lower(
        settings, weights, slots, outputs, jax.random.key(0), np.full(16, 20, np.int32), np.int32(3)
    ).compile().as_text()
    smallest_weight = 64 * 4 * 16 // 2 // 2  # q_kernel [D, N, H] split over fsdp and tensor
    gathered, cache_copies = [], []
    for dims, op in re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\S* (all-gather|copy|dynamic-slice)\(", hlo):
        shape = [int(d) for d in dims.split(",") if d]
        if op == "all-gather":
            gathered.append(int(np.prod(shape or [1])))
        elif 27 in shape and 16 in shape:  # 27 cache columns of 16 dims: a layer's cache, or a slice
            # over its columns (not the attention scores [slots, kv heads, 2, 27], which XLA may copy)
            cache_copies.append((op, shape))
    assert gathered, "the mesh run gathers the per-step token columns, so the pattern must match"
    assert max(gathered) < smallest_weight, gathered
    assert not cache_copies, cache_copies


def test_decode_chunk_writes_the_cache_in_place():
    """With the slots donated, the compiled decode loop aliases every layer's cache to its output,
    and its scratch memory stays below one layer's keys (no copy of a layer's cache)."""
    from cfpo_jax.models import decoding

    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    block_graphdef, _ = nnx.split(model.blocks)
    weights = jax.eval_shape(
        functools.partial(decoding.gather_program, graphdef, block_graphdef, None, "float32"), state)
    settings = sampling.Settings(max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, eos_token_ids=(1,),
                                 pad_id=0, mesh=None, attention="einsum")
    slots, outputs = jax.eval_shape(functools.partial(sampling.init_program, settings, config, 2, 4096, 8))
    budget = jax.ShapeDtypeStruct((8,), jnp.int32)
    memory = sampling.decode_program.lower(
        settings, weights, slots, outputs, jax.random.key(0), budget, np.int32(1)).compile().memory_analysis()
    layer_keys = 2 * 2 * 4096 * 8 * 4  # slots x kv heads x columns x head dim x float32
    assert memory.alias_size_in_bytes >= 2 * 4 * layer_keys  # keys and values of the 4 layers
    assert memory.temp_size_in_bytes < layer_keys, memory.temp_size_in_bytes


# ----------------------------------------------------------------------------- multi-turn


def observation_for(row, tokens):
    """A deterministic stand-in for an environment: after each of the row's first two turns, an
    observation of 2-5 tokens that depends on the row and on what it sampled; then the end."""
    turns = sum(1 for t in tokens if t in MANY_EOS or t == 200)  # turn ends so far (incl. forced)
    if turns > 2:
        return None
    length = 2 + (row + sum(tokens)) % 4
    return [20 + (row * 7 + sum(tokens) + j) % 150 for j in range(length)]


def turn_ends(tokens, generated, eos, stop):
    """Independent scan: the columns where a turn ends — a sampled EOS, or the last token of a
    stop sequence whose tokens were all sampled."""
    ends = []
    for c, t in enumerate(tokens):
        if not generated[c]:
            continue
        if t in eos:
            ends.append(c)
        for seq in stop:
            start = c - len(seq) + 1
            if start >= 0 and list(tokens[start:c + 1]) == list(seq) and all(generated[start:c + 1]):
                ends.append(c)
    return sorted(set(ends))


def test_multi_turn_episodes_logprobs_and_masks(checkpoint):
    """Three-turn episodes: each turn ends at a sampled EOS or stop sequence, the observation
    turn_end returned follows it verbatim (forced, generated 0, logprob 0), sampling resumes
    after it; the sampled tokens' logprobs equal the teacher-forced forward of the whole episode
    (trainer and transformers)."""
    _, model, ref = checkpoint
    stop = ((200,), (30, 31))
    calls = []

    def turn_end(row, tokens):
        calls.append((row, list(tokens)))
        return observation_for(row, tokens)

    s = sampling.generate(model, make_prompts(), max_new_tokens=48, temperature=1.0,
                          eos_token_ids=MANY_EOS, seed=4, n=2, turn_end=turn_end,
                          stop_sequences=stop)
    tokens, mask, generated = (np.asarray(x) for x in (s.tokens, s.mask, s.generated))
    logprobs, lengths = np.asarray(s.logprobs), np.asarray(s.lengths)
    assert np.all(generated <= mask) and np.all(mask.sum(1) == lengths)
    multi = 0
    for row in range(tokens.shape[0]):
        n = lengths[row]
        row_calls = [c for r, c in calls if r == row]
        ends = turn_ends(tokens[row, :n], generated[row, :n], MANY_EOS, stop)
        # turn_end was called at each turn end (except one that hit the budget) with the columns
        # so far, and each observation sits right after its turn.
        assert [len(c) for c in row_calls] == [e + 1 for e in ends if e + 1 < 48]
        for call in row_calls:
            observation = observation_for(row, call) or []
            start = len(call)
            got = tokens[row, start:start + len(observation)].tolist()
            assert got == observation[: n - start]
            assert not generated[row, start:start + len(observation)].any()
            assert np.all(logprobs[row, start:start + len(observation)] == 0)
        forced = sum(len(observation_for(row, c) or []) for c in row_calls)
        assert (mask[row] - generated[row]).sum() == min(forced, n - generated[row].sum())
        multi += len(row_calls) >= 2
    assert multi >= 2, calls  # some episodes really have three turns

    full = jnp.concatenate([s.prompt_tokens, s.tokens], axis=1)
    attn = jnp.concatenate([s.prompt_mask, s.mask], axis=1)
    width = s.prompt_tokens.shape[1]
    logp, _ = sequence_logprobs(model, full, attn, temperature=1.0)
    np.testing.assert_allclose(np.where(generated, logprobs, 0.0),
                               np.where(generated, logp[:, width:], 0.0), atol=1e-4)
    logits = hf_fixtures.reference_logits(ref, np.array(full), np.array(attn)).astype(np.float64)
    scaled = logits[:, width - 1: -1]
    log_probs = scaled - scaled.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.where(generated, logprobs, 0.0), np.where(generated, expected, 0.0),
                               atol=1e-4)


def test_multi_turn_episodes_do_not_depend_on_max_concurrent(checkpoint):
    _, model, _ = checkpoint
    prompts = make_prompts((5, 11, 3, 7, 1), seed=2)
    kwargs = dict(max_new_tokens=40, temperature=1.0, eos_token_ids=MANY_EOS, n=2, seed=9,
                  turn_end=observation_for, stop_sequences=((200,),))
    runs = {k: sampling.generate(model, prompts, **kwargs, max_concurrent=k) for k in (1, 3, None)}
    reference = runs.pop(None)
    assert np.asarray(reference.mask - reference.generated).sum() > 0  # observations were forced
    for k, s in runs.items():
        for field in ("tokens", "mask", "generated", "eos"):
            np.testing.assert_array_equal(getattr(s, field), getattr(reference, field),
                                          err_msg=f"{field}, max_concurrent={k}")
        np.testing.assert_allclose(s.logprobs, reference.logprobs, atol=1e-5, err_msg=f"max_concurrent={k}")


def test_multi_turn_episodes_on_a_mesh_equal_one_device(checkpoint):
    """Sharded weights and slots (4 batch shards × 2 tensor, 4 slots for 6 rows): the same
    episodes as one device decoding every row at once."""
    directory, model, _ = checkpoint
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(directory, mesh=mesh)
    kwargs = dict(max_new_tokens=32, temperature=1.0, eos_token_ids=MANY_EOS, n=2, seed=6,
                  turn_end=observation_for, stop_sequences=((200,),))
    plain = sampling.generate(model, make_prompts(), **kwargs)
    split = sampling.generate(sharded, make_prompts(), **kwargs, mesh=mesh, max_concurrent=4)
    assert np.asarray(plain.mask - plain.generated).sum() > 0
    for field in ("tokens", "mask", "generated", "eos"):
        np.testing.assert_array_equal(getattr(split, field), getattr(plain, field), err_msg=field)
    np.testing.assert_allclose(split.logprobs, plain.logprobs, atol=1e-5)


def test_stop_sequences_need_turn_end(checkpoint):
    _, model, _ = checkpoint
    with pytest.raises(ValueError, match="need turn_end"):
        sampling.generate(model, make_prompts(), max_new_tokens=4, stop_sequences=((5,),))
