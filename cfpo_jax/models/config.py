"""ModelConfig: the one description of a decoder, and its translation to/from Hugging Face config.json.

One dataclass covers Qwen2/2.5, Qwen3, Qwen3-MoE and Llama 3 (SmolLM2 is a Llama) through flags:

* `qkv_bias`: biases on the q/k/v projections (Qwen2; never on the output projection).
* `qk_norm`: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
* `head_dim`: explicit, because Qwen3 decouples it from hidden_size / num_heads.
* `rope_scaling`: None, or a dict with `rope_type` "linear" or "llama3" (Llama 3.1+ frequencies).
* `num_labels`: 0 for a causal LM; > 0 for a sequence-classification (reward) model, the same
  decoder whose unembedding is replaced by a `score` head [hidden, num_labels] without bias
  (`LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`, Qwen3's). The
  architecture name in config.json says which; its label count is `id2label`'s length, else
  `num_labels`, else transformers' default of 2.
* `num_experts` > 0: every layer's MLP is a sparse mixture of experts (Qwen3-MoE,
  `cfpo_jax.models.moe`): a router [hidden, num_experts], `num_experts_per_tok` experts per token
  of width `moe_intermediate_size`, their weights renormalised to sum 1 when `norm_topk_prob`.
  Layers are stacked and scanned, so every layer must be sparse: checkpoints with
  `mlp_only_layers` or `decoder_sparse_step` > 1 (dense layers between sparse ones) are rejected.
  `intermediate_size` is kept only to round-trip config.json.
* `lora_rank`, `lora_alpha`, `lora_targets`: low-rank adapters (`cfpo_jax.lora`) on the named
  projections, each adding (alpha / rank) · x·A·B to it; rank 0 (the default) means none. They are
  not part of a Hugging Face config (`to_hf_config` describes the base model).

and, for how the model runs rather than what it is (never written to config.json):

* `remat` / `remat_policy`: rematerialise each layer in the backward pass, and what to keep
  (`REMAT_POLICIES`, see `cfpo_jax.models.transformer`).
* `attention`: the full-sequence attention kernel (`cfpo_jax.models.attention.IMPLEMENTATIONS`).
* `moe_matmul`: the grouped matmul of the experts (`MOE_MATMULS`): "ragged_dot"
  (`jax.lax.ragged_dot`, every platform) or "megablox" (the Pallas TPU kernel, TPU only).
* `unroll_layers`: unroll the layer scan (one copy of the layer per layer in the program: longer
  compiles, no loop overhead; faster for shallow models on CPU, see benchmarks/README.md).

Both spellings of the RoPE settings in config.json are read: `rope_theta` + `rope_scaling` (what
published checkpoints carry) and `rope_parameters` (what transformers >= 5 writes). We write the
first, which every transformers version and vLLM read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "llama")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter can sit on
# What a rematerialised layer keeps for the backward pass; cfpo_jax.models.transformer maps each
# name to its jax.checkpoint policy and says when to use which.
REMAT_POLICIES = ("full", "dots_with_no_batch_dims", "dots")
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "cudnn", "splash")
MOE_MATMULS = ("ragged_dot", "megablox")

_FAMILY_NAMES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe", "llama": "Llama"}
CAUSAL_LM, SEQUENCE_CLASSIFICATION = "ForCausalLM", "ForSequenceClassification"
# transformers' PretrainedConfig default when a config.json names neither id2label nor num_labels.
_DEFAULT_NUM_LABELS = 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    attention: str = "auto"
    unroll_layers: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    num_labels: int = 0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_matmul: str = "ragged_dot"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid: {', '.join(SUPPORTED_DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; valid: {', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; valid: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if (self.model_type == "qwen3_moe") != (self.num_experts > 0):
            raise ValueError(f"model_type {self.model_type!r} with num_experts={self.num_experts}: "
                             "qwen3_moe needs num_experts > 0, every other family 0")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts
                                     and self.moe_intermediate_size > 0):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                f"{self.num_experts}] and moe_intermediate_size={self.moe_intermediate_size} > 0")
        if self.moe_matmul not in MOE_MATMULS:
            raise ValueError(f"moe_matmul={self.moe_matmul!r}; valid: {', '.join(MOE_MATMULS)}")
        if self.num_labels < 0:
            raise ValueError(f"num_labels must be >= 0 (0: causal LM); got {self.num_labels}")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown lora_targets {unknown}; valid: {', '.join(LORA_TARGETS)}")
        dense_mlp = [t for t in self.lora_targets if t in ("gate", "up", "down")]
        if self.num_experts and self.lora_rank and dense_mlp:
            raise ValueError(
                f"lora_targets {dense_mlp}: a mixture-of-experts model has experts, not a dense MLP, "
                "and adapters on experts are not supported; valid here: q, k, v, o")
        if self.lora_rank < 0 or (self.lora_rank > 0 and not self.lora_targets):
            raise ValueError(
                f"lora_rank={self.lora_rank} must be 0 (no adapters) or > 0 with at least one of "
                f"lora_targets ({', '.join(LORA_TARGETS)}); got targets {self.lora_targets}"
            )

    def adapted(self, target: str) -> bool:
        """Whether projection `target` (one of LORA_TARGETS) carries a low-rank adapter."""
        return self.lora_rank > 0 and target in self.lora_targets

    @property
    def lora_scale(self) -> float:
        """The factor on x·A·B (PEFT's `scaling`, alpha / rank)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    # The config is static metadata of the NNX module, so jit needs it hashable; the dict field
    # is not, hence the explicit hash over a frozen view of it.
    def __hash__(self):
        fields = dataclasses.astuple(self)
        return hash(tuple(tuple(sorted(f.items())) if isinstance(f, dict) else f for f in fields))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters")
    if params is not None:
        if "rope_theta" not in params and "full_attention" in params:
            params = params["full_attention"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        scaling = dict(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", 10000.0)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def _unsupported(model_type: str, flag: str, value: Any) -> ValueError:
    return ValueError(f"{model_type} checkpoints with {flag}={value!r} are not supported")


def from_hf_config(cfg: dict, *, param_dtype: str | None = None, dtype: str | None = None) -> ModelConfig:
    """ModelConfig from a parsed config.json. Dtypes default to the checkpoint's (else float32)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise _unsupported(model_type, "hidden_act", cfg["hidden_act"])
    if cfg.get("use_sliding_window"):
        raise _unsupported(model_type, "use_sliding_window", True)
    if model_type == "llama" and cfg.get("mlp_bias"):
        raise _unsupported(model_type, "mlp_bias", True)
    # Qwen3 and Llama put `attention_bias` on the output projection as well, which we do not model.
    if model_type in ("qwen3", "qwen3_moe", "llama") and cfg.get("attention_bias"):
        raise _unsupported(model_type, "attention_bias", True)
    moe = {}
    if model_type == "qwen3_moe":
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ValueError(
                "qwen3_moe checkpoints with dense layers between the sparse ones (mlp_only_layers="
                f"{cfg.get('mlp_only_layers')!r}, decoder_sparse_step={cfg.get('decoder_sparse_step')!r}) "
                "are not supported: every layer must be sparse (the layers are stacked and scanned)")
        moe = dict(num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                   num_experts_per_tok=cfg["num_experts_per_tok"],
                   moe_intermediate_size=cfg["moe_intermediate_size"],
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))
    theta, scaling = _rope_from_hf(cfg)
    num_labels = 0
    architectures = cfg.get("architectures") or []
    if any(a.endswith(SEQUENCE_CLASSIFICATION) for a in architectures):
        num_labels = len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", _DEFAULT_NUM_LABELS)
    checkpoint_dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if checkpoint_dtype not in SUPPORTED_DTYPES:
        checkpoint_dtype = "float32"
    param_dtype = param_dtype or checkpoint_dtype
    num_heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
    return ModelConfig(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        # A score head replaces the unembedding, so a classifier ties nothing.
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) and not num_labels,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        param_dtype=param_dtype,
        dtype=dtype or param_dtype,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        num_labels=num_labels,
        **moe,
    )


def to_hf_config(config: ModelConfig) -> dict:
    """config.json contents that transformers (4.x and 5.x) and vLLM read back as this model."""
    expected = {"qwen2": (True, False), "qwen3": (False, True), "qwen3_moe": (False, True),
                "llama": (False, False)}[config.model_type]
    if (config.qkv_bias, config.qk_norm) != expected:
        raise ValueError(
            f"model_type {config.model_type!r} needs qkv_bias={expected[0]}, qk_norm={expected[1]}; "
            f"got qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}"
        )
    cfg = {
        "architectures": [
            _FAMILY_NAMES[config.model_type] + (SEQUENCE_CLASSIFICATION if config.num_labels else CAUSAL_LM)
        ],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": config.param_dtype,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (
            None if not config.eos_token_ids
            else config.eos_token_ids[0] if len(config.eos_token_ids) == 1
            else list(config.eos_token_ids)
        ),
        "pad_token_id": config.pad_token_id,
    }
    if config.num_labels:
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    if config.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        cfg["use_sliding_window"] = False
    if config.num_experts:
        cfg.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                   moe_intermediate_size=config.moe_intermediate_size,
                   norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    if config.model_type in ("qwen3", "qwen3_moe", "llama"):
        cfg["attention_bias"] = False
    if config.model_type == "llama":
        cfg["mlp_bias"] = False
    return cfg
