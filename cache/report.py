"""What `ExpertCache` reports: its per-tier counters, prefetch and CPU-compute counts, where its
memory is (`memory`, `process_memory`), and the reset between measurements.

`StatsMixin` is a base class of `ExpertCache` (`tiered.py`) and reads the counters that the cache's
other methods update; it changes nothing but the counters.
"""

from __future__ import annotations

import resource
from typing import Any

from .compute import KERNELS
from .pool import pinned_bytes
from .tier import Key


class StatsMixin:
    """`ExpertCache`'s reporting methods (see the module docstring)."""

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
