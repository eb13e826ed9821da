"""The decoder against transformers' PyTorch implementation (the independent reference)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures
from cfpo_jax.models import (
    ModelConfig,
    Transformer,
    default_positions,
    from_pretrained,
    init_cache,
    save_pretrained,
    sequence_logprobs,
)

FAMILIES = ("qwen2", "qwen3", "llama")
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


def test_kv_cache_prefill_then_decode_matches_transformers(checkpoint):
    """Prefill a left-padded prompt, then decode one token at a time into a cache with spare slots;
    every step's logits equal the reference full forward over the whole sequence."""
    _, directory, ref = checkpoint
    model = from_pretrained(directory)
    P, N, spare = 8, 5, 3
    tokens, mask = batch(T=P + N, pad=(0, 3))
    expected = hf_fixtures.reference_logits(ref, tokens, mask)
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    kv_mask = np.zeros((2, P + N + spare), np.int32)
    kv_mask[:, :P] = mask[:, :P]
    cache = init_cache(model.config, 2, P + N + spare)
    step = nnx.jit(lambda m, t, p, c, k, i: m.forward_cached(t, p, c, k, i))
    logits, cache = step(model, tokens[:, :P], positions[:, :P], cache, kv_mask, jnp.int32(0))
    assert_close_logits(logits, expected[:, :P], mask[:, :P])
    for i in range(P, P + N):
        kv_mask[:, i] = 1
        logits, cache = step(model, tokens[:, i : i + 1], positions[:, i : i + 1], cache, kv_mask, jnp.int32(i))
        assert_close_logits(logits, expected[:, i : i + 1])
    assert cache.k.shape == (model.config.num_layers, 2, P + N + spare, model.config.num_kv_heads, model.config.head_dim)
    np.testing.assert_array_equal(np.asarray(cache.k[:, :, P + N :]), 0.0)
