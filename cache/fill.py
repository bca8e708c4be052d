"""The fill side of `ExpertCache`: how an expert's bytes reach its slot.

The loader thread runs `_run_job` for each queued request: it makes room in the compute tier
(`_make_room`: evicts what the policy chooses, or gives the job up), charges a slot, and fills it
(`_fill`): on a CPU compute device straight from the backing; on CUDA from the pinned host tier
(`_host_entry`, itself filled from the backing on a miss), from a page-locked backing directly, or
through a pinned staging buffer, each copy on the copy engine's stream with its own event.
`fetch_once` times the same path for the cost model.

`FillMixin` is a base class of `ExpertCache` (`tiered.py`) and reads the cache's attributes set in
`ExpertCache.__init__`; what is requested, and at which priority, is decided there.
"""

from __future__ import annotations

import torch

from .loader import PREDICTED, RING, URGENT, Job
from .tier import Entry, Key, Tier


class FillMixin:
    """`ExpertCache`'s loader-side methods (see the module docstring)."""

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
