"""What the kernel benchmark and the tuner share: model shapes, one setup factory for a layer's inputs
(float and quantized weights), one timer (`triton.testing.do_bench` median on CUDA), the measured
machine rates and the roofline floor.

Shape legend: T tokens, E experts, H hidden, I intermediate, K top-k. Made for the GPU; on the CPU
(the `--smoke` rehearsals, kernels in Triton's interpreter) the same functions time with
`time.perf_counter` and measure the CPU's rates, so the rehearsal runs the same code end to end.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from moe_infer.experts.quant import QuantizedWeight, QuantScheme, quantize
from moe_infer.errors import ConfigError


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
# The rehearsals' (--smoke) layer: small enough for Triton's interpreter; with their int4 group of
# SMOKE_GROUP_SIZE, H = 96 is three groups and I = 48 ends in a short one. T = 72 gives T*K = 144 >
# one alignment chunk (the three-launch path) and two row blocks for some experts.
SMOKE_SHAPE = MoEShape("smoke", 4, 96, 48, 2)
SMOKE_TOKEN_COUNTS = (1, 72)
SMOKE_GROUP_SIZE = 32


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


def run_interpreted(module: str, argv: list[str], prog: str) -> int:
    """Run `python -m module argv` again with TRITON_INTERPRET=1 and return its exit status: a
    --smoke rehearsal on a machine without CUDA, where this process defined the kernels for a GPU
    (Triton picks the interpreter when a kernel is defined, at import)."""
    print(f"{prog}: no CUDA: running again under TRITON_INTERPRET=1 (Triton's CPU interpreter)", file=sys.stderr,
          flush=True)
    return subprocess.run([sys.executable, "-m", module, *argv], env={**os.environ, "TRITON_INTERPRET": "1"}).returncode


def quantize_weights(weights: tuple[Tensor, Tensor], scheme: QuantScheme) -> tuple[QuantizedWeight, QuantizedWeight]:
    """w13, w2 quantized on their device, round to nearest (no clipping search: speed does not depend on it)."""
    return tuple(quantize(w, scheme, clip_search=False) for w in weights)  # type: ignore[return-value]


def quantized_expert_bytes(weights: tuple[QuantizedWeight, QuantizedWeight]) -> int:
    """Bytes one expert's quantized w13 and w2 occupy (values, scales and zero points)."""
    return sum(w.nbytes for w in weights) // weights[0].shape[0]


REP_MS = 50  # milliseconds of timed runs per measurement, at least
MIN_SAMPLES = 10  # timed runs per measurement, at least


def time_ms(fn: Callable[[], object], *, cuda_graph: bool = False, device: str = "cuda", reps: int = 3) -> float:
    """Median milliseconds of `fn`. On CUDA `triton.testing.do_bench` (the L2 cache flushed before each
    run), repeated for REP_MS or MIN_SAMPLES runs, whichever is longer (a fixed 100 ms spent twice as
    long on fast calls and gave slow ones 5 samples); with `cuda_graph`, do_bench_cudagraph (calls
    unrolled into one graph for REP_MS, 10 replays, no L2 flush). On the CPU one warm-up call and the
    median of `reps` timed calls (rehearsals only)."""
    if device != "cuda":
        if cuda_graph:
            raise ConfigError("time_ms: CUDA graphs need CUDA")
        fn()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)
    import triton.testing

    if cuda_graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=REP_MS, return_mode="median"))
    fn()  # compiled and warm before the estimate
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rep = max(REP_MS, MIN_SAMPLES * start.elapsed_time(end))
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def measure_hbm_bandwidth(device: str = "cuda", nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src), device=device) / 1e3)


def measure_matmul_rate(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a size^3 matmul."""
    a = torch.randn((size, size), device=device, dtype=dtype)
    b = torch.randn((size, size), device=device, dtype=dtype)
    return 2 * size**3 / (time_ms(lambda: a @ b, device=device) / 1e3)


def floor_ms(shape: MoEShape, inputs: LayerInputs, bandwidth: float, flop_rate: float,
             expert_bytes: int | None = None) -> dict:
    """Roofline floor of one layer call: max(bytes / bandwidth, FLOPs / rate). Bytes: the weights of the
    experts this routing touches, read once (`expert_bytes` each: quantized experts pass theirs; the
    default is the float experts' size), plus the input read and the output written."""
    dtype = inputs.w13.dtype
    num_tokens = inputs.hidden.shape[0]
    touched = int(torch.unique(inputs.expert_ids).numel())
    element = torch.finfo(dtype).bits // 8
    if expert_bytes is None:
        expert_bytes = shape.expert_bytes(dtype)
    nbytes = touched * expert_bytes + 2 * num_tokens * shape.hidden_size * element
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
