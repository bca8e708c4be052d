"""`fused_moe`: one MoE layer in four to six Triton launches (alignment: one for decode, three
otherwise; two grouped GEMMs; a deterministic top-k sum), registered as the custom op
`torch.ops.moe_infer.fused_moe` (with a fake implementation) so that `torch.compile` traces through
it and CUDA graphs capture it: nothing here synchronises with the host, and every size is known
from the input shapes. Inference only (no autograd formula).

Shape legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K slots.
Owns input checks, allocation, grids and launches; the kernels are in `fused_moe_kernels.py`, the
alignment in `align.py`, launch configs in `config.py`, the ground truth in `reference.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_infer import envs
from moe_infer.experts.math import Activation, as_activation

from . import fused_moe_kernels as kernels
from .align import align_block_size
from .config import KernelConfig, get_config

ACTIVATIONS = {"silu": kernels.SILU, "swish": kernels.SILU, "gpt_oss": kernels.GPT_OSS, "gelu": kernels.GELU,
               "gelu_pytorch_tanh": kernels.GELU_TANH, "gelu_new": kernels.GELU_TANH, "relu": kernels.RELU}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUM_BLOCK_T, SUM_BLOCK_H = 16, 128


def fused_moe(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor, *,
              activation: str | Activation = "silu", b13: Tensor | None = None, b2: Tensor | None = None) -> Tensor:
    """hidden [T,H]; w13 [E,2I,H] (gate rows then up rows); w2 [E,H,I]; expert_ids [T,K] int;
    expert_weights [T,K]; optional b13 [E,2I], b2 [E,H]. Ids < 0 or >= E are skipped.
    Returns [T,H] in hidden's dtype. Same contract as `reference_moe`."""
    return fused_experts(hidden, w13, w2, expert_ids, expert_weights, activation=activation, b13=b13, b2=b2)


def fused_experts(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor, *,
                  activation: str | Activation = "silu", b13: Tensor | None = None, b2: Tensor | None = None,
                  interleaved: bool = False) -> Tensor:
    """`fused_moe` for any strided weight views (no copy): w13 may be a transposed view, and with
    `interleaved` its rows alternate gate, up, gate, ... (GPT-OSS) instead of all gate rows first."""
    act = as_activation(activation)
    check_inputs(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act)
    return torch.ops.moe_infer.fused_moe(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act.name,
                                         float(act.alpha), float(act.limit), interleaved)


def fused_moe_with_config(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor,
                          config: KernelConfig, *, activation: str | Activation = "silu", b13: Tensor | None = None,
                          b2: Tensor | None = None) -> Tensor:
    """`fused_moe` with an explicit launch config instead of the looked-up one (for tuning); not a custom op."""
    act = as_activation(activation)
    check_inputs(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act)
    return _launch(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act, False, config)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA, or anything under TRITON_INTERPRET=1."""
    return device.type == "cuda" or envs.triton_interpret()


def check_inputs(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor,
                 b13: Tensor | None, b2: Tensor | None, activation: Activation) -> None:
    """Raise ValueError/TypeError naming what was received and what is allowed."""
    shapes = (f"got hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, expert_ids "
              f"{tuple(expert_ids.shape)}, expert_weights {tuple(expert_weights.shape)}")
    if hidden.ndim != 2 or w13.ndim != 3 or w2.ndim != 3 or expert_ids.ndim != 2:
        raise ValueError(f"fused_moe: expected hidden [T,H], w13 [E,2I,H], w2 [E,H,I], expert_ids [T,K]; {shapes}")
    num_tokens, hidden_size = hidden.shape
    num_experts, intermediate_size = w13.shape[0], w2.shape[2]
    if (w13.shape != (num_experts, 2 * intermediate_size, hidden_size)
            or w2.shape != (num_experts, hidden_size, intermediate_size)
            or expert_ids.shape[0] != num_tokens or expert_weights.shape != expert_ids.shape):
        raise ValueError(f"fused_moe: expected hidden [T,H], w13 [E,2I,H], w2 [E,H,I], expert_ids and "
                         f"expert_weights [T,K] with matching sizes; {shapes}")
    if b13 is not None and b13.shape != (num_experts, 2 * intermediate_size):
        raise ValueError(f"fused_moe: b13 must be [E,2I] = {(num_experts, 2 * intermediate_size)}, "
                         f"got {tuple(b13.shape)}")
    if b2 is not None and b2.shape != (num_experts, hidden_size):
        raise ValueError(f"fused_moe: b2 must be [E,H] = {(num_experts, hidden_size)}, got {tuple(b2.shape)}")
    if (b13 is None) != (b2 is None):
        raise ValueError("fused_moe: pass both b13 and b2, or neither")
    if hidden.dtype not in DTYPES or w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise TypeError(f"fused_moe: hidden, w13 and w2 must share one dtype of float32, float16, bfloat16; got "
                        f"{hidden.dtype}, {w13.dtype}, {w2.dtype}")
    if not expert_weights.is_floating_point() or expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fused_moe: expert_ids must be int32/int64 and expert_weights floating point; got "
                        f"{expert_ids.dtype}, {expert_weights.dtype}")
    if expert_ids.shape[1] > 32 or num_experts > 4096:
        raise ValueError(f"fused_moe: supports K <= 32 and E <= 4096; {shapes}")
    if activation.name not in ACTIVATIONS:
        raise ValueError(f"fused_moe: activation {activation.name!r} has no fused kernel; supported: "
                         f"{', '.join(sorted(ACTIVATIONS))}")
    tensors = [hidden, w13, w2, expert_ids, expert_weights] + [b for b in (b13, b2) if b is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"fused_moe: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = hidden.device
    if device.type != "meta" and not triton_runs_on(device):
        raise ValueError(f"fused_moe: the Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                         f"to run them in Triton's CPU interpreter (slow, for tests), or use reference_moe")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (TF32 would lose ~3 decimal digits against the reference)
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor,
            b13: Tensor | None, b2: Tensor | None, activation: Activation, interleaved: bool,
            config: KernelConfig | None = None) -> Tensor:
    num_tokens, hidden_size = hidden.shape
    num_experts, intermediate_size = w13.shape[0], w2.shape[2]
    top_k = expert_ids.shape[1]
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    num_slots = num_tokens * top_k
    if config is None:
        config = get_config(num_experts, intermediate_size, top_k, num_tokens, hidden.dtype, hidden.device)
    block_m = config.BLOCK_M
    flat_ids = expert_ids.reshape(-1)  # [S]
    flat_weights = expert_weights.reshape(-1)  # [S]
    alignment = align_block_size(flat_ids, num_experts, block_m)
    num_blocks_m = alignment.max_blocks

    # gate rows then up rows, or alternating (interleaved): two strided views of w13 either way
    if interleaved:
        w_gate, w_up = w13[:, 0::2], w13[:, 1::2]  # [E, I, H]
        b_gate, b_up = (b13[:, 0::2], b13[:, 1::2]) if b13 is not None else (None, None)
    else:
        w_gate, w_up = w13[:, :intermediate_size], w13[:, intermediate_size:]
        b_gate, b_up = (b13[:, :intermediate_size], b13[:, intermediate_size:]) if b13 is not None else (None, None)
    has_bias = b13 is not None
    precision = _dot_precision(hidden.dtype)

    act = torch.empty((num_blocks_m * block_m, intermediate_size), dtype=hidden.dtype, device=hidden.device)
    cfg = config.gate_up
    kernels.gate_up_kernel[(num_blocks_m * _cdiv(intermediate_size, cfg.BLOCK_N),)](
        hidden, w_gate, w_up, b_gate if has_bias else w_gate, b_up if has_bias else w_up,
        alignment.sorted_slot_ids, alignment.block_expert_ids, act,
        num_slots, hidden_size, intermediate_size, top_k, num_blocks_m,
        hidden.stride(0), hidden.stride(1), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2),
        b_gate.stride(0) if has_bias else 0, b_gate.stride(1) if has_bias else 0, act.stride(0), act.stride(1),
        float(activation.alpha), float(activation.limit),
        BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        ACTIVATION=ACTIVATIONS[activation.name], HAS_BIAS=has_bias, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    slot_dtype = torch.promote_types(hidden.dtype, expert_weights.dtype)
    slot_out = torch.empty((num_slots, hidden_size), dtype=slot_dtype, device=hidden.device)
    cfg = config.down
    kernels.down_kernel[(num_blocks_m * _cdiv(hidden_size, cfg.BLOCK_N),)](
        act, w2, b2 if has_bias else w2, flat_weights, alignment.sorted_slot_ids, alignment.block_expert_ids,
        slot_out,
        num_slots, hidden_size, intermediate_size, num_blocks_m,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        b2.stride(0) if has_bias else 0, b2.stride(1) if has_bias else 0, slot_out.stride(0), slot_out.stride(1),
        BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        HAS_BIAS=has_bias, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    kernels.sum_topk_kernel[(_cdiv(num_tokens, SUM_BLOCK_T), _cdiv(hidden_size, SUM_BLOCK_H))](
        slot_out, flat_ids, out,
        num_tokens, hidden_size, num_experts,
        slot_out.stride(0), slot_out.stride(1), out.stride(0), out.stride(1),
        TOP_K=top_k, BLOCK_T=SUM_BLOCK_T, BLOCK_H=SUM_BLOCK_H,
    )
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.library.custom_op("moe_infer::fused_moe", mutates_args=())
def _fused_moe_op(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor,
                  b13: Tensor | None, b2: Tensor | None, activation: str, alpha: float, limit: float,
                  interleaved: bool) -> Tensor:
    return _launch(hidden, w13, w2, expert_ids, expert_weights, b13, b2,
                   Activation(activation, alpha=alpha, limit=limit), interleaved)


@_fused_moe_op.register_fake
def _(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor,
      b13: Tensor | None, b2: Tensor | None, activation: str, alpha: float, limit: float,
      interleaved: bool) -> Tensor:
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)
