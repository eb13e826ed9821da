"""Top-p (nucleus) without sorting the vocabulary: `sampling.nucleus` against a numpy top-p that
sorts the whole row in float64 (ties by lower index first), on both of its ways of finding the
threshold (the sorted top candidates, the bisection), with ties at the cutoff, nuclei larger than
the candidates, and the draws of `sampling.sample` against numpy's inverse CDF at the same uniforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfpo_jax import sampling


def numpy_top_p(logits_BxV, top_p):
    """Sort each row (highest first, ties by lower index), keep an entry while the mass before it
    is short of top_p; float64. Also returns the entries whose mass before is within 1e-5 of
    top_p (where float32 rounding may decide)."""
    keep = np.zeros(logits_BxV.shape, bool)
    close = np.zeros(logits_BxV.shape, bool)
    for b, row in enumerate(logits_BxV.astype(np.float64)):
        row = np.where(np.isnan(row), -np.inf, row)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = np.argsort(-row, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        keep[b, order[before < top_p]] = True
        close[b, order[np.abs(before - top_p) < 1e-5]] = True
    return keep, close


def nucleus(logits_BxV, top_p):
    logits = jnp.asarray(logits_BxV)
    # Traced afresh, so a patched _TOP_P_CANDIDATES takes effect.
    return np.asarray(jax.jit(lambda x: sampling.nucleus(x, jax.nn.logsumexp(x, axis=-1), top_p))(logits))


def rows(vocab=1000, seed=0):
    """Peaked rows (nucleus of a few entries), flat rows (hundreds: more than 256 candidates), and
    rows with ties at the top-p cutoff, among them ties that straddle the 256th candidate."""
    rng = np.random.default_rng(seed)
    peaked = rng.normal(0, 4, (6, vocab))
    flat = rng.normal(0, 0.3, (6, vocab))
    # [0.4, 0.15 × 4] in mass at top_p 0.6: two of the four tied entries stay, the lower indices.
    tied = np.full((1, vocab), -np.inf)
    tied[0, [500, 17, 900, 3, 250]] = np.log([0.4, 0.15, 0.15, 0.15, 0.15])
    # 300 equal entries holding most of the mass: the cutoff falls among them, past candidate 256.
    wide_tie = rng.normal(-3, 0.5, (1, vocab))
    wide_tie[0, rng.choice(vocab, 300, replace=False)] = 2.0
    # Every entry equal: the first ceil(top_p · V) entries by index.
    uniform = np.zeros((1, vocab))
    masked = rng.normal(0, 2, (1, vocab))
    masked[0, 100:400] = -np.inf
    return np.concatenate([peaked, flat, tied, wide_tie, uniform, masked]).astype(np.float32)


@pytest.mark.parametrize("candidates", [1, 256, 1000], ids=["bisection", "default", "whole-row"])
@pytest.mark.parametrize("top_p", [0.6, 0.999])
def test_nucleus_is_numpy_top_p(monkeypatch, candidates, top_p):
    """1 candidate: nearly every batch falls back to the bisection; 1000 = V: the sorted
    candidates always cover the nucleus; 256: the default, both ways within one batch."""
    monkeypatch.setattr(sampling, "_TOP_P_CANDIDATES", candidates)
    logits = rows()
    expected, close = numpy_top_p(logits, top_p)
    ours = nucleus(logits, top_p)
    np.testing.assert_array_equal(ours[~close], expected[~close])
    assert close.sum() < 0.02 * expected.sum()
    sizes = expected.sum(-1)
    assert sizes.min() <= 5 and sizes.max() > 256  # both kinds of rows are there


def test_ties_at_the_cutoff_keep_the_lower_indices():
    keep = nucleus(rows()[12:13], 0.6)[0]
    assert sorted(np.flatnonzero(keep)) == [3, 17, 500]  # 0.4 (index 500), then the ties 3 and 17
    zeros = np.zeros((1, 1000), np.float32)
    zeros[0, ::2] = -0.0  # the two zeros tie
    uniform = nucleus(zeros, 0.5)[0]
    assert np.flatnonzero(uniform).tolist() == list(range(500))  # before < 0.5: the first 500


def test_a_row_keeps_its_set_whichever_rows_share_its_batch():
    """A peaked row alone (its nucleus within the candidates) and beside a flat row (which sends the
    batch to the bisection) gets the same set, and so the same token at the same key."""
    logits = rows()
    peaked, flat, tied = logits[0:1], logits[6:7], logits[12:13]
    alone = nucleus(np.concatenate([peaked, tied]), 0.9)
    beside = nucleus(np.concatenate([peaked, tied, flat]), 0.9)
    np.testing.assert_array_equal(alone, beside[:2])
    draw = jax.jit(lambda x, k: sampling.sample(x, k, temperature=1.0, top_p=0.9))
    keys = jax.random.split(jax.random.key(3), 3)
    alone_tokens, alone_logprobs = draw(jnp.asarray(np.concatenate([peaked, tied])), keys[:2])
    beside_tokens, beside_logprobs = draw(jnp.asarray(np.concatenate([peaked, tied, flat])), keys)
    np.testing.assert_array_equal(alone_tokens, beside_tokens[:2])
    np.testing.assert_array_equal(alone_logprobs, beside_logprobs[:2])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_p_draws_what_numpy_draws_at_the_same_uniforms(temperature):
    """Row b's token is numpy's searchsorted of the renormalised nucleus CDF (index order) at the
    uniform that row b's key gives; the logprob is under the unrestricted softmax."""
    base = rows()
    logits = np.repeat(base, 64, axis=0)
    keys = jax.random.split(jax.random.key(5), len(logits))
    tokens, logprobs = map(np.asarray, jax.jit(
        lambda x, k: sampling.sample(x, k, temperature=temperature, top_p=0.9))(jnp.asarray(logits), keys))
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys), np.float64)
    scaled = logits.astype(np.float64) / temperature
    keep, close = numpy_top_p(scaled, 0.9)
    probs = np.where(keep, np.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    expected = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u)])
    near = np.abs(cdf[np.arange(len(u)), np.minimum(expected, cdf.shape[1] - 1)] - u) < 1e-5
    near |= np.abs(cdf[np.arange(len(u)), np.maximum(expected - 1, 0)] - u) < 1e-5
    near |= close.any(-1)
    assert (~near).sum() > 0.85 * len(u)  # (the uniform row sits on a boundary at 0.9: excluded)
    np.testing.assert_array_equal(tokens[~near], expected[~near])
    assert keep[np.arange(len(u)), tokens].all()
    log_softmax = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - scaled.max(-1, keepdims=True)
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(len(u)), tokens], atol=1e-5)


def test_nan_logits_give_a_token_in_the_vocabulary():
    logits = np.full((2, 300), np.nan, np.float32)
    logits[1, :5] = 1.0
    tokens, _ = jax.jit(lambda x, k: sampling.sample(x, k, temperature=1.0, top_p=0.9))(
        jnp.asarray(logits), jax.random.split(jax.random.key(0), 2))
    tokens = np.asarray(tokens)
    assert ((0 <= tokens) & (tokens < 300)).all() and tokens[1] < 5
