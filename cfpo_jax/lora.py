"""Low-rank adapters (LoRA) for RL: adapters on the stacked decoder, the base as the reference
policy, merging, a fingerprint of the base, and PEFT-compatible export.

An adapted projection computes W·x + (alpha / rank)·(x·A)·B with A [*in, R] drawn like PEFT's
default (uniform ±1/√fan_in) and B zero, so a freshly adapted model computes exactly what its base
does. The adapters are `nnx.LoRAParam`s inside the model (`cfpo_jax.models.transformer`), stacked
with the layer axis like every block parameter: the layer scan, and so the compile time, are
unchanged, and the sharding table derives their placement from the kernel they adapt.

Why not qwix (the library Tunix uses): qwix creates the adapter parameters lazily, during a first
call, on whichever NNX module it finds (by inspecting the Python stack) running the intercepted
einsum. In our decoder that module is one layer's block rebuilt with `nnx.merge` inside the traced
`lax.scan` body, so the adapters would be per-layer arrays created inside a trace that never reach
the stacked state; qwix 0.1.8 on our Transformer fails inside the scan (IndexError), checked on
2026-11-23. Tunix's own models unroll their layers in an `nnx.List` instead, which makes compile
time grow with depth. qwix also has no PEFT export. A few lines in the model do the same job here.

Decisions:
  * Only the adapters train: the trainer splits the model into (adapters, frozen) with `split`;
    the optimiser state is built from the adapters alone, and the frozen base (any dtype, e.g.
    bfloat16 via `config.lora.base_dtype`) is never differentiated or updated. Adapters are
    float32 whatever the base dtype; they are cast to the compute dtype in the forward pass.
  * The reference policy for β > 0 is the base itself, adapters off: the trainer scores it with
    `disabled(adapters)` (all zero inside the jitted function: the adapted projections then add
    exactly 0), so it reuses the frozen arrays and no reference copy exists. With a warm start,
    the warm start lives in the adapters, so the reference stays the base model (not the
    warm-started policy as in full fine-tuning).
  * The frozen base is passed to every jitted function as an argument, never closed over: jit
    would embed a closed-over array in the program as a constant.
  * Dropout on the adapter input is not supported (`config.lora.dropout` must be 0): in RL it
    would make the trainer's log-probabilities random, so the ratio of a policy to itself would not
    be 1 and CFPO's penalty would act on noise.
  * The sampler reads the adapted model either as is (adapters applied on the fly, exactly the
    trainer's function) or, with `config.lora.merge_for_sampling`, through `merge` once per
    generate call (one more copy of the adapted kernels in the base dtype, no adapter matmuls per
    decode step). `benchmarks/sampling.py --lora-rank R` times the two (and the base) in one
    run; its 0.5B GPU figures, which decide the default, are still to be taken (no GPU this
    session; benchmarks/README.md).
  * Checkpoints hold the adapters and their optimiser state, plus `base_fingerprint` of the base
    checkpoint (its path and a sha256 over its files), which a resumed run checks.
  * Export: `merge` then `models.save_pretrained` (a full Hugging Face model), or `save_peft`, an
    adapter directory that `peft.PeftModel.from_pretrained` loads onto the transformers base.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from cfpo_jax import sharding
from cfpo_jax.models import Transformer
from cfpo_jax.models.config import LORA_TARGETS
from cfpo_jax.models.hf import CONFIG_FILE, INDEX_FILE, hf_module_name, resolve
from cfpo_jax.models.transformer import lora_a_init

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_A_NAMES = {f"{target}_lora_a" for target in LORA_TARGETS}


def adapt(model: Transformer, *, rank: int, alpha: float, targets, seed: int = 0, mesh=None) -> Transformer:
    """`model` with fresh adapters of `rank` on `targets` (some of q k v o gate up down).

    The base arrays are shared with `model`, not copied. A is drawn from `seed`, B is zero. With
    `mesh`, the adapters are created with their `cfpo_jax.sharding` shardings.
    """
    config = model.config.replace(lora_rank=rank, lora_alpha=float(alpha), lora_targets=tuple(targets))
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_adapters, _ = nnx.split(abstract, nnx.LoRAParam, ...)
    shardings = None if mesh is None else sharding.param_shardings(mesh, abstract_adapters)

    def init():
        paths_and_leaves = jax.tree_util.tree_leaves_with_path(abstract_adapters)
        keys = jax.random.split(jax.random.key(seed), len(paths_and_leaves))
        values = []
        for key, (path, leaf) in zip(keys, paths_and_leaves):
            if any(getattr(k, "key", None) in _A_NAMES for k in path):  # stacked [L, *in, R]
                layer_keys = jax.random.split(key, leaf.shape[0])
                values.append(jax.vmap(lambda k: lora_a_init(k, leaf.shape[1:]))(layer_keys))
            else:
                values.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree.unflatten(jax.tree.structure(abstract_adapters), values)

    adapters = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, adapters, nnx.state(model))


def split(model: Transformer):
    """(graphdef, adapters, frozen): the trainable adapters and everything else (the base)."""
    return nnx.split(model, nnx.LoRAParam, ...)


def disabled(adapters):
    """Adapters that add exactly nothing (zeros of the same tree): with them the adapted model
    computes its base, the reference policy. Inside jit these are broadcasts, not a copy."""
    return jax.tree.map(jnp.zeros_like, adapters)


@functools.lru_cache(maxsize=None)
def base_graphdef(config):
    """The graph of the model without adapters, to `nnx.merge` with an adapted model's frozen
    state: the base policy, sharing its arrays. Cached per config: building it traces the model's
    construction, 14 ms of host time on the tiny shape, which `merge` paid on every rollout
    (benchmarks/sampling.py --lora-rank)."""
    base_config = config.replace(lora_rank=0, lora_alpha=0.0, lora_targets=())
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(base_config, rngs=nnx.Rngs(0))))


def base(model: Transformer) -> Transformer:
    """The same model with its adapters off (the reference policy). It shares the base's
    variables with `model`: nothing is copied, and an update to one is an update to both."""
    return nnx.merge(base_graphdef(model.config), nnx.state(model, nnx.Not(nnx.LoRAParam)))


@jax.jit
def _merged_kernel(kernel, lora_a, lora_b, scale):
    """W + scale·A·B per layer, summed in float32, returned in W's dtype."""
    delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(lora_a, lora_b)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge(model: Transformer) -> Transformer:
    """A model without adapters whose kernels are W + (alpha / rank)·A·B, in the base dtype (each
    merged kernel keeps its sharding). The adapted model is left as it is."""
    config = model.config
    merged = {}
    for target in config.lora_targets:
        module_name = "attn" if target in ("q", "k", "v", "o") else "mlp"
        module = getattr(model.blocks, module_name)
        kernel = getattr(module, f"{target}_kernel")[...]
        value = _merged_kernel(kernel, getattr(module, f"{target}_lora_a")[...],
                               getattr(module, f"{target}_lora_b")[...], config.lora_scale)
        merged["blocks", module_name, f"{target}_kernel"] = jax.device_put(value, kernel.sharding)

    def replace(path, value):
        names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return merged.get(names, value)

    # A new state (new Variables): nnx.merge would otherwise share the adapted model's ones.
    state = jax.tree_util.tree_map_with_path(replace, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    return nnx.merge(base_graphdef(config), state)


def base_fingerprint(path: str) -> dict:
    """{'path', 'sha256'} of a Hugging Face checkpoint (local directory or Hub id): a sha256 over
    config.json and the weight files, so a resumed run can tell it has the same base.

    Files of the Hub cache are symlinks to blobs named by their own sha256, which is used as is;
    other files are read (about 0.5 GB/s on the 2-core CPU machine where this was written).
    """
    directory = resolve(path)
    names = sorted(f for f in os.listdir(directory)
                   if f.endswith(".safetensors") or f in (CONFIG_FILE, INDEX_FILE))
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{_file_sha256(os.path.join(directory, name))}\n".encode())
    return {"path": path, "sha256": digest.hexdigest()}


def _file_sha256(path: str) -> str:
    real = os.path.realpath(path)
    if os.path.basename(os.path.dirname(real)) == "blobs" and re.fullmatch(r"[0-9a-f]{64}", os.path.basename(real)):
        return os.path.basename(real)
    with open(real, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_peft(model: Transformer, path: str, *, base_model_path: str) -> None:
    """Writes the adapters as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(<transformers base>, path)` loads. PEFT stores
    lora_A [R, in] and lora_B [out, R] per layer with HF's flattening of heads. Every process must
    call it (sharded adapters are gathered); only process 0 writes."""
    config = model.config
    if not config.lora_rank:
        raise ValueError("this model has no adapters (lora_rank = 0); nothing to save as PEFT")
    tensors = {}
    for target in config.lora_targets:
        module = model.blocks.attn if target in ("q", "k", "v", "o") else model.blocks.mlp
        lora_a_LxIxR = sharding.to_host(getattr(module, f"{target}_lora_a")[...])
        lora_b_LxRxO = sharding.to_host(getattr(module, f"{target}_lora_b")[...])
        name = hf_module_name(target)
        for i in range(config.num_layers):
            prefix = "base_model.model." + name.format(i=i)
            rank = config.lora_rank
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(lora_a_LxIxR[i].reshape(-1, rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(lora_b_LxRxO[i].reshape(rank, -1).T)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({hf_module_name(t).rsplit(".", 1)[-1] for t in config.lora_targets}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with open(os.path.join(path, PEFT_CONFIG_FILE), "w") as f:
        json.dump(peft_config, f, indent=2)
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})

