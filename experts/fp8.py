"""Block-scaled FP8 weights (DeepSeek-V3 checkpoints): dequantization and block geometry.

A weight W [M, N] is stored as float8_e4m3fn with a float32 `weight_scale_inv` S of shape
[ceil(M / bm), ceil(N / bn)] (blocks of bm x bn, 128 x 128 in DeepSeek-V3): the real weight is
W[i, j] * S[i // bm, j // bn]. Partial edge blocks use the same scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from moe_infer.errors import ConfigError

DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, int], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequantize(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
               dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """weight [M, N] (fp8) times its per-block scales [ceil(M/bm), ceil(N/bn)] -> [M, N] in `dtype`.

    Works one block row at a time, so the fp32 temporary is bm x N, not M x N."""
    rows, cols = weight.shape
    if weight.ndim != 2 or tuple(scale_inv.shape) != scale_shape((rows, cols), block):
        raise ConfigError(f"fp8 dequantize: weight {tuple(weight.shape)} needs weight_scale_inv of shape "
                         f"{scale_shape((rows, cols), block)} for blocks {block}, got {tuple(scale_inv.shape)}")
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    bm, bn = block
    for r in range(scale_inv.shape[0]):
        chunk = weight[r * bm:(r + 1) * bm].float()  # [<=bm, N]
        scales = scale_inv[r].float().repeat_interleave(bn)[:cols]  # [N]
        out[r * bm:(r + 1) * bm] = (chunk * scales).to(dtype)
    return out
