"""`cfpo_jax.aot` compiles the trainer's programs for the inputs a run really gives them: the
abstract arguments of the update, prepare, prefill and decode programs (shapes, dtypes,
shardings, the typed key) equal those the trainer passes in a real CPU run of a tiny config,
recorded here."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from cfpo_jax import checkpoint, metrics, sampling, train
from cfpo_jax.aot import programs
from tests.fixtures.runs import tiny


@dataclasses.dataclass(frozen=True)
class _Leaf:  # not a pytree: a leaf of the described tree
    shape: tuple
    dtype: object
    sharding: object  # None: a host (numpy) array


def _describe(tree):
    """Shape, dtype and sharding of every array leaf (None leaves are no leaves)."""
    return jax.tree.map(lambda x: _Leaf(tuple(np.shape(x)), np.asarray(x).dtype if isinstance(
        x, (np.ndarray, np.generic)) else x.dtype, getattr(x, "sharding", None)), tree)


def _record(fn, calls, *, static: int = 0):
    """`fn` recording the description of its arguments after the first `static` (hashable
    settings, compared apart)."""
    def recorded(*args):
        calls.append(_describe(args[static:]))
        return fn(*args)
    return recorded


def _assert_same_inputs(real, abstract, name):
    real_leaves, real_tree = jax.tree.flatten(real)
    spec_leaves, spec_tree = jax.tree.flatten(_describe(abstract))
    assert real_tree == spec_tree, f"{name}: the trainer passes {real_tree}, aot compiles {spec_tree}"
    for got, want in zip(real_leaves, spec_leaves):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), (name, got, want)
        if got.sharding is None:  # the host uploads it whole: aot compiles it replicated
            assert want.sharding.is_fully_replicated, (name, got, want)
        else:
            assert got.sharding.is_equivalent_to(want.sharding, len(got.shape)), (name, got, want)


@pytest.mark.parametrize("overrides", [
    # off policy with a KL loss term: old and reference logprobs, every optional batch field
    dict(rl__num_epochs=2, rl__beta=0.1, rl__pack=False),
    # on policy, KL in the reward, 8 devices: the sampler's logprobs, fsdp-sharded state
    dict(rl__beta=0.1, rl__kl_in_reward=True, rl__estimator="rloo", rl__pack=False),
], ids=["off-policy-kl-loss", "on-policy-kl-in-reward"])
def test_aot_compiles_the_programs_for_the_inputs_the_trainer_passes(tmp_path, monkeypatch, overrides):
    config = tiny(train__num_steps=1, **overrides)
    devices = jax.devices()[:1] if overrides.get("rl__num_epochs") else jax.devices()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=100, keep=1)
    parts, state = train.build(config, str(tmp_path), devices=devices, ckpt=ckpt,
                               progress=metrics.Progress(1, enabled=False))
    ckpt.close()
    calls = {name: [] for name in ("update", "prepare", "prefill", "decode")}
    for name in ("update", "prepare"):
        parts.learner.programs[name] = _record(parts.learner.programs[name], calls[name])
    # The sampler's programs, with their static settings left out.
    monkeypatch.setattr(sampling, "prefill_program", _record(sampling.prefill_program, calls["prefill"], static=1))
    monkeypatch.setattr(sampling, "decode_program", _record(sampling.decode_program, calls["decode"], static=1))
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
    compiled = {**programs.learner_programs(config, model_config, parts.mesh),
                **programs.sampler_programs(config, model_config, parts.mesh)}
    for name in calls:
        assert calls[name], name  # prepare and prefill once; update once per epoch; decode per chunk
        abstract = compiled[name].args[1:] if name in ("prefill", "decode") else compiled[name].args
        for call in calls[name]:
            _assert_same_inputs(call, abstract, name)
