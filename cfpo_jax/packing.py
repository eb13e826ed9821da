"""Sequence packing for the learner: a minibatch's prompt + completion sequences laid end to end
in a few fixed-width rows, so that the update and the logprob passes compute real tokens only.

A rollout row is `prompt bucket P + completion budget N` columns (prompt left-padded, completion
right-padded); RL completions are long-tailed, so most of those columns are padding. `plan` lays
the real tokens of the chosen sequences into R packed rows of the same width W = P + N:

* segment ids [R, W]: 1, 2, ... per sequence within a row, 0 on padding. Attention reads keys of
  the query's own segment only (`models.attention.causal_attention`).
* positions [R, W]: 0, 1, ... from each sequence's first prompt token, so RoPE restarts per
  sequence and every sequence sees exactly the positions it has unpacked.
* the completion layout [R, N]: the j-th completion token of packed row r, as the column where it
  sits (its prediction comes from the hidden state one column left, same segment), its sequence
  (for per-sequence sums, `losses.segment_sums`) and its place in the unpacked [B, N] arrays.
  Per-token losses, ratios and metrics run on [R, N] arrays instead of [B, N].

Decisions:
* The plan is made on the host, the data stays on device. Lengths are host facts already: prompts
  are tokenised on the host and the completion lengths come back with the completion tokens the
  rewards need. A plan is int32 index arrays (a few per token), uploaded once per minibatch; the
  device then gathers the packed rows from the rollout it holds (`pack_rows`, `pack_completion`).
  First-fit decreasing is sequential and tiny (milliseconds for thousands of sequences): nothing
  gained by running it on device, where its output shape would have to be fixed in advance.
* Width W = the unpacked row width: any sequence fits in one row, none is split, and a packed
  row costs what an unpacked row costs, so micro-batches of `rl.micro_batch_size` packed rows
  need no more memory than the same number of unpacked rows.
* A packed row also holds at most N completion tokens. The vocabulary work (unembedding,
  log-softmax: the largest matmul of a small model) then runs on [R, N] as unpacked on [B, N],
  never on prompt tokens. With prompts near their bucket width the token capacity binds first,
  so this costs next to nothing in packing density.
* Row counts come from a ladder g·{1, 2, 3, 4, 6, 8, 12, 16, ...} capped at the number of
  sequences (`row_ladder`), g the micro-batch rows (or the batch shards without micro-batching):
  a run compiles at most about 2·log2(B / g) + 1 shapes of each packed function, and from 2g
  up a plan has at most 1.5× the rows first-fit decreasing needs. Rows only multiply g, so packed rows
  shard over ('data', 'fsdp') and split into micro-batches like unpacked ones.
* Sequences with no completion token contribute nothing to any loss or metric and are left out.
* A completion's length is its attended span (`Samples.lengths`, the sum of `Samples.mask`): in a
  multi-turn episode that includes the observation tokens, which are context. Which of its tokens
  count in the loss is the rollout's loss mask, gathered into the packed layout like the other
  per-token arrays (`pack_minibatch`), not the plan's `comp_mask`.
* This module is the one owner of packing: the plans (`plan`, a pytree), the device gathers
  (`pack_minibatch`, a `batch.PackedBatch` from a `batch.Batch`) and the run's counters
  (`Packer`: the learner shapes compiled, the rows run over the unpacked rows). A plan that
  would need as many rows as the unpacked minibatch saves nothing, and its gathers and index
  arrays only cost: `Packer.plan` then returns None and the learner takes the unpacked layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cfpo_jax import batch as batch_lib


@struct.dataclass
class Plan:
    """Where each token of the packed sequences goes: int32 arrays (R rows, width W, completion
    capacity N, S sequences in the order `plan` was given them), numpy on the host; a pytree,
    uploaded leaf by leaf.

    token_src_RxW: flat index b·W + l of the unpacked [B, W] token it holds (0 on padding).
    segment_RxW: 1, 2, ... per sequence in the row; 0 on padding.
    positions_RxW: position within its sequence (0 on padding).
    comp_col_RxN: column of the row's j-th completion token (0 where the row has fewer).
    comp_src_RxN: flat index b·N + n of that token in the unpacked [B, N] completion arrays.
    comp_seq_RxN: its sequence, an index into the S sequences.
    comp_mask_RxN: 1 on completion tokens, 0 on the unused tail of a row.
    unpack_SxN: flat index r·N + j of sequence s's n-th completion token in [R, N] (0 past its end).
    rows_S: the unpacked row b of each sequence.
    """

    token_src_RxW: np.ndarray
    segment_RxW: np.ndarray
    positions_RxW: np.ndarray
    comp_col_RxN: np.ndarray
    comp_src_RxN: np.ndarray
    comp_seq_RxN: np.ndarray
    comp_mask_RxN: np.ndarray
    unpack_SxN: np.ndarray
    rows_S: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """(R, W, N): what a packed program compiles for (with S, fixed per run)."""
        return (*self.segment_RxW.shape, self.comp_col_RxN.shape[1])


def row_ladder(max_rows: int, granule: int) -> list[int]:
    """The row counts a plan may have: granule·m for m in 1, 2, 3, 4, 6, 8, 12, ... below
    max_rows / granule, and max_rows itself (a multiple of granule)."""
    if granule < 1 or max_rows < granule or max_rows % granule:
        raise ValueError(f"max_rows={max_rows} must be a positive multiple of granule={granule}")
    ladder, power = [], 1
    while granule * power < max_rows:
        ladder += [granule * power] + ([granule * power * 3 // 2] if power >= 2 else [])
        power *= 2
    return sorted({r for r in ladder if r < max_rows} | {max_rows})


def first_fit_decreasing(lengths, completion_lengths, width: int, completion_width: int):
    """Bins of sequence indices: each bin's lengths sum to at most `width` and its completion
    lengths to at most `completion_width`; sequences taken longest first, each into the first
    bin where it fits."""
    lengths, completion_lengths = np.asarray(lengths), np.asarray(completion_lengths)
    too_long = np.flatnonzero((lengths > width) | (completion_lengths > completion_width))
    if too_long.size:
        i = too_long[0]
        raise ValueError(f"sequence {i} has {lengths[i]} tokens ({completion_lengths[i]} completion);"
                         f" a packed row holds {width} ({completion_width} completion)")
    free = np.empty(0, np.int64)
    free_completion = np.empty(0, np.int64)
    bins: list[list[int]] = []
    # Stable sort, longest first: equal lengths keep their order, so a plan is deterministic.
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero((free >= lengths[i]) & (free_completion >= completion_lengths[i]))
        if fits.size:
            b = fits[0]
        else:
            b = len(bins)
            bins.append([])
            free = np.append(free, width)
            free_completion = np.append(free_completion, completion_width)
        bins[b].append(int(i))
        free[b] -= lengths[i]
        free_completion[b] -= completion_lengths[i]
    return bins


def plan(prompt_lengths, completion_lengths, rows, *, prompt_width: int, completion_width: int,
         granule: int, max_rows: int) -> Plan:
    """The packing of unpacked rows `rows` (in this order: sequence s is row rows[s]).

    prompt_lengths / completion_lengths: real tokens of every unpacked row [B] (host ints); an
    unpacked row is `prompt_width` columns of left-padded prompt then `completion_width` columns
    of completion. The row count is the smallest of `row_ladder(max_rows, granule)` that holds
    the first-fit-decreasing bins.
    """
    rows = np.asarray(rows, np.int64)
    p_S = np.asarray(prompt_lengths, np.int64)[rows]
    n_S = np.asarray(completion_lengths, np.int64)[rows]
    P, N = prompt_width, completion_width
    W = P + N
    bad = np.flatnonzero((p_S < 1) | (p_S > P) | (n_S < 0) | (n_S > N))
    if bad.size:
        s = bad[0]
        raise ValueError(f"row {rows[s]} has {p_S[s]} prompt and {n_S[s]} completion tokens; "
                         f"valid: 1..{P} prompt (a completion token is predicted from the token "
                         f"before it) and 0..{N} completion")
    kept = np.flatnonzero(n_S > 0)
    bins = [[kept[i] for i in b] for b in first_fit_decreasing(p_S[kept] + n_S[kept], n_S[kept], W, N)]
    ladder = row_ladder(max_rows, granule)
    if len(bins) > ladder[-1]:
        raise ValueError(f"{len(bins)} packed rows needed, more than max_rows={max_rows}")
    R = next(r for r in ladder if r >= len(bins))

    token_src, segment, positions = (np.zeros((R, W), np.int32) for _ in range(3))
    comp_col, comp_src, comp_seq, comp_mask = (np.zeros((R, N), np.int32) for _ in range(4))
    unpack = np.zeros((len(rows), N), np.int32)
    for r, members in enumerate(bins):
        column, filled = 0, 0
        for k, s in enumerate(members, start=1):
            b, p, n = rows[s], p_S[s], n_S[s]
            span = slice(column, column + p + n)
            token_src[r, span] = b * W + np.arange(P - p, P + n)
            segment[r, span] = k
            positions[r, span] = np.arange(p + n)
            done = slice(filled, filled + n)
            comp_col[r, done] = column + p + np.arange(n)
            comp_src[r, done] = b * N + np.arange(n)
            comp_seq[r, done] = s
            comp_mask[r, done] = 1
            unpack[s, :n] = r * N + filled + np.arange(n)
            column, filled = column + p + n, filled + n
    return Plan(token_src, segment, positions, comp_col, comp_src, comp_seq, comp_mask, unpack,
                rows.astype(np.int32))


def saves_rows(plan_: Plan, num_sequences: int) -> bool:
    """Whether `plan_` runs fewer rows than the `num_sequences` unpacked rows it packs. When it
    does not (every sequence near full length), the packed programs would do the unpacked work
    plus the gathers and the plan's index arrays: the learner takes the unpacked layout."""
    return plan_.shape[0] < num_sequences


# ----------------------------------------------------------------------------- device side


def pack_rows(x_BxW, token_src_RxW):
    """The packed rows [R, W] of an unpacked [B, W] array (padding slots hold x's first value)."""
    return jnp.take(x_BxW.reshape(-1), token_src_RxW, axis=0)


def pack_completion(x_BxN, comp_src_RxN, comp_mask_RxN):
    """The packed completion layout [R, N] of an unpacked [B, N] array (0 on unused slots)."""
    values = jnp.take(x_BxN.reshape(-1), comp_src_RxN, axis=0)
    return jnp.where(comp_mask_RxN != 0, values, jnp.zeros_like(values))


def unpack_completion(x_RxN, unpack_SxN, mask_SxN):
    """The unpacked [S, N] of a packed completion array (0 where `mask_SxN` is 0)."""
    values = jnp.take(x_RxN.reshape(-1), unpack_SxN, axis=0)
    return jnp.where(mask_SxN != 0, values, jnp.zeros_like(values))


def pack_minibatch(batch: batch_lib.Batch, plan_: Plan) -> batch_lib.PackedBatch:
    """Jittable: the packed minibatch of the rollout `batch` under `plan_` (on device): rows
    gathered on device; the advantages of the S sequences in plan order."""
    completion = {name: pack_completion(getattr(batch, name), plan_.comp_src_RxN, plan_.comp_mask_RxN)
                  for name in batch_lib.COMPLETION_FIELDS if getattr(batch, name) is not None}
    return batch_lib.PackedBatch(
        tokens=pack_rows(batch.tokens, plan_.token_src_RxW), segment=plan_.segment_RxW,
        positions=plan_.positions_RxW, comp_col=plan_.comp_col_RxN, comp_seq=plan_.comp_seq_RxN,
        adv=jnp.take(batch.adv, plan_.rows_S, axis=0), **completion)


def spec(*, rows: int, sequences: int, prompt_width: int, completion_width: int, sharding) -> Plan:
    """The abstract plan of `sequences` sequences in `rows` packed rows (ShapeDtypeStructs with
    `sharding`): what `cfpo_jax.aot` compiles the packed prepare pass for."""
    W, N = prompt_width + completion_width, completion_width
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
    return Plan(token_src_RxW=ints(rows, W), segment_RxW=ints(rows, W), positions_RxW=ints(rows, W),
                comp_col_RxN=ints(rows, N), comp_src_RxN=ints(rows, N), comp_seq_RxN=ints(rows, N),
                comp_mask_RxN=ints(rows, N), unpack_SxN=ints(sequences, N), rows_S=ints(sequences))


@dataclasses.dataclass
class Packer:
    """Plans minibatches for one run and counts what they cost.

    granule: rows of a micro-batch (or the batch shards without micro-batching): packed row
    counts are its multiples. `learner_shapes` holds (function, (R, W, N)) of every learner shape
    planned so far — packed, or "update unpacked" / "prepare unpacked" where packing saved no row:
    what the learner compiled for. `metrics()` reports them and the rows run over the unpacked
    rows since it was last called.
    """

    granule: int
    learner_shapes: set = dataclasses.field(default_factory=set)
    _planned_rows: list = dataclasses.field(default_factory=list)

    def plan(self, lengths_Bx2, rows_S, kind: str, *, prompt_width: int,
             completion_width: int) -> Plan | None:
        """The packing (host arrays) of rollout rows `rows_S` (host lengths [B, 2]: prompt and
        completion tokens; rollout rows are `prompt_width` + `completion_width` columns); `kind`
        ("prepare" or "update") names the function it feeds. None when the packed rows would be
        as many as the unpacked ones: then the unpacked layout is cheaper (no gathers)."""
        lengths_Bx2 = np.asarray(lengths_Bx2)
        max_rows = -(-len(rows_S) // self.granule) * self.granule
        planned = plan(lengths_Bx2[:, 0], lengths_Bx2[:, 1], rows_S, prompt_width=prompt_width,
                       completion_width=completion_width, granule=self.granule, max_rows=max_rows)
        if not saves_rows(planned, len(rows_S)):
            self.learner_shapes.add((f"{kind} unpacked", (len(rows_S), *planned.shape[1:])))
            self._planned_rows.append((len(rows_S), len(rows_S)))
            return None
        self.learner_shapes.add((kind, planned.shape))
        self._planned_rows.append((planned.shape[0], len(rows_S)))
        return planned

    def metrics(self) -> dict[str, float]:
        """learner_shapes: how many learner shapes (packed or not) were planned so far;
        packed_rows_frac: rows run over unpacked rows since the last call (1: packing saved none)."""
        ran, unpacked = np.sum(self._planned_rows, axis=0) if self._planned_rows else (1, 1)
        self._planned_rows.clear()
        return dict(learner_shapes=len(self.learner_shapes), packed_rows_frac=float(ran / unpacked))
