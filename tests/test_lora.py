"""LoRA on the stacked decoder: forward, merge, sharding, PEFT export, fingerprint.

References are independent of `cfpo_jax.lora`: transformers' base model (an adapted model with
B = 0 must equal it), kernels merged in numpy here (W + s·A·B, float64), and the `peft` package
loading our adapter directory onto the transformers base model.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import hf_fixtures
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
