"""`ExpertCache`: the tiered expert cache behind a wrapped model's MoE layers.

Tiers, nearest to the compute first: the compute tier (GPU memory with budget `gpu_memory` on
CUDA; CPU RAM with budget `cpu_memory` on CPU-only machines), then on CUDA an optional pinned host
tier (`cpu_memory`), then the backing source (the model's own weights in host memory, or the
converted checkpoint on disk). Budgets are hard: bytes are charged before a buffer is
allocated and `Tier.charge` refuses (AssertionError, an internal invariant) to go over.

One forward of a layer: `forward(layer, hidden, routing, grouping)` requests every missed expert
at demand priority, in the order the layer computes them, then runs the reference grouped MoE
math with a source that waits for each expert in turn and pins it until the call ends (the
reference math takes all of a call's experts before computing). Experts of a call beyond what
the budget can hold at once run from the backing on the CPU (counted as CPU-computed misses). The loader thread fills entries in the background; a load's error is raised
in the forward that waits for it; waits have a timeout; `close()` joins every thread.
Entries in use are pinned; the experts a layer call needs (hits and demand loads) are reserved
until used; a waiting forward's request is urgent and may, when nothing else can go, take a
reserved entry's place (it is requested again when its turn comes), so the cache makes progress
with a budget of a single expert.

Shape legend: T tokens, H hidden, K top-k, E experts.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_infer.experts.math import ExpertTensors, moe_forward

from .backing import Backing, empty_like_expert, expert_signature
from .cpu_compute import CostModel, split_misses
from .loader import DEMAND, PREDICTED, RING, CopyEngine, Job, LoadQueue, Loader, ring_schedule
from .policies import ExpertFlowPolicy, Policy, RingPolicy, StaticPolicy, make_policy
from moe_infer.errors import ConfigError

URGENT = -1  # a forward is waiting for this expert now
Key = tuple[int, int]  # (decoder-layer index, expert)


@dataclass(eq=False)
class Entry:
    key: Key
    nbytes: int
    tensors: ExpertTensors | None = None
    buffer: Any = None  # the allocation `tensors` lives in (reused by the next entry of the same kind)
    ready: bool = False
    error: BaseException | None = None
    pins: int = 0
    reserved: bool = False  # requested by a forward, not used yet
    demand_miss: bool = False  # requested as a miss: its use counts as a miss however fast it came
    prefetched: bool = False  # loaded ahead of use, not used yet
    charged: bool = False
    event: Any = None  # CUDA event: the copy into `tensors` is complete
    release_event: Any = None  # CUDA event: the last kernel reading `tensors` is complete
    wait_events: list = field(default_factory=list)  # release events of the entries evicted to make room


@dataclass
class Tier:
    name: str
    device: torch.device
    budget_bytes: int
    policy: Policy
    entries: dict[Key, Entry] = field(default_factory=dict)
    used_bytes: int = 0
    peak_bytes: int = 0
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0

    def charge(self, entry: Entry) -> None:
        assert not entry.charged
        assert self.used_bytes + entry.nbytes <= self.budget_bytes, (
            f"{self.name} tier over budget: {self.used_bytes} + {entry.nbytes} > {self.budget_bytes}")
        self.used_bytes += entry.nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        entry.charged = True

    def remove(self, entry: Entry) -> None:
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.charged:
            self.used_bytes -= entry.nbytes
            entry.charged = False
        self.policy.removed(entry.key)

    def evictable(self, entry: Entry, urgent: bool) -> bool:
        if not entry.ready or entry.pins or (entry.reserved and not urgent):
            return False
        # a host entry may still be the source of a running copy to the device
        return entry.event is None or self.device.type == "cuda" or entry.event.query()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes_moved": self.bytes_moved,
                "peak_bytes": self.peak_bytes, "used_bytes": self.used_bytes, "budget_bytes": self.budget_bytes}


class ExpertCache:
    """The tiered cache of one wrapped model (see the module docstring)."""

    def __init__(self, backing: Backing, layer_order: list[int], *, device: torch.device | str,
                 budget_bytes: int, host_budget_bytes: int | None = None, policy: str = "lru",
                 loader: str = "on-demand", cpu_compute: str = "never", load_timeout: float = 120.0,
                 cost_model: CostModel | None = None):
        self.backing = backing
        self.layer_order = list(layer_order)
        self.device = torch.device(device)
        self.loader_kind = loader
        self.cpu_compute = cpu_compute
        self.load_timeout = load_timeout
        self.templates = {l: backing.template(l) for l in self.layer_order}
        self.nbytes = {l: backing.expert_nbytes(l) for l in self.layer_order}
        self.num_experts = {l: backing.num_experts(l) for l in self.layer_order}
        largest = max(self.nbytes.values())
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
        self.tier = Tier(name, self.device, budget_bytes, compute_policy)
        self.host_tier = (Tier("cpu", torch.device("cpu"), host_budget_bytes, make_policy("lru"))
                          if self.device.type == "cuda" and host_budget_bytes is not None else None)
        layer_bytes = max(self.nbytes[l] * self._experts_of(l) for l in self.layer_order)
        self.ring_sections = max(2, min(len(self.layer_order), budget_bytes // max(layer_bytes, 1)))
        self.expert_counts: dict[int, list[int]] = {}  # rows routed per expert (ring: which to stream)

        self.cond = threading.Condition(threading.RLock())
        self.queue = LoadQueue(self.cond)
        self.engine = CopyEngine(self.device)
        self.cost_model = cost_model
        if cpu_compute == "auto" and self.device.type == "cuda" and cost_model is None:
            first = self.layer_order[0]
            self.cost_model = CostModel.measure(self.templates[first], backing.activation(first), self.device)
        # on CUDA, experts the budget cannot hold beside the rest of their call run on the CPU
        self._cpu_pool = ThreadPoolExecutor(1, thread_name_prefix="moe-infer-cpu-experts") \
            if self.device.type == "cuda" else None
        self.prefetch_counts = {"issued": 0, "used": 0, "wasted": 0, "cancelled": 0}
        self.cpu_computed_experts = 0
        self.stall_seconds = 0.0
        self._backing_reads_at_reset = self._backing_bytes_at_reset = 0
        self.closed = False
        self.loader = Loader(self.queue, self.cond, self._run_job)

    # -- sizes -------------------------------------------------------------------------------
    def _experts_of(self, layer_idx: int) -> int:
        return self.num_experts[layer_idx]

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
        from moe_infer.trace import Trace

        from moe_infer.placement import expert_load

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

    def forward(self, layer, hidden: Tensor, routing, grouping: tuple[Tensor, list[int]]) -> Tensor:
        """The layer's expert computation through the cache: hidden [T, H] -> [T, H]."""
        layer_idx = layer.layer_idx
        counts = grouping[1]
        used = [e for e, c in enumerate(counts) if c]
        self._note_counts(layer_idx, counts)
        activation = self.backing.activation(layer_idx)
        cpu_experts = self._begin(layer_idx, {e: counts[e] for e in used})
        source = _LayerSource(self, layer_idx, set(cpu_experts))
        num_experts = len(counts)
        if not cpu_experts or self.device.type != "cuda":
            try:
                return moe_forward(hidden, routing.expert_ids, routing.expert_weights, source, num_experts,
                                   activation, grouping=grouping)
            finally:
                source.release()
                self._end(layer_idx)
        # CUDA: missed experts chosen for the CPU run there while the GPU fetches and computes the rest
        on_cpu = torch.zeros(num_experts + 1, dtype=torch.bool)
        on_cpu[cpu_experts] = True
        ids = routing.expert_ids
        cpu_mask = on_cpu.to(ids.device)[ids.clamp(0, num_experts)]
        cpu_ids = torch.where(cpu_mask, ids, -1)
        with self.cond:
            self.tier.misses += len(cpu_experts)
            self.cpu_computed_experts += len(cpu_experts)
        future = self._cpu_pool.submit(
            moe_forward, hidden.cpu(), cpu_ids.cpu(), routing.expert_weights.cpu(),
            _BackingSource(self.backing, layer_idx), num_experts, activation)
        try:
            out = moe_forward(hidden, torch.where(cpu_mask, -1, ids), routing.expert_weights, source,
                              num_experts, activation)
        finally:
            source.release()
            self._end(layer_idx)
        return out + future.result().to(out.device, non_blocking=True)

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
                        entry.tensors = None

    def stats(self) -> dict[str, Any]:
        with self.cond:
            tiers = {self.tier.name: self.tier.stats()}
            if self.host_tier is not None:
                tiers["cpu"] = self.host_tier.stats()
            if self.backing.tier_name is not None:  # every read is a hit: the backing holds every expert
                tiers[self.backing.tier_name] = {"hits": self.backing.reads - self._backing_reads_at_reset,
                                                 "misses": 0, "bytes_moved": 0, "peak_bytes": 0,
                                                 "bytes_read": self.backing.bytes_read - self._backing_bytes_at_reset}
            return {"tiers": tiers, "prefetch": dict(self.prefetch_counts),
                    "cpu_computed_experts": self.cpu_computed_experts, "stall_seconds": self.stall_seconds}

    def reset_stats(self) -> None:
        with self.cond:
            for tier in (self.tier, self.host_tier):
                if tier is not None:
                    tier.hits = tier.misses = tier.bytes_moved = 0
                    tier.peak_bytes = tier.used_bytes
            self.prefetch_counts = dict.fromkeys(self.prefetch_counts, 0)
            self.cpu_computed_experts = 0
            self.stall_seconds = 0.0
            self._backing_reads_at_reset = getattr(self.backing, "reads", 0)
            self._backing_bytes_at_reset = getattr(self.backing, "bytes_read", 0)

    def resident(self) -> dict[Key, int]:
        """Ready entries of the compute tier and their bytes (for tests and reports)."""
        with self.cond:
            return {k: e.nbytes for k, e in self.tier.entries.items() if e.ready}

    # -- one layer ---------------------------------------------------------------------------
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
            # the reference math holds every expert of the call at once: what the budget cannot
            # hold beside the others runs straight from the backing (on the CPU), fewest rows first
            kept = getattr(self.tier.policy, "hot", set())  # static: room that stays with the hot set
            # counted whether loaded yet or not: a hot expert still queued (pin_popular just ran) must
            # find its room free, or this call's cold experts take it and it never comes back
            kept_bytes = sum(self.nbytes[k[0]] for k in kept if not (k[0] == layer_idx and k[1] in rows))
            capacity = (self.tier.budget_bytes - kept_bytes) // self.nbytes[layer_idx]
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
        return split_misses(misses, self.nbytes[layer_idx], self.cost_model)[1]

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
                    raise TimeoutError(f"expert {expert} of layer {layer_idx} was not loaded within "
                                       f"{self.load_timeout} s")
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
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(entry.event)
            for x in (entry.tensors.w13, entry.tensors.w2, entry.tensors.b13, entry.tensors.b2):
                if x is not None:
                    x.record_stream(stream)  # the allocator must not reuse it before this stream is done
        return entry

    def _release(self, entry: Entry) -> None:
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self.cond:
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
            buffers = self._make_room(tier, entry, job)
            if buffers is False:
                return
            tier.charge(entry)
            if entry.prefetched:
                self.prefetch_counts["issued"] += 1
        try:
            tensors, event = self._fill(entry, buffers)
        except BaseException as err:  # noqa: BLE001 - surfaces in the forward that waits for it
            with self.cond:
                entry.error = err
                tier.remove(entry)
                self.cond.notify_all()
            return
        with self.cond:
            entry.tensors, entry.event, entry.ready = tensors, event, True
            tier.bytes_moved += entry.nbytes
            self.cond.notify_all()

    def _make_room(self, tier: Tier, entry: Entry, job: Job):
        """Evict until `entry` fits (caller holds the lock). Returns the buffer of a victim of the same
        kind to reuse, None to allocate, or False when the job was given up (a prefetch with no room,
        a demand overtaken by an urgent request, or shutdown)."""
        urgent = job.priority == URGENT
        reuse = None
        while tier.used_bytes + entry.nbytes > tier.budget_bytes:
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
                if self.loader.stopping:
                    return False
                top = self.queue.top_priority()
                if not urgent and top is not None and top < job.priority:
                    self.queue.push(entry.key, job.priority)  # let the urgent request go first
                    return False
                self.cond.wait(0.05)
                continue
            victim = tier.entries[victim_key]
            if victim.release_event is not None:
                # the copy into the room it leaves must wait for the kernels still reading it
                entry.wait_events.append(victim.release_event)
            if victim.prefetched:
                self.prefetch_counts["wasted"] += 1
            tier.remove(victim)
            if reuse is None and victim.buffer is not None and \
                    self._buffer_key(tier, victim.key[0]) == self._buffer_key(tier, entry.key[0]):
                reuse = victim
            victim.tensors = None
        return None if reuse is None else reuse.buffer

    def _buffer_key(self, tier: Tier, layer_idx: int):
        if tier.device.type == "cuda":
            return ("device", expert_signature(self.templates[layer_idx]))
        return self.backing.buffer_key(layer_idx)

    def _fill(self, entry: Entry, buffer):
        """Copy expert `entry.key` into the compute tier (into `buffer`, or a new allocation); returns
        (tensors, the copy's CUDA event or None)."""
        layer_idx, expert = entry.key
        if self.device.type != "cuda":
            entry.buffer = buffer if buffer is not None else self.backing.host_buffer(layer_idx)
            return self.backing.read(layer_idx, expert, out=entry.buffer), None
        if buffer is None:
            with torch.cuda.stream(self.engine.stream):  # allocated where it is written
                buffer = empty_like_expert(self.templates[layer_idx], self.device)
        entry.buffer = buffer
        host = self._host_copy(entry.key)
        event = self.engine.copy(entry.buffer, host, wait_for=entry.wait_events)
        entry.wait_events = []
        if self.host_tier is not None:
            with self.cond:
                host_entry = self.host_tier.entries.get(entry.key)
                if host_entry is not None:
                    host_entry.event = event
        else:
            event.synchronize()  # the shared staging buffer is reused by the next load
        return entry.buffer, event

    def _host_copy(self, key: Key) -> ExpertTensors:
        """The expert in pinned host memory: from the host tier (hit), or read from the backing into
        a new host-tier entry (miss) or into the staging buffer (no host tier)."""
        layer_idx, expert = key
        host = self.host_tier
        if host is None:
            staging = self.engine.staging(self.backing.buffer_key(layer_idx),
                                          lambda: self.backing.host_buffer(layer_idx, pin=True))
            return self.backing.read(layer_idx, expert, out=staging)
        with self.cond:
            entry = host.entries.get(key)
            if entry is not None and entry.ready:
                host.hits += 1
                host.policy.access(key)
                return entry.tensors
            host.misses += 1
            entry = Entry(key, self.nbytes[layer_idx])
            host.entries[key] = entry
            buffer = self._make_room(host, entry, Job(URGENT, 0, key))
            if buffer is False:
                host.remove(entry)
                raise RuntimeError("the expert cache is shutting down")
            host.charge(entry)
        try:
            entry.buffer = buffer if buffer is not None else self.backing.host_buffer(layer_idx, pin=True)
            tensors = self.backing.read(layer_idx, expert, out=entry.buffer)
        except BaseException:
            with self.cond:
                host.remove(entry)
            raise
        with self.cond:
            entry.tensors, entry.ready = tensors, True
            host.bytes_moved += entry.nbytes
            host.policy.access(key)
        return tensors


class _LayerSource:
    """The expert source one layer's forward computes from: waits for each expert and pins it until
    the call ends (the reference math takes every expert of the call before it computes)."""

    def __init__(self, cache: ExpertCache, layer_idx: int, cpu_experts: set[int]):
        self.cache = cache
        self.layer_idx = layer_idx
        self.cpu_experts = cpu_experts
        self.counted: set[int] = set()
        self.held: list[Entry] = []

    def __call__(self, expert: int) -> ExpertTensors:
        if expert in self.cpu_experts:  # CPU compute device: run it from the backing, uncached
            if expert not in self.counted:  # read once per projection; counted once per call
                self.counted.add(expert)
                with self.cache.cond:
                    self.cache.tier.misses += 1
                    self.cache.cpu_computed_experts += 1
            try:
                return self.cache.backing.read(self.layer_idx, expert)
            except Exception as err:
                raise RuntimeError(f"reading expert {expert} of layer {self.layer_idx} failed: "
                                   f"{type(err).__name__}: {err}") from err
        entry = self.cache._acquire(self.layer_idx, expert)
        self.held.append(entry)
        return entry.tensors

    def is_resident(self, expert: int) -> bool:
        """Cached experts stay pinned for the call; an expert run from the backing is read per use."""
        return expert not in self.cpu_experts

    def release(self) -> None:
        for entry in self.held:
            self.cache._release(entry)
        self.held = []


class _BackingSource:
    """Experts read straight from the backing for one call (CPU compute of misses): not resident,
    so `moe_forward` holds at most one of them at a time."""

    def __init__(self, backing, layer_idx: int):
        self.backing = backing
        self.layer_idx = layer_idx

    def __call__(self, expert: int) -> ExpertTensors:
        return self.backing.read(self.layer_idx, expert)

    def is_resident(self, expert: int) -> bool:
        return False
