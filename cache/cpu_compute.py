"""CPU compute of missed experts (Fiddler), and the cost model that decides it in "auto".

A missed expert can be fetched (its bytes cross the host-to-device link, then it runs on the
accelerator) or run where its weights already are, on the host CPU (only the activation rows
cross). `CostModel.measure` times both on this machine at start-up: the cache's own fetch path
(`ExpertCache.fetch_once`: a disk read into a staging buffer then the copy, or a direct copy from
page-locked memory) in bytes/s, and
CPU seconds of one expert as a function of its rows (fixed + per row). `split_misses` then
assigns each layer's misses to the two lanes, the link and the CPU cores, so that both work at
once and the later of the two finishes as early as possible (greedy, largest cost first).

On a machine whose compute device is the CPU there is nothing to split: every expert runs on
the CPU; "auto" fetches into the cache tier (it keeps the cache warm) and "always" runs missed
experts straight from the backing source without caching them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe_infer.experts.math import Activation, ExpertTensors, expert_forward
from moe_infer.experts.quant import QuantizedWeight

from .backing import copy_expert, empty_like_expert, tensors_nbytes


@dataclass(frozen=True)
class CostModel:
    copy_bytes_per_s: float  # host -> compute device
    cpu_fixed_s: float  # one expert on the CPU: fixed part
    cpu_per_row_s: float  # ... and per routed row

    def fetch_seconds(self, nbytes: int) -> float:
        return nbytes / self.copy_bytes_per_s

    def cpu_seconds(self, rows: int) -> float:
        return self.cpu_fixed_s + self.cpu_per_row_s * rows

    @classmethod
    def measure(cls, template: ExpertTensors, activation: Activation, device: torch.device,
                repeats: int = 3, fetch=None) -> "CostModel":
        """Time the fetch of one expert and the CPU forward of one expert at 1 and 16 rows (medians of
        `repeats`). `fetch()` performs one fetch the way the cache will (from its backing, through
        its staging buffers or straight from page-locked memory, to the device, synchronised); without
        it, a pinned host -> `device` copy is timed."""
        host = empty_like_expert(template, "cpu", pin=torch.device(device).type == "cuda")
        for x in (host.w13, host.w2, host.b13, host.b2):
            if isinstance(x, QuantizedWeight):  # timing only: any bytes, finite scales
                for part in x.parts().values():
                    part.fill_(1)
            elif x is not None:
                x.normal_(0, 0.02)
        dst = empty_like_expert(template, device)

        def copy_once() -> None:
            copy_expert(dst, host, non_blocking=True)
            if dst.w13.device.type == "cuda":
                torch.cuda.synchronize(dst.w13.device)

        if fetch is not None:
            copy_once = fetch

        def cpu_once(rows: int):
            dtype = host.b13.dtype if isinstance(host.w13, QuantizedWeight) and host.b13 is not None else (
                torch.bfloat16 if isinstance(host.w13, QuantizedWeight) else host.w13.dtype)
            x = torch.randn(rows, host.w13.shape[1], dtype=dtype)
            return lambda: expert_forward(x, host, activation)

        copy_s = _median_seconds(copy_once, repeats)
        t1, t16 = _median_seconds(cpu_once(1), repeats), _median_seconds(cpu_once(16), repeats)
        per_row = max((t16 - t1) / 15, 0.0)
        return cls(tensors_nbytes(host) / max(copy_s, 1e-9), max(t1 - per_row, 0.0), per_row)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def split_misses(misses: dict[int, int], nbytes: int, cost: CostModel) -> tuple[list[int], list[int]]:
    """Assign missed experts (expert -> rows routed to it) to fetching or to the CPU.

    Greedy list scheduling on two lanes: experts by decreasing CPU cost, each to the lane that
    would finish it earlier. Returns (fetch, cpu), each sorted by expert index.
    """
    fetch_s = cost.fetch_seconds(nbytes)
    fetch_end = cpu_end = 0.0
    fetch, cpu = [], []
    for expert, rows in sorted(misses.items(), key=lambda item: -item[1]):
        cpu_s = cost.cpu_seconds(rows)
        if cpu_end + cpu_s < fetch_end + fetch_s:
            cpu_end += cpu_s
            cpu.append(expert)
        else:
            fetch_end += fetch_s
            fetch.append(expert)
    return sorted(fetch), sorted(cpu)
