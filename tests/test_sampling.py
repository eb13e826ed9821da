"""cfpo_jax.sampling.generate against transformers (greedy decoding, teacher-forced logprobs),
against numpy (top-k / top-p allowed sets on a fixed distribution), and against itself only for
invariances (seeds, batching, sharding, compile cache)."""

import functools

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cfpo_jax import sampling
from cfpo_jax.models import ModelConfig, from_pretrained, sequence_logprobs
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


def transformers_greedy(ref, prompts, max_new_tokens):
    """transformers' greedy generate on the left-padded batch, padded to max_new_tokens columns."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=EOS, pad_token_id=0,
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
    compiled = sampling._generate_jit._cache_size()
    samples = run(make_prompts((12, 10, 15)))
    assert samples.prompt_tokens.shape == (3, 16)
    assert sampling._generate_jit._cache_size() == compiled


def test_sharded_params_and_batch_give_the_unsharded_samples(checkpoint):
    directory, model, _ = checkpoint
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(directory, mesh=mesh)
    assert len(sharded.blocks.mlp.up_kernel[...].sharding.device_set) == 8
    prompts = make_prompts()  # 3 prompts: padded to 4 rows for the 4-way batch split
    plain = sampling.generate(model, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS)
    split = sampling.generate(sharded, prompts, max_new_tokens=NEW, temperature=0, eos_token_ids=EOS, mesh=mesh)
    np.testing.assert_array_equal(split.tokens, plain.tokens)
    np.testing.assert_allclose(split.logprobs, plain.logprobs, atol=1e-5)
    assert split.tokens.shape == (3, NEW)


# ----------------------------------------------------------------------------- a fixed distribution

PROBS = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.006, 0.004])
TRACED_SHAPES = []


class FixedLogits(nnx.Module):
    """Test double: the same next-token logits at every position; records the token shapes that
    `forward_cached` is traced with."""

    def __init__(self, logits_V):
        vocab = len(logits_V)
        self.config = ModelConfig(
            model_type="qwen2", vocab_size=vocab, hidden_size=8, intermediate_size=8, num_layers=1,
            num_heads=1, num_kv_heads=1, head_dim=4,
        )
        self.logits_V = nnx.Variable(jnp.asarray(logits_V, jnp.float32))

    def forward_cached(self, tokens_BxT, positions_BxT, cache, kv_mask_BxS, write_index):
        TRACED_SHAPES.append(tokens_BxT.shape)
        B, T = tokens_BxT.shape
        return jnp.broadcast_to(self.logits_V[...], (B, T, self.config.vocab_size)), cache


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


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.55), (0.7, 5, 0.75)]
)
def test_top_k_top_p_sample_only_the_allowed_set(temperature, top_k, top_p):
    expected, log_probs = allowed_distribution(temperature, top_k, top_p)
    model = FixedLogits(np.log(PROBS))
    s = sampling.generate(
        model, [[0]] * 512, max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=top_p, seed=11
    )
    tokens = np.asarray(s.tokens).ravel()
    assert set(tokens) == set(np.flatnonzero(expected)), (sorted(set(tokens)), np.flatnonzero(expected))
    freq = np.bincount(tokens, minlength=len(PROBS)) / tokens.size
    np.testing.assert_allclose(freq, expected, atol=0.03)
    # Logprobs are under the unrestricted softmax(logits / temperature): what the trainer recomputes.
    np.testing.assert_allclose(np.asarray(s.logprobs).ravel(), log_probs[tokens], atol=1e-5)


def test_n_samples_prefill_each_prompt_once():
    TRACED_SHAPES.clear()
    model = FixedLogits(np.log(PROBS))
    s = sampling.generate(model, [[3, 4], [5, 6, 7, 8]], max_new_tokens=5, n=3, seed=1)
    # Two prompts padded to 4: one prefill of 2 rows x 3 columns, then 6-row decode steps.
    assert set(TRACED_SHAPES) == {(2, 3), (6, 1)}
    assert s.tokens.shape == (6, 5)
    np.testing.assert_array_equal(s.prompt_tokens, np.repeat([[0, 0, 3, 4], [5, 6, 7, 8]], 3, axis=0))


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
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    model = FixedLogits(np.log(PROBS))
    with pytest.raises(ValueError, match=message):
        sampling.generate(model, [[1, 2]], **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="empty"):
        sampling.generate(model, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampling.generate(model, [[1, 99]], max_new_tokens=4)
