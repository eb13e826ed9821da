"""Hugging Face checkpoints: load safetensors into a `Transformer`, write them back, tokenizer.

Loading never builds a randomly initialised model: `nnx.eval_shape` gives the abstract state and
each parameter is filled from the checkpoint one at a time (a stacked block parameter is gathered
layer by layer into one host buffer of its final dtype), then placed on device (directly with its
`NamedSharding` when a mesh is given, each device receiving only its slice). Tensors are read with
plain file reads (no memory map left resident), so peak host memory is the placed model plus one
stacked parameter.

`_PARAM_MAP` is the single name/layout table used in both directions. HF stores linear weights
as [out, in]; ours are [in, ...heads, head_dim] so that the einsums name their axes. A
mixture-of-experts layer's experts are stored one by one (`{j}` in the name: the layout of the
published Qwen3-MoE checkpoints, which transformers 5 and vLLM read and transformers 5 writes) and
stacked here as [L, E, ...].
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from cfpo_jax.models.config import ModelConfig, from_hf_config, to_hf_config
from cfpo_jax.models.transformer import Transformer
from cfpo_jax.sharding import param_shardings, to_host

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3


def _linear_in(*head_shape):
    """HF [out, in] -> ours [in, *head_shape] and back."""
    def to_ours(w, c):
        return w.T.reshape(w.shape[1], *[getattr(c, s) for s in head_shape])

    def to_hf(w, c):
        return w.reshape(w.shape[0], -1).T

    return to_ours, to_hf


def _linear_out(*head_shape):
    """HF [out, in] where `in` is heads x head_dim -> ours [*head_shape, out] and back."""
    def to_ours(w, c):
        return w.T.reshape(*[getattr(c, s) for s in head_shape], w.shape[0])

    def to_hf(w, c):
        return w.reshape(-1, w.shape[-1]).T

    return to_ours, to_hf


def _heads(*head_shape):
    def to_ours(b, c):
        return b.reshape(*[getattr(c, s) for s in head_shape])

    def to_hf(b, c):
        return b.reshape(-1)

    return to_ours, to_hf


_SAME = (lambda w, c: w, lambda w, c: w)
_TRANSPOSE = (lambda w, c: w.T, lambda w, c: w.T)

# our state path -> (HF name, with {i} for the layer, (to_ours, to_hf))
_PARAM_MAP: dict[tuple[str, ...], tuple[str, tuple[Callable, Callable]]] = {
    ("embedding",): ("model.embed_tokens.weight", _SAME),
    ("lm_head",): ("lm_head.weight", _TRANSPOSE),
    ("score",): ("score.weight", _TRANSPOSE),
    ("final_norm", "scale"): ("model.norm.weight", _SAME),
    ("blocks", "attn_norm", "scale"): ("model.layers.{i}.input_layernorm.weight", _SAME),
    ("blocks", "mlp_norm", "scale"): ("model.layers.{i}.post_attention_layernorm.weight", _SAME),
    ("blocks", "attn", "q_kernel"): ("model.layers.{i}.self_attn.q_proj.weight", _linear_in("num_heads", "head_dim")),
    ("blocks", "attn", "k_kernel"): ("model.layers.{i}.self_attn.k_proj.weight", _linear_in("num_kv_heads", "head_dim")),
    ("blocks", "attn", "v_kernel"): ("model.layers.{i}.self_attn.v_proj.weight", _linear_in("num_kv_heads", "head_dim")),
    ("blocks", "attn", "o_kernel"): ("model.layers.{i}.self_attn.o_proj.weight", _linear_out("num_heads", "head_dim")),
    ("blocks", "attn", "q_bias"): ("model.layers.{i}.self_attn.q_proj.bias", _heads("num_heads", "head_dim")),
    ("blocks", "attn", "k_bias"): ("model.layers.{i}.self_attn.k_proj.bias", _heads("num_kv_heads", "head_dim")),
    ("blocks", "attn", "v_bias"): ("model.layers.{i}.self_attn.v_proj.bias", _heads("num_kv_heads", "head_dim")),
    ("blocks", "attn", "q_norm", "scale"): ("model.layers.{i}.self_attn.q_norm.weight", _SAME),
    ("blocks", "attn", "k_norm", "scale"): ("model.layers.{i}.self_attn.k_norm.weight", _SAME),
    ("blocks", "mlp", "gate_kernel"): ("model.layers.{i}.mlp.gate_proj.weight", _TRANSPOSE),
    ("blocks", "mlp", "up_kernel"): ("model.layers.{i}.mlp.up_proj.weight", _TRANSPOSE),
    ("blocks", "mlp", "down_kernel"): ("model.layers.{i}.mlp.down_proj.weight", _TRANSPOSE),
    ("blocks", "mlp", "router_kernel"): ("model.layers.{i}.mlp.gate.weight", _TRANSPOSE),
    ("blocks", "mlp", "expert_gate_kernel"): ("model.layers.{i}.mlp.experts.{j}.gate_proj.weight", _TRANSPOSE),
    ("blocks", "mlp", "expert_up_kernel"): ("model.layers.{i}.mlp.experts.{j}.up_proj.weight", _TRANSPOSE),
    ("blocks", "mlp", "expert_down_kernel"): ("model.layers.{i}.mlp.experts.{j}.down_proj.weight", _TRANSPOSE),
}


def hf_module_name(target: str) -> str:
    """The Hugging Face module (with `{i}` for the layer) of projection `target` ("q" ... "down"),
    e.g. "model.layers.{i}.self_attn.q_proj": where PEFT puts that projection's adapter."""
    module = "attn" if target in ("q", "k", "v", "o") else "mlp"
    return _PARAM_MAP[("blocks", module, f"{target}_kernel")][0].removesuffix(".weight")


def resolve(path) -> str:
    """A local directory as is; a GGUF file converted once (models/gguf.py); anything else is a Hub
    repo id, downloaded (config, weights, tokenizer)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if path.endswith(".gguf") and os.path.isfile(path):
        from cfpo_jax.models import gguf

        return gguf.convert(path)
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{path!r} is not a directory holding a Hugging Face checkpoint")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
        )
    except Exception as e:  # offline, unknown repo, no access: all reach the user the same way
        raise FileNotFoundError(
            f"{path!r} is not a local directory and could not be fetched from the Hugging Face Hub: {e}"
        ) from e


# safetensors dtype codes -> numpy (bfloat16 through ml_dtypes, which jax depends on).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class _SafetensorsFile:
    """Reads one tensor at a time with plain file reads. Unlike a memory map, nothing of the file
    stays resident in this process once a tensor has been converted and placed."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(header_len))
        self.header.pop("__metadata__", None)
        self.path, self.data_start = path, 8 + header_len

    def read(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = info["data_offsets"]
        array = np.empty(info["shape"], _DTYPES[info["dtype"]])
        if array.nbytes != end - begin:
            raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {info['shape']}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(array.reshape(-1).view(np.uint8))
        return array


class _Checkpoint:
    """A (possibly sharded) safetensors checkpoint, read tensor by tensor."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
            weight_map = None
        else:
            raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {directory}")
        self._files = {}
        for file in sorted(set(weight_map.values())) if weight_map else [WEIGHTS_FILE]:
            file_path = os.path.join(directory, file)
            if not os.path.exists(file_path):
                raise FileNotFoundError(f"{file_path} is listed in {INDEX_FILE} but missing")
            self._files[file] = _SafetensorsFile(file_path)
        self.weight_map = weight_map or {name: WEIGHTS_FILE for name in self._files[WEIGHTS_FILE].header}

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in the checkpoint")
        return self._files[self.weight_map[name]].read(name)


def read_config(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    with open(config_path) as f:
        return json.load(f)


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "name", None) != "value")


def _load_array(ckpt: _Checkpoint, key, config: ModelConfig, shape, dtype) -> np.ndarray:
    name, (to_ours, _) = _PARAM_MAP[key]
    if key[0] != "blocks":
        return np.asarray(to_ours(ckpt.get(name), config), dtype)
    buffer = np.empty(shape, dtype)
    for i in range(config.num_layers):
        if "{j}" in name:
            for j in range(config.num_experts):
                buffer[i, j] = to_ours(ckpt.get(name.format(i=i, j=j)), config)
        else:
            buffer[i] = to_ours(ckpt.get(name.format(i=i)), config)
    return buffer


def from_pretrained(path: str, *, mesh=None, param_dtype=None, dtype=None, remat: bool = False,
                    remat_policy: str = "full", attention: str = "auto",
                    unroll_layers: bool = False, moe_matmul: str = "ragged_dot") -> Transformer:
    """Transformer from a Hugging Face directory (or Hub repo id) with config.json + safetensors.

    A `*ForSequenceClassification` checkpoint gives a reward model (a `score` head, `reward()`).

    param_dtype / dtype ("float32", "bfloat16") default to the checkpoint's dtype; `remat`
    rematerialises each layer in the backward pass, keeping what `remat_policy` says;
    `attention` picks the full-sequence attention kernel, `unroll_layers` unrolls the layer scan
    (see `ModelConfig`), `moe_matmul` a mixture of experts' grouped matmul. With `mesh`, each
    parameter is created directly with its `cfpo_jax.sharding.param_shardings` sharding.
    """
    directory = resolve(path)
    config = from_hf_config(read_config(directory), param_dtype=param_dtype, dtype=dtype).replace(
        remat=remat, remat_policy=remat_policy, attention=attention, unroll_layers=unroll_layers,
        moe_matmul=moe_matmul)
    ckpt = _Checkpoint(directory)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None if mesh is None else param_shardings(mesh, abstract_state)

    def load(path, leaf, sharding=None):
        host = _load_array(ckpt, _path_key(path), config, leaf.shape, jnp.dtype(leaf.dtype))
        if host.shape != leaf.shape:
            raise ValueError(f"{_path_key(path)}: checkpoint shape {host.shape} != model shape {leaf.shape}")
        if sharding is None:
            return jax.device_put(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index],
                                            dtype=host.dtype)

    if shardings is None:
        state = jax.tree_util.tree_map_with_path(load, abstract_state)
    else:
        state = jax.tree_util.tree_map_with_path(load, abstract_state, shardings)
    return nnx.merge(graphdef, state)


def eos_token_ids(path: str, tokenizer=None) -> tuple[int, ...]:
    """Every token id that ends a completion, sorted: the tokenizer's EOS and the `eos_token_id`
    of config.json and generation_config.json (chat models end a turn with a token that is not
    the tokenizer's EOS, and name it only in generation_config.json)."""
    directory = resolve(path)
    ids = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            with open(file) as f:
                value = json.load(f).get("eos_token_id")
            ids += [] if value is None else value if isinstance(value, list) else [value]
    return tuple(sorted(set(ids)))


def load_tokenizer(path: str):
    """The transformers tokenizer stored next to the checkpoint (local directory or Hub repo id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(path))


def _hf_tensors(model: Transformer, gather: bool):
    """Yields (HF name, nbytes, host array or None) one parameter (one layer of a stacked one) at a
    time; without `gather`, only names and sizes (to plan the shards before writing)."""
    config = model.config
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        key = _path_key(path)
        name, (_, to_hf) = _PARAM_MAP[key]
        stacked, experts = key[0] == "blocks", "{j}" in name
        nbytes = value.nbytes // config.num_layers if stacked else value.nbytes
        host = to_host(value) if gather else None
        for i in range(config.num_layers) if stacked else [None]:
            layer = host[i] if gather and stacked else host
            for j in range(config.num_experts) if experts else [None]:
                array = None
                if gather:
                    array = np.ascontiguousarray(to_hf(layer if j is None else layer[j], config))
                yield name.format(i=i, j=j), nbytes // config.num_experts if experts else nbytes, array


def save_pretrained(model: Transformer, path: str, tokenizer=None, *, max_shard_bytes: int = MAX_SHARD_BYTES):
    """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`) that
    transformers' AutoModelForCausalLM (AutoModelForSequenceClassification for a reward model) and
    vLLM load, and the tokenizer when given. Every process
    must call it (sharded arrays are gathered collectively); only process 0 writes."""
    if model.config.lora_rank:
        raise ValueError(
            "this model carries low-rank adapters, which a Hugging Face model directory cannot hold: "
            "save cfpo_jax.lora.merge(model) (adapters folded in), or the adapters alone with "
            "cfpo_jax.lora.save_peft"
        )
    shard_of, num_shards, shard_bytes = {}, 1, 0
    for name, nbytes, _ in _hf_tensors(model, gather=False):
        if shard_bytes and shard_bytes + nbytes > max_shard_bytes:
            num_shards, shard_bytes = num_shards + 1, 0
        shard_of[name] = num_shards - 1
        shard_bytes += nbytes
    files = (
        [WEIGHTS_FILE] if num_shards == 1
        else [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    )
    write = jax.process_index() == 0
    if write:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(to_hf_config(model.config), f, indent=2)
    current, current_shard = {}, 0
    for name, _, array in _hf_tensors(model, gather=True):
        if shard_of[name] != current_shard:
            if write:
                save_file(current, os.path.join(path, files[current_shard]), metadata={"format": "pt"})
            current, current_shard = {}, shard_of[name]
        current[name] = array
    if not write:
        return
    save_file(current, os.path.join(path, files[current_shard]), metadata={"format": "pt"})
    if num_shards > 1:
        weight_map = {name: files[shard] for name, shard in shard_of.items()}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
