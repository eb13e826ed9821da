"""Per-token log-probabilities and entropies of a sequence under the model, chunked over time.

The trainer scores rollouts with this (old, current and reference log-probs), so it must match
what the sampler drew from: float32 log softmax(logits / temperature). The final hidden states are
computed once; the unembedding, log-softmax and entropy then run chunk by chunk
(`unembed_logprobs`), so the float32 [B, T, V] logits never exist at once (only [B, chunk, V]),
in the backward pass either: a custom VJP recomputes each chunk's logits and turns them straight
into the gradients of the hidden states and of the unembedding matrix, the target's one-hot part
as a gather and a segment sum of B·T weight rows. Autodiff of the plain formula would keep every
chunk's logits for the backward pass and scatter the gathered target log-probs back into a
[B, T, V] zero tensor (on 2 CPU cores, vocabulary 4k, 64 rows of 48 tokens: the whole policy
update took 0.90 s of CPU time that way and takes 0.60 s this way; benchmarks/README.md,
vs_tunix). With `num_completion=N` only the last N columns (the completion of a prompt +
completion row) are unembedded: the prompt columns cost no vocabulary work, which is half of it
when prompt and response budgets are equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sequence_logprobs(model, tokens_BxT, mask_BxT, *, temperature: float = 1.0, chunk_size: int = 256,
                      num_completion: int | None = None):
    """(logp, entropy), float32, [B, T]; or [B, N] for the last N = `num_completion` columns.

    logp[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]] and entropy[:, t] is the
    entropy (nats) of that same predicting distribution. Both are 0 where there is no real
    predicting token: t = 0, padding (mask 0), and the first real token of a left-padded row.
    """
    B, T = tokens_BxT.shape
    N = T if num_completion is None else num_completion
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for logprobs; got {temperature}")
    if not 1 <= N <= T:
        raise ValueError(f"num_completion must be in [1, {T}] (the sequence length); got {num_completion}")
    mask_BxT = mask_BxT.astype(jnp.int32)
    hidden_BxTxD = model.hidden(tokens_BxT, mask_BxT=mask_BxT)
    # Column t is scored from the hidden state at t - 1; column 0 gets a dummy that is masked below.
    pred_BxNxD = jnp.concatenate([hidden_BxTxD[:, :1], hidden_BxTxD[:, :-1]], axis=1)[:, T - N:]
    logp_BxN, entropy_BxN = unembed_logprobs(pred_BxNxD, _unembedding_VxD(model), tokens_BxT[:, T - N:],
                                             temperature, min(chunk_size, N))
    prev_mask_BxT = jnp.pad(mask_BxT[:, :-1], ((0, 0), (1, 0)))
    valid_BxN = ((mask_BxT != 0) & (prev_mask_BxT != 0))[:, T - N:]
    return jnp.where(valid_BxN, logp_BxN, 0.0), jnp.where(valid_BxN, entropy_BxN, 0.0)


def _unembedding_VxD(model):
    """The matrix `model.unembed` multiplies by, as [V, D] (tied: the embedding; else lm_head.T)."""
    if model.config.tie_embeddings:
        return model.embedding[...]
    return model.lm_head[...].T


def _to_chunks(x_BxN, chunk):
    """[B, N, ...] → [M, B, chunk, ...], N zero-padded to M · chunk."""
    B, N = x_BxN.shape[:2]
    M = -(-N // chunk)
    x_BxN = jnp.pad(x_BxN, [(0, 0), (0, M * chunk - N)] + [(0, 0)] * (x_BxN.ndim - 2))
    return jnp.swapaxes(x_BxN.reshape(B, M, chunk, *x_BxN.shape[2:]), 0, 1)


def _from_chunks(x_MxBxC, N):
    M, B, C = x_MxBxC.shape[:3]
    return jnp.swapaxes(x_MxBxC, 0, 1).reshape(B, M * C, *x_MxBxC.shape[3:])[:, :N]


def _scaled_logits(hidden_BxCxD, weight_VxD, temperature):
    # As `Transformer.unembed`: the weight in the compute dtype, float32 accumulation.
    weight = weight_VxD.astype(hidden_BxCxD.dtype)
    return jnp.einsum("bcd,vd->bcv", hidden_BxCxD, weight, preferred_element_type=jnp.float32) / temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def unembed_logprobs(hidden_BxNxD, weight_VxD, targets_BxN, temperature: float, chunk_size: int):
    """(logp_BxN, entropy_BxN), float32, of z = hidden @ weight.T / temperature: log softmax(z) at
    the targets and the entropy of softmax(z), `chunk_size` columns at a time in both passes.

    Differentiable in `hidden_BxNxD` and `weight_VxD` (through both outputs); `targets_BxN` are
    int token ids in [0, V).
    """
    return _unembed_logprobs_fwd(hidden_BxNxD, weight_VxD, targets_BxN, temperature, chunk_size)[0]


def _unembed_logprobs_fwd(hidden_BxNxD, weight_VxD, targets_BxN, temperature, chunk_size):
    N = hidden_BxNxD.shape[1]

    def chunk(_, xs):
        hidden_BxCxD, targets_BxC = xs
        z_BxCxV = _scaled_logits(hidden_BxCxD, weight_VxD, temperature)
        lse_BxC = jax.nn.logsumexp(z_BxCxV, axis=-1)
        target_BxC = jnp.take_along_axis(z_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
        mean_z_BxC = jnp.sum(jnp.exp(z_BxCxV - lse_BxC[..., None]) * z_BxCxV, axis=-1)  # E_p[z]
        return None, (target_BxC - lse_BxC, lse_BxC - mean_z_BxC, lse_BxC, mean_z_BxC)

    xs = (_to_chunks(hidden_BxNxD, chunk_size), _to_chunks(targets_BxN, chunk_size))
    _, outs = jax.lax.scan(chunk, None, xs)
    logp_BxN, entropy_BxN, lse_BxN, mean_z_BxN = (_from_chunks(x, N) for x in outs)
    return (logp_BxN, entropy_BxN), (hidden_BxNxD, weight_VxD, targets_BxN, lse_BxN, mean_z_BxN)


def _unembed_logprobs_bwd(temperature, chunk_size, residuals, cotangents):
    hidden_BxNxD, weight_VxD, targets_BxN, lse_BxN, mean_z_BxN = residuals
    g_logp_BxN, g_entropy_BxN = cotangents
    N, dtype = hidden_BxNxD.shape[1], hidden_BxNxD.dtype
    weight = weight_VxD.astype(dtype)

    def chunk(g_weight_VxD, xs):
        hidden_BxCxD, targets_BxC, lse_BxC, mean_z_BxC, g_logp_BxC, g_entropy_BxC = xs
        z_BxCxV = _scaled_logits(hidden_BxCxD, weight_VxD, temperature)
        # d logp / dz = onehot(target) − p;  d entropy / dz = −p · (z − E_p[z]). The dense −p·(…)
        # part goes through the matmuls; the one-hot part only touches the target rows of the
        # weight, so it is a gather (hidden) and a segment sum (weight) of B·C rows.
        g_dense_BxCxV = -jnp.exp(z_BxCxV - lse_BxC[..., None]) * (
            g_logp_BxC[..., None] + g_entropy_BxC[..., None] * (z_BxCxV - mean_z_BxC[..., None]))
        g_dense_BxCxV = (g_dense_BxCxV / temperature).astype(dtype)
        g_target_BxC = g_logp_BxC / temperature
        g_hidden_BxCxD = (jnp.einsum("bcv,vd->bcd", g_dense_BxCxV, weight, preferred_element_type=jnp.float32)
                          + g_target_BxC[..., None] * jnp.take(weight, targets_BxC, axis=0).astype(jnp.float32))
        g_weight_VxD = g_weight_VxD + jnp.einsum("bcv,bcd->vd", g_dense_BxCxV, hidden_BxCxD,
                                                 preferred_element_type=jnp.float32)
        g_weight_VxD = g_weight_VxD.at[targets_BxC.reshape(-1)].add(
            (g_target_BxC[..., None] * hidden_BxCxD.astype(jnp.float32)).reshape(-1, hidden_BxCxD.shape[-1]))
        return g_weight_VxD, g_hidden_BxCxD.astype(dtype)

    xs = tuple(_to_chunks(x, chunk_size) for x in (hidden_BxNxD, targets_BxN, lse_BxN, mean_z_BxN,
                                                   g_logp_BxN, g_entropy_BxN))
    g_weight_VxD, g_hidden_MxBxCxD = jax.lax.scan(chunk, jnp.zeros(weight_VxD.shape, jnp.float32), xs)
    return _from_chunks(g_hidden_MxBxCxD, N), g_weight_VxD.astype(weight_VxD.dtype), None


unembed_logprobs.defvjp(_unembed_logprobs_fwd, _unembed_logprobs_bwd)
