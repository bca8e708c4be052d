"""Backing sources: where the expert cache reads an expert it does not hold.

A backing source is the outermost tier: the model's own expert weights in host memory
(`ModuleBacking`, over the layers' `ModuleExperts`) or a converted checkpoint or offload directory on disk
(`StoreBacking`, over `moe_infer.experts.store.ExpertStore`: one positional read per expert, no memory map). Both answer the same
three questions: how big is an expert of a layer, what does an empty expert of that layer look
like (to allocate cache buffers), and read expert e of layer l into given buffers.

Shape legend: H hidden, I intermediate (per expert).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import torch

from moe_infer.experts.math import Activation, ExpertTensors
from moe_infer.errors import ConfigError


def tensors_nbytes(t: ExpertTensors) -> int:
    return sum(x.numel() * x.element_size() for x in (t.w13, t.w2, t.b13, t.b2) if x is not None)


def empty_like_expert(template: ExpertTensors, device: torch.device | str, *, pin: bool = False) -> ExpertTensors:
    """Uninitialised buffers shaped like `template` on `device` (pinned host memory if `pin`)."""

    def make(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        # the template's strides, not contiguous ones: a transposed weight (GPT-OSS keeps [H, 2I])
        # must stay transposed, or the matmul takes another path and rounds differently
        strides = x.stride() if _dense(x) else None
        if strides is None:
            return torch.empty(x.shape, dtype=x.dtype, device=device, pin_memory=pin)
        return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=device, pin_memory=pin)

    return ExpertTensors(make(template.w13), make(template.w2), make(template.b13), make(template.b2),
                         interleaved=template.interleaved)


def _dense(x: torch.Tensor) -> bool:
    """Whether x's strides describe a dense, non-overlapping layout of exactly numel elements."""
    order = sorted(range(x.ndim), key=lambda d: x.stride(d))
    expected = 1
    for d in order:
        if x.stride(d) != expected and x.shape[d] != 1:
            return False
        expected *= x.shape[d]
    return True


def copy_expert(dst: ExpertTensors, src: ExpertTensors, *, non_blocking: bool = False) -> None:
    for d, s in ((dst.w13, src.w13), (dst.w2, src.w2), (dst.b13, src.b13), (dst.b2, src.b2)):
        if (d is None) != (s is None):
            raise ConfigError("copy_expert: source and destination disagree on biases")
        if d is not None:
            d.copy_(s, non_blocking=non_blocking)


def expert_signature(t: ExpertTensors) -> tuple:
    """Shapes, strides and dtypes of an expert's tensors: buffers with equal signatures are interchangeable."""
    return tuple(None if x is None else (tuple(x.shape), x.stride(), x.dtype) for x in (t.w13, t.w2, t.b13, t.b2))


class Backing(ABC):
    """The outermost tier of the cache (see the module docstring). Keys are decoder-layer indices.

    Host buffers are the backing's own business (expert-shaped tensors for in-memory weights, one
    raw byte range for a checkpoint): `host_buffer` allocates one, `read(..., out=buffer)` fills it
    and returns the expert's tensors (views into it), `buffer_key` says which layers' buffers are
    interchangeable."""

    @abstractmethod
    def template(self, layer_idx: int) -> ExpertTensors:
        """An expert of `layer_idx` as `read` returns it: shapes, strides, dtypes, biases, layout."""

    @abstractmethod
    def read(self, layer_idx: int, expert: int, out=None) -> ExpertTensors:
        """Expert `expert` of `layer_idx` as host tensors, written into `out` (a `host_buffer`) when given."""

    @abstractmethod
    def host_buffer(self, layer_idx: int, *, pin: bool = False):
        """A host buffer `read` can fill with any expert of `layer_idx` (pinned if `pin`)."""

    @abstractmethod
    def activation(self, layer_idx: int) -> Activation: ...

    @abstractmethod
    def num_experts(self, layer_idx: int) -> int: ...

    def buffer_key(self, layer_idx: int):
        return expert_signature(self.template(layer_idx))

    def expert_nbytes(self, layer_idx: int) -> int:
        return tensors_nbytes(self.template(layer_idx))

    tier_name: str | None = None  # the name of this backing in stats()["tiers"] (None: not a tier of its own)

    def close(self) -> None:
        """Release files or mappings."""


class ModuleBacking(Backing):
    """The in-memory expert weights of wrapped layers (`layer_idx -> ModuleExperts`)."""

    def __init__(self, sources: dict[int, "object"]):
        self.sources = sources

    def template(self, layer_idx: int) -> ExpertTensors:
        return self.sources[layer_idx](0)

    def activation(self, layer_idx: int) -> Activation:
        return self.sources[layer_idx].activation

    def num_experts(self, layer_idx: int) -> int:
        return self.sources[layer_idx].num_experts

    def host_buffer(self, layer_idx: int, *, pin: bool = False) -> ExpertTensors:
        return empty_like_expert(self.template(layer_idx), "cpu", pin=pin)

    def read(self, layer_idx: int, expert: int, out: ExpertTensors | None = None) -> ExpertTensors:
        src = self.sources[layer_idx](expert)
        if out is None:
            return src
        copy_expert(out, src)
        return out


class StoreBacking(Backing):
    """A converted checkpoint's `ExpertStore`: one positional read of the expert's contiguous byte
    range, straight into the buffer (cast afterwards when the model runs another dtype)."""

    tier_name = "disk"

    def __init__(self, store, activations: dict[int, Activation], dtype: torch.dtype | None = None):
        self.reads = 0
        self.bytes_read = 0
        self._count_lock = threading.Lock()
        self.store = store
        self.activations = activations
        self.dtype = dtype if dtype is not None else store.compute_dtype
        self.cast = self.dtype != store.compute_dtype or store.fp8_block is not None
        self._templates: dict[int, ExpertTensors] = {}

    def template(self, layer_idx: int) -> ExpertTensors:
        if layer_idx not in self._templates:
            # shapes, strides and dtypes only (on `meta`): keeping a real expert per layer as the
            # template held a layer count of experts outside every budget (1.3 GB for 4 Mixtral layers)
            t = self.store.read(layer_idx, 0)
            self._templates[layer_idx] = ExpertTensors(*(None if x is None else _meta_like(x.to(self.dtype))
                                                         for x in (t.w13, t.w2, t.b13, t.b2)))
        return self._templates[layer_idx]

    def activation(self, layer_idx: int) -> Activation:
        return self.activations[layer_idx]

    def num_experts(self, layer_idx: int) -> int:
        return int(self.store.num_experts)

    def buffer_key(self, layer_idx: int):
        if self.cast:
            return super().buffer_key(layer_idx)
        return ("raw", self.store.stored_nbytes(layer_idx))

    def host_buffer(self, layer_idx: int, *, pin: bool = False):
        if self.cast:
            return empty_like_expert(self.template(layer_idx), "cpu", pin=pin)
        return torch.empty(self.store.stored_nbytes(layer_idx), dtype=torch.uint8, pin_memory=pin)

    def read(self, layer_idx: int, expert: int, out=None) -> ExpertTensors:
        with self._count_lock:  # the loader thread and the CPU-compute worker both read
            self.reads += 1
            self.bytes_read += self.store.stored_nbytes(layer_idx)
        if not self.cast:
            return self.store.read(layer_idx, expert, out=out)
        t = self.store.read(layer_idx, expert)
        if out is None:
            return ExpertTensors(*(None if x is None else x.to(self.dtype) for x in (t.w13, t.w2, t.b13, t.b2)))
        copy_expert(out, t)
        return out

    def close(self) -> None:
        """The store belongs to the model (`moe_infer.loading`); it is closed with it, not here."""


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
