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

This module owns the cache's runtime decisions: which experts a layer call needs, which of its
misses load and which run on the CPU, the requests and their priorities, waiting for and pinning
entries, and closing. The rest of `ExpertCache` comes from its base classes, one concern each:
how a call computes once its experts are held (`compute.py`), how the loader thread fills a slot
(`fill.py`), and what the cache reports (`report.py`); one tier's books are `tier.py`.

Shape legend: T tokens, H hidden, K top-k, E experts, S slots.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from moe_infer.errors import ConfigError
from moe_infer.experts.math import expert_counts, group_by_expert, moe_forward
from moe_infer.traces.popularity import expert_load
from moe_infer.traces.trace import Trace

from .backing import Backing
from .compute import KERNELS, ComputeMixin, _LayerSource
from .cpu_compute import CostModel, split_misses
from .fill import FillMixin
from .loader import DEMAND, PREDICTED, RING, URGENT, CopyEngine, LoadQueue, Loader, ring_schedule
from .policies import ExpertFlowPolicy, Policy, RingPolicy, StaticPolicy, make_policy
from .pool import SlotPool
from .report import StatsMixin
from .tier import Entry, Key, Tier


class ExpertCache(ComputeMixin, FillMixin, StatsMixin):
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
