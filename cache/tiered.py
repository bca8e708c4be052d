"""`ExpertCache`: the tiered expert cache behind a wrapped model's MoE layers.

Tiers, nearest to the compute first: the compute tier (GPU memory with budget `gpu_memory` on
CUDA; CPU RAM with budget `cpu_memory` on CPU-only machines), then on CUDA an optional pinned host
tier (`cpu_memory`), then the backing source (the model's own weights in host memory, or the
converted checkpoint on disk). Each tier is a `SlotPool` (`pool.py`): its budget allocated once as
one slab of expert-sized slots, global to the tier (any layer's expert takes any free slot).
Budgets are hard: a slot is charged before it is written and `Tier.charge` refuses (AssertionError,
an internal invariant) to go over.

One forward of a layer: `forward(layer, hidden, routing)` reads which experts the call uses (the
one host read of a layer call: the cache must know its misses; with kernel "triton" and every
expert of the layer resident it reads nothing and launches at once), requests every miss at
demand priority, waits for each expert in turn and pins it until the call ends, then computes:
- kernel "triton": one fused launch pair over the whole compute pool, the layer's expert ids
  remapped to slot ids on the device (`pool.slot_ids`); the compute stream waits on the events
  of the experts' own copies, nothing else;
- kernel "torch": the reference grouped math (`moe_forward`) over the slots' views (bit-exact
  with the model's own experts).
Experts of a call beyond what the budget can hold at once, and on CUDA the misses the cost model
sends to the CPU (`cpu_compute`), run from the backing on the CPU (counted as CPU-computed misses);
on CUDA their hidden rows go to pinned host memory asynchronously and the CPU worker waits for
that copy only. The loader thread fills slots in the background: from a page-locked source straight
to the device, otherwise through pinned staging buffers (several in flight); a load's error is
raised in the forward that waits for it; a wait longer than `load_timeout` fails that forward and
replaces a loader stuck in its read, so the next forward goes on; `close()` joins every thread.
Entries in use are pinned; the experts a layer call needs (hits and demand loads) are reserved
until used; a waiting forward's request is urgent and may, when nothing else can go, take a
reserved entry's place (it is requested again when its turn comes), so the cache makes progress
with a budget of a single expert.

Concurrency: one forward at a time per model. Threads calling one wrapped model are serialised
by the executor's lock around the whole model forward (`ModelExecutor.forward_lock`: the layer
calls of one forward, its predictor state and its prefetches belong together); the loader and
CPU worker threads run beside it. `prefetch` and `stats` may be called from any thread.

Shape legend: T tokens, H hidden, K top-k, E experts, S slots.
"""

from __future__ import annotations

import atexit
import resource
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe_infer.errors import ConfigError
from moe_infer.experts.math import ExpertTensors, expert_counts, group_by_expert, moe_forward
from moe_infer.experts.quant import QuantizedWeight
from moe_infer.traces.popularity import expert_load
from moe_infer.traces.trace import Trace

from .backing import Backing
from .cpu_compute import CostModel, split_misses
from .loader import DEMAND, PREDICTED, RING, CopyEngine, Job, LoadQueue, Loader, ring_schedule
from .policies import ExpertFlowPolicy, Policy, RingPolicy, StaticPolicy, make_policy
from .pool import SlotPool, pinned_bytes, slot_ids

URGENT = -1  # a forward is waiting for this expert now
Key = tuple[int, int]  # (decoder-layer index, expert)
KERNELS = ("torch", "triton")


@dataclass(eq=False)
class Entry:
    key: Key
    nbytes: int  # bytes charged: one slot
    tensors: ExpertTensors | None = None  # views of the slot
    slot: int | None = None
    slot_wait: Any = None  # CUDA event: the last kernel that read this slot for its previous expert
    ready: bool = False
    error: BaseException | None = None
    pins: int = 0
    reserved: bool = False  # requested by a forward, not used yet
    demand_miss: bool = False  # requested as a miss: its use counts as a miss however fast it came
    prefetched: bool = False  # loaded ahead of use, not used yet
    charged: bool = False
    abandoned: bool = False  # its load hung past the timeout: the slot is freed when the load returns
    event: Any = None  # CUDA event: the copy into (or, in the host tier, out of) the slot is complete
    release_event: Any = None  # CUDA event: the last kernel reading the slot is complete


class Tier:
    """One tier: its pool of slots, its entries, its policy and counters."""

    def __init__(self, name: str, pool: SlotPool, budget_bytes: int, policy: Policy):
        self.name = name
        self.pool = pool
        self.device = pool.device
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.entries: dict[Key, Entry] = {}
        self.used_bytes = self.peak_bytes = 0
        self.hits = self.misses = self.bytes_moved = 0

    def charge(self, entry: Entry) -> None:
        """Charge one slot for `entry` and hand it the slot."""
        assert not entry.charged
        assert self.used_bytes + entry.nbytes <= self.budget_bytes, (
            f"{self.name} tier over budget: {self.used_bytes} + {entry.nbytes} > {self.budget_bytes}")
        self.used_bytes += entry.nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        entry.charged = True
        entry.slot, entry.slot_wait = self.pool.take()

    def fits(self, entry: Entry) -> bool:
        return self.used_bytes + entry.nbytes <= self.budget_bytes and self.pool.free_slots() > 0

    def remove(self, entry: Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.charged:
            self.used_bytes -= entry.nbytes
            entry.charged = False
            self.pool.give(entry.slot, after=entry.release_event)
            entry.slot = None
        entry.tensors = None
        self.policy.removed(entry.key)

    def evictable(self, entry: Entry, urgent: bool) -> bool:
        if not entry.ready or entry.pins or (entry.reserved and not urgent):
            return False
        # a host entry may still be the source of a running copy to the device
        return entry.event is None or self.device.type == "cuda" or entry.event.query()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes_moved": self.bytes_moved,
                "peak_bytes": self.peak_bytes, "used_bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
                "slots": self.pool.num_slots, "slot_bytes": self.pool.slot_bytes, "pool_bytes": self.pool.nbytes}


class ExpertCache:
    """The tiered cache of one wrapped model (see the module docstring)."""

    def __init__(self, backing: Backing, layer_order: list[int], *, device: torch.device | str,
                 budget_bytes: int, host_budget_bytes: int | None = None, policy: str = "lru",
                 loader: str = "on-demand", cpu_compute: str = "never", load_timeout: float = 120.0,
                 cost_model: CostModel | None = None, kernel: str = "torch"):
        if kernel not in KERNELS:
            raise ConfigError(f"kernel={kernel!r}: the cache computes with one of {', '.join(KERNELS)}")
        self.backing = backing
        self.layer_order = list(layer_order)
        self.device = torch.device(device)
        self.kernel = kernel
        self.loader_kind = loader
        self.cpu_compute = cpu_compute
        self.load_timeout = load_timeout
        self.templates = {l: backing.template(l) for l in self.layer_order}
        self.expert_bytes = {l: backing.expert_nbytes(l) for l in self.layer_order}
        self.num_experts = {l: backing.num_experts(l) for l in self.layer_order}
        self.layouts = {l: backing.slot_layout(l) for l in self.layer_order}
        largest = max(self.expert_bytes.values())
        name = "gpu" if self.device.type == "cuda" else "cpu"
        for tier_name, budget in ((name, budget_bytes), ("cpu", host_budget_bytes)):
            if budget is not None and budget < largest:
                raise ConfigError(f"{tier_name} expert budget of {budget} bytes is smaller than one expert "
                                  f"({largest} bytes); give at least {largest}")
        if loader == "ring":
            if policy != "lru":
                raise ConfigError(f"loader='ring' evicts in ring order; cache_policy={policy!r} cannot apply "
                                  f"(leave it at 'lru')")
            compute_policy: Policy = RingPolicy(self.layer_order)
        else:
            compute_policy = make_policy(policy)
        all_experts = sum(self.num_experts.values())

        def pool(tier_name: str, pool_device: torch.device, budget: int, pin: bool) -> SlotPool:
            made = SlotPool(tier_name, pool_device, self.layouts, 0 if budget is None else budget, pin=pin,
                            max_slots=all_experts)
            return made

        self.tier = Tier(name, pool(name, self.device, budget_bytes, False), budget_bytes, compute_policy)
        self.nbytes = {l: self.tier.pool.slot_bytes for l in self.layer_order}  # what an entry charges
        self.host_tier = None
        if self.device.type == "cuda" and host_budget_bytes is not None:
            self.host_tier = Tier("cpu", pool("cpu", torch.device("cpu"), host_budget_bytes, True),
                                  host_budget_bytes, make_policy("lru"))
        layer_bytes = max(self.nbytes[l] * self.num_experts[l] for l in self.layer_order)
        self.ring_sections = max(2, min(len(self.layer_order), budget_bytes // max(layer_bytes, 1)))
        self.expert_counts: dict[int, list[int]] = {}  # rows routed per expert (ring: which to stream)

        self.cond = threading.Condition(threading.RLock())
        self.queue = LoadQueue(self.cond)
        self.engine = CopyEngine(self.device, self.tier.pool.slot_bytes)
        self.cost_model = cost_model
        self._fetch_scratch = None  # one expert of device memory, only while the cost model is measured
        if cpu_compute == "auto" and self.device.type == "cuda" and cost_model is None:
            first = self.layer_order[0]
            self.cost_model = CostModel.measure(self.templates[first], backing.activation(first), self.device,
                                                fetch=self.fetch_once)
            self._fetch_scratch = None
        # experts the budget cannot hold beside the rest of their call, or sent to the CPU, run there
        self._cpu_pool = ThreadPoolExecutor(1, thread_name_prefix="moe-infer-cpu-experts") \
            if self.device.type == "cuda" or kernel == "triton" else None
        self._launch_configs: dict = {}  # (layer, tokens) -> the fused kernels' KernelConfig
        self._pending_hits: list[Tensor] = []  # [E] device counts of layer calls that read nothing back
        self.prefetch_counts = {"issued": 0, "used": 0, "wasted": 0, "cancelled": 0}
        self.cpu_computed_experts = 0
        self.stall_seconds = 0.0
        self.kernel_calls = dict.fromkeys(KERNELS, 0)
        self.host_reads = 0  # device -> host reads a layer call made (its experts' usage)
        self._backing_reads_at_reset = self._backing_bytes_at_reset = 0
        self.host_slabs: list = []  # page-locked host copies of the backing (set by `setup.build_cache`)
        self.closed = False
        self.loader = Loader(self.queue, self.cond, self._run_job)
        _LIVE_CACHES.add(self)

    # -- public runtime API ----------------------------------------------------------------
    def prefetch(self, layer_idx: int, expert_ids, scores=None) -> None:
        """Load `expert_ids` of `layer_idx` ahead of use at predicted priority (below demand).
        Queued predictions for this layer that are not in the new list are dropped as stale.
        `scores` (same length, higher = more likely) order the loads and feed `expertflow`."""
        expert_ids = [int(e) for e in (expert_ids.tolist() if isinstance(expert_ids, Tensor) else expert_ids)]
        if scores is None:
            scores = [float(len(expert_ids) - i) for i in range(len(expert_ids))]
        scores = [float(s) for s in (scores.tolist() if isinstance(scores, Tensor) else scores)]
        if len(scores) != len(expert_ids):
            raise ConfigError(f"prefetch: {len(expert_ids)} expert ids but {len(scores)} scores")
        if layer_idx not in self.templates:
            raise KeyError(f"prefetch: no MoE layer {layer_idx}; MoE layers are {self.layer_order}")
        wanted = dict(zip(expert_ids, scores))
        with self.cond:
            self._check_open()
            if isinstance(self.tier.policy, ExpertFlowPolicy):
                self.tier.policy.predict(layer_idx, {(layer_idx, e): s for e, s in wanted.items()})
            stale = self.queue.cancel(lambda job: job.priority == PREDICTED and job.key[0] == layer_idx
                                      and job.key[1] not in wanted)
            for job in stale:
                self._drop_queued(job.key)
            for e, s in sorted(wanted.items(), key=lambda item: -item[1]):
                self._request((layer_idx, e), PREDICTED, score=s)

    def pin_popular(self, popularity) -> list[Key]:
        """The `static` policy's hot set: the most used experts of `popularity` (a `Trace` recorded on
        this model, or {layer_idx: per-expert counts}) that fit in the compute tier with one expert's
        room left for the others; they are loaded now (demand priority) and never evicted for a
        cold expert. Returns the hot keys."""
        if not isinstance(self.tier.policy, StaticPolicy):
            raise ConfigError(f"pin_popular needs cache_policy='static'; this cache runs {self.tier.policy.name!r}")
        if isinstance(popularity, Trace):
            if popularity.num_layers != len(self.layer_order):
                raise ConfigError(f"pin_popular: the trace has {popularity.num_layers} MoE layers; this model has "
                                  f"{len(self.layer_order)}")
            rows = expert_load(popularity)
            popularity = {l: rows[i].tolist() for i, l in enumerate(self.layer_order)}
        ranked = sorted(((count, l, e) for l, counts in popularity.items() for e, count in enumerate(counts)),
                        key=lambda item: (-item[0], item[1], item[2]))
        room = self.tier.budget_bytes - max(self.nbytes.values())
        hot: list[Key] = []
        for count, l, e in ranked:
            if count <= 0 or self.nbytes[l] > room:
                continue
            room -= self.nbytes[l]
            hot.append((l, e))
        with self.cond:
            self.tier.policy.set_hot(hot)
            for key in hot:
                self._request(key, DEMAND)  # not a guess: loaded ahead of everything else, never dropped
        return hot

    def forward(self, layer, hidden: Tensor, routing) -> tuple[Tensor, list[int] | Tensor]:
        """The layer's expert computation through the cache: hidden [T, H] -> ([T, H], rows routed
        to each expert: a list, or an int64 [E] device tensor when nothing was read back)."""
        layer_idx = layer.layer_idx
        num_experts = self.num_experts[layer_idx]
        ids = routing.expert_ids
        if self.kernel == "triton" and self.loader_kind != "ring":
            resident = self._resident_forward(layer_idx, hidden, routing)
            if resident is not None:
                return resident
        if self.kernel == "triton":
            grouping = None
            counts = expert_counts(ids, num_experts).tolist()
        else:
            grouping = group_by_expert(ids, num_experts)
            counts = grouping[1]
        with self.cond:
            self.host_reads += 1
        used = [e for e, c in enumerate(counts) if c]
        self._note_counts(layer_idx, counts)
        activation = self.backing.activation(layer_idx)
        cpu_experts = self._begin(layer_idx, {e: counts[e] for e in used})
        source = _LayerSource(self, layer_idx, set(cpu_experts))
        separate = bool(cpu_experts) and (self.device.type == "cuda" or self.kernel == "triton")
        future = self._submit_cpu_experts(layer_idx, hidden, routing, cpu_experts) if separate else None
        try:
            if self.kernel == "triton":
                for e in used:
                    if e not in source.cpu_experts:
                        source(e)  # waits for it, pins it, and orders the compute stream after its copy
                out = self._fused(layer_idx, hidden, routing, source.held, activation)
            else:
                resident_ids = ids
                if separate:
                    on_cpu = torch.zeros(num_experts + 1, dtype=torch.bool)
                    on_cpu[cpu_experts] = True
                    resident_ids = torch.where(on_cpu.to(ids.device)[ids.clamp(0, num_experts)], -1, ids)
                    grouping = None
                out = moe_forward(hidden, resident_ids, routing.expert_weights, source, num_experts, activation,
                                  grouping=grouping)
                with self.cond:
                    self.kernel_calls["torch"] += 1
        finally:
            source.release()
            self._end(layer_idx)
        if future is not None:
            out = out + future.result().to(out.device, non_blocking=True)
        return out, counts

    def close(self) -> None:
        """Stop the loader and the CPU worker and join them; drop every cached expert. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.loader.close()
        if self._cpu_pool is not None:
            self._cpu_pool.shutdown(wait=True)
        with self.cond:
            for tier in (self.tier, self.host_tier):
                if tier is not None:
                    for entry in list(tier.entries.values()):
                        tier.remove(entry)
        self.engine.close()
        if not self.loader.abandoned:  # a hung read may still write into its slot: keep the slab then
            for tier in (self.tier, self.host_tier):
                if tier is not None:
                    tier.pool.close()

    def fetch_once(self) -> None:
        """One fetch of expert 0 of the first layer by the path a miss takes (what the cost model
        times): page-locked backing -> device directly, otherwise backing -> staging buffer (a disk
        read for a checkpoint) -> device; into a scratch buffer, synchronised. It touches no cache
        entry; the staging buffers are the loader's, so it runs at start-up, before the loader."""
        layer_idx = self.layer_order[0]
        layout = self.layouts[layer_idx]
        if self._fetch_scratch is None:
            self._fetch_scratch = torch.empty(self.tier.pool.slot_bytes, dtype=torch.uint8, device=self.device)
        scratch = self._fetch_scratch[:layout.nbytes]
        pinned = self.backing.pinned_source(layer_idx, 0)
        if pinned is not None and self.host_tier is None:
            event = self.engine.copy(layout.view(self._fetch_scratch), pinned)
        else:
            index, staging = self.engine.staging()
            self.backing.fill(layer_idx, 0, staging, drop_page_cache=True)
            event = self.engine.copy(scratch, staging[:layout.nbytes])
            self.engine.staged(index, event)
        if event is not None:
            event.synchronize()

    def stats(self) -> dict[str, Any]:
        with self.cond:
            self._flush_hits()
            tiers = {self.tier.name: self.tier.stats()}
            if self.host_tier is not None:
                tiers["cpu"] = self.host_tier.stats()
            if self.backing.tier_name is not None:  # every read is a hit: the backing holds every expert
                tiers[self.backing.tier_name] = {"hits": self.backing.reads - self._backing_reads_at_reset,
                                                 "misses": 0, "bytes_moved": 0, "peak_bytes": 0,
                                                 "bytes_read": self.backing.bytes_read - self._backing_bytes_at_reset}
            return {"tiers": tiers, "prefetch": dict(self.prefetch_counts),
                    "cpu_computed_experts": self.cpu_computed_experts, "stall_seconds": self.stall_seconds,
                    "kernel_calls": dict(self.kernel_calls), "host_reads": self.host_reads,
                    "memory": self.memory()}

    def memory(self) -> dict[str, int]:
        """Where this cache's memory is: each pool's slab, the staging buffers, the process's pinned
        total (`pool.pinned_bytes`, every live slab of this process) and its resident set."""
        pools = {f"{tier.name}_pool_bytes": tier.pool.nbytes for tier in (self.tier, self.host_tier) if tier}
        return {**pools, "staging_bytes": self.engine.staging_bytes, "pinned_bytes": pinned_bytes(),
                **process_memory()}

    def reset_stats(self) -> None:
        with self.cond:
            self._pending_hits = []
            for tier in (self.tier, self.host_tier):
                if tier is not None:
                    tier.hits = tier.misses = tier.bytes_moved = 0
                    tier.peak_bytes = tier.used_bytes
            self.prefetch_counts = dict.fromkeys(self.prefetch_counts, 0)
            self.cpu_computed_experts = 0
            self.stall_seconds = 0.0
            self.kernel_calls = dict.fromkeys(KERNELS, 0)
            self.host_reads = 0
            self._backing_reads_at_reset = getattr(self.backing, "reads", 0)
            self._backing_bytes_at_reset = getattr(self.backing, "bytes_read", 0)

    def resident(self) -> dict[Key, int]:
        """Ready entries of the compute tier and their bytes (for tests and reports)."""
        with self.cond:
            return {k: e.nbytes for k, e in self.tier.entries.items() if e.ready}

    # -- one layer ---------------------------------------------------------------------------
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

    def _note_counts(self, layer_idx: int, counts: list[int]) -> None:
        acc = self.expert_counts.setdefault(layer_idx, [0] * len(counts))
        for e, c in enumerate(counts):
            acc[e] += c

    def _begin(self, layer_idx: int, rows: dict[int, int]) -> list[int]:
        """Request this layer's misses (in compute order) and the ring's next sections; return the
        missed experts that run on the CPU instead."""
        with self.cond:
            self._check_open()
            if isinstance(self.tier.policy, RingPolicy):
                self.tier.policy.current = layer_idx
            misses = {e: r for e, r in rows.items() if (layer_idx, e) not in self.tier.entries}
            for e in rows:
                if e not in misses:  # a hit (or a load in flight): keep it for this call
                    self.tier.entries[(layer_idx, e)].reserved = True
            cpu = set(self._cpu_experts(layer_idx, misses))
            # the layer computes with every expert of the call at once: what the budget cannot
            # hold beside the others runs straight from the backing (on the CPU), fewest rows first
            kept = getattr(self.tier.policy, "hot", set())  # static: room that stays with the hot set
            # counted whether loaded yet or not: a hot expert still queued (pin_popular just ran) must
            # find its room free, or this call's cold experts take it and it never comes back
            kept_bytes = sum(self.nbytes[k[0]] for k in kept if not (k[0] == layer_idx and k[1] in rows))
            capacity = min((self.tier.budget_bytes - kept_bytes) // self.nbytes[layer_idx], self.tier.pool.num_slots)
            overflow = len(rows) - len(cpu) - capacity
            if overflow > 0:
                spare = sorted((e for e in misses if e not in cpu), key=lambda e: (misses[e], e))
                cpu.update(spare[:overflow])
            for e in sorted(misses):
                if e not in cpu:
                    entry = self._request((layer_idx, e), DEMAND)
                    entry.reserved = entry.demand_miss = True
            if self.loader_kind == "ring":
                self._ring_requests(layer_idx)
            return sorted(cpu)

    def _end(self, layer_idx: int) -> None:
        """A layer call is over (normally or not): what it reserved and did not use is free to go, and
        the predictions made for this call are stale (a wrong one must not keep its slot)."""
        with self.cond:
            if isinstance(self.tier.policy, ExpertFlowPolicy):
                self.tier.policy.predict(layer_idx, {})
            for (l, _), entry in self.tier.entries.items():
                if l == layer_idx:
                    entry.reserved = entry.demand_miss = False
            self.cond.notify_all()

    def _cpu_experts(self, layer_idx: int, misses: dict[int, int]) -> list[int]:
        if not misses or self.cpu_compute == "never":
            return []
        if self.cpu_compute == "always":
            return sorted(misses)
        if self.device.type != "cuda":
            return []  # "auto" on a CPU compute device: fetching into the cache tier keeps it warm
        return split_misses(misses, self.expert_bytes[layer_idx], self.cost_model)[1]

    def _ring_requests(self, layer_idx: int) -> None:
        slots = max(1, (self.tier.budget_bytes // self.ring_sections) // self.nbytes[layer_idx])
        for upcoming in ring_schedule(self.layer_order, layer_idx, self.ring_sections):
            counts = self.expert_counts.get(upcoming)
            if counts is None:
                continue  # not seen yet: nothing says how many experts it has or which are hot
            order = sorted(range(len(counts)), key=lambda e: -counts[e])[:slots]
            for e in order:
                self._request((upcoming, e), RING)

    # -- entries -----------------------------------------------------------------------------
    def _request(self, key: Key, priority: int, score: float = 0.0) -> Entry:
        """The entry of `key`, queued for loading at `priority` unless ready or in flight."""
        entry = self.tier.entries.get(key)
        if entry is None:
            entry = Entry(key, self.nbytes[key[0]], prefetched=priority in (PREDICTED, RING))
            self.tier.entries[key] = entry
        if not entry.ready and not entry.charged:
            if priority <= DEMAND:
                entry.prefetched = False
            self.queue.push(key, priority, score)
        return entry

    def _drop_queued(self, key: Key) -> None:
        entry = self.tier.entries.get(key)
        if entry is not None and not entry.ready and not entry.charged and not entry.reserved:
            self.tier.remove(entry)
            self.prefetch_counts["cancelled"] += 1

    def _acquire(self, layer_idx: int, expert: int) -> Entry:
        key = (layer_idx, expert)
        tier = self.tier
        with self.cond:
            self._check_open()
            entry = tier.entries.get(key)
            hit = entry is not None and entry.ready and not entry.demand_miss
            if entry is not None and entry.prefetched and entry.charged:  # loaded or loading ahead of use
                self.prefetch_counts["used"] += 1
                entry.prefetched = False
            if entry is None or not entry.ready:
                entry = self._request(key, URGENT)
                entry.reserved = True
            if hit:
                tier.hits += 1
            else:
                tier.misses += 1
            start = time.perf_counter()
            waited = False
            deadline = start + self.load_timeout
            while not entry.ready and entry.error is None:
                if self.loader.error is not None or not self.loader.alive:
                    raise RuntimeError(f"the expert loader thread stopped ({self.loader.error!r}); "
                                       f"cannot load expert {expert} of layer {layer_idx}")
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    self._give_up(entry)
                    raise TimeoutError(f"expert {expert} of layer {layer_idx} was not loaded within "
                                       f"{self.load_timeout} s (MoEConfig.load_timeout)")
                waited = True
                self.cond.wait(min(remaining, 0.5))
            if waited:
                self.stall_seconds += time.perf_counter() - start
            if entry.error is not None:
                tier.remove(entry)
                raise RuntimeError(f"loading expert {expert} of layer {layer_idx} failed: "
                                   f"{type(entry.error).__name__}: {entry.error}") from entry.error
            entry.pins += 1
            entry.reserved = entry.demand_miss = False
            tier.policy.access(key)
        if entry.event is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.event)
        return entry

    def _give_up(self, entry: Entry) -> None:
        """A forward stops waiting for `entry` (caller holds the lock). A load still queued is
        dropped; a load in flight is abandoned (its slot stays charged until it returns); a loader
        stuck in one job for most of the timeout is replaced, so the next forward is served."""
        entry.reserved = entry.demand_miss = False
        if not entry.charged:
            self.queue.cancel(lambda job: job.key == entry.key)
            self.tier.remove(entry)
        else:
            entry.abandoned = True
            if self.tier.entries.get(entry.key) is entry:
                del self.tier.entries[entry.key]
        since = self.loader.busy_since()
        # one job for most of the wait (it may have started just after the forward began waiting)
        if since is not None and time.monotonic() - since >= 0.5 * self.load_timeout:
            stuck = self.tier.entries.get(self.loader.current[0].key)
            if stuck is not None and stuck.charged and not stuck.ready:  # its slot is freed when it returns
                stuck.abandoned = True
                del self.tier.entries[stuck.key]
            self.loader.replace()

    def _release(self, entry: Entry) -> None:
        self._release_all([entry])

    def _release_all(self, entries: list[Entry]) -> None:
        """Unpin `entries`; on CUDA one event marks the end of the kernels queued so far that read them."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self.cond:
            for entry in entries:
                entry.pins -= 1
                entry.release_event = event
            self.cond.notify_all()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the expert cache is closed (the model was unwrapped or its cache replaced)")

    # -- the loader thread -------------------------------------------------------------------
    def _run_job(self, job: Job) -> None:
        tier = self.tier
        with self.cond:
            entry = tier.entries.get(job.key)
            if entry is None or entry.ready or entry.charged:
                return
            if not self._make_room(tier, entry, job):
                return
            tier.charge(entry)
            if entry.prefetched:
                self.prefetch_counts["issued"] += 1
        try:
            tensors, event = self._fill(entry)
        except BaseException as err:  # noqa: BLE001 - surfaces in the forward that waits for it
            with self.cond:
                entry.error = err
                tier.remove(entry)
                self.cond.notify_all()
            return
        with self.cond:
            if entry.abandoned:  # the forward gave up on it: free its slot now that nothing writes it
                tier.remove(entry)
                return
            entry.tensors, entry.event, entry.ready = tensors, event, True
            tier.bytes_moved += self.expert_bytes[entry.key[0]]
            self.cond.notify_all()

    def _make_room(self, tier: Tier, entry: Entry, job: Job) -> bool:
        """Evict until `entry` fits (caller holds the lock). False when the job was given up (a
        prefetch with no room, a demand overtaken by an urgent request, or shutdown)."""
        urgent = job.priority == URGENT
        while not tier.fits(entry):
            candidates = [k for k, e in tier.entries.items() if e is not entry and e.charged
                          and tier.evictable(e, urgent) and tier.policy.may_evict_for_use(k, entry.key)]
            if urgent and not candidates:  # a forward waits: a protected (e.g. hot) expert may go too
                candidates = [k for k, e in tier.entries.items() if e is not entry and e.charged
                              and tier.evictable(e, urgent)]
            if urgent:  # take an expert reserved for later in this call only when nothing else can go
                free = [k for k in candidates if not tier.entries[k].reserved]
                candidates = free or candidates
            victim_key = tier.policy.victim_for(entry.key, candidates, [k for k, e in tier.entries.items()
                                                                        if e.charged]) if candidates else None
            if victim_key is not None and job.priority in (PREDICTED, RING) and \
                    not tier.policy.worth_evicting(victim_key, entry.key):
                victim_key = None
            if victim_key is None:
                if job.priority in (PREDICTED, RING):
                    tier.remove(entry)
                    self.prefetch_counts["cancelled"] += 1
                    return False
                if self.loader.stopping or entry.abandoned:
                    return False
                top = self.queue.top_priority()
                if not urgent and top is not None and top < job.priority:
                    self.queue.push(entry.key, job.priority)  # let the urgent request go first
                    return False
                self.cond.wait(0.05)
                continue
            victim = tier.entries[victim_key]
            if victim.prefetched:
                self.prefetch_counts["wasted"] += 1
            tier.remove(victim)  # its slot is reused after the kernels still reading it (release_event)
        return True

    def _fill(self, entry: Entry):
        """Write expert `entry.key` into its compute-tier slot; returns (tensors, the copy's CUDA
        event or None)."""
        layer_idx, expert = entry.key
        pool = self.tier.pool
        raw = pool.raw(entry.slot)
        if self.device.type != "cuda":
            self.backing.fill(layer_idx, expert, raw, drop_page_cache=True)
            return pool.view(layer_idx, entry.slot), None
        nbytes = self.layouts[layer_idx].nbytes
        if self.host_tier is not None:
            host_entry = self._host_entry(entry.key)
            event = self.engine.copy(raw[:nbytes], self.host_tier.pool.raw(host_entry.slot)[:nbytes],
                                     wait_for=entry.slot_wait)
            with self.cond:
                host_entry.event = event
                host_entry.pins -= 1
        elif (pinned := self.backing.pinned_source(layer_idx, expert)) is not None:
            event = self.engine.copy(pool.view(layer_idx, entry.slot), pinned, wait_for=entry.slot_wait)
        else:
            index, staging = self.engine.staging()
            self.backing.fill(layer_idx, expert, staging, drop_page_cache=True)
            event = self.engine.copy(raw[:nbytes], staging[:nbytes], wait_for=entry.slot_wait)
            self.engine.staged(index, event)
        entry.slot_wait = None
        return pool.view(layer_idx, entry.slot), event

    def _host_entry(self, key: Key) -> Entry:
        """The expert's entry in the pinned host tier, filled from the backing on a miss; pinned
        until the caller has issued its copy out of it."""
        layer_idx, expert = key
        host = self.host_tier
        with self.cond:
            entry = host.entries.get(key)
            if entry is not None and entry.ready:
                host.hits += 1
                host.policy.access(key)
                entry.pins += 1
                return entry
            host.misses += 1
            entry = Entry(key, host.pool.slot_bytes)
            host.entries[key] = entry
            if not self._make_room(host, entry, Job(URGENT, 0, key)):
                host.remove(entry)
                raise RuntimeError("the expert cache is shutting down")
            host.charge(entry)
            entry.pins += 1
        try:
            if entry.slot_wait is not None:
                entry.slot_wait.synchronize()  # the copy that last read this host slot
            self.backing.fill(layer_idx, expert, host.pool.raw(entry.slot), drop_page_cache=True)
        except BaseException:
            with self.cond:
                entry.pins -= 1
                host.remove(entry)
            raise
        with self.cond:
            entry.tensors, entry.ready = host.pool.view(layer_idx, entry.slot), True
            host.bytes_moved += self.expert_bytes[layer_idx]
            host.policy.access(key)
        return entry


_LIVE_CACHES: "weakref.WeakSet[ExpertCache]" = weakref.WeakSet()


@atexit.register
def _close_live_caches() -> None:
    """At interpreter exit, stop every cache's threads before the interpreter tears down: a loader
    thread still copying when the runtime is finalised aborted the process (rc 134, `terminate
    called without an active exception`) when prefetches were queued."""
    for cache in list(_LIVE_CACHES):
        try:
            cache.close()
        except Exception as err:  # noqa: BLE001 - exit goes on; a thread that cannot stop is a daemon
            print(f"moe_infer: closing an expert cache at exit: {type(err).__name__}: {err}", file=sys.stderr)


def process_memory() -> dict[str, int]:
    """The process's resident set now and at its peak (bytes; Linux /proc, else getrusage's peak)."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    found["rss_bytes" if name == "VmRSS" else "peak_rss_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        found["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return found


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
