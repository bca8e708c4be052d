"""`reference_moe`: the plain-torch ground truth of the `fused_moe` contract, and
`reference_moe_quantized`, that of `fused_moe_quantized`.

Shape legend: T tokens, H hidden, I intermediate, E experts, K top-k.
"""

from __future__ import annotations

from torch import Tensor

from moe_infer.experts.math import Activation, ExpertTensors, as_activation, moe_forward
from moe_infer.experts.quant import QuantizedWeight, dequantize
from moe_infer.errors import ConfigError


def reference_moe(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor, *,
                  activation: str | Activation = "silu", b13: Tensor | None = None,
                  b2: Tensor | None = None) -> Tensor:
    """hidden [T,H]; w13 [E,2I,H] (gate rows then up rows); w2 [E,H,I]; expert_ids [T,K] int;
    expert_weights [T,K]; ids < 0 or >= E are skipped. Returns [T,H] in hidden's dtype."""
    num_experts = w13.shape[0]
    if w13.ndim != 3 or w2.ndim != 3 or w2.shape[0] != num_experts or w13.shape[1] != 2 * w2.shape[2] \
            or w13.shape[2] != hidden.shape[-1] or w2.shape[1] != hidden.shape[-1]:
        raise ConfigError(
            f"reference_moe: expected w13 [E,2I,H] and w2 [E,H,I] matching hidden [T,H]; got hidden "
            f"{tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )

    def expert(e: int) -> ExpertTensors:
        return ExpertTensors(w13[e], w2[e], None if b13 is None else b13[e], None if b2 is None else b2[e])

    return moe_forward(hidden, expert_ids, expert_weights, expert, num_experts, as_activation(activation))


def reference_moe_quantized(hidden: Tensor, w13: QuantizedWeight, w2: QuantizedWeight, expert_ids: Tensor,
                            expert_weights: Tensor, *, activation: str | Activation = "silu",
                            b13: Tensor | None = None, b2: Tensor | None = None) -> Tensor:
    """`reference_moe` on the weights that quantized w13 [E,2I,H] and w2 [E,H,I] stand for
    (`quant.dequantize` to hidden's dtype). Returns [T,H] in hidden's dtype."""
    return reference_moe(hidden, dequantize(w13, hidden.dtype), dequantize(w2, hidden.dtype), expert_ids,
                         expert_weights, activation=activation, b13=b13, b2=b2)
