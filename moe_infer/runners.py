"""The runners of a MoE layer: how its routed experts are computed once the tokens are routed.

`MoELayer.forward` routes, tells its observers, then hands `(hidden, routing)` to its runner,
which owns the rest of DESIGN section 4 (plan: group the (token, k) pairs by expert; acquire the
experts' weights; compute; combine in the original token order) and the layer's counters. The
executor chooses one runner per layer whenever the model is (re)configured (`choose_runner`):

- `CachedRunner`: an expert budget is set; the tiered expert cache fetches, prefetches or runs
  missed experts on the CPU (`moe_infer.cache.tiered.ExpertCache.forward`);
- `ParallelRunner`: `MoEConfig.parallel`; the experts run across ranks
  (`moe_infer.distributed.parallel.ParallelExperts`);
- `QuantizedRunner`: experts quantized in memory (`quantize=`);
- `ResidentRunner`: every other case: the experts the layer's own source holds (its experts
  module, or a converted checkpoint's store without a budget).

The two in-memory runners take the fused Triton kernels when the kernel for the experts' device is
"triton" (checked per call: `.to()` after wrapping moves the experts) and the grouped torch math
otherwise. Shared experts are not a runner's: the layer adds them.

Shape legend: T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from moe_infer import kernels
from moe_infer.experts.layout import ModuleExperts
from moe_infer.experts.math import expert_counts, group_by_expert, moe_forward
from moe_infer.experts.quantized import QuantizedExperts
from moe_infer.routing.adapters import Routing

KernelFor = Callable[[torch.device], str]  # the kernel ("triton" or "torch") for experts on a device


def _torch_kernel(device: torch.device) -> str:
    return "torch"


def grouped_forward(layer, hidden: Tensor, routing: Routing) -> Tensor:
    """The reference path: group the (token, k) pairs by expert, run each used expert once on its
    rows with the torch math, combine; out [T, H]."""
    grouping = group_by_expert(routing.expert_ids, layer.num_experts)
    out = moe_forward(hidden, routing.expert_ids, routing.expert_weights, layer.expert_source, layer.num_experts,
                      layer.expert_source.activation, grouping=grouping)
    layer.stats.record(hidden.shape[0], grouping[1], "torch")
    return out


class _InMemoryRunner:
    """Experts held in the layer's own memory: the fused kernels when the kernel for their device is
    "triton" and the source is one they read (`source_type`), else `grouped_forward`."""

    source_type: type

    def __init__(self, kernel_for: KernelFor = _torch_kernel):
        self.kernel_for = kernel_for

    def __call__(self, layer, hidden: Tensor, routing: Routing) -> Tensor:
        source = layer.expert_source
        if not (isinstance(source, self.source_type) and self.kernel_for(source.device) == "triton"):
            return grouped_forward(layer, hidden, routing)
        out = self._fused(source, hidden, routing)
        layer.stats.record_on_device(hidden.shape[0], expert_counts(routing.expert_ids, layer.num_experts))
        return out

    def _fused(self, source, hidden: Tensor, routing: Routing) -> Tensor:
        raise NotImplementedError


class ResidentRunner(_InMemoryRunner):
    """Experts held by the layer's own source: the fused kernels over the experts module's stacked
    weights, or `grouped_forward` (any source: a converted checkpoint's store without a budget too)."""

    name = "resident"
    source_type = ModuleExperts

    def _fused(self, source: ModuleExperts, hidden: Tensor, routing: Routing) -> Tensor:
        return kernels.module_experts_forward(source.module, hidden, routing.expert_ids, routing.expert_weights,
                                              source.activation)


class QuantizedRunner(_InMemoryRunner):
    """Experts quantized in memory (`QuantizedExperts`): the fused kernels read the packed weights,
    or `grouped_forward` dequantizes per expert."""

    name = "quantized"
    source_type = QuantizedExperts

    def _fused(self, source: QuantizedExperts, hidden: Tensor, routing: Routing) -> Tensor:
        return kernels.fused_experts(hidden, source.w13, source.w2, routing.expert_ids, routing.expert_weights,
                                     activation=source.activation, b13=source.b13, b2=source.b2)


class CachedRunner:
    """Experts behind the tiered expert cache (an expert budget is set): the cache acquires every
    expert the call needs (hit, fetch or CPU compute) and computes them."""

    name = "cached"

    def __init__(self, cache):
        self.cache = cache  # moe_infer.cache.tiered.ExpertCache

    def __call__(self, layer, hidden: Tensor, routing: Routing) -> Tensor:
        out, counts = self.cache.forward(layer, hidden, routing)
        if isinstance(counts, Tensor):  # a fully resident layer: the counts stayed on the device
            layer.stats.record_on_device(hidden.shape[0], counts)
        else:
            layer.stats.record(hidden.shape[0], counts, self.cache.kernel)
        return out


class ParallelRunner:
    """Experts sharded across the job's ranks (`layer.parallel`, attached by
    `moe_infer.distributed.parallel.build_runtime`): tokens are dispatched and combined with all-to-all."""

    name = "parallel"

    def __call__(self, layer, hidden: Tensor, routing: Routing) -> Tensor:
        grouping = group_by_expert(routing.expert_ids, layer.num_experts)
        out = layer.parallel(hidden, routing.expert_ids, routing.expert_weights)
        layer.stats.record(hidden.shape[0], grouping[1], "torch")
        return out


def choose_runner(layer, cache, kernel_for: KernelFor):
    """The runner of `layer` under the current configuration: the cache when a budget built one,
    else the multi-rank path when the layer is sharded, else the in-memory experts."""
    if cache is not None:
        return CachedRunner(cache)
    if layer.parallel is not None:
        return ParallelRunner()
    if isinstance(layer.expert_source, QuantizedExperts):
        return QuantizedRunner(kernel_for)
    return ResidentRunner(kernel_for)
