"""Slot pools: the memory of a cache tier, allocated once and carved into expert-sized slots.

A tier's budget is one slab (`HostSlab` on the host, a plain allocation on a device) divided into
`num_slots` slots of `slot_bytes` each; a slot holds any one expert of any layer (every layer's
`SlotLayout` fits in a slot). Nothing else is allocated per expert, so a tier's memory is its
slab, never rounded up per allocation (PyTorch's pinned allocator rounds every allocation up to a
power of two: 96 GiB pinned for Mixtral's 90 GB of experts when each expert was pinned on its own).

The pool is global per tier (not per layer): a slot freed by one layer's expert is reused by any
other's. Because every slot has the same byte stride, a layer's experts in the pool are also one
stacked tensor per weight ([num_slots, ...] views of the slab, `SlotPool.stacked`), which the fused
kernels take as their expert dimension: expert ids are remapped to slot ids on the device
(`slot_ids`) and one fused launch pair computes every resident expert of a layer call.

`SlotLayout` is where an expert's parts lie inside its slot: name, dtype, shape, strides and byte
offset of each tensor. It is the one place a new expert format plugs in (quantized experts add
their packed weights and scales as parts); the pool itself only knows bytes.

Host slabs on a CUDA machine are page-locked by registering an ordinary allocation
(`cudaHostRegister`), so they are exactly their size; `pinned_bytes()` is the process-wide total
this module has registered.

Shape legend: S slots, E experts of a layer, T tokens, K top-k.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_infer.errors import ConfigError
from moe_infer.experts.math import ExpertTensors
from moe_infer.experts.quant import PART_ROLES, QuantizedWeight, QuantScheme

KINDS = ("w13", "w2", "b13", "b2")  # the parts of a floating-point expert, as ExpertTensors holds them
_pinned = {"bytes": 0}
_pinned_lock = threading.Lock()


def pinned_bytes() -> int:
    """Bytes of host memory this process has page-locked through `HostSlab` (live slabs only)."""
    with _pinned_lock:
        return _pinned["bytes"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Part:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements, as the expert's own tensor has them
    offset: int  # bytes from the start of the slot
    nbytes: int


@dataclass(frozen=True)
class SlotLayout:
    """Where one expert's tensors lie in a slot (identical for every expert of a layer)."""

    parts: tuple[Part, ...]
    nbytes: int  # bytes from the slot's start to the end of its last part
    interleaved: bool = False
    # int8 / int4 experts (experts/quant.py): parts "w13.qweight", "w13.scales", ["w13.zeros"], "w2...."
    # that `view` and `SlotPool.stacked` assemble into QuantizedWeight
    quant: QuantScheme | None = None

    @classmethod
    def compact(cls, template: ExpertTensors) -> "SlotLayout":
        """The parts of `template` one after the other, each aligned to its element size, each keeping
        the template's strides (a transposed weight stays transposed: the matmul must take the same
        path as on the model's own weights, or it rounds differently)."""
        parts, offset, quant = [], 0, None
        for kind in KINDS:
            x = getattr(template, kind)
            if x is None:
                continue
            if isinstance(x, QuantizedWeight):  # in-memory int8 / int4 experts: its tensors as named parts
                quant = x.scheme
                named = [(f"{kind}.{role}", t) for role, t in x.parts().items()]
            else:
                named = [(kind, x)]
            for name, t in named:
                span = _span(t)
                offset = _round_up(offset, t.element_size())
                parts.append(Part(name, t.dtype, tuple(t.shape), tuple(t.stride()), offset, span * t.element_size()))
                offset += span * t.element_size()
        return cls(tuple(parts), offset, template.interleaved, quant=quant)

    @classmethod
    def of_bytes(cls, parts: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                 quant: QuantScheme | None = None) -> "SlotLayout":
        """A layout of contiguous tensors at given byte offsets (a converted checkpoint's expert range;
        `quant`: its int8 / int4 scheme)."""
        out = []
        for name, dtype, shape, offset in parts:
            strides = tuple(torch.empty(shape, device="meta").stride())
            out.append(Part(name, dtype, tuple(shape), strides, offset, torch.Size(shape).numel() * dtype.itemsize))
        return cls(tuple(out), max(p.offset + p.nbytes for p in out), quant=quant)

    @property
    def alignment(self) -> int:
        return max(p.dtype.itemsize for p in self.parts)

    def part(self, name: str) -> Part | None:
        for p in self.parts:
            if p.name == name:
                return p
        return None

    def view(self, raw: Tensor) -> ExpertTensors:
        """The expert's tensors inside `raw` (a uint8 slot, or a staging buffer of this layout)."""
        return self._tensors(raw, lambda p, typed: typed.as_strided(
            p.shape, p.strides, typed.storage_offset() + p.offset // p.dtype.itemsize))

    def _tensors(self, raw: Tensor, make) -> ExpertTensors:
        found = {}
        for p in self.parts:
            typed = raw.view(p.dtype) if raw.ndim == 1 else raw.view(-1).view(p.dtype)
            found[p.name] = make(p, typed)
        if self.quant is not None:
            # in_features: w13 is [.., 2I, H] and w2 [.., H, I]; H and I read off the rows of the other weight
            hidden, inter = found["w2.qweight"].shape[-2], found["w13.qweight"].shape[-2] // 2
            w13, w2 = (QuantizedWeight(self.quant, *(found.get(f"{name}.{role}") for role in PART_ROLES), k)
                       for name, k in (("w13", hidden), ("w2", inter)))
            return ExpertTensors(w13, w2, found.get("b13"), found.get("b2"))
        return ExpertTensors(found["w13"], found["w2"], found.get("b13"), found.get("b2"),
                             interleaved=self.interleaved)


def _span(x: Tensor) -> int:
    """Elements from a tensor's first to one past its last element (numel for dense layouts)."""
    if x.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))


class HostSlab:
    """One host allocation of `nbytes` (uint8, 1-D), page-locked on CUDA machines by registering it
    (no power-of-two rounding); `close()` unregisters it. Views into it keep it alive."""

    def __init__(self, nbytes: int, *, pin: bool):
        self.nbytes = int(nbytes)
        self.tensor = torch.empty(max(self.nbytes, 1), dtype=torch.uint8)
        self.pinned = False
        if pin and self.nbytes:
            _register(self.tensor)
            self.pinned = True
            with _pinned_lock:
                _pinned["bytes"] += self.nbytes
            self._finalizer = weakref.finalize(self, _unregister, self.tensor, self.nbytes)

    def close(self) -> None:
        if self.pinned:
            self.pinned = False
            self._finalizer()


def _register(tensor: Tensor) -> None:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {tensor.numel()} bytes failed with CUDA error {int(err)} "
                           f"(locked-memory limit? see `ulimit -l`)")


def _unregister(tensor: Tensor, nbytes: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    with _pinned_lock:
        _pinned["bytes"] -= nbytes


class SlotPool:
    """`num_slots` slots of `slot_bytes` on `device` in one slab; slots handed out by `take()` and
    returned by `give()`. Not thread-safe by itself: the cache calls it under its lock.

    A slot given back may still be read by kernels queued on the device; `give(slot, after=event)`
    keeps that event with the slot and `take()` returns it, so the copy that overwrites the slot
    waits for it (on the device, not on the host)."""

    def __init__(self, name: str, device: torch.device | str, layouts: dict[int, SlotLayout], budget_bytes: int, *,
                 pin: bool = False, max_slots: int | None = None):
        self.name = name
        self.device = torch.device(device)
        self.layouts = dict(layouts)
        alignment = max(max(layout.alignment for layout in layouts.values()), 16)
        self.slot_bytes = _round_up(max(layout.nbytes for layout in layouts.values()), alignment)
        self.num_slots = int(budget_bytes) // self.slot_bytes
        if max_slots is not None:  # a budget above every expert's bytes allocates only what they need
            self.num_slots = min(self.num_slots, max_slots)
        if self.num_slots < 1:
            raise ConfigError(f"{name} expert budget of {budget_bytes} bytes holds no slot of {self.slot_bytes} "
                              f"bytes (the largest expert, aligned); give at least {self.slot_bytes}")
        total = self.num_slots * self.slot_bytes
        self._slab = None
        if self.device.type == "cpu":
            self._slab = HostSlab(total, pin=pin)
            flat = self._slab.tensor[:total]
        else:
            flat = torch.empty(total, dtype=torch.uint8, device=self.device)
        self.nbytes = total
        self.slots = flat.view(self.num_slots, self.slot_bytes)  # [S, slot_bytes]
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._after: dict[int, object] = {}
        self._stacked: dict[int, ExpertTensors] = {}

    @property
    def pinned(self) -> bool:
        return self._slab is not None and self._slab.pinned

    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> tuple[int, object]:
        """A free slot and the event the next write into it must wait for (None: nothing pending)."""
        slot = self._free.pop()
        return slot, self._after.pop(slot, None)

    def give(self, slot: int, after=None) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, f"slot {slot} given back twice"
        if after is not None:
            self._after[slot] = after
        self._free.append(slot)

    def raw(self, slot: int) -> Tensor:
        """Slot `slot`'s bytes (uint8 [slot_bytes], contiguous)."""
        return self.slots[slot]

    def view(self, layer_idx: int, slot: int) -> ExpertTensors:
        """The expert of layer `layer_idx` held in `slot`, as tensors viewing the slab."""
        return self.layouts[layer_idx].view(self.raw(slot))

    def stacked(self, layer_idx: int) -> ExpertTensors:
        """Every slot seen as an expert of layer `layer_idx`: w13 [S, 2I, H], w2 [S, H, I] (+ biases
        [S, ...]) viewing the slab, slot s at index s: the weights the fused kernels take."""
        if layer_idx not in self._stacked:
            layout = self.layouts[layer_idx]
            stride_bytes = self.slot_bytes
            flat = self.slots.view(-1)

            def make(p: Part, typed: Tensor) -> Tensor:
                return typed.as_strided((self.num_slots, *p.shape), (stride_bytes // p.dtype.itemsize, *p.strides),
                                        typed.storage_offset() + p.offset // p.dtype.itemsize)

            self._stacked[layer_idx] = layout._tensors(flat, make)
        return self._stacked[layer_idx]

    def close(self) -> None:
        self._stacked.clear()
        if self._slab is not None:
            self._slab.close()


def slot_ids(slot_of: Tensor, expert_ids: Tensor) -> Tensor:
    """Expert ids [T, K] -> slot ids [T, K] through `slot_of` [E] (slot of each expert, -1 when it is
    not in the pool); ids outside [0, E) become -1. On the ids' device, no host synchronisation: the
    fused kernels skip the -1 entries."""
    num_experts = slot_of.shape[0]
    table = torch.cat((slot_of, slot_of.new_full((1,), -1)))  # index E: "no expert"
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    return table[torch.where(valid, expert_ids, num_experts).long()]
