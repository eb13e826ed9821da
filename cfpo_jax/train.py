"""`python -m cfpo_jax.train --config=configs/<name>.py[:arg] [--workdir=DIR] [--config.x.y=v]`.

One RL step (ARCHITECTURE.md, "Data flow"):
  prompts → sample (device) → decode → rewards (host) → advantages → old logprobs recomputed by the
  trainer (the sampler's own logprobs only feed the `sampler_logprob_gap` metric) → reference
  logprobs when β > 0 → num_epochs × num_minibatches calls of the jitted pure `update(state, batch)`
  → metrics → checkpoint → periodic evaluation.

Decisions written down here:
  * The training state is a dict pytree {params, opt_state, rng, step, updates, skipped_updates,
    and ref_params only when β > 0};
    `step` counts RL steps, `updates` optimiser updates actually applied (it drives the learning-
    rate schedule), `skipped_updates` those refused because the loss or a gradient was not finite.
  * Gradient accumulation is exact: the loss denominators (token or sequence counts) depend only on
    the masks, so they are computed for the whole minibatch first and each micro-batch contributes
    grad(loss_sum_i / denominator); the sum over micro-batches is the full-minibatch gradient.
  * Minibatches are a fresh permutation of the rollout per epoch, drawn from (seed, step, epoch) so
    a resumed run draws the same ones.
  * The sampler gets a key split off the state's rng each step: same seed and same data iterator
    state → same samples, which is what makes a resumed run equal an uninterrupted one.
  * The supervised warm start (config.warmstart) runs only on a fresh start; its result is part of
    every checkpoint's params, and it is the reference policy when β > 0.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS
from ml_collections import config_flags

from cfpo_jax import advantages, checkpoint, data, evaluate, losses, models, rewards, sampling
from cfpo_jax import sharding
from cfpo_jax import config as config_lib
from cfpo_jax import logging as metrics_lib
from cfpo_jax import tiny

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quickstart.py")
# No default here: ml_collections would parse the default and its overrides at import time, out of
# reach of `_parse_flags`; the quickstart is put in argv there instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Training config file (default {_DEFAULT_CONFIG}).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where everything goes; overrides config.workdir.")


# ============================================================================ optimiser


def make_optimizer(optim: ml_collections.ConfigDict, total_updates: int):
    """optax AdamW with linear warmup then `schedule`, after global-norm clipping."""
    decay_steps = max(total_updates - optim.warmup_steps, 1)
    after = {
        "constant": optax.constant_schedule(optim.lr),
        "cosine": optax.cosine_decay_schedule(optim.lr, decay_steps),
        "linear": optax.linear_schedule(optim.lr, 0.0, decay_steps),
    }[optim.schedule]
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), after], [optim.warmup_steps]
    ) if optim.warmup_steps else after
    chain = [optax.clip_by_global_norm(optim.max_grad_norm)] if optim.max_grad_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
    return optax.chain(*chain), schedule


# ============================================================================ update step


def _micro_batches(tree, micro_size: int):
    """[B, ...] leaves → [M, b, ...] with micro-batch j = rows {i·M + j}: each device keeps its rows."""
    def split(x):
        num = x.shape[0] // micro_size
        return jnp.swapaxes(x.reshape(micro_size, num, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


def make_update(graphdef, rest, tx, schedule, rl: ml_collections.ConfigDict, *,
                temperature: float, max_len: int, micro_batch_size: int):
    """The pure `update(state, batch) -> (state, metrics)` for one minibatch.

    batch: tokens [B, L] (prompt then completion), attn [B, L] (1 on real tokens), mask [B, N]
    (completion tokens incl. EOS), old_logp [B, N], adv [B], and ref_logp [B, N] when β > 0.
    """
    loss_kwargs = dict(objective=rl.objective, eps=rl.eps, eps_high=rl.eps_high,
                       dual_clip=rl.dual_clip, level=rl.level, agg=rl.agg, max_len=max_len)
    beta = rl.beta

    def micro_loss(params, mb, denom, num_tokens):
        model = nnx.merge(graphdef, params, rest)
        logp_BxL, _ = models.sequence_logprobs(model, mb["tokens"], mb["attn"],
                                               temperature=temperature)
        logp_BxN = logp_BxL[:, -mb["mask"].shape[1]:]
        terms = losses.policy_loss_terms(logp_BxN, mb["old_logp"], mb["adv"], mb["mask"],
                                         **loss_kwargs)
        loss = terms["loss_sum"] / denom
        if beta > 0:
            kl_BxN = losses.kl(logp_BxN, mb["ref_logp"], rl.kl_estimator) * mb["mask"]
            terms["kl_sum"] = jnp.sum(kl_BxN)
            loss = loss + beta * terms["kl_sum"] / num_tokens
        return loss, terms

    def update(state, batch):
        params = state["params"]
        mask = batch["mask"].astype(jnp.float32)
        # Denominators depend on masks only: compute them once for the whole minibatch.
        _, denom = losses.lookup("agg", rl.agg)(mask, mask, max_len)
        denom = jnp.maximum(denom, 1e-9)
        num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
        size = micro_batch_size or mask.shape[0]
        micro = _micro_batches(batch, size)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(grads_acc, mb):
            (loss, terms), grads = grad_fn(params, mb, denom, num_tokens)
            return jax.tree.map(jnp.add, grads_acc, grads), (loss, terms)

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        grads, (loss_M, terms_M) = jax.lax.scan(body, zero_grads, micro)
        terms = {k: v[0] for k, v in terms_M.items()}
        for j in range(1, loss_M.shape[0]):
            terms = losses.combine_terms(terms, {k: v[j] for k, v in terms_M.items()})
        loss = jnp.sum(loss_M)
        _, metrics = losses.finalize_terms(terms)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = dict(
            state,
            params=keep(new_params, params),
            opt_state=keep(new_opt_state, state["opt_state"]),
            updates=state["updates"] + finite.astype(jnp.int32),
            skipped_updates=state["skipped_updates"] + (~finite).astype(jnp.int32),
        )
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state["updates"]),
                       update_skipped=(~finite).astype(jnp.float32))
        if beta > 0:
            metrics["kl_ref"] = terms["kl_sum"] / num_tokens
        return new_state, metrics

    return update


def make_logprobs(graphdef, rest, *, temperature: float, micro_batch_size: int):
    """Jittable (params, tokens [B, L], attn [B, L]) -> (logp [B, L], entropy [B, L]) in micro-batches."""

    def logprobs(params, tokens, attn):
        model = nnx.merge(graphdef, params, rest)
        size = micro_batch_size or tokens.shape[0]
        micro = _micro_batches((tokens, attn), size)
        fn = lambda mb: models.sequence_logprobs(model, mb[0], mb[1], temperature=temperature)
        logp_MxbxL, ent_MxbxL = jax.lax.map(fn, micro)
        unsplit = lambda x: jnp.swapaxes(x, 0, 1).reshape(tokens.shape)
        return unsplit(logp_MxbxL), unsplit(ent_MxbxL)

    return logprobs


# ============================================================================ warm start


def warm_start(params, graphdef, rest, *, iterator, tokenizer, wcfg, max_new_tokens, batch_sh,
               progress):
    """Supervised steps before RL: teacher-forced cross-entropy on the gold `answer` text + EOS.

    Meant for models that do not yet know the answer format (the quickstart's random init); the
    target is the bare answer, not a worked solution.
    """
    tx = optax.adam(wcfg.lr)
    eos = tokenizer.eos_token_id

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def sft_step(params, opt_state, tokens, attn, mask):
        def loss_fn(p):
            logp, _ = models.sequence_logprobs(nnx.merge(graphdef, p, rest), tokens, attn)
            logp = logp[:, -mask.shape[1]:]
            return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.jit(tx.init)(params)
    for i in range(wcfg.steps):
        batch = next(iterator)
        answers = [tokenizer(ex["answer"], add_special_tokens=False)["input_ids"][:max_new_tokens - 1]
                   + [eos] for ex in batch.examples]
        tokens, attn, mask = _teacher_forced_batch(batch.prompts, answers, tokenizer.pad_token_id,
                                                   max_new_tokens)
        put = lambda x: jax.device_put(x, batch_sh)
        params, opt_state, loss = sft_step(params, opt_state, put(tokens), put(attn), put(mask))
        if (i + 1) % max(wcfg.steps // 5, 1) == 0 or i + 1 == wcfg.steps:
            progress.message(f"warm start {i + 1}/{wcfg.steps}  cross-entropy {float(loss):.3f}")
    return params


def _teacher_forced_batch(prompts, answers, pad_id, width_n):
    width_p = _bucket(max(len(p) for p in prompts))
    tokens = np.full((len(prompts), width_p + width_n), pad_id, np.int32)
    attn = np.zeros_like(tokens)
    mask = np.zeros((len(prompts), width_n), np.float32)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        tokens[i, width_p - len(p):width_p] = p
        attn[i, width_p - len(p):width_p + len(a)] = 1
        tokens[i, width_p:width_p + len(a)] = a
        mask[i, :len(a)] = 1
    return tokens, attn, mask


# ============================================================================ rollout helpers


def _bucket(length: int) -> int:
    """Next power of two (at least 8): prompt widths that keep the number of compiles small."""
    return max(8, 1 << (max(length, 1) - 1).bit_length())


def _left_pad_to(x, width, value):
    pad = width - x.shape[1]
    return jnp.pad(x, ((0, 0), (pad, 0)), constant_values=value) if pad > 0 else x


def _shard_np(tree, sharding_):
    """Host numpy pytree → global arrays with `sharding_` (every host holds the full batch)."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding_, lambda idx: x[idx])
    return jax.tree.map(put, tree)


def _mean_metrics(metrics_list):
    out = {}
    for key in metrics_list[0]:
        values = np.array([float(m[key]) for m in metrics_list])
        out[key] = values.max() if key == "ratio_max" else values.min() if key == "ratio_min" \
            else values.mean()
    return out


# ============================================================================ signals


class _StopFlag:
    """SIGTERM / SIGINT → finish the current step, checkpoint, exit 0. A second signal acts as usual."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ============================================================================ main loop


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Trains per `config` into `workdir`; returns {'state', 'history', 'stopped_by'}.

    `devices` restricts the mesh (tests compare 1 device with 8); default all devices.
    """
    config_lib.validate(config)
    stop = _StopFlag().install()
    try:
        return _run(config, workdir, devices, stop)
    finally:
        stop.restore()


def _run(config, workdir, devices, stop):
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    rl, smp = config.rl, config.sampling

    # ------------------------------------------------------------------ mesh
    sharding.initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PS())
    rollout = config.data.batch_size * rl.group_size
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    minibatch = rollout // rl.num_minibatches
    micro = rl.micro_batch_size or minibatch
    if micro % batch_shards:
        raise ValueError(
            f"the micro-batch of {micro} sequences (rl.micro_batch_size, or data.batch_size × "
            f"rl.group_size / rl.num_minibatches) must divide over the {batch_shards} "
            f"data × fsdp shards of the mesh {dict(mesh.shape)}"
        )

    # ------------------------------------------------------------------ model and tokenizer
    model_path = config.model.path
    if model_path == "tiny":
        model_path = tiny.build(os.path.join(workdir, "tiny_model"), seed=config.seed,
                                **config.model.tiny.to_dict())
    model = models.from_pretrained(model_path, mesh=mesh, param_dtype=config.model.param_dtype,
                                   dtype=config.model.dtype)
    tokenizer = models.load_tokenizer(model_path)
    eos_ids = sorted({*evaluate.eos_ids(tokenizer, model_path), *model.config.eos_token_ids})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_sh = jax.tree.map(lambda x: x.sharding, params)

    # ------------------------------------------------------------------ data and rewards
    iterator = data.iterator_from_config(config, tokenizer)
    iterator.dataset[0]  # a row without the preset's fields fails now, not after compilation
    scorer = rewards.Scorer.from_config(config.rewards)

    # ------------------------------------------------------------------ train state
    updates_per_step = rl.num_epochs * rl.num_minibatches
    tx, schedule = make_optimizer(config.optim, config.train.num_steps * updates_per_step)
    # Moments inherit the params' shardings; leaves made from nothing (step counts) would land on
    # one device, so they are replicated over the mesh.
    opt_state = jax.tree.map(
        lambda x: x if len(x.sharding.device_set) == mesh.size else jax.device_put(x, replicated),
        jax.jit(tx.init)(params))
    scalar = lambda v: jax.device_put(jnp.int32(v), replicated)
    state = dict(params=params, opt_state=opt_state,
                 rng=jax.device_put(jax.random.PRNGKey(config.seed), replicated),
                 step=scalar(0), updates=scalar(0), skipped_updates=scalar(0))
    if rl.beta > 0:
        # The frozen reference is the policy RL starts from (after any warm start). It lives in the
        # state so a resumed run gets it back from the checkpoint; β = 0 holds no reference.
        state["ref_params"] = jax.tree.map(jnp.copy, params)
    state_sh = jax.tree.map(lambda x: x.sharding, state)

    # ------------------------------------------------------------------ checkpoint / resume
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   every=config.train.checkpoint_every,
                                   keep=config.train.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.train.tensorboard,
                                       wandb_project=config.train.wandb_project,
                                       config=config.to_dict(), enabled=is_main)
    progress = metrics_lib.Progress(config.train.num_steps, every=config.train.log_every,
                                    enabled=is_main)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, checkpoint.abstract_like(state, state_sh))
        iterator.restore(meta["data"])
        progress.message(f"resumed from step {latest} ({ckpt.directory}/{latest})")
    elif config.warmstart.steps:
        # Its own shuffle of the training set (seed + 1), so RL's data order is unchanged.
        warm_iter = data.PromptIterator(iterator.dataset, iterator.builder,
                                        config.warmstart.batch_size, seed=config.data.seed + 1,
                                        max_prompt_len=smp.max_prompt_len)
        state["params"] = warm_start(
            state["params"], graphdef, rest, iterator=warm_iter, tokenizer=tokenizer,
            wcfg=config.warmstart, max_new_tokens=smp.max_new_tokens, batch_sh=batch_sh,
            progress=progress)
        state["params"] = jax.device_put(state["params"], param_sh)
        if rl.beta > 0:
            state["ref_params"] = jax.tree.map(jnp.copy, state["params"])
    start = int(state["step"])

    # ------------------------------------------------------------------ jitted functions
    temperature = smp.temperature
    update = jax.jit(
        make_update(graphdef, rest, tx, schedule, rl, temperature=temperature,
                    max_len=smp.max_new_tokens, micro_batch_size=rl.micro_batch_size),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
        donate_argnums=0)
    logprobs = jax.jit(
        make_logprobs(graphdef, rest, temperature=temperature,
                      micro_batch_size=rl.micro_batch_size),
        in_shardings=(param_sh, batch_sh, batch_sh), out_shardings=(batch_sh, batch_sh))
    split_rng = jax.jit(lambda key: tuple(jax.random.split(key)), out_shardings=replicated)

    # ------------------------------------------------------------------ loop
    history = []
    step = start
    while step < config.train.num_steps and stop.signal is None:
        t0 = time.time()
        # sample
        batch = next(iterator)  # prompts longer than max_prompt_len are skipped by the iterator
        new_rng, sample_key = split_rng(state["rng"])
        samples = sampling.generate(
            nnx.merge(graphdef, state["params"], rest), batch.prompts,
            max_new_tokens=smp.max_new_tokens, temperature=temperature, top_p=smp.top_p,
            top_k=smp.top_k, eos_token_ids=tuple(eos_ids), seed=sample_key, n=rl.group_size,
            pad_id=pad_id, mesh=mesh)
        samples = sharding.to_host(samples)
        t1 = time.time()

        # rewards and advantages
        completions = tokenizer.batch_decode(
            [row[:n] for row, n in zip(samples.tokens, samples.lengths)], skip_special_tokens=True)
        answers, fields = batch.reward_inputs(rl.group_size)
        scores = scorer(completions, answers, **fields)
        reward_B = scores.total_B
        adv_B = np.asarray(advantages.compute(reward_B, rl.group_size, rl.estimator))
        t2 = time.time()

        # old (and reference) logprobs, recomputed by the trainer
        width_p = _bucket(samples.prompt_tokens.shape[1])
        prompt_tok = np.asarray(_left_pad_to(samples.prompt_tokens, width_p, pad_id))
        prompt_mask = np.asarray(_left_pad_to(samples.prompt_mask, width_p, 0))
        tokens = np.concatenate([prompt_tok, samples.tokens], axis=1)
        attn = np.concatenate([prompt_mask, samples.mask], axis=1)
        mask = samples.mask.astype(np.float32)
        tokens_d, attn_d = _shard_np((tokens, attn), batch_sh)
        old_logp, entropy = sharding.to_host(logprobs(state["params"], tokens_d, attn_d))
        old_logp, entropy = old_logp[:, width_p:], entropy[:, width_p:]
        rollout_batch = dict(tokens=tokens, attn=attn, mask=mask, old_logp=old_logp, adv=adv_B)
        if rl.beta > 0:
            rollout_batch["ref_logp"] = sharding.to_host(
                logprobs(state["ref_params"], tokens_d, attn_d)[0])[:, width_p:]

        # num_epochs × num_minibatches updates
        update_metrics = []
        for epoch in range(rl.num_epochs):
            order = np.random.default_rng((config.seed, step, epoch)).permutation(rollout) \
                if rl.num_minibatches > 1 else np.arange(rollout)
            for rows in np.split(order, rl.num_minibatches):
                minibatch_d = _shard_np({k: v[rows] for k, v in rollout_batch.items()}, batch_sh)
                state, m = update(state, minibatch_d)
                update_metrics.append(m)
        update_metrics = _mean_metrics(sharding.to_host(update_metrics))
        state = dict(state, rng=new_rng, step=state["step"] + 1)
        step += 1
        t3 = time.time()

        # metrics
        num_tokens = float(mask.sum())
        groups = reward_B.reshape(-1, rl.group_size)
        metrics = dict(
            **scores.metrics("reward"),
            **update_metrics,
            entropy=float((entropy * mask).sum() / max(num_tokens, 1)),
            response_len_mean=float(samples.lengths.mean()),
            response_len_max=int(samples.lengths.max()),
            truncated_frac=float(1.0 - samples.eos.mean()),
            zero_std_groups=int((np.ptp(groups, axis=1) == 0).sum()),
            sampler_logprob_gap=float(
                (np.abs(samples.logprobs - old_logp) * mask).sum() / max(num_tokens, 1)),
            skipped_updates=int(state["skipped_updates"]),
            tokens_per_s=num_tokens / max(t1 - t0, 1e-9),
            time_sample_s=t1 - t0, time_score_s=t2 - t1, time_learn_s=t3 - t2,
            time_step_s=t3 - t0,
        )
        writer.write(step, metrics)
        progress.update(step, metrics)
        history.append(dict(step=step, **metrics))

        # checkpoint, evaluation
        if ckpt.save(step, state, {"data": iterator.state},
                     force=stop.signal is not None or step == config.train.num_steps):
            progress.message(f"checkpoint {step} -> {ckpt.directory}/{step}")
        every = config.eval.every_steps
        if config.eval.sources and ((every and step % every == 0) or step == config.train.num_steps):
            _evaluate(config, workdir, nnx.merge(graphdef, state["params"], rest), tokenizer,
                      mesh, tuple(eos_ids), step, writer, progress)

    if stop.signal is not None:
        # A signal before the first RL step (during compilation or the warm start) still leaves a
        # checkpoint of what was done.
        ckpt.wait()
        if ckpt.latest_step() != step:
            ckpt.save(step, state, {"data": iterator.state}, force=True)
        progress.message(f"{stop.signal}: saved step {step} and stopped")
    ckpt.close()
    if config.train.export_hf and step == config.train.num_steps and stop.signal is None:
        path = os.path.join(workdir, "hf")
        models.save_pretrained(nnx.merge(graphdef, state["params"], rest), path, tokenizer=tokenizer)
        progress.message(f"exported the policy to {path}")
    writer.close()
    return dict(state=state, history=history, stopped_by=stop.signal)


def _evaluate(config, workdir, model, tokenizer, mesh, eos_ids, step, writer, progress):
    results = evaluate.evaluate_model(
        model, tokenizer, config, output_dir=config.eval.output_dir or os.path.join(workdir, "eval"),
        step=step, mesh=mesh, eos_token_ids=eos_ids, progress=progress.tty)
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
    shown = (f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items())
    progress.message(f"eval @ {step}: " + "  ".join(shown))


# ============================================================================ command line


def _parse_flags(argv):
    """absl flag parsing, with an unknown `--config.a.b` override reported with the valid names."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        message = str(e).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
        sys.stderr.write(f"error: {message}\n")
        for arg in argv:
            if arg.startswith("--config.") and "=" in arg:
                *sections, _ = arg[len("--config."):].split("=")[0].split(".")
                node = config_lib.base_config()
                for section in sections:
                    node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
                if isinstance(node, ml_collections.ConfigDict):
                    where = ".".join(sections) or "the top level"
                    sys.stderr.write(f"  valid fields of {where}: {sorted(node.keys())}\n")
        sys.exit(2)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or config.workdir
    if not workdir:
        sys.exit("error: no workdir: pass --workdir=DIR or set config.workdir")
    try:
        config_lib.validate(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    result = run(config, workdir)
    history = result["history"]
    if history:
        tenth = max(len(history) // 10, 1)
        first = np.mean([h["reward_mean"] for h in history[:tenth]])
        last = np.mean([h["reward_mean"] for h in history[-tenth:]])
        print(f"done: mean reward first tenth {first:.3f} -> last tenth {last:.3f}; "
              f"metrics in {os.path.join(workdir, 'metrics.jsonl')}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
