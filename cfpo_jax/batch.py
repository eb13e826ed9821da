"""The learner's typed batches: what `learner.make_update` and the logprob passes consume.

Two layouts, each its own pytree type, chosen when a program is built (`learner.make_update(...,
packed=...)`), never read off which fields a batch happens to carry:

* `Batch`, unpacked: one row per sequence, prompt bucket P (left-padded) then N completion
  columns — what a rollout is (`learner.make_prepare`) and what an unpacked minibatch is.
* `PackedBatch`: R rows of width W = P + N holding several sequences end to end
  (`packing.pack_minibatch`), the per-token arrays in the packed completion layout [R, N] with
  their sequence ids, one advantage per sequence [S].

The optional per-token arrays follow the config, not the data: `old_logp` off policy (the
recomputed logprobs of the policy that sampled), `sampler_logp` on policy (the sampler's own,
for the sampler-gap metric; the old logprobs are then the current ones, gradient stopped), and
`ref_logp` when the KL to the reference is a loss term (`fields`). Absent arrays are None.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Batch:
    """Unpacked: tokens, attn [B, L] (int32; attn 1 on real tokens), mask [B, N] float32 (the
    tokens the policy sampled, EOS included), adv [B]; old_logp / sampler_logp / ref_logp [B, N]."""

    tokens: jax.Array
    attn: jax.Array
    mask: jax.Array
    adv: jax.Array
    old_logp: jax.Array | None = None
    sampler_logp: jax.Array | None = None
    ref_logp: jax.Array | None = None


@struct.dataclass
class PackedBatch:
    """Packed: tokens, segment (1, 2, ... per sequence in a row, 0 on padding), positions [R, W];
    comp_col (column of the row's j-th completion token), comp_seq (its sequence), mask [R, N];
    adv [S]; old_logp / sampler_logp / ref_logp [R, N] (see `packing.Plan`)."""

    tokens: jax.Array
    segment: jax.Array
    positions: jax.Array
    comp_col: jax.Array
    comp_seq: jax.Array
    mask: jax.Array
    adv: jax.Array
    old_logp: jax.Array | None = None
    sampler_logp: jax.Array | None = None
    ref_logp: jax.Array | None = None


# The per-token completion arrays a packed minibatch gathers from the rollout.
COMPLETION_FIELDS = ("mask", "old_logp", "sampler_logp", "ref_logp")


def is_on_policy(rl) -> bool:
    """One update per rollout (μ = 1, one minibatch): the sampler's logprobs are the old policy's,
    and the rollout needs no old-logprob forward."""
    return rl.num_epochs == 1 and rl.num_minibatches == 1


def fields(rl) -> dict[str, bool]:
    """Which optional arrays a batch of the `rl` config carries."""
    on_policy = is_on_policy(rl)
    return dict(old_logp=not on_policy, sampler_logp=on_policy,
                ref_logp=rl.beta > 0 and not rl.kl_in_reward)


def spec(rl, *, rows: int, prompt_width: int, completion_width: int, packed: bool, sharding):
    """The abstract minibatch of `rows` rows (ShapeDtypeStructs with `sharding`) of the layout a
    run with `rl` feeds its update: what `cfpo_jax.aot` compiles. A packed spec is at its largest
    row bucket (as many rows as sequences)."""
    P, N = prompt_width, completion_width
    column = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    optional = {name: column(rows, N, dtype=jnp.float32) if present else None
                for name, present in fields(rl).items()}
    if packed:
        return PackedBatch(tokens=column(rows, P + N), segment=column(rows, P + N),
                           positions=column(rows, P + N), comp_col=column(rows, N),
                           comp_seq=column(rows, N), mask=column(rows, N, dtype=jnp.float32),
                           adv=column(rows, dtype=jnp.float32), **optional)
    return Batch(tokens=column(rows, P + N), attn=column(rows, P + N),
                 mask=column(rows, N, dtype=jnp.float32), adv=column(rows, dtype=jnp.float32),
                 **optional)
