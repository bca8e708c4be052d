"""Asynchronous loading: the prefetch queue, the loader thread, device copies and the SE-MoE ring.

- `LoadQueue`: jobs ordered by priority (DEMAND before PREDICTED before RING), first come first
  served within a priority; queued jobs of a (layer, kind) can be cancelled when a newer
  prediction replaces them.
- `Loader`: one daemon thread that drains the queue through a callback; `close()` stops it and
  joins it (never leaves a thread behind), whatever the callback is doing.
- `CopyEngine`: host -> device copies on a dedicated CUDA stream with pinned staging buffers and
  events, so the compute stream waits only for the weights it uses (no host synchronisation); on
  CPU-only machines the same calls are plain synchronous copies.
- `ring_schedule`: which upcoming layers the ring loader streams while the current layer computes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_infer.experts.math import ExpertTensors

from .backing import copy_expert

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
    """

    def __init__(self, queue: LoadQueue, cond: threading.Condition, run_job: Callable[[Job], None],
                 name: str = "moe-infer-loader"):
        self.queue = queue
        self.cond = cond
        self.run_job = run_job
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            while True:
                with self.cond:
                    job = self.queue.pop()
                    while job is None and not self.stopping:
                        self.cond.wait(timeout=0.5)
                        job = self.queue.pop()
                    if self.stopping:
                        return
                self.run_job(job)
        except BaseException as err:  # noqa: BLE001 - kept and re-raised in the caller's thread
            with self.cond:
                self.error = err
                self.cond.notify_all()

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


class CopyEngine:
    """Copies an expert into a tier's buffers. On CUDA targets: a dedicated copy stream, a pinned
    staging buffer per expert shape (reused), and one event per copy; the consumer makes its own
    stream wait on that event. Elsewhere: a synchronous copy, and no event."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._staging: dict = {}

    def staging(self, key, make: Callable[[], object]):
        """The pinned host buffer for buffers of kind `key` (one per kind, made by `make` on first use;
        used by the loader thread only)."""
        if key not in self._staging:
            self._staging[key] = make()
        return self._staging[key]

    def copy(self, dst: ExpertTensors, src: ExpertTensors, wait_for: list | None = None):
        """Copy `src` (host) into `dst` (this engine's device), after the CUDA events `wait_for` (the
        last readers of the memory it overwrites); returns the event that marks the end of the copy,
        or None when the copy is already complete."""
        if not self.cuda:
            copy_expert(dst, src)
            return None
        with torch.cuda.stream(self.stream):
            for event in wait_for or ():
                self.stream.wait_event(event)
            copy_expert(dst, src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event


def ring_schedule(order: list[int], current: int, sections: int) -> list[int]:
    """The layers to stream while `current` computes: the next `sections - 1` layers of `order`,
    cyclically (after the last MoE layer comes the first one of the next token)."""
    pos = order.index(current)
    return [order[(pos + i) % len(order)] for i in range(1, min(sections, len(order)))]
