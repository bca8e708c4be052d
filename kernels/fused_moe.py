"""`fused_moe`: one MoE layer in four to six Triton launches (alignment: one for decode, three
otherwise; two grouped GEMMs; a deterministic top-k sum), registered as the custom op
`torch.ops.moe_infer.fused_moe` (with a fake implementation) so that `torch.compile` traces through
it and CUDA graphs capture it: nothing here synchronises with the host, and every size is known
from the input shapes. Inference only (no autograd formula).

`fused_moe_quantized` is the same layer on int8 / int4 experts (`experts/quant.py`), dequantized
inside the same two GEMM kernels (w8a16, w4a16), as the custom op `torch.ops.moe_infer.fused_moe_quantized`.
Every BLOCK_K / group size pair runs (see `fused_moe_kernels.py`); the int4 default configs pick a
BLOCK_K that divides the group size, the faster case.

Shape legend: T tokens, H hidden, I intermediate, E experts, K top-k, S = T*K slots.
Owns input checks, allocation, grids and launches; the kernels are in `fused_moe_kernels.py`, the
alignment in `align.py`, launch configs in `config.py`, the ground truth in `reference.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moe_infer import envs
from moe_infer.experts.math import Activation, as_activation
from moe_infer.experts.quant import QuantizedWeight, QuantScheme, num_groups

from . import fused_moe_kernels as kernels
from .align import align_block_size
from .config import INT4_MIN_BLOCK_K, KernelConfig, get_config
from moe_infer.errors import ConfigError

ACTIVATIONS = {"silu": kernels.SILU, "swish": kernels.SILU, "gpt_oss": kernels.GPT_OSS, "gelu": kernels.GELU,
               "gelu_pytorch_tanh": kernels.GELU_TANH, "gelu_new": kernels.GELU_TANH, "relu": kernels.RELU}
WEIGHT_FORMATS = {"int8": kernels.INT8_WEIGHTS, "int4": kernels.INT4_WEIGHTS}  # QuantScheme.name -> WEIGHTS
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUM_BLOCK_T, SUM_BLOCK_H = 16, 128


def fused_moe(hidden: Tensor, w13: Tensor, w2: Tensor, expert_ids: Tensor, expert_weights: Tensor, *,
              activation: str | Activation = "silu", b13: Tensor | None = None, b2: Tensor | None = None) -> Tensor:
    """hidden [T,H]; w13 [E,2I,H] (gate rows then up rows); w2 [E,H,I]; expert_ids [T,K] int;
    expert_weights [T,K]; optional b13 [E,2I], b2 [E,H]. Ids < 0 or >= E are skipped.
    Returns [T,H] in hidden's dtype. Same contract as `reference_moe`."""
    return fused_experts(hidden, w13, w2, expert_ids, expert_weights, activation=activation, b13=b13, b2=b2)


def fused_moe_quantized(hidden: Tensor, w13: QuantizedWeight, w2: QuantizedWeight, expert_ids: Tensor,
                        expert_weights: Tensor, *, activation: str | Activation = "silu", b13: Tensor | None = None,
                        b2: Tensor | None = None) -> Tensor:
    """`fused_moe` on quantized experts (w8a16 / w4a16: weights dequantized inside the kernels):
    w13 `QuantizedWeight` [E,2I,H] (gate rows then up rows), w2 `QuantizedWeight` [E,H,I], both of one
    scheme of `experts/quant.py`; biases, if any, floating. Returns [T,H] in hidden's dtype. Same
    contract as `reference_moe_quantized` (dequantize, then `reference_moe`)."""
    if not isinstance(w13, QuantizedWeight) or not isinstance(w2, QuantizedWeight):
        raise TypeError(f"fused_moe_quantized: w13 and w2 must be QuantizedWeight (moe_infer.experts.quant), got "
                        f"{type(w13).__name__} and {type(w2).__name__}; fused_moe takes floating weights")
    return fused_experts(hidden, w13, w2, expert_ids, expert_weights, activation=activation, b13=b13, b2=b2)


def fused_experts(hidden: Tensor, w13: Tensor | QuantizedWeight, w2: Tensor | QuantizedWeight, expert_ids: Tensor,
                  expert_weights: Tensor, *, activation: str | Activation = "silu", b13: Tensor | None = None,
                  b2: Tensor | None = None, interleaved: bool = False) -> Tensor:
    """`fused_moe` / `fused_moe_quantized` for any strided weight views (no copy): a float w13 may be a
    transposed view, and with `interleaved` the rows of w13 (float or quantized) alternate gate, up,
    gate, ... (GPT-OSS) instead of all gate rows first."""
    act = as_activation(activation)
    check_inputs(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act)
    if isinstance(w13, QuantizedWeight):
        return torch.ops.moe_infer.fused_moe_quantized(
            hidden, w13.qweight, w13.scales, w13.zeros, w2.qweight, w2.scales, w2.zeros, expert_ids, expert_weights,
            b13, b2, w13.scheme.name, w13.scheme.group_size, act.name, float(act.alpha), float(act.limit), interleaved)
    return torch.ops.moe_infer.fused_moe(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act.name,
                                         float(act.alpha), float(act.limit), interleaved)


def fused_moe_with_config(hidden: Tensor, w13: Tensor | QuantizedWeight, w2: Tensor | QuantizedWeight,
                          expert_ids: Tensor, expert_weights: Tensor, config: KernelConfig, *,
                          activation: str | Activation = "silu", b13: Tensor | None = None,
                          b2: Tensor | None = None, interleaved: bool = False) -> Tensor:
    """`fused_experts` with an explicit launch config instead of the looked-up one (for tuning and
    tests); not a custom op."""
    act = as_activation(activation)
    check_inputs(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act)
    return _launch(hidden, w13, w2, expert_ids, expert_weights, b13, b2, act, interleaved, config)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA, or anything under TRITON_INTERPRET=1."""
    return device.type == "cuda" or envs.triton_interpret()


def check_inputs(hidden: Tensor, w13: Tensor | QuantizedWeight, w2: Tensor | QuantizedWeight, expert_ids: Tensor,
                 expert_weights: Tensor, b13: Tensor | None, b2: Tensor | None, activation: Activation) -> None:
    """Raise ValueError/TypeError naming what was received and what is allowed."""
    quantized = isinstance(w13, QuantizedWeight)
    op = "fused_moe_quantized" if quantized else "fused_moe"
    if quantized != isinstance(w2, QuantizedWeight):
        raise TypeError(f"{op}: w13 and w2 must both be tensors or both QuantizedWeight, got "
                        f"{type(w13).__name__} and {type(w2).__name__}")
    shapes = (f"got hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, expert_ids "
              f"{tuple(expert_ids.shape)}, expert_weights {tuple(expert_weights.shape)}")
    if hidden.ndim != 2 or len(w13.shape) != 3 or len(w2.shape) != 3 or expert_ids.ndim != 2:
        raise ConfigError(f"{op}: expected hidden [T,H], w13 [E,2I,H], w2 [E,H,I], expert_ids [T,K]; {shapes}")
    num_tokens, hidden_size = hidden.shape
    num_experts, intermediate_size = w13.shape[0], w2.shape[2]
    if (w13.shape != (num_experts, 2 * intermediate_size, hidden_size)
            or w2.shape != (num_experts, hidden_size, intermediate_size)
            or expert_ids.shape[0] != num_tokens or expert_weights.shape != expert_ids.shape):
        raise ConfigError(f"{op}: expected hidden [T,H], w13 [E,2I,H], w2 [E,H,I], expert_ids and "
                         f"expert_weights [T,K] with matching sizes; {shapes}")
    if b13 is not None and b13.shape != (num_experts, 2 * intermediate_size):
        raise ConfigError(f"{op}: b13 must be [E,2I] = {(num_experts, 2 * intermediate_size)}, "
                         f"got {tuple(b13.shape)}")
    if b2 is not None and b2.shape != (num_experts, hidden_size):
        raise ConfigError(f"{op}: b2 must be [E,H] = {(num_experts, hidden_size)}, got {tuple(b2.shape)}")
    if (b13 is None) != (b2 is None):
        raise ConfigError(f"{op}: pass both b13 and b2, or neither")
    if any(b is not None and not b.is_floating_point() for b in (b13, b2)):
        raise TypeError(f"{op}: biases must be floating point, got {b13.dtype} and {b2.dtype}")
    if quantized:
        if hidden.dtype not in DTYPES:
            raise TypeError(f"{op}: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
        # fields, not the dataclasses: torch.compile may trace group_size as a symbolic int
        if w13.scheme.name != w2.scheme.name or w13.scheme.group_size != w2.scheme.group_size:
            raise ConfigError(f"{op}: w13 and w2 must share one quantization scheme, got {w13.scheme} and {w2.scheme}")
        _check_quantized(op, "w13", w13)
        _check_quantized(op, "w2", w2)
    elif hidden.dtype not in DTYPES or w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise TypeError(f"{op}: hidden, w13 and w2 must share one dtype of float32, float16, bfloat16; got "
                        f"{hidden.dtype}, {w13.dtype}, {w2.dtype}")
    if not expert_weights.is_floating_point() or expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: expert_ids must be int32/int64 and expert_weights floating point; got "
                        f"{expert_ids.dtype}, {expert_weights.dtype}")
    if expert_ids.shape[1] > 32 or num_experts > 4096:
        raise ConfigError(f"{op}: supports K <= 32 and E <= 4096; {shapes}")
    if activation.name not in ACTIVATIONS:
        raise ConfigError(f"{op}: activation {activation.name!r} has no fused kernel; supported: "
                         f"{', '.join(sorted(ACTIVATIONS))}")
    weights = [*w13.parts().values(), *w2.parts().values()] if quantized else [w13, w2]
    tensors = [hidden, *weights, expert_ids, expert_weights] + [b for b in (b13, b2) if b is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ConfigError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = hidden.device
    if device.type != "meta" and not triton_runs_on(device):
        raise ConfigError(f"{op}: the Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                         f"to run them in Triton's CPU interpreter (slow, for tests), or use reference_moe")


def _check_quantized(op: str, name: str, weight: QuantizedWeight) -> None:
    """The tensors of one QuantizedWeight [E, N, K] against the layout of `experts/quant.py`."""
    num_experts, out_features, in_features = weight.shape
    if weight.scheme.name == "int4" and in_features % 2:
        raise ConfigError(f"{op}: {name} is int4 with an odd K={weight.in_features}; int4 packs two values a byte")
    if weight.scheme.name == "int8":
        expected = {"qweight": (torch.int8, (num_experts, out_features, in_features)),
                    "scales": (torch.float32, (num_experts, out_features))}
    else:
        groups = num_groups(in_features, weight.scheme.group_size)
        expected = {"qweight": (torch.uint8, (num_experts, out_features, in_features // 2)),
                    "scales": (torch.float32, (num_experts, out_features, groups)),
                    "zeros": (torch.uint8, (num_experts, out_features, groups))}
    parts = weight.parts()
    # compared role by role (torch.compile traces a dict comparison poorly, and NG may be symbolic there)
    if parts.keys() != expected.keys() or any(parts[role].dtype != dtype or tuple(parts[role].shape) != shape
                                              for role, (dtype, shape) in expected.items()):
        got = {role: (t.dtype, tuple(t.shape)) for role, t in parts.items()}
        def show(parts: dict) -> str:
            return ", ".join(f"{role} {str(dtype).removeprefix('torch.')} {list(shape)}"
                             for role, (dtype, shape) in parts.items())
        raise ConfigError(f"{op}: {name} ({weight.scheme.name}"
                         f"{'' if weight.scheme.name == 'int8' else f', group {weight.scheme.group_size}'}) of "
                         f"[E,N,K] = {[num_experts, out_features, in_features]} must hold {show(expected)}; "
                         f"got {show(got)}")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (TF32 would lose ~3 decimal digits against the reference)
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class _GemmWeight:
    """What one GEMM kernel reads as its weight [E, N, K]: `values` (float in hidden's dtype, int8
    [E, N, K], or uint8 [E, N, K/2] for int4), and for quantized weights their `scales` ([E, N] or
    [E, N, NG]) and `zeros` ([E, N, NG], int4), in the layout of `experts/quant.py`."""

    values: Tensor
    weights_format: int = kernels.FLOAT_WEIGHTS
    scales: Tensor | None = None
    zeros: Tensor | None = None
    group_size: int = 1

    @classmethod
    def of(cls, weight: Tensor | QuantizedWeight) -> "_GemmWeight":
        if not isinstance(weight, QuantizedWeight):
            return cls(weight)
        return cls(weight.qweight, WEIGHT_FORMATS[weight.scheme.name], weight.scales, weight.zeros,
                   weight.scheme.group_size if weight.scheme.name == "int4" else 1)

    def output_rows(self, index: slice) -> "_GemmWeight":
        """The weight of output rows `index` (a view of every tensor)."""
        return replace(self, values=self.values[:, index],
                       scales=None if self.scales is None else self.scales[:, index],
                       zeros=None if self.zeros is None else self.zeros[:, index])

    def group_per_tile(self, block_k: int) -> bool:
        """Whether every K tile of block_k lies in one int4 group (the kernels then load one scale per column)."""
        return self.group_size % block_k == 0

    def aux_pointers(self) -> tuple[Tensor, Tensor]:
        """Scales and zero points, or stand-ins the kernel never reads."""
        return (self.values if self.scales is None else self.scales,
                self.values if self.zeros is None else self.zeros)

    def strides(self) -> tuple[int, ...]:
        """stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_ze, stride_zn, stride_zg."""
        def three(t: Tensor | None) -> tuple[int, int, int]:
            if t is None:
                return 0, 0, 0
            return t.stride(0), t.stride(1), t.stride(2) if t.ndim == 3 else 0
        return (*self.values.stride(), *three(self.scales), *three(self.zeros))


def _launch(hidden: Tensor, w13: Tensor | QuantizedWeight, w2: Tensor | QuantizedWeight, expert_ids: Tensor,
            expert_weights: Tensor, b13: Tensor | None, b2: Tensor | None, activation: Activation, interleaved: bool,
            config: KernelConfig | None = None) -> Tensor:
    num_tokens, hidden_size = hidden.shape
    num_experts, intermediate_size = w13.shape[0], w2.shape[2]
    top_k = expert_ids.shape[1]
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    num_slots = num_tokens * top_k
    if config is None:
        scheme = w13.scheme if isinstance(w13, QuantizedWeight) else None
        config = get_config(num_experts, intermediate_size, top_k, num_tokens, hidden.dtype, hidden.device,
                            quant=scheme)
    if isinstance(w13, QuantizedWeight) and w13.scheme.name == "int4":
        too_small = {name: cfg.BLOCK_K for name, cfg in (("gate_up", config.gate_up), ("down", config.down))
                     if cfg.BLOCK_K < INT4_MIN_BLOCK_K}
        if too_small:
            raise ConfigError(f"fused_moe_quantized: int4 experts need BLOCK_K >= {INT4_MIN_BLOCK_K} (each K tile is "
                             f"split into even and odd halves for the two nibbles of a byte); the config has "
                             f"{', '.join(f'{name} BLOCK_K={k}' for name, k in too_small.items())}")
    block_m = config.BLOCK_M
    flat_ids = expert_ids.reshape(-1)  # [S]
    flat_weights = expert_weights.reshape(-1)  # [S]
    alignment = align_block_size(flat_ids, num_experts, block_m)
    num_blocks_m = alignment.max_blocks

    # gate rows then up rows, or alternating (interleaved): two strided views of w13 either way
    gate_rows, up_rows = ((slice(0, None, 2), slice(1, None, 2)) if interleaved
                          else (slice(0, intermediate_size), slice(intermediate_size, None)))
    w13_operand = _GemmWeight.of(w13)
    w_gate, w_up = w13_operand.output_rows(gate_rows), w13_operand.output_rows(up_rows)  # [E, I, H]
    b_gate, b_up = (b13[:, gate_rows], b13[:, up_rows]) if b13 is not None else (None, None)
    has_bias = b13 is not None
    precision = _dot_precision(hidden.dtype)

    act = torch.empty((num_blocks_m * block_m, intermediate_size), dtype=hidden.dtype, device=hidden.device)
    cfg = config.gate_up
    (s_gate, z_gate), (s_up, z_up) = w_gate.aux_pointers(), w_up.aux_pointers()
    kernels.gate_up_kernel[(num_blocks_m * _cdiv(intermediate_size, cfg.BLOCK_N),)](
        hidden, w_gate.values, w_up.values, s_gate, s_up, z_gate, z_up,
        b_gate if has_bias else hidden, b_up if has_bias else hidden,
        alignment.sorted_slot_ids, alignment.block_expert_ids, act,
        num_slots, hidden_size, intermediate_size, top_k, num_blocks_m, w_gate.group_size,
        hidden.stride(0), hidden.stride(1), *w_gate.strides(),
        b_gate.stride(0) if has_bias else 0, b_gate.stride(1) if has_bias else 0, act.stride(0), act.stride(1),
        float(activation.alpha), float(activation.limit),
        BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        ACTIVATION=ACTIVATIONS[activation.name], HAS_BIAS=has_bias, DOT_PRECISION=precision,
        WEIGHTS=w_gate.weights_format, GROUP_PER_TILE=w_gate.group_per_tile(cfg.BLOCK_K),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    slot_dtype = torch.promote_types(hidden.dtype, expert_weights.dtype)
    slot_out = torch.empty((num_slots, hidden_size), dtype=slot_dtype, device=hidden.device)
    cfg = config.down
    w_down = _GemmWeight.of(w2)
    s_down, z_down = w_down.aux_pointers()
    kernels.down_kernel[(num_blocks_m * _cdiv(hidden_size, cfg.BLOCK_N),)](
        act, w_down.values, s_down, z_down, b2 if has_bias else act, flat_weights, alignment.sorted_slot_ids,
        alignment.block_expert_ids, slot_out,
        num_slots, hidden_size, intermediate_size, num_blocks_m, w_down.group_size,
        act.stride(0), act.stride(1), *w_down.strides(),
        b2.stride(0) if has_bias else 0, b2.stride(1) if has_bias else 0, slot_out.stride(0), slot_out.stride(1),
        BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        HAS_BIAS=has_bias, DOT_PRECISION=precision,
        WEIGHTS=w_down.weights_format, GROUP_PER_TILE=w_down.group_per_tile(cfg.BLOCK_K),
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


@torch.library.custom_op("moe_infer::fused_moe_quantized", mutates_args=())
def _fused_moe_quantized_op(hidden: Tensor, w13_qweight: Tensor, w13_scales: Tensor, w13_zeros: Tensor | None,
                            w2_qweight: Tensor, w2_scales: Tensor, w2_zeros: Tensor | None, expert_ids: Tensor,
                            expert_weights: Tensor, b13: Tensor | None, b2: Tensor | None, scheme: str,
                            group_size: int, activation: str, alpha: float, limit: float,
                            interleaved: bool) -> Tensor:
    quant = QuantScheme(scheme, group_size)
    hidden_size, intermediate_size = hidden.shape[1], w13_qweight.shape[1] // 2
    w13 = QuantizedWeight(quant, w13_qweight, w13_scales, w13_zeros, hidden_size)
    w2 = QuantizedWeight(quant, w2_qweight, w2_scales, w2_zeros, intermediate_size)
    return _launch(hidden, w13, w2, expert_ids, expert_weights, b13, b2,
                   Activation(activation, alpha=alpha, limit=limit), interleaved)


@_fused_moe_quantized_op.register_fake
def _(hidden: Tensor, w13_qweight: Tensor, w13_scales: Tensor, w13_zeros: Tensor | None, w2_qweight: Tensor,
      w2_scales: Tensor, w2_zeros: Tensor | None, expert_ids: Tensor, expert_weights: Tensor, b13: Tensor | None,
      b2: Tensor | None, scheme: str, group_size: int, activation: str, alpha: float, limit: float,
      interleaved: bool) -> Tensor:
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)
