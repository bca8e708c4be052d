"""Asynchronous loading: the prefetch queue, the loader thread, device copies and the SE-MoE ring.

- `LoadQueue`: jobs ordered by priority (DEMAND before PREDICTED before RING), first come first
  served within a priority; queued jobs of a (layer, kind) can be cancelled when a newer
  prediction replaces them.
- `Loader`: one daemon thread that drains the queue through a callback; a thread stuck in a hung
  read is replaced (`replace`) so later loads go on; `close()` stops it and joins it.
- `CopyEngine`: host -> device copies on a dedicated CUDA stream, straight from page-locked
  sources or through a ring of pinned staging buffers, one event per copy, so the compute stream
  waits only for the weights it uses (no host synchronisation).
- `ring_schedule`: which upcoming layers the ring loader streams while the current layer computes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .backing import copy_expert

URGENT = -1  # a forward is waiting for this expert now (before every queued priority)
DEMAND, PREDICTED, RING = 0, 1, 2
PRIORITY_NAMES = {DEMAND: "demand", PREDICTED: "predicted", RING: "ring"}


@dataclass(order=True)
class Job:
    priority: int
    seq: int
    key: tuple[int, int] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    score: float = field(default=0.0, compare=False)


class LoadQueue:
    """Priority queue of load jobs with cancellation (thread-safe through the owner's condition)."""

    def __init__(self, cond: threading.Condition):
        self.cond = cond
        self._heap: list[Job] = []
        self._seq = itertools.count()
        self._pending: dict[tuple[int, int], Job] = {}  # key -> its queued job

    def push(self, key: tuple[int, int], priority: int, score: float = 0.0) -> Job | None:
        """Queue `key` (caller holds the condition). A key queued at a lower priority is re-queued at
        the higher one (a predicted expert that turns out needed now becomes a demand load)."""
        old = self._pending.get(key)
        if old is not None:
            if old.priority <= priority:
                return old
            old.cancelled = True
        job = Job(priority, next(self._seq), key, score=score)
        heapq.heappush(self._heap, job)
        self._pending[key] = job
        self.cond.notify_all()
        return job

    def cancel(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Cancel queued jobs matching `predicate`; returns them."""
        dropped = [job for job in self._pending.values() if predicate(job)]
        for job in dropped:
            job.cancelled = True
            del self._pending[job.key]
        return dropped

    def pop(self) -> Job | None:
        while self._heap:
            job = heapq.heappop(self._heap)
            if not job.cancelled:
                del self._pending[job.key]
                return job
        return None

    def top_priority(self) -> int | None:
        """The priority of the next job `pop` would return (None: empty)."""
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].priority if self._heap else None

    def pending(self, key: tuple[int, int]) -> Job | None:
        return self._pending.get(key)

    def __len__(self) -> int:
        return len(self._pending)


class Loader:
    """The background thread: `run_job(job)` for every job popped, until `close()`.

    `run_job` must not raise (the cache stores a load's error in the entry that waits for it);
    if it does anyway, the error is kept in `self.error` and every waiter is woken.

    A job that never returns (a hung read) must not stop every later load: `replace()` leaves the
    stuck thread to finish on its own (it exits as soon as its job returns, running nothing else)
    and starts a fresh one for the queue; `close()` joins the current thread and waits a little for
    abandoned ones.
    """

    def __init__(self, queue: LoadQueue, cond: threading.Condition, run_job: Callable[[Job], None],
                 name: str = "moe-infer-loader"):
        self.queue = queue
        self.cond = cond
        self.run_job = run_job
        self.name = name
        self.stopping = False
        self.error: BaseException | None = None
        self.current: tuple[Job, float] | None = None  # the job running now and when it started
        self.abandoned: list[threading.Thread] = []
        self._start()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self.thread.start()  # after the assignment: the thread checks that it is the current one

    def _main(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self.cond:
                    if me is not self.thread:
                        return  # replaced while its job hung: the new thread owns the queue
                    job = self.queue.pop()
                    while job is None and not self.stopping:
                        self.cond.wait(timeout=0.5)
                        job = self.queue.pop()
                    if self.stopping:
                        return
                    self.current = (job, time.monotonic())
                self.run_job(job)
                with self.cond:
                    if me is self.thread:
                        self.current = None
        except BaseException as err:  # noqa: BLE001 - kept and re-raised in the caller's thread
            with self.cond:
                if me is self.thread:
                    self.error = err
                self.cond.notify_all()

    def busy_since(self) -> float | None:
        """When the running job started (time.monotonic), None when idle (caller holds the condition)."""
        return None if self.current is None else self.current[1]

    def replace(self) -> None:
        """Abandon the thread stuck in its job and start a fresh one (caller holds the condition)."""
        if self.stopping:
            return
        self.abandoned.append(self.thread)
        self.current = None
        self._start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the expert loader thread did not stop within {timeout} s")
        for thread in self.abandoned:  # stuck in a read that may never return: do not wait long
            thread.join(1.0)
        self.abandoned = [t for t in self.abandoned if t.is_alive()]


class CopyEngine:
    """Copies experts into a CUDA tier on a dedicated copy stream, one event per copy; the consumer's
    stream waits on that event only (no host synchronisation). A source that is already page-locked
    is copied as it is; any other is first written into one of `STAGING_BUFFERS` pinned staging
    buffers (one slab, allocated on first use: the constant that pinned memory may exceed the host
    budget by), so that the next read fills another buffer while earlier copies run. On CPU-only
    machines copies are synchronous (the cache writes its slots directly; the cost model's
    `fetch_once` still runs here)."""

    STAGING_BUFFERS = 4

    def __init__(self, device: torch.device, slot_bytes: int = 0):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.slot_bytes = slot_bytes
        self._slab = None
        self._staging_events: list = []
        self._next = 0

    @property
    def staging_bytes(self) -> int:
        return 0 if self._slab is None else self._slab.nbytes

    def staging(self) -> tuple[int, torch.Tensor]:
        """(index, uint8 [slot_bytes] pinned buffer) free to be written now: waits for the copy that
        last read it, which was issued STAGING_BUFFERS loads ago (used by the loader thread only)."""
        from .pool import HostSlab

        if self._slab is None:
            self._slab = HostSlab(self.STAGING_BUFFERS * self.slot_bytes, pin=self.cuda)
            self._staging_events = [None] * self.STAGING_BUFFERS
        index = self._next
        self._next = (self._next + 1) % self.STAGING_BUFFERS
        event = self._staging_events[index]
        if event is not None:
            event.synchronize()
            self._staging_events[index] = None
        return index, self._slab.tensor[index * self.slot_bytes:(index + 1) * self.slot_bytes]

    def staged(self, index: int, event) -> None:
        """The copy that reads staging buffer `index` ends with `event`."""
        self._staging_events[index] = event

    def copy(self, dst, src, wait_for=None):
        """Copy `src` (host: an uint8 range, or ExpertTensors) into `dst` (the same kind on this
        engine's device) after the CUDA event `wait_for` (the last reader of the memory it
        overwrites); returns the event that marks the end of the copy (None off CUDA: the copy is
        done when this returns)."""
        if not self.cuda:
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
            else:
                copy_expert(dst, src)
            return None
        with torch.cuda.stream(self.stream):
            if wait_for is not None:
                self.stream.wait_event(wait_for)
            if isinstance(dst, torch.Tensor):
                dst.copy_(src, non_blocking=True)
            else:
                copy_expert(dst, src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def close(self) -> None:
        if self._slab is not None:
            if self.cuda:
                self.stream.synchronize()
            self._slab.close()
            self._slab = None


def ring_schedule(order: list[int], current: int, sections: int) -> list[int]:
    """The layers to stream while `current` computes: the next `sections - 1` layers of `order`,
    cyclically (after the last MoE layer comes the first one of the next token)."""
    pos = order.index(current)
    return [order[(pos + i) % len(order)] for i in range(1, min(sections, len(order)))]
