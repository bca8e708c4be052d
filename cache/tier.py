"""One tier of the expert cache: its slot pool, its entries, its policy and its counters.

`Entry` is one expert's place in a tier (its slot, its copy events, its pins and reservations);
`Tier` charges and frees slots against the tier's hard budget and says which entries may be
evicted. Which entry to evict, and when to load, is decided by `ExpertCache` (`tiered.py`) and
the loader side (`fill.py`); this module only keeps the books.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_infer.experts.math import ExpertTensors

from .policies import Policy
from .pool import SlotPool

Key = tuple[int, int]  # (decoder-layer index, expert)


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
