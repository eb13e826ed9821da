"""Per-token log-probabilities and entropies of a sequence under the model, chunked over time.

The trainer scores rollouts with this (old, current and reference log-probs), so it must match
what the sampler drew from: float32 log softmax(logits / temperature). The final hidden states are
computed once; the unembedding, log-softmax and entropy then run chunk by chunk under `lax.map`,
so the float32 [B, T, V] logits never exist at once (only [B, chunk, V]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfpo_jax.losses import entropy, token_logprobs


def sequence_logprobs(model, tokens_BxT, mask_BxT, *, temperature: float = 1.0, chunk_size: int = 256):
    """(logp_BxT, entropy_BxT), float32.

    logp[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]] and entropy[:, t] is the
    entropy (nats) of that same predicting distribution. Both are 0 where there is no real
    predicting token: t = 0, padding (mask 0), and the first real token of a left-padded row.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    B, T = tokens_BxT.shape
    mask_BxT = mask_BxT.astype(jnp.int32)
    hidden_BxTxD = model.hidden(tokens_BxT, mask_BxT=mask_BxT)
    # Row t is scored from the hidden state at t - 1; row 0 gets a dummy that is masked below.
    pred_BxTxD = jnp.concatenate([hidden_BxTxD[:, :1], hidden_BxTxD[:, :-1]], axis=1)
    chunk = min(chunk_size, T)
    num_chunks = -(-T // chunk)
    pad = num_chunks * chunk - T
    pred_BxTxD = jnp.pad(pred_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(tokens_BxT, ((0, 0), (0, pad)))
    pred_NxBxCxD = pred_BxTxD.reshape(B, num_chunks, chunk, -1).swapaxes(0, 1)
    targets_NxBxC = targets_BxT.reshape(B, num_chunks, chunk).swapaxes(0, 1)

    def score(args):
        pred_BxCxD, targets_BxC = args
        logits_BxCxV = model.unembed(pred_BxCxD)
        return (
            token_logprobs(logits_BxCxV, targets_BxC, temperature),
            entropy(logits_BxCxV / temperature),
        )

    logp_NxBxC, entropy_NxBxC = jax.lax.map(score, (pred_NxBxCxD, targets_NxBxC))
    logp_BxT = logp_NxBxC.swapaxes(0, 1).reshape(B, -1)[:, :T]
    entropy_BxT = entropy_NxBxC.swapaxes(0, 1).reshape(B, -1)[:, :T]
    prev_mask_BxT = jnp.pad(mask_BxT[:, :-1], ((0, 0), (1, 0)))
    valid_BxT = (mask_BxT != 0) & (prev_mask_BxT != 0)
    return jnp.where(valid_BxT, logp_BxT, 0.0), jnp.where(valid_BxT, entropy_BxT, 0.0)
