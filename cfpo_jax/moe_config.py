"""Checks of the mixture-of-experts config fields (`model.moe_routing`, `model.moe_matmul`,
`model.tiny.num_experts*`, `mesh.expert`, `rl.moe_aux_loss_coef`), for `cfpo_jax.config.validate`
to add to its list of errors."""

from __future__ import annotations

from cfpo_jax.models.config import MOE_MATMULS

MOE_ROUTING = ("recompute", "replay")


def errors(config) -> list[str]:
    """Every problem with the MoE fields of `config`, as messages naming the value and what is valid."""
    found = []
    model, tiny = config.model, config.model.tiny
    if model.moe_routing not in MOE_ROUTING:
        found.append(f"model.moe_routing={model.moe_routing!r}; valid: {list(MOE_ROUTING)}")
    if model.moe_matmul not in MOE_MATMULS:
        found.append(f"model.moe_matmul={model.moe_matmul!r}; valid: {list(MOE_MATMULS)}")
    if config.mesh.expert < 1:
        found.append(f"mesh.expert must be >= 1 (1: no expert parallelism); got {config.mesh.expert}")
    if config.rl.moe_aux_loss_coef < 0:
        found.append(f"rl.moe_aux_loss_coef must be >= 0 (0: no load-balancing loss); got "
                     f"{config.rl.moe_aux_loss_coef}")
    if tiny.num_experts < 0 or (tiny.num_experts and not (
            0 < tiny.num_experts_per_tok <= tiny.num_experts and tiny.moe_intermediate_size > 0)):
        found.append(f"model.tiny: num_experts={tiny.num_experts} must be 0 (dense) or > 0 with "
                     f"num_experts_per_tok in [1, num_experts] (got {tiny.num_experts_per_tok}) and "
                     f"moe_intermediate_size > 0 (got {tiny.moe_intermediate_size})")
    if model.path == "tiny" and tiny.num_experts == 0 and (
            model.moe_routing == "replay" or config.rl.moe_aux_loss_coef > 0):
        found.append("model.moe_routing='replay' and rl.moe_aux_loss_coef > 0 need a mixture-of-experts "
                     "model; model.tiny.num_experts is 0 (a dense model)")
    return found
