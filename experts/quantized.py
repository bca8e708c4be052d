"""Quantized experts held in memory: the expert source of a model wrapped with `quantize=` and of the
GPU-resident experts the fused kernels read.

`QuantizedExperts` keeps every expert of one layer as two stacked `QuantizedWeight`s, w13 [E, 2I, H]
(gate rows then up rows) and w2 [E, H, I] (`experts/quant.py`), plus floating biases if the
family has them. `self(e)` gives expert e as `ExpertTensors` whose weights are `QuantizedWeight`
views (the torch path runs them through `quant_matmul`); the fused kernels take the stacked
weights (`stacked`). Does not own the layout (`quant.py`) or quantizing a checkpoint on disk
(`convert.py`).

Shape legend: E experts, H hidden, I intermediate (per expert).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .math import Activation, ExpertTensors
from .quant import QuantizedWeight, QuantScheme, part_specs, quantize


class QuantizedExperts:
    """Expert source over quantized experts in memory (see `moe_infer.experts.math.moe_forward`)."""

    def __init__(self, w13: QuantizedWeight, w2: QuantizedWeight, activation: Activation,
                 b13: Tensor | None = None, b2: Tensor | None = None):
        self.w13, self.w2, self.b13, self.b2 = w13, w2, b13, b2
        self.activation = activation
        self.scheme = w13.scheme
        self.num_experts, two_inter, self.hidden_size = w13.shape
        self.intermediate_size = two_inter // 2
        # per-expert views, kept so that a kernel form prepared for one (quant_matmul) is built once
        self._experts = [ExpertTensors(w13.map(lambda t, e=e: t[e]), w2.map(lambda t, e=e: t[e]),
                                       None if b13 is None else b13[e], None if b2 is None else b2[e])
                         for e in range(self.num_experts)]

    @classmethod
    def quantize(cls, source, scheme: QuantScheme, compute_device: torch.device | None = None) -> "QuantizedExperts":
        """Quantize every expert of `source` (an expert source, e.g. `ModuleExperts`) one at a time, on
        `compute_device` (default: the device its weights are on; a CUDA model whose experts sit in host
        memory quantizes on its GPU, one expert there at a time); the result lives where the weights
        are. Gate/up rows are de-interleaved (canonical order), so every family reads the same layout."""
        w13, w2, b13, b2 = [], [], [], []
        home = source.device
        work = home if compute_device is None else compute_device

        def quantized(weight: Tensor) -> QuantizedWeight:
            return quantize(weight.to(work), scheme).map(lambda t: t.to(home))

        for e in range(source.num_experts):
            tensors = source(e).canonical()
            w13.append(quantized(tensors.w13))
            w2.append(quantized(tensors.w2))
            if tensors.b13 is not None:
                b13.append(tensors.b13)
                b2.append(tensors.b2)
            del tensors
        return cls(_stack(w13), _stack(w2), source.activation, torch.stack(b13) if b13 else None,
                   torch.stack(b2) if b2 else None)

    def __call__(self, expert_idx: int) -> ExpertTensors:
        return self._experts[expert_idx]

    def tensors(self) -> list[Tensor]:
        """Every tensor it holds (packed weights, scales, zero points, biases)."""
        return [*self.w13.parts().values(), *self.w2.parts().values(),
                *(b for b in (self.b13, self.b2) if b is not None)]

    def replace_tensors(self, tensors: list[Tensor]) -> None:
        """Hold `tensors` (same shapes and dtypes, in the order of `tensors()`) instead, e.g. copies on
        another device (the cache moves a CUDA model's quantized experts to host memory, its backing)."""
        it = iter(tensors)
        w13 = QuantizedWeight(self.scheme, *(next(it) if role in self.w13.parts() else None
                                             for role in ("qweight", "scales", "zeros")), self.w13.in_features)
        w2 = QuantizedWeight(self.scheme, *(next(it) if role in self.w2.parts() else None
                                            for role in ("qweight", "scales", "zeros")), self.w2.in_features)
        b13 = next(it) if self.b13 is not None else None
        b2 = next(it) if self.b2 is not None else None
        self.__init__(w13, w2, self.activation, b13, b2)

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def expert_nbytes(self) -> int:
        """Bytes of one expert: packed weights, scales, zero points and biases."""
        biases = sum(b[0].numel() * b.element_size() for b in (self.b13, self.b2) if b is not None)
        return (self.w13.nbytes + self.w2.nbytes) // self.num_experts + biases

    def __repr__(self) -> str:
        return (f"QuantizedExperts({self.scheme.as_json()}, experts={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, device={self.device})")


def quantized_expert_nbytes(source, scheme: QuantScheme) -> int:
    """Bytes one expert of `source` (float experts, e.g. `ModuleExperts`) will take once quantized
    with `scheme` (`QuantizedExperts.expert_nbytes` of the result), from its shapes alone."""
    t = source(0)  # w13 [2I, H] (gate/up interleaved or not), w2 [H, I]
    (two_inter, hidden), inter = t.w13.shape, t.w2.shape[1]
    specs = [*part_specs(scheme, two_inter, hidden).values(), *part_specs(scheme, hidden, inter).values()]
    weights = sum(dtype.itemsize * torch.Size(shape).numel() for dtype, shape in specs)
    return weights + sum(b.numel() * b.element_size() for b in (t.b13, t.b2) if b is not None)


def _stack(weights: list[QuantizedWeight]) -> QuantizedWeight:
    first = weights[0]
    zeros = None if first.zeros is None else torch.stack([w.zeros for w in weights])
    return QuantizedWeight(first.scheme, torch.stack([w.qweight for w in weights]),
                           torch.stack([w.scales for w in weights]), zeros, first.in_features)


def free_float_experts(experts: nn.Module) -> None:
    """Replace the float expert parameters of a `transformers` experts module by `meta` tensors of
    the same shape and dtype (their memory is released; the quantized copy is what runs)."""
    for name, param in list(experts.named_parameters(recurse=False)):
        experts._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
