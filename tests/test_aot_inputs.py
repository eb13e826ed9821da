"""`cfpo_jax.aot` compiles the trainer's programs for the inputs a run really gives them: the
abstract arguments of the update and prepare programs (shapes, dtypes, shardings, the typed
key) equal those the trainer passes in a real CPU run of a tiny config, recorded here."""

import jax
import pytest
from flax import nnx

from cfpo_jax import checkpoint, metrics, train
from cfpo_jax.aot import programs

from test_train import tiny


def _describe(tree):
    """(shape, dtype, sharding) of every leaf; None leaves kept as such."""
    return jax.tree.map(lambda x: (tuple(x.shape), x.dtype, x.sharding), tree)


def _record(fn, calls):
    def recorded(*args):
        calls.append(_describe(args))
        return fn(*args)
    return recorded


def _assert_same_inputs(real, abstract, name):
    real_leaves, real_tree = jax.tree.flatten(real, is_leaf=lambda x: isinstance(x, tuple))
    spec_leaves, spec_tree = jax.tree.flatten(_describe(abstract), is_leaf=lambda x: isinstance(x, tuple))
    assert real_tree == spec_tree, f"{name}: the trainer passes {real_tree}, aot compiles {spec_tree}"
    for (shape, dtype, sh), (spec_shape, spec_dtype, spec_sh) in zip(real_leaves, spec_leaves):
        assert (shape, dtype) == (spec_shape, spec_dtype), name
        assert sh.is_equivalent_to(spec_sh, len(shape)), (name, sh, spec_sh)


@pytest.mark.parametrize("overrides", [
    # off policy with a KL loss term: old and reference logprobs, every optional batch field
    dict(rl__num_epochs=2, rl__beta=0.1, rl__pack=False),
    # on policy, KL in the reward, 8 devices: the sampler's logprobs, fsdp-sharded state
    dict(rl__beta=0.1, rl__kl_in_reward=True, rl__estimator="rloo", rl__pack=False),
], ids=["off-policy-kl-loss", "on-policy-kl-in-reward"])
def test_aot_compiles_the_programs_for_the_inputs_the_trainer_passes(tmp_path, overrides):
    config = tiny(train__num_steps=1, **overrides)
    devices = jax.devices()[:1] if overrides.get("rl__num_epochs") else jax.devices()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=100, keep=1)
    parts, state = train.build(config, str(tmp_path), devices=devices, ckpt=ckpt,
                               progress=metrics.Progress(1, enabled=False))
    ckpt.close()
    calls = {name: [] for name in ("update", "prepare")}
    for name in calls:
        parts.learner.programs[name] = _record(parts.learner.programs[name], calls[name])
    assert jax.dtypes.issubdtype(state["rng"].dtype, jax.dtypes.prng_key)  # one key style
    model_config = nnx.merge(parts.policy.graphdef, state["params"], parts.policy.frozen).config
    with jax.set_mesh(parts.mesh):
        _, sample_key = parts.learner.split_rng(state["rng"])
        rollout = parts.rollout(state, next(parts.iterator), sample_key)
        parts.learner.learn(state, rollout.batch, rollout.lengths_Bx2, step=0)  # state donated
    parts.rollout.close()

    # aot's shapes are the config's worst case: give it the prompt bucket this run had.
    prompt_width = rollout.batch.tokens.shape[1] - rollout.batch.mask.shape[1]
    config.sampling.max_prompt_len = int(prompt_width)
    compiled = programs.learner_programs(config, model_config, parts.mesh)
    for name in calls:
        assert len(calls[name]) == 1, name
        _assert_same_inputs(calls[name][0], compiled[name].args, name)
