"""Per-token log-probabilities and entropies of a sequence under the model, chunked over time.

The trainer scores rollouts with this (old, current and reference log-probs), so it must match
what the sampler drew from: float32 log softmax(logits / temperature). The final hidden states are
computed once; the unembedding, logsumexp and entropy then run chunk by chunk under `lax.map`,
so the float32 [B, T, V] logits never exist at once (only [B, chunk, V]); the target token's logit
comes from its own unembedding row (`Transformer.target_logits`), so no gradient of shape
[B, chunk, V] is scattered. With `num_completion=N`
only the last N columns (the completion of a prompt + completion row) are unembedded: the prompt
columns cost no vocabulary work, which is half of it when prompt and response budgets are equal.
`packed_logprobs` does the same for packed rows (`cfpo_jax.packing`): the completion tokens'
predicting hidden states are gathered into an [R, N] layout and only those are unembedded.

For a mixture-of-experts model both take `routing` (expert ids per token and layer, [B, T, L, k]
or packed [R, W, L, k]: replayed instead of the router's choice) and, with `return_moe=True`,
return the forward's `cfpo_jax.models.moe.MoEStats` (own routing, load-balancing loss) third.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfpo_jax.losses import token_logprobs_and_entropy


def _hidden(model, tokens_BxT, positions_BxT, mask_BxT, routing, return_moe):
    if routing is None and not return_moe:
        return model.hidden(tokens_BxT, positions_BxT=positions_BxT, mask_BxT=mask_BxT), None
    return model.hidden_with_moe(tokens_BxT, positions_BxT=positions_BxT, mask_BxT=mask_BxT,
                                 routing_BxTxLxK=routing)


def sequence_logprobs(model, tokens_BxT, mask_BxT, *, temperature: float = 1.0, chunk_size: int = 256,
                      num_completion: int | None = None, routing=None, return_moe: bool = False):
    """(logp, entropy), float32, [B, T]; or [B, N] for the last N = `num_completion` columns.

    logp[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]] and entropy[:, t] is the
    entropy (nats) of that same predicting distribution. Both are 0 where there is no real
    predicting token: t = 0, padding (mask 0), and the first real token of a left-padded row.
    """
    B, T = tokens_BxT.shape
    N = T if num_completion is None else num_completion
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if not 1 <= N <= T:
        raise ValueError(f"num_completion must be in [1, {T}] (the sequence length); got {num_completion}")
    mask_BxT = mask_BxT.astype(jnp.int32)
    hidden_BxTxD, moe_stats = _hidden(model, tokens_BxT, None, mask_BxT, routing, return_moe)
    # Column t is scored from the hidden state at t - 1; column 0 gets a dummy that is masked below.
    pred_BxNxD = jnp.concatenate([hidden_BxTxD[:, :1], hidden_BxTxD[:, :-1]], axis=1)[:, T - N:]
    logp_BxN, entropy_BxN = _score(model, pred_BxNxD, tokens_BxT[:, T - N:], temperature, chunk_size)
    prev_mask_BxT = jnp.pad(mask_BxT[:, :-1], ((0, 0), (1, 0)))
    valid_BxN = ((mask_BxT != 0) & (prev_mask_BxT != 0))[:, T - N:]
    out = jnp.where(valid_BxN, logp_BxN, 0.0), jnp.where(valid_BxN, entropy_BxN, 0.0)
    return (*out, moe_stats) if return_moe else out


def packed_logprobs(model, tokens_RxW, segment_RxW, positions_RxW, comp_col_RxN, comp_mask_RxN, *,
                    temperature: float = 1.0, chunk_size: int = 256, routing=None, return_moe: bool = False):
    """(logp, entropy), float32 [R, N], of the completion tokens of packed rows
    (`cfpo_jax.packing.Plan`): entry [r, j] scores the token at column comp_col_RxN[r, j] from
    the hidden state one column left (same sequence: the packer puts a prompt token first), and is
    0 where comp_mask_RxN is 0. Only these R·N positions are unembedded."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    hidden_RxWxD, moe_stats = _hidden(model, tokens_RxW, positions_RxW, segment_RxW, routing, return_moe)
    valid_RxN = comp_mask_RxN != 0
    pred_col_RxN = jnp.where(valid_RxN, comp_col_RxN - 1, 0)
    pred_RxNxD = jnp.take_along_axis(hidden_RxWxD, pred_col_RxN[:, :, None], axis=1)
    targets_RxN = jnp.take_along_axis(tokens_RxW, comp_col_RxN, axis=1)
    logp_RxN, entropy_RxN = _score(model, pred_RxNxD, targets_RxN, temperature, chunk_size)
    out = jnp.where(valid_RxN, logp_RxN, 0.0), jnp.where(valid_RxN, entropy_RxN, 0.0)
    return (*out, moe_stats) if return_moe else out


def _score(model, pred_BxNxD, targets_BxN, temperature, chunk_size):
    """(logp, entropy) [B, N] of `targets` under the logits of `pred`, N in chunks under lax.map."""
    B, N = targets_BxN.shape
    chunk = min(chunk_size, N)
    num_chunks = -(-N // chunk)
    pad = num_chunks * chunk - N
    pred_BxNxD = jnp.pad(pred_BxNxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxN = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
    pred_MxBxCxD = pred_BxNxD.reshape(B, num_chunks, chunk, -1).swapaxes(0, 1)
    targets_MxBxC = targets_BxN.reshape(B, num_chunks, chunk).swapaxes(0, 1)

    def score(args):
        pred_BxCxD, targets_BxC = args
        return token_logprobs_and_entropy(model.unembed(pred_BxCxD),
                                          model.target_logits(pred_BxCxD, targets_BxC), temperature)

    logp_MxBxC, entropy_MxBxC = jax.lax.map(score, (pred_MxBxCxD, targets_MxBxC))
    logp_BxN = logp_MxBxC.swapaxes(0, 1).reshape(B, -1)[:, :N]
    entropy_BxN = entropy_MxBxC.swapaxes(0, 1).reshape(B, -1)[:, :N]
    return logp_BxN, entropy_BxN
