"""In-JAX batched sampling: one jitted prefill, then a `lax.while_loop` decode over a KV cache.

Layout (B prompts, n samples each, P padded prompt length, N = max_new_tokens, V vocabulary):

* Prompts are left-padded to a bucket P (the next power of two of the longest prompt, or the
  given `prompt_bucket`), so every prompt ends in column P - 1 and a new prompt length does not
  recompile. Positions come from the mask through `models.default_positions`, as in the
  trainer's teacher-forced forward, so both see the same numbers.
* One shared write index for all rows. The cache has S = P - 1 + N slots: the prefill writes the
  first P - 1 prompt columns; decode step s feeds one token (the last prompt token at s = 0, the
  previous sample after) into slot P - 1 + s and samples from its logits. The prefill's logits are
  never used, so XLA drops its [B, P, V] unembedding. The attention mask over slots is the prompt
  mask followed by ones and never changes: the model's causal rule (slot <= write index) hides the
  slots not written yet.
* `n` samples per prompt: the B prompts are prefilled once and the prompt part of the cache is
  repeated n times along the batch; rows are group by group (row i * n + j is sample j of
  prompt i), the layout `advantages.compute` expects.
* Sampling: `temperature=0` is greedy (argmax) and reports temperature-1 logprobs. Otherwise the
  token is drawn from softmax(logits / temperature) restricted by `top_k` then `top_p` (top-p on
  the distribution renormalised over the top-k, as in transformers), with one Gumbel-argmax
  (`jax.random.categorical`). The reported logprob is under the *unrestricted*
  softmax(logits / temperature), the distribution the trainer recomputes. `top_p == 1` with
  `top_k == 0` samples straight from the [B, V] logits: no sort.
* A row is finished after it emits one of `eos_token_ids`; the EOS is part of the completion
  (mask 1), later columns hold `pad_id`, mask 0 and logprob 0. The loop stops when every row has
  finished or N tokens were drawn. Rows that finished keep being decoded (the batch is static) but
  their output is discarded.
* Randomness is explicit: `seed` (an int or a PRNG key) is split once per step with `fold_in`, so
  the same seed gives the same samples. Pass a fresh seed per call in training.
* Everything static (sampling settings, shapes, mesh) keys the jit cache; params are an argument,
  so new weights after an update step reuse the compiled sampler. Prefill, cache and decode live
  in one jitted call: the cache is born inside it and rides in the `while_loop` carry, where the
  model's `dynamic_update_slice` writes it in place (no buffer to donate, no host round trip).
* With a `mesh`, the prompt batch is split over ('data', 'fsdp') (rows are padded with copies of
  the first prompt up to a multiple of that size and dropped again) and the cache follows
  `cfpo_jax.sharding.cache_sharding`; parameters keep the sharding they were placed with
  (`shard_model` / `from_pretrained(mesh=...)`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from cfpo_jax.models import default_positions, init_cache
from cfpo_jax.sharding import BATCH_AXES, batch_sharding, cache_sharding


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
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    eos: jax.Array


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything that shapes the compiled sampler (hashable: it keys the jit cache)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    n: int
    pad_id: int
    mesh: jax.sharding.Mesh | None


@flax.struct.dataclass
class _DecodeState:
    """The `while_loop` carry.

    step: int32 [] samples drawn so far; the column the next sample goes to. The token fed at this
      step is written to cache slot P - 1 + step (the shared write index).
    token_B: int32 [B] the token fed at this step: the last prompt token, then the previous sample.
    position_B: int32 [B] its position id.
    cache: the model's KV cache, slots [0, P - 1 + step) filled.
    done_B: bool [B] the row has emitted an EOS; what it samples from now on is discarded.
    tokens_BxN, mask_BxN, logprobs_BxN: the outputs, filled one column per step.
    """

    step: jax.Array
    token_B: jax.Array
    position_B: jax.Array
    cache: object
    done_B: jax.Array
    tokens_BxN: jax.Array
    mask_BxN: jax.Array
    logprobs_BxN: jax.Array


def _constrain_batch(x, mesh, axis):
    """Pins the batch dimension `axis` of `x` to ('data', 'fsdp'); the other dims are left free."""
    if mesh is None:
        return x
    spec = [PS.UNCONSTRAINED] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PS(*spec)))


def _constrain_cache(cache, mesh):
    """The cache layout of `cfpo_jax.sharding` (batch over data x fsdp, kv heads over tensor)."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_sharding(mesh, cache))


def _sample(logits_BxV, key, settings: _Settings):
    """One token per row and its logprob under softmax(logits / temperature); float32 math."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if settings.temperature == 0.0:
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        scaled_BxV = logits_BxV
    else:
        scaled_BxV = logits_BxV / settings.temperature
        vocab = scaled_BxV.shape[-1]
        if settings.top_k == 0 and settings.top_p == 1.0:
            token_B = jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32)
        else:
            # Sorted candidates (the top k, or the whole vocabulary for top-p alone); sampling an
            # index among them keeps the allowed set exact even when logits tie at the cutoff.
            k = settings.top_k if settings.top_k > 0 else vocab
            top_BxK, index_BxK = jax.lax.top_k(scaled_BxV, k)
            if settings.top_p < 1.0:
                probs_BxK = jax.nn.softmax(top_BxK, axis=-1)
                # Keep the smallest prefix whose mass reaches top_p: a candidate stays if the mass
                # before it is still short of top_p (so the most likely one always stays).
                keep_BxK = (jnp.cumsum(probs_BxK, axis=-1) - probs_BxK) < settings.top_p
                top_BxK = jnp.where(keep_BxK, top_BxK, -jnp.inf)
            choice_B = jax.random.categorical(key, top_BxK, axis=-1)
            token_B = jnp.take_along_axis(index_BxK, choice_B[:, None], axis=-1)[:, 0]
            token_B = token_B.astype(jnp.int32)
    picked_B = jnp.take_along_axis(scaled_BxV, token_B[:, None], axis=-1)[:, 0]
    logprob_B = picked_B - jax.nn.logsumexp(scaled_BxV, axis=-1)
    return token_B, logprob_B


def _generate_impl(graphdef, settings: _Settings, state, prompt_tokens_BxP, prompt_mask_BxP, key):
    model = nnx.merge(graphdef, state)
    config = model.config
    n, num_new = settings.n, settings.max_new_tokens
    batch, prompt_len = prompt_tokens_BxP.shape
    rows = batch * n
    cache_len = prompt_len - 1 + num_new
    positions_BxP = default_positions(prompt_mask_BxP)

    # ---- prefill: every prompt column but the last, once per prompt.
    if prompt_len > 1:
        prefill_cache = init_cache(config, batch, prompt_len - 1)
        prefill_cache = _constrain_cache(prefill_cache, settings.mesh)
        _, prefill_cache = model.forward_cached(
            prompt_tokens_BxP[:, :-1],
            positions_BxP[:, :-1],
            prefill_cache,
            prompt_mask_BxP[:, :-1],
            jnp.int32(0),
        )
        # n copies of each prompt's keys/values, group by group, then room for the completion.
        cache = jax.tree.map(
            lambda x: jnp.pad(
                jnp.repeat(x, n, axis=1),
                [(0, 0), (0, 0), (0, cache_len - (prompt_len - 1))] + [(0, 0)] * (x.ndim - 3),
            ),
            prefill_cache,
        )
    else:
        cache = init_cache(config, rows, cache_len)
    cache = _constrain_cache(cache, settings.mesh)

    def per_row(x_B):
        return _constrain_batch(jnp.repeat(x_B, n, axis=0), settings.mesh, 0)

    kv_mask_BxS = per_row(
        jnp.concatenate([prompt_mask_BxP, jnp.ones((batch, num_new - 1), jnp.int32)], axis=1)
    )
    eos_ids = jnp.asarray(settings.eos_token_ids, jnp.int32)

    # ---- decode: one token per step for every row until all rows hit EOS or N are drawn.
    def cond_fn(s: _DecodeState):
        return (s.step < num_new) & ~jnp.all(s.done_B)

    def body_fn(s: _DecodeState):
        step_model = nnx.merge(graphdef, state)
        logits_Bx1xV, cache = step_model.forward_cached(
            s.token_B[:, None], s.position_B[:, None], s.cache, kv_mask_BxS, prompt_len - 1 + s.step
        )
        token_B, logprob_B = _sample(logits_Bx1xV[:, 0], jax.random.fold_in(key, s.step), settings)
        live_B = ~s.done_B
        done_B = s.done_B | jnp.isin(token_B, eos_ids)
        column = (jnp.int32(0), s.step)
        return _DecodeState(
            step=s.step + 1,
            token_B=token_B,
            position_B=s.position_B + 1,
            cache=cache,
            done_B=done_B,
            tokens_BxN=jax.lax.dynamic_update_slice(
                s.tokens_BxN, jnp.where(live_B, token_B, settings.pad_id)[:, None], column
            ),
            mask_BxN=jax.lax.dynamic_update_slice(
                s.mask_BxN, live_B.astype(jnp.int32)[:, None], column
            ),
            logprobs_BxN=jax.lax.dynamic_update_slice(
                s.logprobs_BxN, jnp.where(live_B, logprob_B, 0.0)[:, None], column
            ),
        )

    init = _DecodeState(
        step=jnp.int32(0),
        token_B=per_row(prompt_tokens_BxP[:, -1]),
        position_B=per_row(positions_BxP[:, -1]),
        cache=cache,
        done_B=jnp.zeros((rows,), bool),
        tokens_BxN=jnp.full((rows, num_new), settings.pad_id, jnp.int32),
        mask_BxN=jnp.zeros((rows, num_new), jnp.int32),
        logprobs_BxN=jnp.zeros((rows, num_new), jnp.float32),
    )
    final = jax.lax.while_loop(cond_fn, body_fn, init)
    return Samples(
        prompt_tokens=jnp.repeat(prompt_tokens_BxP, n, axis=0),
        prompt_mask=jnp.repeat(prompt_mask_BxP, n, axis=0),
        tokens=final.tokens_BxN,
        mask=final.mask_BxN,
        logprobs=final.logprobs_BxN,
        lengths=jnp.sum(final.mask_BxN, axis=-1, dtype=jnp.int32),
        eos=final.done_B,
    )


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1))


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


def generate(
    model,
    prompts,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: int | Sequence[int] = (),
    seed: int | jax.Array = 0,
    n: int = 1,
    pad_id: int = 0,
    prompt_bucket: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Samples:
    """Samples `n` completions of `max_new_tokens` tokens for each prompt (see the module doc).

    Args:
      model: a `cfpo_jax.models.Transformer` (anything with `.config` and `forward_cached`).
      prompts: a list of token-id lists (lengths may differ, none empty), or a pair
        (tokens [B, L], lengths [B]) of right-padded prompts.
      temperature: 0 is greedy; otherwise sample from softmax(logits / temperature).
      top_p, top_k: nucleus / top-k restriction of the sampled distribution (1.0 / 0 = off).
      eos_token_ids: a row stops after the first of these (the EOS is kept, mask 1).
      seed: an int or a `jax.random.key`; the same seed gives the same samples.
      n: samples per prompt; rows are group by group (row i * n + j: sample j of prompt i).
      prompt_bucket: padded prompt length; None rounds the longest prompt up to a power of two.
      mesh: split the batch over its ('data', 'fsdp') axes.

    Returns:
      `Samples` with B = len(prompts) * n rows (arrays on device).
    """
    if isinstance(eos_token_ids, (int, np.integer)):
        eos_token_ids = (eos_token_ids,)
    eos_token_ids = tuple(int(i) for i in eos_token_ids)
    vocab = model.config.vocab_size
    _check_settings(vocab, max_new_tokens, temperature, top_p, top_k, eos_token_ids, n, pad_id)

    token_lists = _as_token_lists(prompts)
    if not token_lists:
        raise ValueError("prompts is empty")
    empty = [i for i, ids in enumerate(token_lists) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token")
    bad = sorted({t for ids in token_lists for t in ids if not 0 <= t < vocab})
    if bad:
        raise ValueError(f"prompt token ids {bad[:10]} are outside the vocabulary [0, {vocab})")
    num_prompts = len(token_lists)
    if mesh is not None:
        # The batch split needs a multiple of the ('data', 'fsdp') size: fill with copies of the
        # first prompt, whose rows are dropped after sampling.
        shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        token_lists = token_lists + [token_lists[0]] * (-num_prompts % shards)
    width = _bucket(max(len(ids) for ids in token_lists), prompt_bucket)
    prompt_tokens_BxP, prompt_mask_BxP = _left_pad(token_lists, width, pad_id)
    if mesh is not None:
        prompt_tokens_BxP = jax.device_put(prompt_tokens_BxP, batch_sharding(mesh))
        prompt_mask_BxP = jax.device_put(prompt_mask_BxP, batch_sharding(mesh))

    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    settings = _Settings(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_token_ids=eos_token_ids,
        n=int(n),
        pad_id=int(pad_id),
        mesh=mesh,
    )
    graphdef, state = nnx.split(model)
    samples = _generate_jit(graphdef, settings, state, prompt_tokens_BxP, prompt_mask_BxP, key)
    rows = num_prompts * n
    if samples.tokens.shape[0] != rows:
        samples = jax.tree.map(lambda x: x[:rows], samples)
    return samples
