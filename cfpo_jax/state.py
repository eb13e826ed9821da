"""The training state: optimiser, the state pytree, its shardings, created already sharded.

The state is a dict pytree {params, opt_state, rng, step, updates, skipped_updates, and
ref_params only when β > 0 without LoRA}. `step` counts RL steps, `updates` the optimiser
updates actually applied (it drives the learning-rate schedule), `skipped_updates` those refused
because the loss or a gradient was not finite. `rng` is a typed key (`jax.random.key`): the one
key style of the package, from the state to the sampler's compiled decode chunk.

Every leaf is created with its final sharding, big_vision style (`jax.eval_shape` → shardings →
`jit(init, out_shardings=...)`): params and the optimiser moments FSDP-sharded alike, scalars and
the key replicated, so `update` returns the state in the shardings it was given and compiles once
per batch shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from cfpo_jax import checkpoint


# The learning-rate schedules after warmup: (peak lr, decay updates) -> schedule.
SCHEDULES = {
    "constant": lambda lr, decay_steps: optax.constant_schedule(lr),
    "cosine": optax.cosine_decay_schedule,
    "linear": lambda lr, decay_steps: optax.linear_schedule(lr, 0.0, decay_steps),  # to 0
}


def make_optimizer(optim: ml_collections.ConfigDict, total_updates: int):
    """(optax AdamW with linear warmup then `optim.schedule`, after global-norm clipping;
    the learning-rate schedule, a function of the update count)."""
    decay_steps = max(total_updates - optim.warmup_steps, 1)
    after = SCHEDULES[optim.schedule](optim.lr, decay_steps)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), after], [optim.warmup_steps]
    ) if optim.warmup_steps else after
    chain = [optax.clip_by_global_norm(optim.max_grad_norm)] if optim.max_grad_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
    return optax.chain(*chain), schedule


def total_updates(config: ml_collections.ConfigDict) -> int:
    """Optimiser updates of the whole run: the schedule's length."""
    rl = config.rl
    return config.train.num_steps * rl.num_epochs * rl.num_minibatches


def init_state(params, tx, *, seed: int, beta: float, adapters: bool = False):
    """The step-0 training state around `params` (pure; `create_state` jits it with shardings).
    With `adapters` (LoRA) the reference policy is the base, so no reference copy is made."""
    state = dict(params=params, opt_state=tx.init(params), rng=jax.random.key(seed),
                 step=jnp.int32(0), updates=jnp.int32(0), skipped_updates=jnp.int32(0))
    if beta > 0 and not adapters:
        # The frozen reference is the policy RL starts from (after any warm start). It lives in the
        # state so a resumed run gets it back from the checkpoint; β = 0 holds no reference.
        state["ref_params"] = jax.tree.map(jnp.copy, params)
    return state


def state_shardings(abstract_state, tx, param_sh, mesh):
    """Shardings of the state: params, reference and optimiser moments as the params; the rest
    (rng, counters, the optimiser's step counts) replicated."""
    replicated = NamedSharding(mesh, PS())
    is_sharding = lambda x: isinstance(x, NamedSharding)
    shardings = jax.tree.map(lambda _: replicated, abstract_state)
    shardings["params"] = param_sh
    shardings["opt_state"] = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_state["opt_state"], param_sh,
        transform_non_params=lambda _: replicated, is_leaf=is_sharding)
    if "ref_params" in abstract_state:
        shardings["ref_params"] = param_sh
    return shardings


def create_state(params, tx, mesh, *, seed: int, beta: float, adapters: bool = False):
    """(init, abstract_state): `init(params)` builds the step-0 state with every leaf born in its
    sharding (params donated); `abstract_state` holds ShapeDtypeStructs with those shardings, the
    target a checkpoint is restored into."""
    pure = functools.partial(init_state, tx=tx, seed=seed, beta=beta, adapters=adapters)
    abstract = jax.eval_shape(pure, params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    shardings = state_shardings(abstract, tx, param_sh, mesh)
    init = jax.jit(pure, out_shardings=shardings, donate_argnums=0)
    return init, checkpoint.abstract_like(abstract, shardings)
