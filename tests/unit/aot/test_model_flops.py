"""The analytic model FLOPs that benchmarks/compile.py sets the compiled FLOPs against: 6 (update)
or 2 (forward) × the parameters a token runs through × tokens. For a mixture of experts that is
the k routed experts of E, not all of them; for a dense model every parameter. The parameter
counts are written here from the architectures (Qwen3-MoE, Qwen2), not read from the code."""

import jax
import pytest

from cfpo_jax import config as config_lib
from cfpo_jax import sharding
from cfpo_jax.aot import programs
from cfpo_jax.models import ModelConfig

V, D, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 64, 2, 4, 2, 16
EXPERTS, TOP_K, MOE_F, F = 8, 2, 32, 128
PROMPTS, GROUP, PROMPT, NEW, SLOTS = 4, 2, 16, 16, 8


def _config():
    c = config_lib.base_config()
    c.model.path = "tiny"  # the shapes come from the ModelConfig below; nothing is loaded
    c.data.batch_size, c.rl.group_size = PROMPTS, GROUP
    c.rl.num_epochs = 2  # off policy: prepare runs the old-logprob pass
    c.sampling.max_prompt_len, c.sampling.max_new_tokens = PROMPT, NEW
    c.sampling.max_concurrent = SLOTS
    config_lib.validate(c)
    return c


def _attention(qkv_bias):
    weights = D * HEADS * HEAD_DIM * 2 + D * KV_HEADS * HEAD_DIM * 2
    return weights + ((HEADS + 2 * KV_HEADS) * HEAD_DIM if qkv_bias else 0)


def _moe_counts():
    """(all parameters, parameters one token runs through) of the tiny Qwen3-MoE below: untied
    embedding and head, per layer attention + q/k norms + two RMSNorms + router + E SwiGLU experts
    (of which a token runs k), a final norm."""
    shared = 2 * V * D + D + LAYERS * (_attention(False) + 2 * HEAD_DIM + 2 * D + D * EXPERTS)
    return shared + LAYERS * 3 * EXPERTS * D * MOE_F, shared + LAYERS * 3 * TOP_K * D * MOE_F


def _dense_count():
    """Parameters of the tiny Qwen2 below: tied embedding, per layer attention with q/k/v biases,
    a SwiGLU MLP and two RMSNorms, a final norm."""
    return V * D + D + LAYERS * (_attention(True) + 3 * D * F + 2 * D)


MODELS = {
    "qwen3_moe": ModelConfig(model_type="qwen3_moe", vocab_size=V, hidden_size=D, intermediate_size=F,
                             num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                             qk_norm=True, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                             moe_intermediate_size=MOE_F, norm_topk_prob=True, tie_embeddings=False),
    "qwen2": ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=D, intermediate_size=F,
                         num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         qkv_bias=True, tie_embeddings=True),
}


@pytest.mark.parametrize("family", list(MODELS))
def test_model_flops_count_the_parameters_a_token_runs_through(family):
    """Update: 6 × active × the minibatch's tokens; prepare (one old-logprob pass): 2 × active ×
    the rollout's tokens; a decode step: 2 × active per slot. A MoE's active count is the formula's
    (k of E experts: 1.9 × fewer here than all its parameters), a dense model's is all of them."""
    model = MODELS[family]
    total, active = _moe_counts() if family == "qwen3_moe" else (_dense_count(), _dense_count())
    mesh = sharding.make_mesh(1, -1, 1, devices=jax.devices()[:1])
    config = _config()
    _, params, frozen = programs.abstract_policy(config, model, mesh)
    assert sum(x.size for x in jax.tree.leaves((params, frozen))) == total  # the formula is the model's
    learner = programs.learner_programs(config, model, mesh)
    rows, width = PROMPTS * GROUP // config.rl.num_minibatches, PROMPT + NEW
    assert learner["update"].model_flops == pytest.approx(6 * active * rows * width, rel=1e-12)
    assert learner["prepare"].model_flops == pytest.approx(2 * active * PROMPTS * GROUP * width, rel=1e-12)
    decode = programs.sampler_programs(config, model, mesh)["decode"]
    assert decode.model_flops == pytest.approx(2 * active * decode.tokens, rel=1e-12)
    if family == "qwen3_moe":
        assert total > 1.8 * active  # the count is not the whole model's
