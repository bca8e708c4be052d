"""Backing sources: where the expert cache reads an expert it does not hold.

A backing source is the outermost tier: the model's own expert weights in host memory
(`ModuleBacking`, over the layers' `ModuleExperts`) or a converted checkpoint or offload directory on disk
(`StoreBacking`, over `moe_infer.experts.store.ExpertStore`, positional reads). Both answer the
same questions: how big is an expert of a layer, how it lies in a cache slot, write expert e of
layer l into a slot, and give it (or one of its projections) for a call that runs it uncached.

Shape legend: H hidden, I intermediate (per expert).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moe_infer.experts.math import Activation, ExpertTensors, projection_tensors
from moe_infer.experts.quant import QuantizedWeight
from moe_infer.errors import ConfigError

from .pool import SlotLayout


def tensors_nbytes(t: ExpertTensors) -> int:
    """Bytes of an expert's tensors (a quantized weight counts its packed bytes, scales and zeros)."""
    return sum(x.nbytes if isinstance(x, QuantizedWeight) else x.numel() * x.element_size()
               for x in (t.w13, t.w2, t.b13, t.b2) if x is not None)


def empty_like_expert(template: ExpertTensors, device: torch.device | str, *, pin: bool = False) -> ExpertTensors:
    """Uninitialised buffers shaped like `template` on `device` (pinned host memory if `pin`)."""

    def make(x):
        if x is None:
            return None
        if isinstance(x, QuantizedWeight):
            return x.map(make)
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
        if isinstance(d, QuantizedWeight):
            for role, part in d.parts().items():
                part.copy_(s.parts()[role], non_blocking=non_blocking)
        elif d is not None:
            d.copy_(s, non_blocking=non_blocking)


class Backing(ABC):
    """The outermost tier of the cache (see the module docstring). Keys are decoder-layer indices.

    Cache slots are the cache's (`moe_infer.cache.pool`); the backing says how its experts lie in
    one (`slot_layout`: the compact layout of the template for in-memory weights, the file's own
    byte layout for a checkpoint, so a read lands in the slot as it is) and writes them (`fill`)."""

    @abstractmethod
    def template(self, layer_idx: int) -> ExpertTensors:
        """An expert of `layer_idx` as `read` returns it: shapes, strides, dtypes, biases, layout."""

    @abstractmethod
    def read(self, layer_idx: int, expert: int) -> ExpertTensors:
        """Expert `expert` of `layer_idx` as host tensors (views of the backing where it can)."""

    @abstractmethod
    def activation(self, layer_idx: int) -> Activation: ...

    @abstractmethod
    def num_experts(self, layer_idx: int) -> int: ...

    def slot_layout(self, layer_idx: int) -> SlotLayout:
        """How an expert of `layer_idx` lies in a cache slot (`fill` writes that layout)."""
        return SlotLayout.compact(self.template(layer_idx))

    def fill(self, layer_idx: int, expert: int, raw: torch.Tensor, *, drop_page_cache: bool = False) -> None:
        """Write expert `expert` of `layer_idx` into `raw` (a host uint8 slot or staging buffer of at
        least `slot_layout(layer_idx).nbytes` bytes) in the slot layout."""
        copy_expert(self.slot_layout(layer_idx).view(raw), self.read(layer_idx, expert))

    def pinned_source(self, layer_idx: int, expert: int) -> ExpertTensors | None:
        """The expert's own tensors when they are already in page-locked host memory (copied to the
        device without staging), else None."""
        return None

    def projection(self, layer_idx: int, expert: int, projection: str) -> ExpertTensors:
        """One projection ("w13" or "w2") of an expert for a call that runs it from the backing,
        reading only that projection's bytes where reads cost (see `moe_forward`)."""
        t = self.read(layer_idx, expert)
        if projection == "w13":
            return projection_tensors("w13", t.w13, t.b13, t.interleaved)
        return projection_tensors("w2", t.w2, t.b2, t.interleaved)

    def expert_nbytes(self, layer_idx: int) -> int:
        return tensors_nbytes(self.template(layer_idx))

    tier_name: str | None = None  # the name of this backing in stats()["tiers"] (None: not a tier of its own)

    def close(self) -> None:
        """Release files or mappings."""


class ModuleBacking(Backing):
    """The in-memory expert weights of wrapped layers (`layer_idx -> ModuleExperts`)."""

    def __init__(self, sources: dict[int, "object"]):
        self.sources = sources
        self._pinned: dict[int, bool] = {}

    def template(self, layer_idx: int) -> ExpertTensors:
        return self.sources[layer_idx](0)

    def activation(self, layer_idx: int) -> Activation:
        return self.sources[layer_idx].activation

    def num_experts(self, layer_idx: int) -> int:
        return self.sources[layer_idx].num_experts

    def read(self, layer_idx: int, expert: int) -> ExpertTensors:
        return self.sources[layer_idx](expert)

    def pinned_source(self, layer_idx: int, expert: int) -> ExpertTensors | None:
        if layer_idx not in self._pinned:
            w13 = self.template(layer_idx).w13
            w13 = w13.qweight if isinstance(w13, QuantizedWeight) else w13
            self._pinned[layer_idx] = w13.device.type == "cpu" and torch.cuda.is_available() and w13.is_pinned()
        return self.read(layer_idx, expert) if self._pinned[layer_idx] else None


class StoreBacking(Backing):
    """A converted checkpoint's `ExpertStore`: one positional read of the expert's contiguous byte
    range, straight into the slot or staging buffer (its slot layout is the file's byte layout), or
    cast afterwards when the model runs another dtype. The kernel is told to drop the pages read
    into a cache tier (the tier holds the copy); the bytes read are counted by the store."""

    tier_name = "disk"

    def __init__(self, store, activations: dict[int, Activation], dtype: torch.dtype | None = None):
        self.store = store
        self.activations = activations
        self.dtype = dtype if dtype is not None else store.compute_dtype
        # int8 / int4 experts are held as stored (their slot layout is the file's); only float or FP8 ones cast
        self.cast = store.quant_scheme is None and (self.dtype != store.compute_dtype or store.fp8_block is not None)
        self._templates: dict[int, ExpertTensors] = {}

    @property
    def reads(self) -> int:
        return self.store.reads

    @property
    def bytes_read(self) -> int:
        return self.store.bytes_read

    def template(self, layer_idx: int) -> ExpertTensors:
        if layer_idx not in self._templates:
            # shapes, strides and dtypes only (on `meta`): keeping a real expert per layer as the
            # template held a layer count of experts outside every budget (1.3 GB for 4 Mixtral layers)
            layout = self.store.layout(layer_idx)
            if self.store.quant_scheme is not None:  # QuantizedWeight views of meta tensors
                self._templates[layer_idx] = self.store.tensors_from_bytes(
                    layer_idx, torch.empty(layout.nbytes, dtype=torch.uint8, device="meta"))
                return self._templates[layer_idx]
            shapes = {kind: (dtype, shape) for kind, dtype, shape, _ in layout.parts}
            dtype_of = lambda kind: self.dtype if kind in ("w13", "w2") or self.cast else shapes[kind][0]  # noqa: E731
            self._templates[layer_idx] = ExpertTensors(*(
                torch.empty(shapes[kind][1], dtype=dtype_of(kind), device="meta") if kind in shapes else None
                for kind in ("w13", "w2", "b13", "b2")))
        return self._templates[layer_idx]

    def activation(self, layer_idx: int) -> Activation:
        return self.activations[layer_idx]

    def num_experts(self, layer_idx: int) -> int:
        return int(self.store.num_experts)

    def slot_layout(self, layer_idx: int) -> SlotLayout:
        if self.cast:
            return super().slot_layout(layer_idx)
        return SlotLayout.of_bytes([(kind, dtype, tuple(shape), off)
                                    for kind, dtype, shape, off in self.store.layout(layer_idx).parts],
                                   quant=self.store.quant_scheme)

    def fill(self, layer_idx: int, expert: int, raw: torch.Tensor, *, drop_page_cache: bool = False) -> None:
        if not self.cast:
            self.store.read_raw(layer_idx, expert, out=raw, drop_page_cache=drop_page_cache)
            return
        t = self.store.read(layer_idx, expert)
        copy_expert(self.slot_layout(layer_idx).view(raw), t)

    def read(self, layer_idx: int, expert: int) -> ExpertTensors:
        t = self.store.read(layer_idx, expert)
        if not self.cast:
            return t
        return ExpertTensors(*(None if x is None else x.to(self.dtype) for x in (t.w13, t.w2, t.b13, t.b2)))

    def projection(self, layer_idx: int, expert: int, projection: str) -> ExpertTensors:
        weight, bias = self.store.read_projection(layer_idx, expert, projection)
        if not isinstance(weight, QuantizedWeight) and weight.dtype != self.dtype:
            weight, bias = weight.to(self.dtype), None if bias is None else bias.to(self.dtype)
        return projection_tensors(projection, weight, bias)

    def close(self) -> None:
        """The store belongs to the model (`moe_infer.loading`); it is closed with it, not here."""


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
