"""The rollout engine: a fixed number of cache slots, continuous batching, per-row randomness.

Layout (R = prompts × n rows, P padded prompt length, N = max_new_tokens, V vocabulary, K slots):

* Prompts are left-padded to a bucket P (the next power of two of the longest prompt, or the
  given `prompt_bucket`), so a new prompt length does not recompile. Positions come from the mask
  (`models.default_positions`), as in the trainer's teacher-forced forward.
* At most K = `max_concurrent` rows are decoded at a time (split over the mesh's ('data',
  'fsdp') shards). Each slot owns S = P - 1 + N cache columns per layer
  (`models.decoding.SlotCache`, `[K, kv_heads, S, head_dim]`), the row's tokens left-aligned in
  them: a row with an L-token prompt has its first L - 1 tokens in columns [0, L - 1) (written by
  its prefill); decode step t writes column L - 1 + t (the last prompt token at t = 0, the previous
  sample after), which is also its position, and samples from its logits. The row's valid columns
  are [0, L + t); decode attention reads only those (`models.attention.decode_attention`), in
  place. The KV cache is O(K × (P + N)), whatever R.
* Continuous batching, host-driven: a jitted `_insert` prefills waiting rows (each distinct prompt
  of the batch once; a batch of a power-of-two size, so few shapes compile) and writes them into
  free slots (at most ~16k prompt tokens per batch shard per call, to bound the prefill's
  activations); a jitted `_decode_chunk` runs decode steps over all K slots in a `lax.while_loop`
  until a sixteenth of the slots (at least one) are free again while rows wait, or until every
  slot is free when none wait; then the host refills the free slots and calls it again. Only the
  K slot flags come to the host between chunks. A finished row's slot is recomputed (and its
  output dropped) only until the end of the current chunk. Chosen over a single on-device loop
  that inserts: the prefill of a variable number of rows needs a static shape, and the host loop
  keeps both jitted functions small, with no prefill compiled inside the decode loop.
  With K ≥ R every row is inserted at once and one chunk runs to the end: the static sampler.
* K: `max_concurrent`, or by default as many slots as fit `kv_cache_gb` of keys/values per device
  (`slots_for_budget`); printed once per setting. Settings pass through `config.sampling`.
* Results do not depend on K: row r's token t is drawn with the key fold_in(fold_in(seed, r), t),
  and each row's arithmetic reads only its own slot. The same call with K = 1, 3 or R gives the
  same tokens (float32 on CPU; tests/unit/test_sampling.py).
* Rows are group by group: row i * n + j is sample j of prompt i (the layout `advantages.compute`
  expects); the n rows of a prompt inserted together share one prefill.
* Sampling: `temperature=0` is greedy (argmax) and reports temperature-1 logprobs. Otherwise the
  token is drawn from softmax(logits / temperature) restricted by `top_k` then `top_p` (top-p on
  the distribution renormalised over the top-k, as in transformers), by inverting its cumulative
  distribution at one uniform per row (`inverse_cdf`, two-level: block masses, then inside one
  block), the logsumexp of the logprob from the same exp pass. The reported logprob is under the
  *unrestricted* softmax(logits / temperature), the distribution the trainer recomputes. Top-p
  without top-k finds its nucleus without sorting the vocabulary (`nucleus`: the sorted top 256
  entries, else a bisection over the logits) and draws over the vocabulary in index order.
* A row ends after one of `eos_token_ids` (kept: mask 1) or its budget (N, or its prompt's own
  `max_new_tokens`); later columns hold `pad_id`, mask 0 and logprob 0.
* Weights are gathered once per call into the sampling layout (`models.decoding.gather_weights`:
  compute dtype, one buffer per layer, replicated over the batch axes and split over 'tensor'),
  never per decode step; the memory this costs is stated there.
* Decode attention runs jax's Pallas flash-decoding kernel on GPU, jax's Pallas paged-attention
  kernel on TPU (bfloat16, head_dim a multiple of 128), a C++ kernel over each row's valid slots
  on CPU (products and sums over the whole cache where no compiler builds it), and the plain-XLA
  masked einsum otherwise (`models.attention.decode_attention`; `attention=`
  overrides). With a Pallas kernel the cache's slot count is rounded up to a multiple of 128 for
  its blocks/pages. The prefill runs the trainer's full-sequence kernel (`config.attention`:
  cuDNN / splash / einsum).
* The projections (q/k/v/o, MLP) of the prefill and the decode steps run XLA's dot, except on CPU,
  where a C++ kernel runs them (`models.matmul`: float32 sums in another order; `matmul=`
  overrides). The unembedding stays XLA's dot (float32 logits; on CPU a tied one from its own
  [D, V] copy, `models.decoding`).

Multi-turn (`turn_end` given; episodes and tools live in `cfpo_jax.envs`, which passes it):

* The N output columns of a row hold its whole episode after the prompt: sampled tokens and the
  tokens the host forced in (observations, template tokens), N being the episode's token budget.
  `Samples.generated` marks the sampled ones (the loss mask); forced ones have logprob 0.
* A row's turn ends at a sampled EOS or stop sequence (`stop_sequences`, token ids, checked on
  device against the row's last sampled tokens). The slot then stops decoding and keeps its
  cache; the host calls `turn_end(row, tokens so far)` in a thread pool (all waiting rows at
  once, while the other slots decode on). Its answer, the observation tokens, is forced in
  through the ordinary decode steps: at column c the step feeds the previous token and, where
  the host put a token for column c, writes that token instead of the sample, one column per
  step, batched with the other slots' decoding. Chosen over a prefill of the observation into
  the slot: no new compiled shapes, and the cache of an observation is computed exactly as a
  generated token's; the price is one decode step per observation token. An empty answer ends
  the row; so does the budget (a forced observation is cut there).
* Chunks return to the host when a sixteenth of the slots (at least one) more have stopped; a
  slot is refilled only when its episode ends. Row r's sample at column c is still drawn with
  fold_in(fold_in(seed, r), c), so given deterministic answers to its turns an episode does not
  depend on K, on the order in which tool calls finish, or on the other rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from cfpo_jax.models import decoding, moe
from cfpo_jax.models.attention import DECODE_SLOT_ALIGN, resolve_decode
from cfpo_jax.models.matmul import resolve as resolve_matmul
from cfpo_jax.sharding import BATCH_AXES, mesh_context, to_host

DEFAULT_KV_CACHE_GB = 8.0
_REFILL_FRACTION = 16  # a chunk returns to the host when K / 16 slots (at least 1) are free
_PREFILL_TOKENS = 16384  # prompt tokens per prefill call and batch shard (a power of two of rows)


@flax.struct.dataclass
class Samples:
    """What `generate` returns; rows are group by group (row i * n + j: sample j of prompt i).

    prompt_tokens: int32 [B, P], left-padded with pad_id.
    prompt_mask: int32 [B, P], 1 on real prompt tokens.
    tokens: int32 [B, N] sampled tokens, pad_id after the first EOS.
    mask: int32 [B, N], 1 up to and including the first EOS, 0 after.
    logprobs: float32 [B, N], log softmax(logits / temperature) of each sampled token
      (temperature-1 logprobs when temperature = 0), 0 where mask is 0.
    lengths: int32 [B], completion lengths (the sum of mask).
    eos: bool [B], True when the row ended on an EOS, False when it was truncated at N.
    generated: int32 [B, N] or None. Multi-turn (`turn_end` given): 1 on the tokens the policy
      sampled, 0 on forced (observation and template) tokens and after the end; the loss mask.
      None in a single-turn call, where every token under `mask` was sampled.
    routing: int16 [B, P + N, layers, k] or None. With `record_routing` (a mixture of experts):
      the experts the sampler's router chose for each token of prompt + completion, -1 where
      none was recorded (`cfpo_jax.models.moe.rollout_routing`), for the learner to replay.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    eos: jax.Array
    generated: jax.Array | None = None
    routing: jax.Array | None = None

    @property
    def loss_mask(self) -> jax.Array:
        """int32 [B, N]: the tokens the policy sampled (`generated`, else `mask`)."""
        return self.mask if self.generated is None else self.generated


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything static that shapes the compiled functions (hashable: it keys the jit cache)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_id: int
    mesh: jax.sharding.Mesh | None
    attention: str
    matmul: str = "xla"  # the projections' kernel (`models.matmul`, resolved)
    # Multi-turn only (`turn_end` given): a row's turn also ends after one of these token
    # sequences, and forced tokens (`_Outputs.forced_RxN`) replace the samples where set.
    multi_turn: bool = False
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    record_routing: bool = False  # a MoE model's decode steps record their experts (routing_RxNxLxK)


@flax.struct.dataclass
class _Slots:
    """The K decoding slots (device arrays; R, the number of rows, marks an empty slot).

    cache: the slots' keys/values (`models.decoding.SlotCache`).
    row_K: int32, the row a slot decodes (R: none).
    token_K: int32, the token to feed at the next step.
    step_K: int32, tokens the row has sampled so far: its next output column, and cache column
      length_K - 1 + step_K is where the fed token goes.
    length_K: int32, the row's prompt length.
    active_K: bool, the slot holds a row that has not finished.
    """

    cache: decoding.SlotCache
    row_K: jax.Array
    token_K: jax.Array
    step_K: jax.Array
    length_K: jax.Array
    active_K: jax.Array


@flax.struct.dataclass
class _Outputs:
    """Per row: tokens, logprobs, length and how it ended. Multi-turn only (else None):
    forced_RxN, a token the host put at that column (an observation's), -1 where the row samples;
    generated_RxN, whether the column was sampled."""

    tokens_RxN: jax.Array
    logprobs_RxN: jax.Array
    lengths_R: jax.Array
    eos_R: jax.Array
    forced_RxN: jax.Array | None = None
    generated_RxN: jax.Array | None = None
    routing_RxNxLxK: jax.Array | None = None  # record_routing: decode step s's experts (int16, -1 unset)


def _constrain_batch(x, mesh, axis=0):
    """Pins dimension `axis` of `x` to ('data', 'fsdp') when it divides; the rest left free."""
    if mesh is None or x.shape[axis] % int(np.prod([mesh.shape[a] for a in BATCH_AXES])):
        return x
    spec = [PS.UNCONSTRAINED] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PS(*spec)))


def _constrain_slots(slots: _Slots, mesh) -> _Slots:
    """Slots over ('data', 'fsdp'); cache kv heads over 'tensor' when they divide."""
    if mesh is None:
        return slots

    def cache_leaf(x):
        heads = "tensor" if x.shape[1] % mesh.shape["tensor"] == 0 else None
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PS(BATCH_AXES, heads, None, None)))

    cache = decoding.SlotCache(k=tuple(map(cache_leaf, slots.cache.k)), v=tuple(map(cache_leaf, slots.cache.v)))
    fields = {f: _constrain_batch(getattr(slots, f), mesh) for f in ("row_K", "token_K", "step_K", "length_K", "active_K")}
    return _Slots(cache=cache, **fields)


_CDF_BLOCK = 256  # vocabulary entries per block of the two-level inverse-CDF search


def inverse_cdf(u_B, logits_BxV):
    """One draw per row from softmax(logits_BxV), by inverting its cumulative distribution at the
    row's uniform u_B[b] in [0, 1): the first index whose cumulative mass exceeds u · total, int32
    [B]; also logsumexp(logits_BxV), float32 [B], from the same pass. A draw needs one uniform per
    row instead of one Gumbel variate per vocabulary entry (the threefry bits of 49k Gumbels per
    row were 28% of a SmolLM2 decode step's CPU time at 256 rows, benchmarks/README.md). The
    search is two-level — block masses (blocks of `_CDF_BLOCK` entries, from the same exp pass that
    gives the total), then a cumulative sum inside the chosen block — so no [B, V] cumulative sum
    is formed. -inf logits (zero mass) are never drawn; NaN logits give
    a token inside the vocabulary."""
    B, V = logits_BxV.shape
    blocks = -(-V // _CDF_BLOCK)
    padded_BxW = jnp.pad(logits_BxV, ((0, 0), (0, blocks * _CDF_BLOCK - V)), constant_values=-jnp.inf)
    largest_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    weight_BxNxC = jnp.exp(padded_BxW - largest_Bx1).reshape(B, blocks, _CDF_BLOCK)
    mass_BxN = jnp.sum(weight_BxNxC, axis=-1)
    upto_BxN = jnp.cumsum(mass_BxN, axis=-1)
    target_B = u_B * upto_BxN[:, -1]
    # The first block whose cumulative mass exceeds the target; rounding can leave the target at
    # or past the total: then the last block with mass (never a zero-mass block).
    last_block_B = _last_positive(mass_BxN)
    block_B = jnp.minimum(jnp.sum(upto_BxN <= target_B[:, None], axis=-1, dtype=jnp.int32), last_block_B)
    before_B = jnp.where(block_B > 0, _picked(upto_BxN, jnp.maximum(block_B - 1, 0)), 0.0)
    inside_BxC = jnp.take_along_axis(weight_BxNxC, block_B[:, None, None], axis=1)[:, 0]
    index_B = jnp.minimum(jnp.sum(jnp.cumsum(inside_BxC, axis=-1) <= (target_B - before_B)[:, None], axis=-1,
                                  dtype=jnp.int32), _last_positive(inside_BxC))
    token_B = jnp.minimum(block_B * _CDF_BLOCK + index_B, V - 1)
    return token_B, largest_Bx1[:, 0] + jnp.log(upto_BxN[:, -1])


def _last_positive(x_BxN):
    """The last index of each row holding a value > 0 (0 when none), int32 [B]."""
    return jnp.max(jnp.where(x_BxN > 0, jnp.arange(x_BxN.shape[-1], dtype=jnp.int32), 0), axis=-1)


def sample(logits_BxV, key_B, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """One token per row (row b drawn with its own key_B[b]) and its logprob under
    softmax(logits / temperature), int32 [B] and float32 [B]: a decode step's sampler (module doc,
    "Sampling"); float32 math. The settings are static (jit it with them bound)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0.0:
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return token_B, _picked(logits_BxV, token_B) - jax.nn.logsumexp(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV / temperature
    u_B = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(key_B)
    if top_k == 0 and top_p == 1.0:
        token_B, log_mass_B = inverse_cdf(u_B, scaled_BxV)
        return token_B, _picked(scaled_BxV, token_B) - log_mass_B
    log_mass_B = jax.nn.logsumexp(scaled_BxV, axis=-1)
    if top_k == 0:
        keep_BxV = nucleus(scaled_BxV, log_mass_B, top_p)
        token_B, _ = inverse_cdf(u_B, jnp.where(keep_BxV, scaled_BxV, -jnp.inf))
        return token_B, _picked(scaled_BxV, token_B) - log_mass_B
    # The sorted top k; drawing an index among them keeps the allowed set exact even when logits
    # tie at the cutoff.
    top_BxK, index_BxK = jax.lax.top_k(scaled_BxV, top_k)
    if top_p < 1.0:
        probs_BxK = jax.nn.softmax(top_BxK, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a candidate stays if the mass before
        # it is still short of top_p (so the most likely one always stays).
        keep_BxK = (jnp.cumsum(probs_BxK, axis=-1) - probs_BxK) < top_p
        top_BxK = jnp.where(keep_BxK, top_BxK, -jnp.inf)
    choice_B, _ = inverse_cdf(u_B, top_BxK)
    token_B = jnp.take_along_axis(index_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    # The reported logprob is under the unrestricted distribution (what the trainer recomputes).
    return token_B, _picked(scaled_BxV, token_B) - log_mass_B


_TOP_P_CANDIDATES = 256  # top-p alone: sorted candidates tried before the exact search over all


def nucleus(scaled_BxV, log_mass_B, top_p: float):
    """Each row's top-p set, bool [B, V], without sorting the vocabulary: order the entries by
    logit, highest first and ties by lower index, and keep an entry while the softmax mass of the
    entries before it is short of top_p (the smallest prefix that reaches top_p; the most likely
    entry always stays). `log_mass_B` is logsumexp(scaled_BxV) over the row; NaN logits count as
    -inf. Same set as sorting the whole row (what the sampler did, `lax.top_k` with k = V: 3.6 CPU
    seconds per SmolLM2 step at 256 rows, benchmarks/README.md).

    The set is {logit > t} plus, at logit == t, tied entries in index order while the mass before
    them is short of top_p, where t is the smallest logit whose mass strictly above is below top_p
    ("mass above" is one masked sum over the row, `above`, the same arithmetic whichever way t is
    found). t is read off the sorted top `_TOP_P_CANDIDATES` entries (`lax.top_k`) and checked
    with two masked sums; when the check fails for any row (its nucleus is larger than the
    candidates, or rounding disagrees at the boundary) t is found by bisection over the logits'
    ordered int32 bit patterns (32 masked sums over the batch). Either way the same t, so a row's
    set does not depend on the other rows of its batch (token identity across batch schedules)."""
    V = scaled_BxV.shape[-1]
    # NaN as -inf, -0.0 as 0.0 (the two zeros tie, as in a sort).
    scaled_BxV = jnp.where(jnp.isnan(scaled_BxV), -jnp.inf, jnp.where(scaled_BxV == 0, 0.0, scaled_BxV))
    probs_BxV = jnp.exp(scaled_BxV - log_mass_B[:, None])
    key_BxV = _ordered_bits(scaled_BxV)

    def above(key_B):  # mass of the entries whose logit is strictly above key_B's
        return jnp.sum(jnp.where(key_BxV > key_B[:, None], probs_BxV, 0.0), axis=-1)

    lowest_B, highest_B = jnp.min(key_BxV, axis=-1), jnp.max(key_BxV, axis=-1)
    top_BxC, _ = jax.lax.top_k(scaled_BxV, min(_TOP_P_CANDIDATES, V))
    sorted_BxC = jnp.exp(top_BxC - log_mass_B[:, None])
    kept_B = jnp.sum(jnp.cumsum(sorted_BxC, axis=-1) - sorted_BxC < top_p, axis=-1)
    guess_B = _ordered_bits(_picked(top_BxC, jnp.maximum(kept_B - 1, 0)))
    # t is the guess iff the mass above it is short of top_p and the mass at or above it is not
    # (or it is the row's lowest logit).
    found_B = (above(guess_B) < top_p) & ((above(guess_B - 1) >= top_p) | (guess_B == lowest_B))

    def bisect():
        # Invariant: above(high) < top_p; t in (low, high]. 32 halvings close any int32 range.
        def halve(_, bounds):
            low_B, high_B = bounds
            middle_B = (low_B >> 1) + (high_B >> 1) + (low_B & high_B & 1)  # floor of the mean, no overflow
            open_B = low_B < high_B - 1
            short_B = open_B & (above(middle_B) < top_p)
            return (jnp.where(open_B & ~short_B, middle_B, low_B), jnp.where(short_B, middle_B, high_B))

        return jax.lax.fori_loop(0, 32, halve, (lowest_B - 1, highest_B))[1]

    threshold_B = jax.lax.cond(jnp.all(found_B), lambda: guess_B, bisect)
    tie_BxV = key_BxV == threshold_B[:, None]

    def tie_rule():
        tied_BxV = jnp.where(tie_BxV, probs_BxV, 0.0)
        before_BxV = above(threshold_B)[:, None] + (jnp.cumsum(tied_BxV, axis=-1) - tied_BxV)
        return (key_BxV > threshold_B[:, None]) | (tie_BxV & (before_BxV < top_p))

    # A lone entry at t is always kept (the mass above t is short of top_p): the cumulative sum
    # over the row runs only when some row has a tie at t.
    return jax.lax.cond(jnp.any(jnp.sum(tie_BxV, axis=-1) > 1), tie_rule,
                        lambda: key_BxV >= threshold_B[:, None])


def _ordered_bits(x):
    """int32 keys in the order of the float32 values x (-inf lowest; -0.0 below 0.0: callers map it to 0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _picked(x_BxV, token_B):
    return jnp.take_along_axis(x_BxV, token_B[:, None], axis=-1)[:, 0]


def _force_and_stop(settings: Settings, outputs: _Outputs, row_K, step_K, token_K, logprob_K, hit_eos_K):
    """Multi-turn: a forced token replaces the sample (logprob 0, not generated, never ends the
    turn); a sampled token also ends the turn when it completes a stop sequence of sampled tokens.
    Returns (token_K, logprob_K, turn_end_K, generated_K)."""
    forced_K = outputs.forced_RxN.at[row_K, step_K].get(mode="fill", fill_value=-1)
    generated_K = forced_K < 0
    token_K = jnp.where(generated_K, token_K, forced_K)
    logprob_K = jnp.where(generated_K, logprob_K, 0.0)
    turn_end_K = hit_eos_K & generated_K
    for sequence in settings.stop_sequences:
        match_K = generated_K & (token_K == sequence[-1])
        for back, expected in enumerate(reversed(sequence[:-1]), start=1):
            column_K = step_K - back
            earlier = lambda x: x.at[row_K, column_K].get(mode="fill", fill_value=-1)  # noqa: E731
            match_K &= (column_K >= 0) & (earlier(outputs.tokens_RxN) == expected)
            match_K &= earlier(outputs.generated_RxN.astype(jnp.int32)) == 1
        turn_end_K |= match_K
    return token_K, logprob_K, turn_end_K, generated_K


# ----------------------------------------------------------------------------- jitted pieces


def _init(settings: Settings, config, num_slots, num_cache_slots, num_rows):
    slots = _Slots(
        cache=decoding.init_slot_cache(config, num_slots, num_cache_slots),
        row_K=jnp.full((num_slots,), num_rows, jnp.int32),
        token_K=jnp.zeros((num_slots,), jnp.int32),
        step_K=jnp.zeros((num_slots,), jnp.int32),
        length_K=jnp.zeros((num_slots,), jnp.int32),
        active_K=jnp.zeros((num_slots,), bool),
    )
    outputs = _Outputs(
        tokens_RxN=jnp.full((num_rows, settings.max_new_tokens), settings.pad_id, jnp.int32),
        logprobs_RxN=jnp.zeros((num_rows, settings.max_new_tokens), jnp.float32),
        lengths_R=jnp.zeros((num_rows,), jnp.int32),
        eos_R=jnp.zeros((num_rows,), bool),
    )
    if settings.multi_turn:
        outputs = outputs.replace(
            forced_RxN=jnp.full((num_rows, settings.max_new_tokens), -1, jnp.int32),
            generated_RxN=jnp.zeros((num_rows, settings.max_new_tokens), bool))
    if settings.record_routing:
        outputs = outputs.replace(routing_RxNxLxK=jnp.full(
            (num_rows, settings.max_new_tokens, config.num_layers, config.num_experts_per_tok), -1, jnp.int16))
    return _constrain_slots(slots, settings.mesh), outputs


def _insert(settings: Settings, weights, slots: _Slots, prompt_tokens_MxP, prompt_mask_MxP, source_K, row_K):
    """Prefills the M prompts and starts slot k on prompt source_K[k] as row row_K[k] (source -1:
    the slot keeps what it has). Only the prompt columns [0, P - 1) of the new slots change."""
    prompt_len = prompt_tokens_MxP.shape[1]
    insert_K = source_K >= 0
    source_K = jnp.maximum(source_K, 0)
    cache = slots.cache
    if prompt_len > 1:
        keys, values = decoding.prefill(
            weights, _constrain_batch(prompt_tokens_MxP[:, :-1], settings.mesh),
            _constrain_batch(prompt_mask_MxP[:, :-1], settings.mesh), matmul=settings.matmul)

        def write(old_KxGxSxH, new_MxGxTxH):
            prefix_KxGxTxH = jnp.where(insert_K[:, None, None, None], new_MxGxTxH[source_K],
                                       old_KxGxSxH[:, :, : prompt_len - 1])
            return old_KxGxSxH.at[:, :, : prompt_len - 1].set(prefix_KxGxTxH)

        cache = decoding.SlotCache(k=tuple(map(write, cache.k, keys)), v=tuple(map(write, cache.v, values)))
    length_K = jnp.sum(prompt_mask_MxP, axis=1, dtype=jnp.int32)[source_K]
    new = _Slots(
        cache=cache,
        row_K=jnp.where(insert_K, row_K, slots.row_K),
        token_K=jnp.where(insert_K, prompt_tokens_MxP[source_K, -1], slots.token_K),
        step_K=jnp.where(insert_K, 0, slots.step_K),
        length_K=jnp.where(insert_K, length_K, slots.length_K),
        active_K=slots.active_K | insert_K,
    )
    return _constrain_slots(new, settings.mesh)


def _decode_chunk(settings: Settings, weights, slots: _Slots, outputs: _Outputs, key, budget_R, refill_at):
    """Decode steps over all slots until `refill_at` slots are free or none is active; row r
    ends at an EOS or after budget_R[r] tokens."""
    num_rows = outputs.lengths_R.shape[0]
    num_cache_slots = slots.cache.k[0].shape[2]
    eos_ids = jnp.asarray(settings.eos_token_ids, jnp.int32)

    def cond_fn(carry):
        slots, _ = carry
        return jnp.any(slots.active_K) & (jnp.sum(~slots.active_K) < refill_at)

    def body_fn(carry):
        slots, outputs = carry
        live_K = slots.active_K
        # Finished and empty slots still run (static shapes); keep their writes inside the cache.
        column_K = jnp.clip(slots.length_K - 1 + slots.step_K, 0, num_cache_slots - 1)
        logits_KxV, cache, *experts = decoding.decode_step(
            weights, slots.token_K, slots.cache, column_K, implementation=settings.attention,
            record_routing=settings.record_routing, matmul=settings.matmul)
        key_K = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(slots.row_K, slots.step_K)
        token_K, logprob_K = sample(logits_KxV, key_K, temperature=settings.temperature, top_k=settings.top_k,
                                    top_p=settings.top_p)
        hit_eos_K = jnp.isin(token_K, eos_ids)
        if settings.multi_turn:
            token_K, logprob_K, hit_eos_K, generated_K = _force_and_stop(
                settings, outputs, slots.row_K, slots.step_K, token_K, logprob_K, hit_eos_K)
        budget_K = jnp.take(budget_R, slots.row_K, mode="clip")  # (empty slots: not live)
        finished_K = live_K & (hit_eos_K | (slots.step_K + 1 >= budget_K))
        row_K = jnp.where(live_K, slots.row_K, num_rows)  # out of range: dropped
        done_row_K = jnp.where(finished_K, slots.row_K, num_rows)
        outputs = outputs.replace(
            tokens_RxN=outputs.tokens_RxN.at[row_K, slots.step_K].set(token_K, mode="drop"),
            logprobs_RxN=outputs.logprobs_RxN.at[row_K, slots.step_K].set(logprob_K, mode="drop"),
            lengths_R=outputs.lengths_R.at[done_row_K].set(slots.step_K + 1, mode="drop"),
            eos_R=outputs.eos_R.at[done_row_K].set(hit_eos_K, mode="drop"),
        )
        if settings.record_routing:
            outputs = outputs.replace(routing_RxNxLxK=outputs.routing_RxNxLxK.at[row_K, slots.step_K].set(
                experts[0].astype(jnp.int16), mode="drop"))
        if settings.multi_turn:
            outputs = outputs.replace(generated_RxN=outputs.generated_RxN.at[row_K, slots.step_K].set(
                generated_K, mode="drop"))
            # A slot waiting for its turn's answer keeps the token it feeds next: its idle steps
            # then rewrite its next cache column with the same key/value, and the resumed row
            # continues from its real last token.
            token_K = jnp.where(live_K, token_K, slots.token_K)
        slots = _Slots(
            cache=cache, row_K=slots.row_K, token_K=token_K,
            step_K=jnp.where(live_K, slots.step_K + 1, slots.step_K), length_K=slots.length_K,
            active_K=live_K & ~finished_K,
        )
        return _constrain_slots(slots, settings.mesh), outputs

    return jax.lax.while_loop(cond_fn, body_fn, (slots, outputs))


def _resume(settings: Settings, slots: _Slots, outputs: _Outputs, slot_M, row_M, start_M, forced_MxW):
    """Multi-turn: slot slot_M[m] (row row_M[m]) decodes on, with forced_MxW[m] (-1 padded) as its
    tokens at columns start_M[m], start_M[m] + 1, ... (columns past the budget are dropped).
    Entries with slot_M = K are padding."""
    width = forced_MxW.shape[1]
    column_MxW = start_M[:, None] + jnp.arange(width)[None]
    rows_MxW = jnp.where(forced_MxW >= 0, row_M[:, None], outputs.forced_RxN.shape[0])
    forced_RxN = outputs.forced_RxN.at[rows_MxW, column_MxW].set(forced_MxW, mode="drop")
    active_K = slots.active_K.at[slot_M].set(True, mode="drop")
    return slots.replace(active_K=active_K), outputs.replace(forced_RxN=forced_RxN)


# The sampler's compiled programs, public for `cfpo_jax.aot` (which compiles these very functions for
# the chips) and for tests. init_program(settings, model_config, K, S, R) -> (slots, outputs);
# prefill_program(settings, weights, slots, prompt_tokens_MxP, prompt_mask_MxP, source_K, row_K) ->
# slots (slots donated); decode_program(settings, weights, slots, outputs, key, budget_R, refill_at)
# -> (slots, outputs) (both donated; `key` a typed `jax.random.key`, whatever `generate`'s seed was).
init_program = jax.jit(_init, static_argnums=(0, 1, 2, 3, 4))
_resume_jit = jax.jit(_resume, static_argnums=(0,), donate_argnums=(1, 2))
prefill_program = jax.jit(_insert, static_argnums=(0,), donate_argnums=(2,))
decode_program = jax.jit(_decode_chunk, static_argnums=(0,), donate_argnums=(2, 3))


# ----------------------------------------------------------------------------- host side


def _bucket(longest: int, prompt_bucket: int | None) -> int:
    if prompt_bucket is None:
        return 1 << max(longest - 1, 0).bit_length()
    if prompt_bucket < longest:
        raise ValueError(
            f"prompt_bucket={prompt_bucket} is shorter than the longest prompt ({longest} tokens); "
            "use a bucket >= the longest prompt, or None for the next power of two"
        )
    return prompt_bucket


def _as_token_lists(prompts) -> list[list[int]]:
    """A list of token-id lists, or a pair (tokens [B, L], lengths [B]) whose row b holds its
    prompt in tokens[b, :lengths[b]] (right padding, as tokenizers pad by default)."""
    if isinstance(prompts, tuple) and len(prompts) == 2:
        tokens_BxL, lengths_B = np.asarray(prompts[0]), np.asarray(prompts[1])
        if tokens_BxL.ndim != 2 or lengths_B.shape != tokens_BxL.shape[:1]:
            raise ValueError(
                "prompts given as (tokens, lengths) need tokens [B, L] and lengths [B]; got "
                f"{tokens_BxL.shape} and {lengths_B.shape}"
            )
        if np.any(lengths_B > tokens_BxL.shape[1]):
            raise ValueError(f"prompt lengths {lengths_B.tolist()} exceed the width {tokens_BxL.shape[1]}")
        return [row[:length].tolist() for row, length in zip(tokens_BxL, lengths_B)]
    return [list(map(int, p)) for p in prompts]


def _left_pad(token_lists, width: int, pad_id: int):
    tokens_BxP = np.full((len(token_lists), width), pad_id, np.int32)
    mask_BxP = np.zeros((len(token_lists), width), np.int32)
    for b, ids in enumerate(token_lists):
        tokens_BxP[b, width - len(ids) :] = ids
        mask_BxP[b, width - len(ids) :] = 1
    return tokens_BxP, mask_BxP


def _check_settings(vocab, max_new_tokens, temperature, top_p, top_k, eos_token_ids, n, pad_id):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off); got {top_p}")
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, vocab_size={vocab}] (0 = off); got {top_k}")
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1; got {n}")
    for name, ids in (("eos_token_ids", eos_token_ids), ("pad_id", (pad_id,))):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{name} {bad} are outside the vocabulary [0, {vocab})")


def kv_bytes_per_slot(config, num_cache_slots: int, tensor: int = 1) -> int:
    """Bytes of keys and values one slot holds on one device (kv heads split over `tensor` when
    it divides them), on the platform of the mesh in context (`decoding.cache_dtype`)."""
    heads = config.num_kv_heads // tensor if config.num_kv_heads % tensor == 0 else config.num_kv_heads
    itemsize = decoding.cache_dtype(config).itemsize
    return 2 * config.num_layers * heads * num_cache_slots * config.head_dim * itemsize


def slots_for_budget(config, num_cache_slots: int, kv_cache_gb: float, mesh=None) -> int:
    """The default K: as many slots per batch shard as fit `kv_cache_gb` GB (1e9 bytes) of keys
    and values per device, times the number of batch shards; at least one per shard."""
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    tensor = 1 if mesh is None else mesh.shape["tensor"]
    per_device = int(kv_cache_gb * 1e9) // kv_bytes_per_slot(config, num_cache_slots, tensor)
    return max(per_device, 1) * shards


def engine_settings(sampling_config) -> dict:
    """`generate`'s engine arguments from `config.sampling` (max_concurrent 0: from the budget)."""
    return dict(max_concurrent=sampling_config.max_concurrent or None,
                kv_cache_gb=sampling_config.kv_cache_gb, attention=sampling_config.attention,
                matmul=sampling_config.matmul)


def _run_turns(settings: Settings, weights, slots: _Slots, outputs: _Outputs, key, budget_R,
               insert: _Inserter, turn_end, executor, clock: _Clock) -> _Outputs:
    """The multi-turn host loop (module doc, "Multi-turn"): decode chunks; a row whose turn ended
    waits in its slot while `turn_end` runs in `executor`; its observation is forced in and the
    slot decodes on, or the row ends and frees the slot for a waiting row."""
    num_slots = slots.active_K.shape[0]
    num_rows = budget_R.shape[0]
    settings_vocab = weights.model().config.vocab_size
    own_executor = executor is None
    executor = executor or concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="turn_end")
    active_K = np.zeros(num_slots, bool)  # decoding
    occupied_K = np.zeros(num_slots, bool)  # holds a row: decoding, or waiting for turn_end
    waiting = {}  # future -> (slot, row, column)
    try:
        while True:
            slots, filled = insert(slots, np.flatnonzero(~occupied_K))
            active_K[filled] = occupied_K[filled] = True
            if not occupied_K.any():
                return outputs
            if active_K.any():
                # Back to the host once a sixteenth of the slots (at least one) more have stopped.
                idle = num_slots - int(active_K.sum())
                refill_at = min(idle + max(num_slots // _REFILL_FRACTION, 1), num_slots)
                slots, outputs = clock.run("decode", decode_program, settings, weights, slots, outputs, key,
                                           budget_R, np.int32(refill_at))
                now_K, step_K, row_K = to_host((slots.active_K, slots.step_K, slots.row_K))
                stopped = np.flatnonzero(active_K & ~now_K)
                active_K = np.array(now_K)
                if len(stopped):
                    tokens = to_host(outputs.tokens_RxN[row_K[stopped]])
                    for slot, row_tokens in zip(stopped, tokens):
                        row, column = int(row_K[slot]), int(step_K[slot])
                        if column >= budget_R[row]:
                            occupied_K[slot] = False  # the episode's token budget is spent
                        else:
                            future = executor.submit(turn_end, row, row_tokens[:column].tolist())
                            waiting[future] = (slot, row, column)
            if not waiting:
                continue
            # Nothing decoding: wait for a turn to be answered; otherwise take what is ready.
            done, _ = concurrent.futures.wait(list(waiting), timeout=None if not active_K.any() else 0,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            resumed = []
            for future in done:
                slot, row, column = waiting.pop(future)
                forced = [int(t) for t in future.result() or ()]
                bad = [t for t in forced if not 0 <= t < settings_vocab]
                if bad:
                    raise ValueError(f"turn_end answered row {row} with token ids {bad[:10]} outside "
                                     f"the vocabulary [0, {settings_vocab})")
                if forced:
                    resumed.append((slot, row, column, forced))
                else:
                    occupied_K[slot] = False
            if resumed:
                width = 1 << (max(len(f) for *_, f in resumed) - 1).bit_length()
                slot_M = np.full(num_slots, num_slots, np.int32)
                row_M = np.full(num_slots, num_rows, np.int32)
                start_M = np.zeros(num_slots, np.int32)
                forced_MxW = np.full((num_slots, width), -1, np.int32)
                for m, (slot, row, column, forced) in enumerate(resumed):
                    slot_M[m], row_M[m], start_M[m] = slot, row, column
                    forced_MxW[m, : len(forced)] = forced
                slots, outputs = _resume_jit(settings, slots, outputs, slot_M, row_M, start_M, forced_MxW)
                active_K[[slot for slot, *_ in resumed]] = True
    finally:
        for future in waiting:
            future.cancel()
        if own_executor:
            executor.shutdown(wait=False, cancel_futures=True)


def slot_layout(config, *, prompt_len: int, max_new_tokens: int, num_rows: int, mesh,
                max_concurrent: int | None, kv_cache_gb: float, attention: str) -> tuple[int, int, int]:
    """(cache columns per slot, slots, most distinct prompts per prefill) of a `generate` call with
    prompts padded to `prompt_len` and a resolved decode `attention`. Slots are a multiple of the
    batch shards; the prefill count is a power of two per shard near 16k prompt tokens, which
    bounds the prefill's activations (its [M, heads, P, P] attention scores)."""
    num_cache_slots = prompt_len - 1 + max_new_tokens
    if attention in ("pallas", "paged"):
        num_cache_slots = -(-num_cache_slots // DECODE_SLOT_ALIGN) * DECODE_SLOT_ALIGN
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if max_concurrent is None:
        max_concurrent = slots_for_budget(config, num_cache_slots, kv_cache_gb, mesh)
    num_slots = min(-(-max_concurrent // shards), -(-num_rows // shards)) * shards
    max_prefill = shards * (1 << (max(_PREFILL_TOKENS // prompt_len, 1).bit_length() - 1))
    return num_cache_slots, num_slots, max_prefill


@functools.partial(jax.jit, static_argnames="matmul")
def _prefill_routing(weights, prompt_tokens_MxP, prompt_mask_MxP, matmul: str):
    return decoding.prefill(weights, prompt_tokens_MxP[:, :-1], prompt_mask_MxP[:, :-1], record_routing=True,
                            matmul=matmul)[2]


def _prompt_routing(weights, prompt_tokens_BxP, prompt_mask_BxP, outputs: _Outputs, n: int, matmul: str):
    """`Samples.routing`: the prompts' experts (one prefill of the distinct prompts) and the
    decode steps' (`outputs.routing_RxNxLxK`) in the rollout's columns."""
    step_RxNxLxK = outputs.routing_RxNxLxK
    if prompt_tokens_BxP.shape[1] > 1:
        prompt_BxQxLxK = _prefill_routing(weights, jnp.asarray(prompt_tokens_BxP), jnp.asarray(prompt_mask_BxP),
                                          matmul)
    else:  # a one-token prompt bucket: decode step 0 routes its only token
        prompt_BxQxLxK = jnp.full((prompt_tokens_BxP.shape[0], 1, *step_RxNxLxK.shape[2:]), -1, jnp.int16)
    return moe.rollout_routing(jnp.repeat(prompt_BxQxLxK.astype(jnp.int16), n, axis=0),
                               jnp.repeat(jnp.asarray(prompt_mask_BxP), n, axis=0), step_RxNxLxK)


@functools.lru_cache(maxsize=None)
def _announce(message: str) -> None:
    print(message, flush=True)


def _with_mesh_in_context(generate):
    """Traces every program of `generate` with its `mesh` in context: the decode kernel is that of
    the mesh's platform and runs per shard (`models.attention`)."""

    @functools.wraps(generate)
    def wrapped(*args, mesh=None, **kwargs):
        with mesh_context(mesh):
            return generate(*args, mesh=mesh, **kwargs)

    return wrapped


@_with_mesh_in_context
def generate(
    model,
    prompts,
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: int | Sequence[int] = (),
    seed: int | jax.Array = 0,
    n: int = 1,
    pad_id: int = 0,
    prompt_bucket: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    max_concurrent: int | None = None,
    kv_cache_gb: float = DEFAULT_KV_CACHE_GB,
    attention: str = "auto",
    matmul: str = "auto",
    turn_end: Callable[[int, list[int]], Sequence[int] | None] | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    executor: concurrent.futures.Executor | None = None,
    timings: dict | None = None,
    record_routing: bool = False,
) -> Samples:
    """Samples `n` completions of up to `max_new_tokens` tokens per prompt (see the module doc).

    Args:
      model: a `cfpo_jax.models.Transformer`.
      prompts: a list of token-id lists (lengths may differ, none empty), or a pair
        (tokens [B, L], lengths [B]) of right-padded prompts.
      max_new_tokens: the budget N of every row, or one budget per prompt (as lm-eval requests
        carry); N = the largest sizes the outputs and the cache. A row cut by its budget has
        eos False.
      temperature: 0 is greedy; otherwise sample from softmax(logits / temperature).
      top_p, top_k: nucleus / top-k restriction of the sampled distribution (1.0 / 0 = off).
      eos_token_ids: a row stops after the first of these (the EOS is kept, mask 1).
      seed: an int or a `jax.random.key` (a raw uint32 key is wrapped as one); the same seed gives
        the same samples, whatever K.
      n: samples per prompt; rows are group by group (row i * n + j: sample j of prompt i).
      prompt_bucket: padded prompt length; None rounds the longest prompt up to a power of two.
      mesh: split the slots over its ('data', 'fsdp') axes (weights: see `models.decoding`).
      max_concurrent: K, the rows decoded at once (rounded up to a multiple of the batch shards;
        more than the rows is the rows); None: as many as fit `kv_cache_gb` per device.
      attention: decode attention kernel ("auto", "einsum", "reduce", "native", "pallas", "paged"; see
        `models.attention`).
      matmul: the projections' kernel ("auto", "xla", "native"; see `models.matmul`).
      turn_end: multi-turn rollouts (see "Multi-turn" in the module doc): called as
        turn_end(row, tokens) when a row's turn ends (an EOS or a stop sequence), `tokens` the
        row's completion columns so far; returns the tokens to force next (an observation), or
        None / [] to end the row. None: single-turn, a row ends at its first EOS.
      stop_sequences: with `turn_end`, token sequences that also end a turn (kept, sampled).
      executor: where `turn_end` calls run (default: a pool of 8 threads for this call).
      timings: a dict to fill with the call's seconds in its prefill programs ("prefill"), its
        decode chunks ("decode") and the rest ("host"); each program is then waited for, so the
        device does not run ahead of the host (for benchmarks; None: no waiting).
      record_routing: a mixture-of-experts model's routing of every token goes into
        `Samples.routing` (the decode steps record theirs; the prompts' comes from one more prefill
        of the distinct prompts, the same function the slots' prefill runs).

    Returns:
      `Samples` with R = len(prompts) * n rows (arrays on device).
    """
    clock = _Clock(timings)
    request = _request(model.config, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                       stop_sequences=stop_sequences, multi_turn=turn_end is not None, n=n, pad_id=pad_id,
                       prompt_bucket=prompt_bucket)
    _check_settings(model.config.vocab_size, request.max_new_tokens, temperature, top_p, top_k,
                    request.eos_token_ids, n, pad_id)
    if record_routing and not model.config.num_experts:
        raise ValueError(f"record_routing records a mixture of experts' routing; this "
                         f"{model.config.model_type!r} model has no experts")
    engine = _engine(model.config, request, mesh=mesh, max_concurrent=max_concurrent, kv_cache_gb=kv_cache_gb,
                     attention=attention, matmul=matmul)
    settings = Settings(
        max_new_tokens=request.max_new_tokens, temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p), eos_token_ids=request.eos_token_ids, pad_id=int(pad_id), mesh=mesh,
        attention=engine.attention, matmul=engine.matmul, multi_turn=turn_end is not None, stop_sequences=request.stop_sequences,
        record_routing=record_routing)
    weights = decoding.gather_weights(model, mesh)
    slots, outputs = init_program(settings, model.config, engine.num_slots, engine.num_cache_slots, request.num_rows)
    inserter = _Inserter(settings, weights, request, engine, clock)
    key = _as_key(seed)
    if turn_end is None:
        outputs = _run_single_turn(settings, weights, slots, outputs, key, request.budget_R, inserter, clock)
    else:
        outputs = _run_turns(settings, weights, slots, outputs, key, request.budget_R, inserter, turn_end,
                             executor, clock)
    routing = (_prompt_routing(weights, request.prompt_tokens_BxP, request.prompt_mask_BxP, outputs, n,
                               settings.matmul) if record_routing else None)
    samples = _samples(request, outputs, mesh, multi_turn=turn_end is not None, routing=routing)
    clock.finish()
    return samples


@dataclasses.dataclass(frozen=True)
class _Request:
    """A call's prompts and budgets, checked: B prompts left-padded to P, R = B · n rows."""

    prompt_tokens_BxP: np.ndarray
    prompt_mask_BxP: np.ndarray
    budget_R: np.ndarray  # int32, each row's token budget
    max_new_tokens: int  # N, the largest budget
    n: int
    eos_token_ids: tuple[int, ...]
    stop_sequences: tuple[tuple[int, ...], ...]

    @property
    def num_rows(self) -> int:
        return self.prompt_tokens_BxP.shape[0] * self.n


def _request(config, prompts, *, max_new_tokens, eos_token_ids, stop_sequences, multi_turn, n, pad_id,
             prompt_bucket) -> _Request:
    """`generate`'s prompt and budget arguments, checked against the model's vocabulary."""
    if isinstance(eos_token_ids, (int, np.integer)):
        eos_token_ids = (eos_token_ids,)
    eos_token_ids = tuple(int(i) for i in eos_token_ids)
    stop_sequences = tuple(tuple(int(t) for t in sequence) for sequence in stop_sequences)
    if stop_sequences and not multi_turn:
        raise ValueError("stop_sequences end turns of a multi-turn rollout; they need turn_end")
    if any(not sequence for sequence in stop_sequences):
        raise ValueError(f"stop_sequences {stop_sequences} holds an empty sequence")
    bad_stop = sorted({t for sequence in stop_sequences for t in sequence if not 0 <= t < config.vocab_size})
    if bad_stop:
        raise ValueError(f"stop_sequences token ids {bad_stop} are outside the vocabulary [0, {config.vocab_size})")
    if isinstance(max_new_tokens, (int, np.integer)):
        budgets = None
    else:
        budgets = np.asarray(max_new_tokens, np.int64)
        if budgets.ndim != 1 or budgets.size == 0 or budgets.min() < 1:
            raise ValueError(f"max_new_tokens must be >= 1, or one such budget per prompt; got {max_new_tokens}")
        max_new_tokens = int(budgets.max())
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")

    token_lists = _as_token_lists(prompts)
    if not token_lists:
        raise ValueError("prompts is empty")
    empty = [i for i, ids in enumerate(token_lists) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token")
    bad = sorted({t for ids in token_lists for t in ids if not 0 <= t < config.vocab_size})
    if bad:
        raise ValueError(f"prompt token ids {bad[:10]} are outside the vocabulary [0, {config.vocab_size})")
    if budgets is not None and len(budgets) != len(token_lists):
        raise ValueError(f"max_new_tokens has {len(budgets)} budgets for {len(token_lists)} prompts")
    prompt_tokens_BxP, prompt_mask_BxP = _left_pad(
        token_lists, _bucket(max(len(ids) for ids in token_lists), prompt_bucket), pad_id)
    n = max(int(n), 1)  # (n < 1 is reported by _check_settings)
    budget_R = np.full(len(token_lists) * n, max_new_tokens) if budgets is None else np.repeat(budgets, n)
    return _Request(prompt_tokens_BxP=prompt_tokens_BxP, prompt_mask_BxP=prompt_mask_BxP,
                    budget_R=budget_R.astype(np.int32), max_new_tokens=int(max_new_tokens), n=n,
                    eos_token_ids=eos_token_ids, stop_sequences=stop_sequences)


@dataclasses.dataclass(frozen=True)
class _Engine:
    """The call's slots: K slots of S cache columns, prefills of at most `max_prefill` prompts."""

    attention: str
    matmul: str
    num_cache_slots: int
    num_slots: int
    max_prefill: int
    shards: int


def _engine(config, request: _Request, *, mesh, max_concurrent, kv_cache_gb, attention, matmul) -> _Engine:
    """The slot layout of a call (`slot_layout`), printed once per setting."""
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1 (or None for the kv_cache_gb budget); got {max_concurrent}")
    if kv_cache_gb <= 0:
        raise ValueError(f"kv_cache_gb must be > 0; got {kv_cache_gb}")
    attention = resolve_decode(attention, config.dtype, config.head_dim)
    matmul = resolve_matmul(matmul, config.dtype, mesh)
    num_rows = request.num_rows
    num_cache_slots, num_slots, max_prefill = slot_layout(
        config, prompt_len=request.prompt_tokens_BxP.shape[1], max_new_tokens=request.max_new_tokens,
        num_rows=num_rows, mesh=mesh, max_concurrent=max_concurrent, kv_cache_gb=kv_cache_gb, attention=attention)
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if max_concurrent is None:
        max_concurrent = slots_for_budget(config, num_cache_slots, kv_cache_gb, mesh)
        source = f"kv_cache_gb={kv_cache_gb:g}"
    else:
        source = "max_concurrent"
    tensor = 1 if mesh is None else mesh.shape["tensor"]
    _announce(
        f"sampling: {min(max_concurrent, num_rows)} rows at a time ({source}; {num_slots} slots of "
        f"{num_cache_slots} cache columns, "
        f"{num_slots // shards * kv_bytes_per_slot(config, num_cache_slots, tensor) / 1e6:,.1f} MB "
        f"of keys/values per device; {attention} decode attention, {matmul} matmuls)")
    return _Engine(attention=attention, matmul=matmul, num_cache_slots=num_cache_slots, num_slots=num_slots,
                   max_prefill=max_prefill, shards=shards)


def _as_key(seed) -> jax.Array:
    """A typed key from an int, a typed key, or a raw uint32 key (one key style in the programs)."""
    if isinstance(seed, (int, np.integer)):
        return jax.random.key(seed)
    if not jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(seed)
    return seed


class _Clock:
    """`generate(timings=...)`: seconds in the prefill and decode programs (each waited for) and the
    rest of the call ("host"). Without a dict it neither waits nor counts."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.start = time.perf_counter()
        if timings is not None:
            timings.update(prefill=0.0, decode=0.0, host=0.0)

    def run(self, name: str, program, *args):
        if self.timings is None:
            return program(*args)
        start = time.perf_counter()
        result = jax.block_until_ready(program(*args))
        self.timings[name] += time.perf_counter() - start
        return result

    def finish(self):
        if self.timings is not None:
            busy = self.timings["prefill"] + self.timings["decode"]
            self.timings["host"] = time.perf_counter() - self.start - busy


class _Inserter:
    """Starts waiting rows, in order, in free slots: the n rows of a prompt share one prefill."""

    def __init__(self, settings: Settings, weights, request: _Request, engine: _Engine, clock: _Clock):
        self.settings, self.weights, self.request, self.engine, self.clock = settings, weights, request, engine, clock
        self.next_row = 0

    @property
    def waiting(self) -> bool:
        return self.next_row < self.request.num_rows

    def __call__(self, slots: _Slots, free) -> tuple[_Slots, np.ndarray]:
        """Starts waiting rows in the `free` slots; returns (slots, the slots filled)."""
        request, engine, n = self.request, self.engine, self.request.n
        num_rows, num_slots = request.num_rows, engine.num_slots
        filled = []
        while len(free) and self.waiting:
            first_prompt = self.next_row // n
            take = min(len(free), num_rows - self.next_row, (first_prompt + engine.max_prefill) * n - self.next_row)
            rows = np.arange(self.next_row, self.next_row + take)
            self.next_row += take
            # Each distinct prompt of these rows is prefilled once; the batch size is a power of
            # two (times the batch shards) so that few shapes compile.
            prompt_ids, source = np.unique(rows // n, return_inverse=True)
            batch = -(-(1 << (len(prompt_ids) - 1).bit_length()) // engine.shards) * engine.shards
            prompt_ids = np.concatenate([prompt_ids, np.full(batch - len(prompt_ids), prompt_ids[0])])
            source_K = np.full(num_slots, -1, np.int32)
            source_K[free[:take]] = source
            row_K = np.full(num_slots, num_rows, np.int32)
            row_K[free[:take]] = rows
            slots = self.clock.run("prefill", prefill_program, self.settings, self.weights, slots,
                                   request.prompt_tokens_BxP[prompt_ids], request.prompt_mask_BxP[prompt_ids],
                                   source_K, row_K)
            filled.extend(free[:take])
            free = free[take:]
        return slots, np.asarray(filled, np.int64)


def _run_single_turn(settings: Settings, weights, slots: _Slots, outputs: _Outputs, key, budget_R,
                     insert: _Inserter, clock: _Clock) -> _Outputs:
    """The host loop (module doc): fill free slots, decode a chunk, until every row has ended."""
    num_slots = slots.active_K.shape[0]
    active_K = np.zeros(num_slots, bool)
    while True:
        slots, filled = insert(slots, np.flatnonzero(~active_K))
        active_K[filled] = True
        if not active_K.any():
            return outputs
        refill_at = max(num_slots // _REFILL_FRACTION, 1) if insert.waiting else num_slots + 1
        slots, outputs = clock.run("decode", decode_program, settings, weights, slots, outputs, key, budget_R,
                                   np.int32(refill_at))
        active_K = np.array(to_host(slots.active_K))


def _samples(request: _Request, outputs: _Outputs, mesh, *, multi_turn: bool, routing=None) -> Samples:
    """The rows' `Samples`, on the mesh's batch axes when their count divides."""
    max_new_tokens, n = request.max_new_tokens, request.n
    lengths_R = outputs.lengths_R
    mask_RxN = (jnp.arange(max_new_tokens)[None] < lengths_R[:, None]).astype(jnp.int32)
    samples = Samples(
        prompt_tokens=jnp.repeat(jnp.asarray(request.prompt_tokens_BxP), n, axis=0),
        prompt_mask=jnp.repeat(jnp.asarray(request.prompt_mask_BxP), n, axis=0),
        tokens=outputs.tokens_RxN,
        mask=mask_RxN,
        logprobs=outputs.logprobs_RxN,
        lengths=lengths_R,
        eos=outputs.eos_R,
        generated=outputs.generated_RxN.astype(jnp.int32) * mask_RxN if multi_turn else None,
        routing=routing,
    )
    if mesh is not None:
        # Every output on the mesh, rows over the batch axes when they divide (as the trainer's
        # batches are), so later jitted steps need no implicit transfer.
        shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        rows = NamedSharding(mesh, PS(BATCH_AXES) if request.num_rows % shards == 0 else PS())
        samples = jax.device_put(samples, rows)
    return samples
