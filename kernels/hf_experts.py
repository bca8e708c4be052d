"""The `transformers` experts implementation named "moe_infer": `fused_experts` behind transformers'
`ExpertsInterface`, so `model.set_experts_implementation("moe_infer")` (or
`from_pretrained(..., experts_implementation="moe_infer")`) runs the fused kernels without `wrap`.

Handles every experts layout `transformers` 5 marks with `@use_experts_implementation` that is a
gated MLP: gate/up concatenated or interleaved, transposed or not, with or without biases, the
default gate (`act_fn(gate) * up` from `config.hidden_act`) or GPT-OSS's clamped SwiGLU. Others
(ungated experts, post-expert norms, other custom gates) raise ValueError naming what is missing.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_infer.experts.math import Activation

from .fused_moe import fused_experts
from moe_infer.errors import ConfigError

NAME = "moe_infer"


def experts_activation(experts: nn.Module) -> Activation:
    """The gated activation of a `transformers` experts module, or ValueError if no fused kernel has it."""
    from transformers.integrations.moe import _default_apply_gate

    name = type(experts).__name__
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        raise ConfigError(f"experts_implementation='moe_infer' runs gated experts without a post-expert norm; "
                         f"{name} has has_gate={getattr(experts, 'has_gate', True)}, "
                         f"has_post_expert_norm={getattr(experts, 'has_post_expert_norm', False)}")
    if hasattr(experts, "alpha") and hasattr(experts, "limit"):  # GPT-OSS clamped SwiGLU
        return Activation("gpt_oss", alpha=float(experts.alpha), limit=float(experts.limit))
    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        raise ConfigError(f"experts_implementation='moe_infer': {name} has its own _apply_gate, which the fused "
                         f"kernels do not implement; use 'grouped_mm'")
    config = getattr(experts, "config", None)
    return Activation(getattr(config, "hidden_act", None) or "silu")


def moe_infer_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                              top_k_weights: Tensor) -> Tensor:
    """ExpertsInterface signature: hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H].
    Ids >= E (expert-parallel sentinels) are skipped by the kernels."""
    return module_experts_forward(self, hidden_states, top_k_index, top_k_weights, experts_activation(self))


def module_experts_forward(experts: nn.Module, hidden: Tensor, expert_ids: Tensor, expert_weights: Tensor,
                           activation: Activation) -> Tensor:
    """`fused_experts` on the stacked weights of a `transformers` experts module, in place (no copy).
    Under autocast the input may be fp32 with half-precision weights: it runs in the weights' dtype
    and comes back in its own, as transformers' grouped_mm does."""
    w13, w2 = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # stored [E, H, 2I] and [E, I, H]: use transposed views
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    has_bias = getattr(experts, "has_bias", False)
    out = fused_experts(hidden.to(w13.dtype), w13, w2, expert_ids, expert_weights, activation=activation,
                        b13=experts.gate_up_proj_bias if has_bias else None,
                        b2=experts.down_proj_bias if has_bias else None,
                        interleaved=not getattr(experts, "is_concatenated", True))
    return out.to(hidden.dtype)


def register_experts_implementation() -> None:
    """Register "moe_infer" in `transformers`' ExpertsInterface (idempotent; done on import of moe_infer.kernels)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, moe_infer_experts_forward)
