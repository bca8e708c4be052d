"""Matmuls with one quantized weight (`experts/quant.py`) on the CPU: torch's weight-only kernels.

`quantized_matmul(x, weight)` is x [T, K] @ W.T -> [T, N] in x's dtype, where W is a
`QuantizedWeight` [N, K]. On the CPU it runs torch's weight-only kernels, which read the packed
weight directly (no float copy of W is ever made):
- int8: `aten._weight_int8pack_mm` takes our int8 [N, K] and the row scales as they are (cast to x's
  dtype once and kept);
- int4: `aten._weight_int4pack_mm_for_cpu` needs its own tile layout (`_convert_weight_to_int4pack_for_cpu`
  of the unpacked values) and a [K/g, N, 2] table of (scale, offset) with w = (q - 8) * scale + offset.
  Our w = (q - z) * s is the same with offset = (8 - z) * s. Its group g must be 32, 64, 128 or 256 and
  divide K; we take the largest such g that divides both K and our group size G, so every kernel group
  lies inside one of ours (repeating our scale and zero point). N must be a multiple of 16.
The kernel forms are built on first use and kept in the weight's `prepared` dict (a weight that lives
for one call, e.g. read from disk, pays the repacking each time). Everything these kernels cannot
take (other devices, shapes outside their limits) is `quantized_linear`: dequantize, then matmul.

Measured against bf16 and fp32 `F.linear` by `scripts/bench_quant_cpu.py` (bench/results/quant_cpu.*).
Does not own the layout (`experts/quant.py`) nor the fused GPU kernels (`moe_infer.kernels`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quant import QuantizedWeight, quantized_linear, unpack_int4

INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
INT4_KERNEL_N_MULTIPLE = 16
# rows repacked at once: the kernel's tiles are built from int32 values (4 bytes per weight), so
# one Mixtral w13 [28672, 4096] repacked whole held 448 MiB transiently; the tile layout is local
# to blocks of 64 rows, so blocks of a multiple of 64 give the same tiles (tests/test_quant_wrap.py)
REPACK_ROWS = 4096
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantized_matmul(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """x [T, K] @ W.T -> [T, N] in x's dtype (the fastest path there is; `quantized_linear` is its
    ground truth)."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES or x.ndim != 2:
        return quantized_linear(x, weight)
    x = x.contiguous()
    if weight.scheme.name == "int8":
        return torch.ops.aten._weight_int8pack_mm(x, weight.qweight, _int8_scales(weight, x.dtype))
    packed = _int4_kernel_form(weight, x.dtype)
    if packed is None:
        return quantized_linear(x, weight)
    tiles, group, scales_and_offsets = packed
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiles, group, scales_and_offsets)


def kernel_group(in_features: int, group_size: int, out_features: int) -> int | None:
    """The int4 kernel group for a weight [N, K] in groups of G, or None when the kernel cannot take it."""
    if out_features % INT4_KERNEL_N_MULTIPLE:
        return None
    ours = min(group_size, in_features)  # a row shorter than G is one group
    for g in INT4_KERNEL_GROUPS:
        if in_features % g == 0 and ours % g == 0:
            return g
    return None


def _int8_scales(weight: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    key = ("int8_scales", dtype)
    if key not in weight.prepared:
        weight.prepared[key] = weight.scales.to(dtype)
    return weight.prepared[key]


def _int4_kernel_form(weight: QuantizedWeight, dtype: torch.dtype) -> tuple[Tensor, int, Tensor] | None:
    if weight.qweight.ndim != 2:
        return None
    key = ("int4_tiles", dtype)
    if key in weight.prepared:
        return weight.prepared[key]
    k, n, g = weight.in_features, weight.out_features, weight.scheme.group_size
    group = kernel_group(k, g, n)
    if group is None:
        weight.prepared[key] = None
        return None
    tiles = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        unpack_int4(weight.qweight[r:r + REPACK_ROWS])[:, :k].to(torch.int32), 2)  # [rows, K] values
        for r in range(0, n, REPACK_ROWS)])
    ours = torch.arange(0, k, group) // g  # our group of each kernel group, [K/group]
    scales = weight.scales[:, ours]  # [N, K/group]
    offsets = (8 - weight.zeros[:, ours].float()) * scales
    table = torch.stack((scales, offsets), dim=-1).transpose(0, 1).contiguous().to(dtype)  # [K/group, N, 2]
    weight.prepared[key] = (tiles, group, table)
    return weight.prepared[key]
