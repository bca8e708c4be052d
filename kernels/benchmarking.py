"""What the kernel benchmark and the tuner share: model shapes, one setup factory for a layer's inputs,
one timer (`triton.testing.do_bench` median), the measured machine rates and the roofline floor.

Shape legend: T tokens, E experts, H hidden, I intermediate, K top-k. GPU only (callers refuse
without CUDA before importing anything from here that launches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class MoEShape:
    name: str
    num_experts: int  # E
    hidden_size: int  # H
    intermediate_size: int  # I
    top_k: int  # K

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return 3 * self.hidden_size * self.intermediate_size * torch.finfo(dtype).bits // 8


MODEL_SHAPES = {
    "mixtral-8x7b": MoEShape("mixtral-8x7b", 8, 4096, 14336, 2),
    "deepseek-v2-lite": MoEShape("deepseek-v2-lite", 64, 2048, 1408, 6),
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", 128, 2048, 768, 8),
}
TOKEN_COUNTS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


@dataclass
class LayerInputs:
    """One MoE layer's weights and a routing: hidden [T,H], w13 [E,2I,H], w2 [E,H,I], expert_ids /
    expert_weights [T,K] (K distinct experts per token, uniformly random, softmax weights)."""

    hidden: Tensor
    w13: Tensor
    w2: Tensor
    expert_ids: Tensor
    expert_weights: Tensor


def make_weights(shape: MoEShape, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden_size, shape.intermediate_size
    w13 = torch.randn((e, 2 * i, h), generator=g, device=device, dtype=dtype) * h**-0.5
    w2 = torch.randn((e, h, i), generator=g, device=device, dtype=dtype) * i**-0.5
    return w13, w2


def make_inputs(shape: MoEShape, num_tokens: int, weights: tuple[Tensor, Tensor], seed: int = 1) -> LayerInputs:
    w13, w2 = weights
    device, dtype = w13.device, w13.dtype
    g = torch.Generator(device=device).manual_seed(seed + num_tokens)
    hidden = torch.randn((num_tokens, shape.hidden_size), generator=g, device=device, dtype=dtype)
    scores = torch.rand((num_tokens, shape.num_experts), generator=g, device=device)
    top, expert_ids = scores.topk(shape.top_k, dim=-1)
    return LayerInputs(hidden, w13, w2, expert_ids, torch.softmax(top, dim=-1).to(dtype))


def time_ms(fn: Callable[[], object], *, cuda_graph: bool = False) -> float:
    """Median milliseconds of `fn` (triton.testing.do_bench, or do_bench_cudagraph)."""
    import triton.testing

    if cuda_graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_hbm_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src)) / 1e3)


def measure_matmul_rate(size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a size^3 matmul."""
    a = torch.randn((size, size), device="cuda", dtype=dtype)
    b = torch.randn((size, size), device="cuda", dtype=dtype)
    return 2 * size**3 / (time_ms(lambda: a @ b) / 1e3)


def floor_ms(shape: MoEShape, inputs: LayerInputs, bandwidth: float, flop_rate: float) -> dict:
    """Roofline floor of one layer call: max(bytes / bandwidth, FLOPs / rate). Bytes: the weights of the
    experts this routing touches, read once, plus the input read and the output written."""
    dtype = inputs.w13.dtype
    num_tokens = inputs.hidden.shape[0]
    touched = int(torch.unique(inputs.expert_ids).numel())
    element = torch.finfo(dtype).bits // 8
    nbytes = touched * shape.expert_bytes(dtype) + 2 * num_tokens * shape.hidden_size * element
    flops = 2 * num_tokens * shape.top_k * 3 * shape.hidden_size * shape.intermediate_size
    return {"experts_touched": touched, "bytes": nbytes, "flops": flops,
            "floor_ms": max(nbytes / bandwidth, flops / flop_rate) * 1e3}


def transformers_experts(shape: MoEShape, weights: tuple[Tensor, Tensor], implementation: str) -> torch.nn.Module:
    """A `transformers` Mixtral experts module holding `weights`, dispatching to `implementation`
    ("eager", "grouped_mm", "moe_infer", ...) through transformers' own ExpertsInterface."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                           num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k, hidden_act="silu")
    config._experts_implementation = implementation
    with torch.device("meta"):
        experts = MixtralExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(weights[0], requires_grad=False)
    experts.down_proj = torch.nn.Parameter(weights[1], requires_grad=False)
    return experts.eval()
