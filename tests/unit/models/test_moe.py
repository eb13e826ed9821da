"""Mixture of experts (Qwen3-MoE): the router and the load-balancing loss against transformers,
expert parallelism against one device, routing record and replay, packing and adapters.

Logits, left padding, the sampler's prefill/decode and HF export of the MoE model against
transformers run with the other families in tests/unit/models/test_models.py ("qwen3_moe")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tests.fixtures import hf_fixtures
from cfpo_jax import lora, packing, sampling, sharding
from cfpo_jax.models import decoding, from_pretrained, moe, packed_logprobs, sequence_logprobs
from cfpo_jax.models.transformer import default_positions


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return hf_fixtures.build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"), tokenizer=False)


def tokens_and_mask(B=2, T=16, pad=(0, 5), seed=0):
    tokens = np.random.default_rng(seed).integers(3, hf_fixtures.VOCAB_SIZE, (B, T))
    mask = np.ones((B, T), np.int32)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
        tokens[row, :n] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_matches_transformers(norm_topk_prob):
    config = hf_fixtures.hf_config("qwen3_moe", norm_topk_prob=norm_topk_prob)
    router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(config.num_experts, config.hidden_size)).astype(np.float32)
    x = rng.normal(size=(50, config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(weight))
        ref_logits, ref_weights, ref_experts = router(torch.from_numpy(x))
    weights, experts, own, probs = moe.route(jnp.asarray(x @ weight.T), config.num_experts_per_tok,
                                             norm_topk_prob, jnp.float32)
    np.testing.assert_array_equal(np.asarray(experts), ref_experts.numpy())
    np.testing.assert_array_equal(np.asarray(own), ref_experts.numpy())
    np.testing.assert_allclose(np.asarray(weights), ref_weights.numpy(), atol=1e-6)
    assert np.allclose(np.asarray(weights).sum(-1), 1.0) == norm_topk_prob


def test_aux_loss_matches_transformers(checkpoint):
    """The load-balancing loss of a left-padded batch equals transformers' (`output_router_logits`,
    which masks the padding with the attention mask)."""
    model = from_pretrained(checkpoint)
    ref = hf_fixtures.reference_model(checkpoint)
    tokens, mask = tokens_and_mask()
    _, stats = model.hidden_with_moe(tokens, mask_BxT=mask)
    positions = torch.clamp(torch.cumsum(torch.as_tensor(np.asarray(mask)), -1) - 1, min=0)
    with torch.no_grad():
        out = ref(input_ids=torch.as_tensor(np.asarray(tokens)), attention_mask=torch.as_tensor(np.asarray(mask)),
                  position_ids=positions, output_router_logits=True)
    # transformers adds coef · aux_loss to the loss; out.aux_loss is the loss itself.
    np.testing.assert_allclose(float(stats.aux_loss), float(out.aux_loss), rtol=1e-5)
    # Its own top k per layer equals transformers' on every real token.
    for layer, logits in enumerate(out.router_logits):
        ref_experts = torch.topk(logits, 2, dim=-1).indices.numpy().reshape(*tokens.shape, 2)
        real = np.asarray(mask) == 1
        np.testing.assert_array_equal(np.sort(np.asarray(stats.experts_BxTxLxK)[:, :, layer][real], -1),
                                      np.sort(ref_experts[real], -1))


def _loss(model, tokens, mask, routing=None):
    logp, _, stats = sequence_logprobs(model, tokens, mask, routing=routing, return_moe=True)
    return jnp.sum(logp) + 0.5 * stats.aux_loss, stats


# expert = 4 beside data = 2 is the slow twin of expert = 2 beside fsdp and tensor (same code path).
@pytest.mark.parametrize("sizes", [dict(expert=2, fsdp=2, tensor=2),
                                   pytest.param(dict(data=2, expert=4, fsdp=1), marks=pytest.mark.slow)])
def test_expert_parallel_matches_one_device(checkpoint, sizes):
    """Experts split over the 'expert' axis (with fsdp/tensor/data beside it) give the logprobs,
    load-balancing loss and gradients of one device; the tokens reach the experts by an
    all-gather and a reduce-scatter over 'expert' in the compiled program."""
    model = from_pretrained(checkpoint)
    tokens, mask = tokens_and_mask(B=8, pad=(0, 5, 0, 2, 9, 0, 1, 3))
    graphdef, params = nnx.split(model)

    def loss(params, tokens, mask):
        return _loss(nnx.merge(graphdef, params), tokens, mask)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params, tokens, mask)
    mesh = sharding.make_mesh(**sizes)
    assert mesh.shape["expert"] == sizes["expert"]
    sharded = jax.device_put(params, sharding.param_shardings(mesh, params))
    gate = sharded["blocks"]["mlp"]["expert_gate_kernel"]
    assert gate.sharding.spec[1] == "expert"  # [L, E, D, F]: experts split
    batch = sharding.batch_sharding(mesh)
    with sharding.mesh_context(mesh):
        step = jax.jit(jax.value_and_grad(loss))
        args = (sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch))
        hlo = step.lower(*args).compile().as_text()
        value_ep, grads_ep = step(*args)
    assert "all-gather" in hlo and "reduce-scatter" in hlo
    np.testing.assert_allclose(float(value_ep), float(value), rtol=1e-5)
    for (path, g), g_ep in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ep)):
        np.testing.assert_allclose(np.asarray(g_ep), np.asarray(g), atol=2e-5 * float(np.abs(g).max()) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_megablox_under_expert_parallelism_matches_ragged_dot(monkeypatch):
    """The Pallas megablox kernel (`moe_matmul="megablox"`, run by the Pallas interpreter here: it
    is a TPU kernel) inside the expert-parallel `shard_map` (expert × fsdp × tensor = 2 × 2 × 2)
    gives the experts' output and the gradients of every input that `jax.lax.ragged_dot` gives on
    one device. It needs `check_vma=False` (its pallas_call output has no varying-axes type) and
    the rows past the groups zeroed (the kernel leaves them unwritten: NaN in the interpreter, in
    the output and in the input gradient)."""
    monkeypatch.setattr(moe, "_MEGABLOX_INTERPRET", True)
    B, T, D, E, F, K = 8, 16, 128, 8, 128, 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    weights, experts, _, _ = moe.route(jnp.asarray(rng.normal(size=(B * T, E))), K, True, jnp.float32)
    kernels = [jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32) for shape in ((E, D, F),) * 2 + ((E, F, D),)]

    def loss(implementation, x, weights, *kernels):
        y = moe.sparse_mlp(x, weights, experts.reshape(B, T, K), *kernels, implementation=implementation)
        return jnp.sum(jnp.sin(y))

    args = (x, weights.reshape(B, T, K), *kernels)
    argnums = tuple(range(len(args)))
    value, grads = jax.value_and_grad(functools.partial(loss, "ragged_dot"), argnums)(*args)
    with sharding.mesh_context(sharding.make_mesh(1, 2, 2, expert=2)):
        value_mb, grads_mb = jax.jit(jax.value_and_grad(functools.partial(loss, "megablox"), argnums))(*args)
    np.testing.assert_allclose(float(value_mb), float(value), rtol=1e-5)
    for name, g, g_mb in zip(("x", "weights", "gate", "up", "down"), grads, grads_mb):
        np.testing.assert_allclose(np.asarray(g_mb), np.asarray(g), atol=1e-5 * float(np.abs(g).max()), err_msg=name)


def sampler_routing(model, tokens, mask, prompt_len):
    """What the sampler records for rows `tokens` (prompt left-padded to `prompt_len`, then the
    completion): the prefill of the prompts, then one decode step per token, with
    `record_routing`; assembled into the rollout layout by `moe.rollout_routing`. Also the
    decode steps' logprobs of the completion tokens [B, N] (the sampler's logprobs)."""
    B, T = tokens.shape
    weights = decoding.gather_weights(model)
    P = prompt_len
    keys, values, prompt_routing = jax.jit(functools.partial(decoding.prefill, record_routing=True))(
        weights, tokens[:, : P - 1], mask[:, : P - 1])
    cache = decoding.init_slot_cache(model.config, B, T)
    write = lambda old, new: old.at[:, :, : P - 1].set(new)  # noqa: E731
    cache = decoding.SlotCache(k=tuple(map(write, cache.k, keys)), v=tuple(map(write, cache.v, values)))
    positions = default_positions(mask)
    steps, logps = [], []
    step = jax.jit(functools.partial(decoding.decode_step, implementation="einsum", record_routing=True))
    for t in range(P - 1, T - 1):
        logits, cache, experts = step(weights, tokens[:, t], cache, positions[:, t])
        steps.append(experts)
        logps.append(jax.nn.log_softmax(logits)[jnp.arange(B), tokens[:, t + 1]])
    steps = jnp.stack(steps, axis=1)  # [B, N, L, k]: the last completion token is never fed
    return moe.rollout_routing(prompt_routing, mask[:, :P], steps), jnp.stack(logps, axis=1)


@functools.partial(nnx.jit, static_argnames=("num_completion", "return_moe"))
def logprobs(model, tokens, mask, routing=None, *, num_completion, return_moe=False):
    return sequence_logprobs(model, tokens, mask, num_completion=num_completion, routing=routing,
                             return_moe=return_moe)


def perturbed(model, scale, seed=1):
    """A copy of `model` whose routers moved by `scale` × their own RMS (noise)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)
    router = state["blocks"]["mlp"]["router_kernel"]
    noise = jax.random.normal(jax.random.PRNGKey(seed), router.shape)
    router[...] = router[...] + scale * jnp.sqrt(jnp.mean(router[...] ** 2)) * noise
    return nnx.merge(graphdef, state)


def test_replay_restores_the_samplers_logprobs(tmp_path):
    """The learner's router is perturbed away from the sampler's: recomputed routing then differs
    from the sampler's on many tokens and the logprobs drift; replaying the sampler's recorded
    experts puts the learner back on the sampler's logprobs (top-1 routing with normalised
    weights, so the expert choice is the only thing the router decides)."""
    directory = hf_fixtures.build_checkpoint("qwen3_moe", tmp_path, tokenizer=False, num_experts_per_tok=1)
    sampler_model = from_pretrained(directory)
    P = 6
    tokens, mask = tokens_and_mask(T=14, pad=(0, 3))
    routing, sampler_logp = sampler_routing(sampler_model, tokens, mask, P)
    # Recorded routing is the model's own choice: replaying it changes nothing.
    own = logprobs(sampler_model, tokens, mask, num_completion=14 - P)[0]
    replayed = logprobs(sampler_model, tokens, mask, routing, num_completion=14 - P)[0]
    np.testing.assert_allclose(np.asarray(replayed), np.asarray(own), atol=1e-5)
    np.testing.assert_allclose(np.asarray(own), np.asarray(sampler_logp), atol=1e-4)

    learner = perturbed(sampler_model, 0.5)
    recomputed, _, stats = logprobs(learner, tokens, mask, num_completion=14 - P, return_moe=True)
    replay, _, replay_stats = logprobs(learner, tokens, mask, routing, num_completion=14 - P, return_moe=True)
    token_flips, layer_flips = moe.routing_flips(stats.experts_BxTxLxK, routing, mask)
    assert float(token_flips) > 0.2 and 0 < float(layer_flips) <= float(token_flips)
    # The learner's own choice is reported under replay too (layer 0: the same input either way).
    np.testing.assert_array_equal(np.asarray(replay_stats.experts_BxTxLxK[:, :, 0]),
                                  np.asarray(stats.experts_BxTxLxK[:, :, 0]))
    gap_recompute = np.abs(np.asarray(recomputed - sampler_logp)).max()
    gap_replay = np.abs(np.asarray(replay - sampler_logp)).max()
    assert gap_recompute > 1e-2, gap_recompute
    assert gap_replay < 1e-4, gap_replay


def test_rollout_routing_layout():
    """Prompt routing (left-aligned prefill columns) and decode-step routing land in the rollout's
    [prompt bucket + completion] columns; unrecorded places are -1."""
    B, P, N, L, K = 2, 5, 3, 1, 1
    prompt_mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    prefill = jnp.arange(B * (P - 1)).reshape(B, P - 1, L, K) + 100  # row b, column c: 100 + 4b + c
    steps = jnp.arange(B * N).reshape(B, N, L, K) + 200  # row b, step s: 200 + 3b + s
    got = np.asarray(moe.rollout_routing(prefill, prompt_mask, steps))[..., 0, 0]
    np.testing.assert_array_equal(got, [[100, 101, 102, 103, 200, 201, 202, -1],
                                        [-1, -1, 104, 105, 203, 204, 205, -1]])


def test_packed_logprobs_with_replay_equal_unpacked(checkpoint):
    model = from_pretrained(checkpoint)
    P, N = 6, 6
    tokens, mask = tokens_and_mask(B=4, T=P + N, pad=(0, 3, 1, 4))
    completion = np.array([6, 2, 4, 1])
    mask = mask.at[:, P:].set(jnp.asarray(np.arange(N)[None] < completion[:, None], jnp.int32))
    routing = perturbed(model, 1.0).hidden_with_moe(tokens, mask_BxT=mask)[1].experts_BxTxLxK
    plan = packing.plan(np.asarray(mask[:, :P]).sum(1), completion, np.arange(4), prompt_width=P,
                        completion_width=N, granule=1, max_rows=4)
    assert plan.shape[0] < 4  # sequences share rows
    ref, _ = sequence_logprobs(model, tokens, mask, num_completion=N, routing=routing)
    packed, _ = packed_logprobs(
        model, packing.pack_rows(tokens, plan.token_src_RxW), jnp.asarray(plan.segment_RxW),
        jnp.asarray(plan.positions_RxW), jnp.asarray(plan.comp_col_RxN), jnp.asarray(plan.comp_mask_RxN),
        routing=packing.pack_rows(routing, plan.token_src_RxW))
    unpacked = packing.unpack_completion(packed, jnp.asarray(plan.unpack_SxN), mask[:, P:])
    np.testing.assert_allclose(np.asarray(unpacked), np.asarray(ref * mask[:, P:]), atol=1e-5)


def test_sampler_runs_a_moe_policy(checkpoint):
    """`sampling.generate` on the MoE model; its logprobs are the trainer's recomputation."""
    model = from_pretrained(checkpoint)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    s = sampling.generate(model, prompts, max_new_tokens=6, temperature=1.0, eos_token_ids=2, seed=0, n=2)
    tokens = jnp.concatenate([s.prompt_tokens, s.tokens], axis=1)
    mask = jnp.concatenate([s.prompt_mask, s.mask], axis=1)
    logp, _ = sequence_logprobs(model, tokens, mask, num_completion=6)
    np.testing.assert_allclose(np.asarray(s.logprobs), np.asarray(logp * s.mask), atol=1e-4)


def test_adapters_on_attention_and_not_on_experts(checkpoint):
    """LoRA on q/k/v/o of a MoE model: a fresh adapter changes nothing, a trained one does, and
    merging it gives the adapted logits; adapters on the (absent) dense MLP are refused."""
    model = from_pretrained(checkpoint)
    tokens, mask = tokens_and_mask()
    adapted = lora.adapt(model, rank=4, alpha=8.0, targets=("q", "k", "v", "o"))
    np.testing.assert_allclose(np.asarray(adapted(tokens, mask_BxT=mask)), np.asarray(model(tokens, mask_BxT=mask)),
                               atol=1e-6)
    graphdef, adapters, frozen = lora.split(adapted)
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)
    moved = nnx.merge(graphdef, adapters, frozen)
    logits = moved(tokens, mask_BxT=mask)
    assert float(jnp.abs(logits - model(tokens, mask_BxT=mask)).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(lora.merge(moved)(tokens, mask_BxT=mask)), np.asarray(logits), atol=1e-4)
    with pytest.raises(ValueError, match="experts"):
        lora.adapt(model, rank=4, alpha=8.0, targets=("q", "gate"))


def test_sampler_records_the_routing_it_ran(checkpoint):
    """`generate(record_routing=True)`: replaying `Samples.routing` in the trainer's forward gives
    the sampler's logprobs, and the recorded experts are the trainer's own top k on every real
    token that was fed (same weights); the last completion token and padding stay -1."""
    model = from_pretrained(checkpoint)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    s = sampling.generate(model, prompts, max_new_tokens=6, temperature=1.0, eos_token_ids=2, seed=0, n=2,
                          record_routing=True)
    tokens = jnp.concatenate([s.prompt_tokens, s.tokens], axis=1)
    mask = jnp.concatenate([s.prompt_mask, s.mask], axis=1)
    P = s.prompt_tokens.shape[1]
    assert s.routing.shape == (4, P + 6, model.config.num_layers, 2) and s.routing.dtype == jnp.int16
    _, stats = model.hidden_with_moe(tokens, mask_BxT=mask)
    routing, own = np.asarray(s.routing), np.asarray(stats.experts_BxTxLxK)
    fed = np.asarray(mask).astype(bool)
    fed[np.arange(4), P + np.asarray(s.lengths) - 1] = False  # the last token is never fed
    np.testing.assert_array_equal(np.sort(routing[fed], -1), np.sort(own[fed], -1))
    assert np.all(routing[~fed] == -1)
    logp, _ = logprobs(model, tokens, mask, s.routing, num_completion=6)
    np.testing.assert_allclose(np.asarray(s.logprobs), np.asarray(logp * s.mask), atol=1e-4)


# ---------------------------------------------------------------- in the trainer


def _moe_config(**overrides):
    from tests.fixtures.runs import tiny

    base = dict(model__tiny__num_experts=4, model__tiny__num_experts_per_tok=2,
                model__tiny__moe_intermediate_size=32)
    return tiny(**{**base, **overrides})


@pytest.mark.parametrize("pack", [False, True])
def test_trainer_replays_the_samplers_routing_with_the_aux_loss(tmp_path, pack):
    """A tiny MoE policy through the trainer's parts with routing replay and the load-balancing
    loss, off policy (2 epochs × 2 minibatches, packed or not): the rollout carries the sampler's
    routing, prepare reports the replay metrics, the updates run and report the aux loss. Sampler
    and learner share the weights and float32 numerics here, so they route alike (no flips) and
    their logprobs agree with and without replay."""
    from tests.fixtures.runs import build_parts

    config = _moe_config(model__moe_routing="replay", rl__moe_aux_loss_coef=0.01, rl__num_epochs=2,
                         rl__num_minibatches=2, rl__pack=pack)
    parts, state, prompts = build_parts(tmp_path, config, jax.devices()[:1])
    _, sample_key = parts.learner.split_rng(state["rng"])
    rollout = parts.rollout(state, prompts, sample_key)
    batch = rollout.batch
    assert batch.routing.shape == (*batch.tokens.shape, 2, 2)
    metrics = jax.device_get(rollout.device_metrics)
    assert metrics["moe_routing_flip_frac"] < 0.02 and metrics["moe_routing_flip_frac_layer"] < 0.02
    assert metrics["sampler_logprob_gap"] < 1e-4 and metrics["moe_sampler_logprob_gap_recompute"] < 1e-3
    state, update_metrics = parts.learner.learn(state, batch, rollout.lengths_Bx2, 0)
    aux = [float(m["moe_aux_loss"]) for m in jax.device_get(update_metrics)]
    # E · Σ_e f_e P_e is 1 for a uniform router and at most E = 4.
    assert len(aux) == 4 and all(0.9 < a < 4.0 for a in aux), aux
    assert int(jax.device_get(state["updates"])) == 4


def test_aux_loss_coefficient_adds_its_term_to_the_update_loss(tmp_path):
    """The update's loss with rl.moe_aux_loss_coef = c is the loss at 0 plus c × the reported
    load-balancing loss (one micro-batch), and the router's gradient changes with it."""
    import optax

    from cfpo_jax import learner
    from tests.fixtures.runs import build_parts

    config = _moe_config(rl__num_epochs=2, rl__pack=False)
    parts, state, prompts = build_parts(tmp_path, config, jax.devices()[:1])
    _, sample_key = parts.learner.split_rng(state["rng"])
    batch = parts.rollout(state, prompts, sample_key).batch
    tx = optax.sgd(1.0)
    results = {}
    for coef in (0.0, 0.5):
        rl = config.rl.copy_and_resolve_references()
        rl.moe_aux_loss_coef = coef
        update = jax.jit(learner.make_update(parts.policy.graphdef, tx, lambda _: 1.0, rl, temperature=1.0,
                                             max_len=3, micro_batch_size=0, packed=False))
        start = dict(state, opt_state=tx.init(state["params"]))
        new_state, metrics = update(start, parts.policy.frozen, batch)
        results[coef] = jax.device_get((metrics, new_state["params"]["blocks"]["mlp"]["router_kernel"]))
    (m0, router0), (m1, router1) = results[0.0], results[0.5]
    np.testing.assert_allclose(m1["loss"] - m0["loss"], 0.5 * m1["moe_aux_loss"], rtol=1e-4)
    assert np.abs(np.asarray(router1) - np.asarray(router0)).max() > 1e-6


def test_config_checks_name_each_bad_moe_value():
    from cfpo_jax import config as config_lib

    config = config_lib.base_config()
    config.model.path = "tiny"
    config.model.moe_routing = "sometimes"
    config.model.moe_matmul = "dense"
    config.mesh.expert = 0
    config.rl.moe_aux_loss_coef = -0.1
    config.model.tiny.num_experts = 4
    config.model.tiny.num_experts_per_tok = 5
    with pytest.raises(ValueError) as error:
        config_lib.validate(config)
    for expected in ("model.moe_routing='sometimes'", "['recompute', 'replay']", "model.moe_matmul='dense'",
                     "mesh.expert must be >= 1", "rl.moe_aux_loss_coef must be >= 0", "num_experts_per_tok"):
        assert expected in str(error.value), expected
    dense = config_lib.base_config()
    dense.model.path = "tiny"
    dense.model.moe_routing = "replay"
    with pytest.raises(ValueError, match="need a mixture-of-experts model"):
        config_lib.validate(dense)


@pytest.mark.slow  # about 1 minute of CPU: two RL steps of the trainer
def test_lora_training_on_a_moe_moves_only_the_adapters(tmp_path):
    """LoRA (q, k, v, o; the experts and the router have no adapters) on a tiny MoE policy with
    routing replay, two off-policy RL steps through the trainer's parts: the state holds only the
    adapters, they move, and every base parameter — experts and router included — is bit-identical
    afterwards."""
    from tests.fixtures.runs import build_parts, train_steps

    config = _moe_config(lora__rank=4, lora__alpha=8.0, lora__targets=("q", "k", "v", "o"),
                         model__moe_routing="replay", rl__num_epochs=2)
    parts, state, prompts = build_parts(tmp_path, config, jax.devices()[:1])
    paths = ["/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
             for path, _ in jax.tree_util.tree_leaves_with_path(state["params"])]
    assert paths and all("_lora_" in p for p in paths) and not any("expert" in p or "router" in p for p in paths)
    frozen_before = jax.device_get(parts.policy.frozen)
    assert {"expert_gate_kernel", "router_kernel"} <= set(frozen_before["blocks"]["mlp"])
    adapters_before = jax.device_get(state["params"])
    state = train_steps(parts, state, prompts, 2)
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(parts.policy.frozen))):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(adapters_before)))
    assert moved > 0
