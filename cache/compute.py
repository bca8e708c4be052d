"""The compute side of `ExpertCache`: how one layer call computes once its experts are acquired.

- `_resident_forward`: every expert of the layer is resident; one fused launch over the pool that
  reads nothing back (hits are counted later, `_flush_hits`);
- `_fused`: the fused Triton launch pair over the compute pool, expert ids remapped to slot ids;
- `_submit_cpu_experts`: misses that run on the CPU worker from the backing (`_BackingSource`);
- `_LayerSource`: the expert source a layer call's `moe_forward` reads, which acquires and pins
  each expert through the cache.

`ComputeMixin` is a base class of `ExpertCache` (`tiered.py`) and reads the cache's attributes set
in `ExpertCache.__init__`; which experts a call needs and where each comes from is decided there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moe_infer.experts.math import ExpertTensors, expert_counts, moe_forward
from moe_infer.experts.quant import QuantizedWeight

from .pool import slot_ids
from .tier import Entry

if TYPE_CHECKING:
    from .tiered import ExpertCache

KERNELS = ("torch", "triton")


class ComputeMixin:
    """`ExpertCache`'s compute methods (see the module docstring)."""

    def _resident_forward(self, layer_idx: int, hidden: Tensor, routing):
        """A layer call whose experts are all resident (every expert of the layer is ready in the
        pool) reads nothing back: one fused launch over the pool, the routing counts left on the
        device (hits are counted from them later, `_flush_hits`). None when some expert is not
        resident (the caller then reads which experts the call uses). The policy sees every expert
        of the layer accessed (which ones were used is not read back)."""
        num_experts = self.num_experts[layer_idx]
        with self.cond:
            self._check_open()
            entries = [self.tier.entries.get((layer_idx, e)) for e in range(num_experts)]
            if any(entry is None or not entry.ready or entry.demand_miss for entry in entries):
                return None
            for entry in entries:
                entry.pins += 1
                self.tier.policy.access(entry.key)
        try:
            if self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
                for entry in entries:
                    if entry.event is not None:
                        stream.wait_event(entry.event)
            out = self._fused(layer_idx, hidden, routing, entries, self.backing.activation(layer_idx))
        finally:
            self._release_all(entries)
            self._end(layer_idx)
        counts = expert_counts(routing.expert_ids, num_experts)  # [E] on the device
        with self.cond:
            self._pending_hits.append(counts)
            if len(self._pending_hits) >= 256:
                self._flush_hits()
        return out, counts

    def _flush_hits(self) -> None:
        """Count the hits of the layer calls that left their counts on the device (caller holds the
        lock): one read for all of them."""
        pending, self._pending_hits = self._pending_hits, []
        if pending:
            self.tier.hits += int((torch.stack(pending) > 0).sum())

    def _fused(self, layer_idx: int, hidden: Tensor, routing, held: list[Entry], activation) -> Tensor:
        """One fused launch pair over the compute pool: expert ids -> slot ids on the device. The
        launch config is looked up for the layer's own expert count (the tuned files are keyed by
        E, and rows per expert are T*K/E, not T*K/S)."""
        from moe_infer.kernels.config import get_config
        from moe_infer.kernels.fused_moe import fused_moe_with_config

        pool = self.tier.pool
        slot_map = torch.full((self.num_experts[layer_idx],), -1, dtype=torch.int32)
        for entry in held:
            slot_map[entry.key[1]] = entry.slot
        slot_map = slot_map.pin_memory() if self.device.type == "cuda" else slot_map
        slots = slot_ids(slot_map.to(hidden.device, non_blocking=True), routing.expert_ids)
        weights = pool.stacked(layer_idx)
        quant = weights.w13.scheme if isinstance(weights.w13, QuantizedWeight) else None
        dtype = hidden.dtype if quant is not None else weights.w13.dtype  # quantized: computed in hidden's dtype
        num_tokens, top_k = routing.expert_ids.shape
        config = self._launch_configs.get((layer_idx, num_tokens))
        if config is None:  # looked up once per layer and token count (the lookup touches the file system)
            if len(self._launch_configs) > 4096:
                self._launch_configs.clear()
            config = self._launch_configs[(layer_idx, num_tokens)] = get_config(
                self.num_experts[layer_idx], weights.w2.shape[2], top_k, num_tokens, dtype, hidden.device, quant)
        out = fused_moe_with_config(hidden.to(dtype), weights.w13, weights.w2, slots,
                                    routing.expert_weights, config, activation=activation, b13=weights.b13,
                                    b2=weights.b2, interleaved=weights.interleaved)
        with self.cond:
            self.kernel_calls["triton"] += 1
        return out.to(hidden.dtype)

    def _submit_cpu_experts(self, layer_idx: int, hidden: Tensor, routing, cpu_experts: list[int]):
        """Run `cpu_experts` of this call on the CPU worker from the backing; on CUDA the rows go to
        pinned host memory asynchronously and the worker waits for that copy only."""
        num_experts = self.num_experts[layer_idx]
        ids = routing.expert_ids
        on_cpu = torch.zeros(num_experts + 1, dtype=torch.bool)
        on_cpu[cpu_experts] = True
        cpu_ids = torch.where(on_cpu.to(ids.device)[ids.clamp(0, num_experts)], ids, -1)
        with self.cond:
            self.tier.misses += len(cpu_experts)
            self.cpu_computed_experts += len(cpu_experts)
        inputs = (hidden, cpu_ids, routing.expert_weights)
        ready = None
        if hidden.device.type == "cuda":
            host = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for x in inputs]
            for dst, src in zip(host, inputs):
                dst.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(hidden.device))
            inputs = tuple(host)
        source = _BackingSource(self.backing, layer_idx)
        activation = self.backing.activation(layer_idx)

        def run() -> Tensor:
            if ready is not None:
                ready.synchronize()
            out = moe_forward(*inputs, source, num_experts, activation)
            return out.pin_memory() if ready is not None else out

        return self._cpu_pool.submit(run)


class _LayerSource:
    """The expert source one layer's forward computes from: waits for each expert and pins it until
    the call ends (the layer computes with every expert of the call at once)."""

    def __init__(self, cache: ExpertCache, layer_idx: int, cpu_experts: set[int]):
        self.cache = cache
        self.layer_idx = layer_idx
        self.cpu_experts = cpu_experts
        self.counted: set[int] = set()
        self.held: list[Entry] = []

    def __call__(self, expert: int) -> ExpertTensors:
        if expert in self.cpu_experts:  # CPU compute device: run it from the backing, uncached
            self._count(expert)
            return self._read(lambda: self.cache.backing.read(self.layer_idx, expert), expert)
        entry = self.cache._acquire(self.layer_idx, expert)
        self.held.append(entry)
        return entry.tensors

    def projection(self, expert: int, projection: str) -> ExpertTensors:
        """One projection of an expert run from the backing (read once per call, see `moe_forward`)."""
        self._count(expert)
        return self._read(lambda: self.cache.backing.projection(self.layer_idx, expert, projection), expert)

    def _count(self, expert: int) -> None:
        if expert not in self.counted:  # counted once per call
            self.counted.add(expert)
            with self.cache.cond:
                self.cache.tier.misses += 1
                self.cache.cpu_computed_experts += 1

    def _read(self, read, expert: int) -> ExpertTensors:
        try:
            return read()
        except Exception as err:
            raise RuntimeError(f"reading expert {expert} of layer {self.layer_idx} failed: "
                               f"{type(err).__name__}: {err}") from err

    def is_resident(self, expert: int) -> bool:
        """Cached experts stay pinned for the call; an expert run from the backing is read per use."""
        return expert not in self.cpu_experts

    def release(self) -> None:
        self.cache._release_all(self.held)
        self.held = []


class _BackingSource:
    """Experts read straight from the backing for one call (CPU compute of misses): not resident,
    so `moe_forward` reads one projection of one of them at a time."""

    def __init__(self, backing, layer_idx: int):
        self.backing = backing
        self.layer_idx = layer_idx

    def __call__(self, expert: int) -> ExpertTensors:
        return self.backing.read(self.layer_idx, expert)

    def projection(self, expert: int, projection: str) -> ExpertTensors:
        return self.backing.projection(self.layer_idx, expert, projection)

    def is_resident(self, expert: int) -> bool:
        return False
