"""LoRA on the stacked decoder: forward, merge, sharding, PEFT export, fingerprint.

References are independent of `cfpo_jax.lora`: transformers' base model (an adapted model with
B = 0 must equal it), kernels merged in numpy here (W + s·A·B, float64), and the `peft` package
loading our adapter directory onto the transformers base model.
"""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.fixtures import hf_fixtures
from cfpo_jax import lora, sharding
from cfpo_jax.models import ModelConfig, from_pretrained, save_pretrained
from cfpo_jax.models.config import LORA_TARGETS

FAMILIES = ("qwen2", "qwen3", "llama")
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> directory, built once. The PEFT test covers every family (each lays out heads
    differently in HF's flat projections); the others use the one whose shapes they stress."""
    return {family: hf_fixtures.build_checkpoint(family, tmp_path_factory.mktemp(family))
            for family in FAMILIES}


def batch(T=12, seed=0):
    """Tokens [2, T] and a mask whose second row is left-padded by 5."""
    tokens = np.random.default_rng(seed).integers(3, hf_fixtures.VOCAB_SIZE, (2, T))
    mask = np.ones((2, T), np.int32)
    mask[1, :5], tokens[1, :5] = 0, 0
    return tokens, mask


def forward(model, tokens, mask):
    return np.asarray(nnx.jit(lambda m, t, k: m(t, mask_BxT=k))(model, jnp.asarray(tokens), jnp.asarray(mask)))


def with_random_adapters(model, seed=1):
    """`model` with every A and B drawn at random (B is zero after `lora.adapt`)."""
    graphdef, adapters, frozen = lora.split(model)
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(
        lambda x: jax.device_put(0.1 * rng.standard_normal(x.shape).astype(np.float32), x.sharding), adapters)
    return nnx.merge(graphdef, adapters, frozen)


def numpy_merged_kernels(model):
    """{(module, kernel name): W + (alpha / rank)·A·B} per layer, in float64."""
    merged = {}
    for target in model.config.lora_targets:
        module_name = "attn" if target in ("q", "k", "v", "o") else "mlp"
        module = getattr(model.blocks, module_name)
        kernel = np.asarray(getattr(module, f"{target}_kernel")[...], np.float64)
        lora_a = np.asarray(getattr(module, f"{target}_lora_a")[...], np.float64)
        lora_b = np.asarray(getattr(module, f"{target}_lora_b")[...], np.float64)
        num_layers, rank = lora_a.shape[0], lora_a.shape[-1]
        delta = np.stack([(lora_a[i].reshape(-1, rank) @ lora_b[i].reshape(rank, -1)).reshape(kernel.shape[1:])
                          for i in range(num_layers)])
        merged[module_name, f"{target}_kernel"] = kernel + (ALPHA / RANK) * delta
    return merged


def test_zero_initialised_adapters_leave_logits_unchanged(checkpoints):
    directory = checkpoints["qwen2"]
    base = from_pretrained(directory)
    adapted = lora.adapt(base, rank=RANK, alpha=ALPHA, targets=LORA_TARGETS, seed=3)
    lora_a = np.asarray(adapted.blocks.attn.q_lora_a[...])
    bound = 1 / np.sqrt(lora_a.shape[1])  # PEFT's default: uniform ±1/sqrt(fan_in)
    assert lora_a.shape == (2, 64, RANK) and 0.5 * bound < np.abs(lora_a).max() <= bound
    assert not np.any(np.asarray(adapted.blocks.mlp.down_lora_b[...]))
    tokens, mask = batch()
    np.testing.assert_array_equal(forward(adapted, tokens, mask), forward(base, tokens, mask))


def test_adapted_forward_equals_merged_weights_forward(checkpoints):
    directory = checkpoints["qwen3"]  # head_dim 32 != hidden / heads: the o-projection's layout
    adapted = with_random_adapters(lora.adapt(from_pretrained(directory), rank=RANK, alpha=ALPHA,
                                              targets=LORA_TARGETS))
    expected_kernels = numpy_merged_kernels(adapted)
    reference = from_pretrained(directory)  # its kernels replaced by the numpy merge
    for (module_name, kernel_name), value in expected_kernels.items():
        getattr(getattr(reference.blocks, module_name), kernel_name)[...] = jnp.asarray(value, jnp.float32)
    tokens, mask = batch()
    ours, expected = forward(adapted, tokens, mask), forward(reference, tokens, mask)
    base = forward(from_pretrained(directory), tokens, mask)
    sel = mask.astype(bool)
    scale = np.abs(expected[sel]).max()
    assert np.abs(base - expected)[sel].max() > 0.05 * scale  # the adapters matter
    assert np.abs(ours - expected)[sel].max() <= 1e-5 * scale
    # lora.merge folds the adapters the same way (and leaves the adapted model as it was).
    merged = lora.merge(adapted)
    assert merged.config.lora_rank == 0 and not nnx.state(merged, nnx.LoRAParam)
    for (module_name, kernel_name), value in expected_kernels.items():
        got = np.asarray(getattr(getattr(merged.blocks, module_name), kernel_name)[...])
        np.testing.assert_allclose(got, value, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(forward(adapted, tokens, mask), ours)
    # The adapters switched off give the base model exactly.
    np.testing.assert_array_equal(forward(lora.base(adapted), tokens, mask), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_loads_onto_the_transformers_base_with_the_same_logits(family, checkpoints, tmp_path):
    import peft

    directory = checkpoints[family]
    targets = LORA_TARGETS if family != "llama" else ("q", "v", "down")
    adapted = with_random_adapters(lora.adapt(from_pretrained(directory), rank=RANK, alpha=ALPHA,
                                              targets=targets))
    lora.save_peft(adapted, str(tmp_path / "peft"), base_model_path=directory)
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        peft_config = json.load(f)
    assert peft_config["r"] == RANK and peft_config["lora_alpha"] == ALPHA
    assert peft_config["base_model_name_or_path"] == directory
    reference = peft.PeftModel.from_pretrained(hf_fixtures.reference_model(directory),
                                               str(tmp_path / "peft")).eval()
    tokens, mask = batch()
    expected = hf_fixtures.reference_logits(reference, tokens, mask)
    base = hf_fixtures.reference_logits(hf_fixtures.reference_model(directory), tokens, mask)
    sel = mask.astype(bool)
    scale = np.abs(expected[sel]).max()
    assert np.abs(base - expected)[sel].max() > 0.05 * scale  # peft applied the adapters
    assert np.abs(forward(adapted, tokens, mask) - expected)[sel].max() <= 1e-4 * scale


def test_adapters_are_sharded_like_their_kernels_and_give_the_same_logits(checkpoints):
    directory = checkpoints["qwen2"]
    unsharded = with_random_adapters(lora.adapt(from_pretrained(directory), rank=RANK, alpha=ALPHA,
                                                targets=LORA_TARGETS))
    tokens, mask = (np.tile(x, (4, 1)) for x in batch())  # 8 rows: the batch splits over fsdp=4
    expected = forward(unsharded, tokens, mask)
    mesh = sharding.make_mesh(fsdp=4, tensor=2)
    fresh = lora.adapt(from_pretrained(directory, mesh=mesh), rank=RANK, alpha=ALPHA,
                       targets=LORA_TARGETS, mesh=mesh)
    attn, mlp = fresh.blocks.attn, fresh.blocks.mlp
    assert attn.q_lora_a[...].sharding.spec == P(None, "fsdp", None)  # [L, D, R]
    assert attn.q_lora_b[...].sharding.spec == P(None, None, "tensor", None)  # [L, R, N, H]
    assert attn.o_lora_a[...].sharding.spec == P(None, "tensor", None, None)  # [L, N, H, R]
    assert attn.o_lora_b[...].sharding.spec == P(None, None, "fsdp")  # [L, R, D]
    assert mlp.down_lora_a[...].sharding.spec == P(None, "tensor", None)  # [L, F, R]
    assert mlp.up_lora_b[...].sharding.spec == P(None, None, "tensor")  # [L, R, F]
    sharded = sharding.shard_model(unsharded, mesh)
    got = forward(sharded, *jax.device_put((tokens, mask), sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_hf_export_of_an_adapted_model_is_refused_and_merged_export_round_trips(checkpoints, tmp_path):
    directory = checkpoints["llama"]
    adapted = with_random_adapters(lora.adapt(from_pretrained(directory), rank=RANK, alpha=ALPHA,
                                              targets=("q", "o", "up")))
    with pytest.raises(ValueError, match="carries low-rank adapters.*lora.merge"):
        save_pretrained(adapted, str(tmp_path / "refused"))
    save_pretrained(lora.merge(adapted), str(tmp_path / "merged"))
    tokens, mask = batch()
    exported = hf_fixtures.reference_logits(hf_fixtures.reference_model(tmp_path / "merged"), tokens, mask)
    sel = mask.astype(bool)
    err = np.abs(forward(adapted, tokens, mask) - exported)[sel].max() / np.abs(exported[sel]).max()
    assert err <= 1e-4


def test_bad_adapter_settings_name_the_valid_ones():
    base = dict(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match=r"unknown lora_targets \['qkv'\]; valid: q, k, v, o, gate, up, down"):
        ModelConfig(**base, lora_rank=4, lora_targets=("q", "qkv"))
    with pytest.raises(ValueError, match="at least one of lora_targets"):
        ModelConfig(**base, lora_rank=4, lora_targets=())
    from cfpo_jax import config as config_lib

    config = config_lib.base_config()
    config.model.path = "tiny"
    config.lora.rank, config.lora.dropout, config.lora.targets = 4, 0.1, ("q", "qkv")
    with pytest.raises(ValueError) as error:
        config_lib.validate(config)
    assert "lora.dropout=0.1: only 0 is supported" in str(error.value)
    assert "lora.targets=('q', 'qkv'): need a non-empty subset of ['q', 'k', 'v'" in str(error.value)


def test_base_fingerprint_follows_the_weights_and_trusts_hub_cache_blob_names(tmp_path):
    directory = hf_fixtures.build_checkpoint("llama", tmp_path / "a", tokenizer=False)
    first = lora.base_fingerprint(directory)
    assert first["path"] == directory and len(first["sha256"]) == 64
    shutil.copytree(directory, tmp_path / "copy")
    assert lora.base_fingerprint(str(tmp_path / "copy"))["sha256"] == first["sha256"]
    other = hf_fixtures.build_checkpoint("llama", tmp_path / "b", seed=1, tokenizer=False)
    assert lora.base_fingerprint(other)["sha256"] != first["sha256"]
    # The Hub cache layout: snapshot files are symlinks to blobs named by their sha256.
    import hashlib

    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shutil.copy(os.path.join(directory, name), blobs / digest)
        os.symlink(blobs / digest, snapshot / name)
    assert lora.base_fingerprint(str(snapshot))["sha256"] == first["sha256"]


# ---------------------------------------------------------------- training with LoRA (train.py)

LORA = dict(lora__rank=4, lora__alpha=8.0)


def _leaf_names(tree):
    return ["/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_training_moves_only_the_adapters_and_the_reference_is_the_base(tmp_path):
    """Two off-policy RL steps with β > 0 on a bfloat16 base: the state holds the adapters and
    their Adam moments only (no reference copy), the base is bit-identical afterwards, and the
    reference log-probabilities are those of the base model loaded on its own."""
    from tests.fixtures.runs import build_parts, tiny, train_steps

    from cfpo_jax import models

    config = tiny(**LORA, lora__base_dtype="bfloat16", rl__beta=0.1, rl__num_epochs=2)
    parts, state, prompts = build_parts(tmp_path, config, jax.devices()[:1])
    frozen = parts.policy.frozen
    assert "ref_params" not in state
    names = _leaf_names(state["params"])
    assert names and all("_lora_" in name for name in names)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    adapter_size = sum(x.size for x in jax.tree.leaves(state["params"]))
    moments_size = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert moments_size == 2 * adapter_size  # Adam's mu and nu, of the adapters alone
    base_before = jax.device_get(frozen)
    adapters_before = jax.device_get(state["params"])
    state = train_steps(parts, state, prompts, 2)
    base_after = jax.device_get(frozen)
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(adapters_before)))
    assert moved > 0

    _, sample_key = parts.learner.split_rng(state["rng"])
    batch = parts.rollout(state, prompts, sample_key).batch
    tokens, attn, mask = (np.asarray(x) for x in (batch.tokens, batch.attn, batch.mask))
    base = models.from_pretrained(str(tmp_path / "tiny_model"), param_dtype="bfloat16",
                                  dtype=config.model.dtype)
    expected, _ = models.sequence_logprobs(base, jnp.asarray(tokens), jnp.asarray(attn),
                                           temperature=config.sampling.temperature)
    expected = np.asarray(expected)[:, -mask.shape[1]:] * mask
    np.testing.assert_allclose(np.asarray(batch.ref_logp) * mask, expected, rtol=0, atol=1e-5)
    # ... while the policy (adapters on) has moved away from it.
    assert np.abs(np.asarray(batch.old_logp) * mask - expected).max() > 1e-4


def test_resumed_lora_run_equals_an_uninterrupted_one_and_exports(tmp_path):
    """A run stopped at its step-2 checkpoint and resumed to step 4 ends where an uninterrupted
    4-step run does; checkpoints hold adapters and optimiser state, not the base, plus the base's
    fingerprint, which a resume checks. The uninterrupted run exports a merged HF model and a PEFT
    adapter directory, which peft loads onto the base with the merged model's logits."""
    import peft

    from tests.fixtures.runs import read_metrics, state_leaves, tiny

    from cfpo_jax import train

    one = jax.devices()[:1]
    run = lambda workdir, steps, **extra: train.run(
        tiny(**LORA, train__num_steps=steps, train__checkpoint_every=2, **extra),
        str(tmp_path / workdir), devices=one)
    full = run("full", 4, train__export_hf=True, train__export_peft=True)
    run("resumed", 2)
    resumed = run("resumed", 4)
    for a, b in zip(state_leaves(resumed["state"]), state_leaves(full["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [m["loss"] for m in read_metrics(str(tmp_path / "resumed"))][-2:] == \
        [m["loss"] for m in read_metrics(str(tmp_path / "full"))][-2:]

    checkpoint_dir = tmp_path / "resumed" / "checkpoints" / "4"
    with open(checkpoint_dir / "meta" / "metadata") as f:
        meta = json.load(f)
    assert meta["base_model"] == lora.base_fingerprint(str(tmp_path / "resumed" / "tiny_model"))
    state_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
                      os.walk(checkpoint_dir / "state") for f in files)
    base_bytes = os.path.getsize(tmp_path / "resumed" / "tiny_model" / "model.safetensors")
    assert state_bytes < base_bytes / 2, (state_bytes, base_bytes)
    # Another base under the same path is refused on resume.
    from cfpo_jax import tiny as tiny_lib

    other = tiny_lib.build(str(tmp_path / "other"), seed=1, **tiny().model.tiny.to_dict())
    shutil.copy(os.path.join(other, "model.safetensors"), tmp_path / "resumed" / "tiny_model")
    with pytest.raises(ValueError, match="base model"):
        run("resumed", 6)

    tokens, mask = batch()
    tokens = np.where(mask == 1, tokens % 90 + 3, 0)  # inside the tiny model's vocabulary
    base_path = str(tmp_path / "full" / "tiny_model")
    with_adapters = peft.PeftModel.from_pretrained(hf_fixtures.reference_model(base_path),
                                                   str(tmp_path / "full" / "peft")).eval()
    expected = hf_fixtures.reference_logits(hf_fixtures.reference_model(tmp_path / "full" / "hf"),
                                            tokens, mask)
    got = hf_fixtures.reference_logits(with_adapters, tokens, mask)
    base = hf_fixtures.reference_logits(hf_fixtures.reference_model(base_path), tokens, mask)
    sel = mask.astype(bool)
    scale = np.abs(expected[sel]).max()
    assert np.abs(base - expected)[sel].max() > 1e-4 * scale  # training moved the policy
    assert np.abs(got - expected)[sel].max() <= 1e-5 * scale


@pytest.mark.parametrize("merge", [False, True], ids=["on-the-fly", "merged"])
def test_the_sampler_draws_from_the_adapted_policy(tmp_path, merge):
    """With adapters far from zero, the sampler's log-probabilities of its own tokens are the
    trainer's for the adapted policy (`sampler_logprob_gap` ≈ 0) and not the base's, whether the
    adapters are applied on the fly or merged once per rollout (`lora.merge_for_sampling`)."""
    from tests.fixtures.runs import build_parts, tiny

    from cfpo_jax import models

    config = tiny(**LORA, lora__merge_for_sampling=merge, rl__num_epochs=2)  # off policy: old_logp
    parts, state, prompts = build_parts(tmp_path, config, jax.devices()[:1])
    leaves, treedef = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    state = dict(state, params=jax.tree.unflatten(treedef, moved))
    _, sample_key = parts.learner.split_rng(state["rng"])
    rollout = parts.rollout(state, prompts, sample_key)
    batch = rollout.batch
    assert float(rollout.device_metrics["sampler_logprob_gap"]) < 1e-4

    tokens, attn, mask = (np.asarray(x) for x in (batch.tokens, batch.attn, batch.mask))
    base = models.from_pretrained(str(tmp_path / "tiny_model"), dtype=config.model.dtype)
    base_logp, _ = models.sequence_logprobs(base, jnp.asarray(tokens), jnp.asarray(attn),
                                            temperature=config.sampling.temperature)
    base_logp = np.asarray(base_logp)[:, -mask.shape[1]:]
    assert np.abs((np.asarray(batch.old_logp) - base_logp) * mask).max() > 1e-2


@pytest.mark.slow  # 2 min 18 s on the 2-core box: three runs of the trainer, two of them processes
def test_lora_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapters(tmp_path):
    """A real preemption: `python -m cfpo_jax.train` with adapters, SIGKILLed once its first
    checkpoint is complete, then restarted, ends with the adapters and Adam moments of the same
    run done in one go (in this process, same 8 devices, same seed)."""
    from tests.fixtures.runs import launch, restore_like, state_leaves, tiny, wait_for

    from cfpo_jax import train

    workdir = tmp_path / "preempted"
    ckpts = workdir / "checkpoints"
    lora_flags = ("--config.lora.rank=4", "--config.lora.alpha=8.0")
    first = launch(workdir, *lora_flags)  # 6 steps, a checkpoint every 2
    wait_for(lambda: ckpts.is_dir() and any(d.isdigit() for d in os.listdir(ckpts)), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert killed_at < 6

    second = launch(workdir, *lora_flags)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    assert f"resumed from step {killed_at}" in output, output

    reference = train.run(tiny(**LORA, train__num_steps=6, train__checkpoint_every=2),
                          str(tmp_path / "uninterrupted"))
    resumed = restore_like(ckpts, 6, reference["state"])
    assert set(_leaf_names(resumed["params"])) == set(_leaf_names(reference["state"]["params"]))
    assert all("lora" in name for name in _leaf_names(resumed["params"]))  # adapters only
    for a, b in zip(state_leaves(resumed), state_leaves(reference["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_runs_agree_on_one_and_eight_devices(tmp_path):
    from tests.fixtures.runs import read_metrics, tiny

    from cfpo_jax import train

    results = {}
    for devices in (jax.devices()[:1], jax.devices()):
        workdir = str(tmp_path / str(len(devices)))
        train.run(tiny(**LORA, rl__beta=0.1, rl__num_minibatches=2, train__num_steps=2), workdir,
                  devices=devices)
        results[len(devices)] = [(m["loss"], m["grad_norm"], m["kl_ref"], m["reward_mean"])
                                 for m in read_metrics(workdir)]
    assert results[1][1][2] > 0  # the second step's policy differs from the base
    np.testing.assert_allclose(results[8], results[1], rtol=1e-4, atol=1e-6)
