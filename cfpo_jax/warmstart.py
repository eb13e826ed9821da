"""The supervised warm start: teacher-forced cross-entropy on the gold answers before RL.

Meant for a policy that does not yet know the answer format (the quickstart's random-init tiny
model): by default the target is the bare `answer` text followed by EOS, not a worked solution.
`config.warmstart.target` is a format string over the example's fields; a target that ends at a
stop string of the tool-call format, e.g. "<tool>print({expression})</tool>", teaches the first
turn of a tool episode: the call, which ends the turn as it does in sampling (no EOS), and nothing
of what follows the tool's answer (configs/tools_smollm2.py leaves that to RL). It runs only
on a fresh start (`config.warmstart.steps > 0`); its result is the policy RL starts from, part of
every checkpoint, and the reference policy when β > 0. It draws its own shuffle of the training
set (data seed + 1), so RL's data order is the same with or without it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cfpo_jax import data, models
from cfpo_jax.envs import formats


def teacher_forced_batch(prompts, answers, pad_id: int, width_n: int):
    """(tokens [B, P + N], attn [B, P + N], mask [B, N]) numpy arrays: prompts left-padded to a
    bucket P, answers right-padded to N = `width_n`; `mask` is 1 on answer tokens (the loss)."""
    width_p = data.bucket_width(max(len(p) for p in prompts))
    tokens = np.full((len(prompts), width_p + width_n), pad_id, np.int32)
    attn = np.zeros_like(tokens)
    mask = np.zeros((len(prompts), width_n), np.float32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        tokens[i, width_p - len(prompt):width_p] = prompt
        attn[i, width_p - len(prompt):width_p + len(answer)] = 1
        tokens[i, width_p:width_p + len(answer)] = answer
        mask[i, :len(answer)] = 1
    return tokens, attn, mask


def target_ids(example: dict, template: str, tokenizer, *, eos_id: int, stop_strings=(),
               max_tokens: int) -> list[int]:
    """The token ids the warm start trains on for `example`: `template` filled with its fields,
    followed by `eos_id` unless the text ends at one of `stop_strings`; at most `max_tokens` ids
    (the text cut to make room for the EOS)."""
    text = template.format(**example)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if any(text.endswith(stop) for stop in stop_strings):
        return ids[:max_tokens]
    return ids[:max_tokens - 1] + [eos_id]


def run(params, graphdef, frozen, *, config, train_iterator, tokenizer, batch_sharding, progress):
    """`config.warmstart.steps` Adam steps (lr `config.warmstart.lr`) on batches of
    `config.warmstart.batch_size` prompts drawn from `train_iterator`'s dataset in their own order;
    returns the new params. Targets (`target_ids`) are cut to `config.sampling.max_new_tokens`."""
    settings, max_new_tokens = config.warmstart, config.sampling.max_new_tokens
    iterator = data.PromptIterator(train_iterator.dataset, train_iterator.builder,
                                   settings.batch_size, seed=config.data.seed + 1,
                                   max_prompt_len=config.sampling.max_prompt_len)
    tx = optax.adam(settings.lr)
    stops = formats.stop_strings(config.env.format) if config.env.name else ()

    # `frozen` is an argument, not a closure: with LoRA it is the frozen base, which jit would
    # otherwise compile in as a constant.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def sft_step(params, opt_state, frozen, tokens, attn, mask):
        def loss_fn(p):
            logp, _ = models.sequence_logprobs(nnx.merge(graphdef, p, frozen), tokens, attn,
                                               num_completion=mask.shape[1])
            return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.jit(tx.init)(params)
    for i in range(settings.steps):
        batch = next(iterator)
        answers = [target_ids(ex, settings.target, tokenizer, eos_id=tokenizer.eos_token_id,
                              stop_strings=stops, max_tokens=max_new_tokens) for ex in batch.examples]
        arrays = teacher_forced_batch(batch.prompts, answers, tokenizer.pad_token_id, max_new_tokens)
        tokens, attn, mask = (jax.device_put(x, batch_sharding) for x in arrays)
        params, opt_state, loss = sft_step(params, opt_state, frozen, tokens, attn, mask)
        if (i + 1) % max(settings.steps // 5, 1) == 0 or i + 1 == settings.steps:
            progress.message(f"warm start {i + 1}/{settings.steps}  cross-entropy {float(loss):.3f}")
    return params
