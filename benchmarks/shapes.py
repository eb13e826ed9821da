"""Model shapes the benchmarks run at: Qwen2.5 sizes (config.json of the published checkpoints)
and a tiny one for CPU smoke runs. `model_config` makes the `ModelConfig` of a shape."""

from __future__ import annotations

QWEN25 = dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6, max_position_embeddings=32768)
# Llama 3 / 3.1 8B (the policy and the reward model of configs/align_llama.py), config.json.
LLAMA3_8B = dict(model_type="llama", rope_theta=5e5, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, vocab_size=128256, tie_embeddings=False)
# Llama 3.1 70B (the policy of configs/align_llama.py:70b), config.json: Llama 3.1's RoPE scaling.
LLAMA31_70B = dict(model_type="llama", rope_theta=5e5, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192),
                   hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                   num_kv_heads=8, head_dim=128, vocab_size=128256, tie_embeddings=False)
LLAMA = {"llama3-8b": LLAMA3_8B, "llama3.1-70b": LLAMA31_70B}

# Qwen3 dense (configs/dapo_qwen.py), config.json of Qwen/Qwen3-8B-Base: no qkv bias, RMSNorm on
# queries and keys (qk_norm), an untied head.
QWEN3 = {
    "qwen3-8b": dict(model_type="qwen3", qk_norm=True, rope_theta=1e6, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, hidden_size=4096, intermediate_size=12288, num_layers=36,
                     num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=151936, tie_embeddings=False),
}

# Qwen3-MoE (configs/math_qwen3_moe.py), config.json of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B.
_QWEN3_MOE = dict(model_type="qwen3_moe", qk_norm=True, rope_theta=1e6, max_position_embeddings=40960,
                  head_dim=128, vocab_size=151936, tie_embeddings=False, num_kv_heads=4,
                  num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)
QWEN3_MOE = {
    "30b-a3b": dict(_QWEN3_MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                    num_layers=48, num_heads=32),
    "235b-a22b": dict(_QWEN3_MOE, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                      num_layers=94, num_heads=64),
}

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, head_dim=64, vocab_size=151936, tie_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, head_dim=128, vocab_size=151936, tie_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
               num_kv_heads=2, head_dim=128, vocab_size=151936, tie_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
               num_kv_heads=4, head_dim=128, vocab_size=152064, tie_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
                num_kv_heads=8, head_dim=128, vocab_size=152064, tie_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=512, tie_embeddings=True),
}


def shape_of_hub_id(path: str) -> str:
    """'Qwen/Qwen2.5-7B-Instruct' -> '7b' (the shape of a Qwen2.5 hub id); a Llama 3 / 3.1 8B
    id -> 'llama3-8b', a Llama 3.1 70B one -> 'llama3.1-70b'; 'Qwen/Qwen3-30B-A3B' -> '30b-a3b'
    (and 235b-a22b); 'Qwen/Qwen3-8B-Base' (or -8B) -> 'qwen3-8b'."""
    if "Llama-3" in path and "70B" in path.upper():
        return "llama3.1-70b"
    if "Llama-3" in path and "8B" in path.upper():
        return "llama3-8b"
    for name in QWEN3_MOE:
        if f"Qwen3-{name.upper()}" in path:
            return name
    for name in QWEN3:
        if f"Qwen3-{name.removeprefix('qwen3-').upper()}" in path:
            return name
    for name in SHAPES:
        if f"Qwen2.5-{name.upper()}" in path:
            return name
    raise ValueError(f"no benchmark shape for model {path!r}; known: Qwen2.5-{{{', '.join(SHAPES)}}}, "
                     f"Qwen3-{{{', '.join(QWEN3_MOE)}, 8B}}, Llama 3 8B and 3.1 70B")


def model_config(shape: str, **overrides):
    from cfpo_jax.models import ModelConfig

    if shape in LLAMA:
        return ModelConfig(**LLAMA[shape], **overrides)
    if shape in QWEN3_MOE:
        return ModelConfig(**QWEN3_MOE[shape], **overrides)
    if shape in QWEN3:
        return ModelConfig(**QWEN3[shape], **overrides)
    return ModelConfig(**QWEN25, **SHAPES[shape], **overrides)
