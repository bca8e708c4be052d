"""Canonical per-expert views of a `transformers` experts module, whatever layout it keeps.

Layouts handled (checked through the `use_experts_implementation` flags, not assumed):
- standard: `gate_up_proj` [E, 2I, H] (gate rows then up rows), `down_proj` [E, H, I];
- GPT-OSS: transposed `gate_up_proj` [E, H, 2I] with gate/up interleaved, `down_proj` [E, I, H],
  biases `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, H].
`ModuleExperts(e)` returns views (no copy) in the canonical orientation; `ExpertTensors.canonical()`
makes the de-interleaved contiguous copy that checkpoints store.
"""

from __future__ import annotations

from torch import nn

from .math import Activation, ExpertTensors
from moe_infer.errors import UnsupportedExperts


class ModuleExperts:
    """Expert source over an in-memory experts module: `self(e)` -> ExpertTensors (views)."""

    def __init__(self, experts: nn.Module, activation: Activation):
        self.module = experts
        self.activation = activation
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.interleaved = not bool(getattr(experts, "is_concatenated", True))
        self.has_bias = bool(getattr(experts, "has_bias", False))
        gate_up = experts.gate_up_proj
        self.num_experts = gate_up.shape[0]
        if self.transposed:
            self.hidden_size, self.intermediate_size = gate_up.shape[1], gate_up.shape[2] // 2
        else:
            self.hidden_size, self.intermediate_size = gate_up.shape[2], gate_up.shape[1] // 2

    @classmethod
    def from_module(cls, experts: nn.Module, hidden_act: str | None) -> "ModuleExperts":
        name = type(experts).__name__
        problems = []
        if not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
            problems.append("no 3-D `gate_up_proj` parameter")
        if not isinstance(getattr(experts, "down_proj", None), nn.Parameter):
            problems.append("no 3-D `down_proj` parameter")
        if getattr(experts, "has_gate", True) is False:
            problems.append("ungated experts (has_gate=False)")
        if getattr(experts, "has_post_expert_norm", False):
            problems.append("a post-expert norm")
        if problems:
            raise UnsupportedExperts(f"experts module {name} has an unsupported layout: {'; '.join(problems)}")
        if hasattr(experts, "limit") and hasattr(experts, "alpha"):  # GPT-OSS clamped SwiGLU
            activation = Activation("gpt_oss", alpha=float(experts.alpha), limit=float(experts.limit))
        else:
            activation = Activation(hidden_act or "silu")
        source = cls(experts, activation)
        expected_down = (
            (source.num_experts, source.intermediate_size, source.hidden_size)
            if source.transposed
            else (source.num_experts, source.hidden_size, source.intermediate_size)
        )
        if experts.gate_up_proj.ndim != 3 or tuple(experts.down_proj.shape) != expected_down:
            raise UnsupportedExperts(
                f"experts module {name}: gate_up_proj {tuple(experts.gate_up_proj.shape)} and down_proj "
                f"{tuple(experts.down_proj.shape)} do not form a gated MLP (expected down_proj {expected_down})"
            )
        return source

    def __call__(self, expert_idx: int) -> ExpertTensors:
        m = self.module
        w13, w2 = m.gate_up_proj[expert_idx], m.down_proj[expert_idx]
        if self.transposed:
            w13, w2 = w13.t(), w2.t()
        b13 = m.gate_up_proj_bias[expert_idx] if self.has_bias else None
        b2 = m.down_proj_bias[expert_idx] if self.has_bias else None
        return ExpertTensors(w13, w2, b13, b2, interleaved=self.interleaved)

    def expert_nbytes(self) -> int:
        """Bytes of one expert's weights (and biases)."""
        t = self(0)
        return sum(x.numel() * x.element_size() for x in (t.w13, t.w2, t.b13, t.b2) if x is not None)

    @property
    def device(self):
        return self.module.gate_up_proj.device
