"""Tutel-style adaptive parallelism of the MoE layers on `torch.distributed`.

Owns: the per-call weight exchange, the token dispatch and combine with all-to-all (dropless, or
with a capacity factor), the sharding factor r of each call (fixed, or chosen by the cost model
of `moe_infer.distributed.cost`), the communication statistics, and entering and leaving the
multi-rank path (`build_runtime`, `release`). Not owned: the process group
(`moe_infer.distributed.group`), the sharded layout every r reads (`moe_infer.distributed.shard`),
routing (each rank routes its own tokens), shared experts (replicated, computed on the rank that
holds the token), the semantics of r (documented in `moe_infer.distributed.cost`).

Every rank of the job must run the same sequence of forward calls with the same r (as with any
collective); the number of tokens may differ per rank, including zero.

Shape legend: T tokens on this rank, H hidden, E experts, K top-k, I intermediate, S = I / W,
W ranks, D = W / r columns, P = I / r piece of an expert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moe_infer.distributed import cost as parallel_cost
from moe_infer.distributed.group import all_to_all, collective, init_distributed
from moe_infer.distributed.group import ParallelError, launched_by_deepspeed  # noqa: F401 (moe_infer.parallel's names)
from moe_infer.distributed.shard import ExpertShard, GatheredExperts
from moe_infer.experts.layout import ModuleExperts
from moe_infer.experts.math import moe_forward
from moe_infer.errors import ConfigError

MODES = ("auto", "ep", "tp")
_HISTORY = 256  # per-call records kept for stats()


class Placement(Protocol):
    def device_of(self, layer_idx: int, expert: int) -> int: ...


@dataclass
class CallRecord:
    layer: int
    r: int
    tokens: int  # tokens of this call over all ranks
    token_bytes: int  # bytes of tokens and partial outputs this rank sent to other ranks
    weight_bytes: int  # bytes of weight slices this rank sent to other ranks
    dropped: int  # (token, expert) pairs dropped by the capacity factor, over all ranks
    estimated_ms: dict[int, float] | None = None  # the cost model's estimates when r was chosen by it


class ParallelRuntime:
    """Process group, sharding setting and statistics shared by the MoE layers of one model."""

    def __init__(self, setting: str | int, *, placement: Placement | None = None, capacity_factor: float | None = None):
        self.rank, self.world_size = init_distributed()
        self.setting: str | int = "auto"
        self.placement = placement
        self.capacity_factor = capacity_factor
        self.links: parallel_cost.Links | None = None  # measured on the first "auto" call
        self.device_rates: parallel_cost.Device | None = None
        self.reset_stats()
        self.set(setting, capacity_factor=capacity_factor, placement=placement)

    def valid_rs(self, intermediate_size: int) -> list[int]:
        return parallel_cost.valid_rs(self.world_size, intermediate_size)

    def set(self, setting: str | int, *, capacity_factor: float | None = None, placement: Placement | None = None) -> None:
        is_int = isinstance(setting, int) and not isinstance(setting, bool)
        if not (setting in MODES or is_int):
            raise ConfigError(f"parallel={setting!r}: expected 'auto', 'ep', 'tp' or a sharding factor r (int)")
        if is_int:
            valid = parallel_cost.valid_rs(self.world_size, self.world_size)
            if setting not in valid:
                raise ConfigError(
                    f"parallel={setting!r}: with {self.world_size} ranks the sharding factor r must be one of {valid} "
                    f"(0 = data parallel, 1 = expert parallel, {self.world_size} = tensor-sliced experts)"
                )
        if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
            raise ConfigError(f"capacity_factor={capacity_factor!r}: expected None (dropless) or a number > 0")
        if placement is not None and not callable(getattr(placement, "device_of", None)):
            raise ConfigError(f"placement={placement!r}: expected an object with device_of(layer_idx, expert) -> int")
        planned = getattr(placement, "num_devices", self.world_size)
        if planned != self.world_size:
            raise ConfigError(f"placement: the plan is for {planned} devices, this job has {self.world_size} ranks; "
                             f"plan for {self.world_size} devices (moe-infer placement --devices {self.world_size})")
        self.setting = setting
        self.capacity_factor = capacity_factor
        self.placement = placement

    def fixed_r(self) -> int | None:
        if self.setting == "ep":
            return 1
        if self.setting == "tp":
            return self.world_size
        return None if self.setting == "auto" else int(self.setting)

    def reset_stats(self) -> None:
        self.history: list[CallRecord] = []
        self.calls_by_r: dict[int, int] = {}
        self.token_bytes = 0
        self.weight_bytes = 0
        self.dropped = 0

    def record(self, rec: CallRecord) -> None:
        self.history.append(rec)
        del self.history[:-_HISTORY]
        self.calls_by_r[rec.r] = self.calls_by_r.get(rec.r, 0) + 1
        self.token_bytes += rec.token_bytes
        self.weight_bytes += rec.weight_bytes
        self.dropped += rec.dropped

    def stats(self) -> dict[str, Any]:
        calls = sum(self.calls_by_r.values())
        last = self.history[-1] if self.history else None
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "backend": dist.get_backend(),
            "setting": self.setting,
            "capacity_factor": self.capacity_factor,
            "last_r": last.r if last else None,
            "calls_by_r": dict(sorted(self.calls_by_r.items())),
            "bytes_sent": self.token_bytes + self.weight_bytes,
            "token_bytes_sent": self.token_bytes,
            "weight_bytes_sent": self.weight_bytes,
            "bytes_sent_per_call": (self.token_bytes + self.weight_bytes) / calls if calls else 0.0,
            "dropped_pairs": self.dropped,
            "per_call": [dict(vars(rec)) for rec in self.history],
            "links": None if self.links is None else dict(vars(self.links)),
        }

    # the cost model's inputs for this job, measured once (collectively) and agreed on by all ranks
    def measure(self, device: torch.device, dtype: torch.dtype) -> None:
        """Measure all-to-all latency and bandwidth, the matmul rate in `dtype` and the memory bandwidth."""
        def timed(fn, repeat=3):
            fn()
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / repeat

        world = self.world_size
        small = torch.zeros(world, device=device)
        big = torch.zeros(world * (1 << 18), device=device)  # 1 MiB to every rank
        out_small, out_big = torch.empty_like(small), torch.empty_like(big)
        latency = timed(lambda: collective("bandwidth probe", None, dist.all_to_all_single, out_small, small))
        big_s = timed(lambda: collective("bandwidth probe", None, dist.all_to_all_single, out_big, big))
        a = torch.randn(256, 512, device=device, dtype=dtype)
        b = torch.randn(512, 512, device=device, dtype=dtype)
        mm_s = timed(lambda: a @ b)
        copy_src = torch.empty(1 << 22, device=device, dtype=torch.uint8)
        copy_s = timed(lambda: copy_src.clone())
        # the slowest rank's numbers, so that every rank's cost model is the same
        worst = torch.tensor([latency, big_s, mm_s, copy_s], dtype=torch.float64)
        if device.type == "cuda":
            worst = worst.to(device)
        collective("bandwidth probe", None, dist.all_reduce, worst, op=dist.ReduceOp.MAX)
        latency, big_s, mm_s, copy_s = worst.tolist()
        sent = big.numel() // world * (world - 1) * big.element_size()
        bw = sent / max(big_s - latency, 1e-9)
        self.links = parallel_cost.Links(intra_bw=bw, inter_bw=bw, ranks_per_node=world, latency_s=latency)
        self.device_rates = parallel_cost.Device(flops=2 * 256 * 512 * 512 / mm_s, mem_bw=2 * (1 << 22) / copy_s)


class ParallelExperts:
    """The routed experts of one MoE layer across ranks: `self(hidden, expert_ids, expert_weights)`
    returns what `moe_forward` returns on this rank's tokens."""

    def __init__(self, runtime: ParallelRuntime, layer_idx: int, shard: ExpertShard):
        self.runtime = runtime
        self.layer_idx = layer_idx
        self.num_experts = shard.num_experts
        self.shard = shard

    def _devices(self) -> np.ndarray | None:
        plan = self.runtime.placement
        if plan is None:
            return None
        devices = np.array([int(plan.device_of(self.layer_idx, e)) for e in range(self.num_experts)])
        bad = devices[(devices < 0) | (devices >= self.runtime.world_size)]
        if bad.size:
            raise ConfigError(f"placement plan: device_of({self.layer_idx}, ...) returned {int(bad[0])}, not a rank of "
                             f"this job (0..{self.runtime.world_size - 1})")
        return devices

    def columns(self, num_columns: int) -> np.ndarray:
        devices = self._devices()
        if devices is None:
            return parallel_cost.default_columns(self.num_experts, num_columns)
        return parallel_cost.columns_from_devices(devices, num_columns)

    def layer_shape(self, top_k: int) -> parallel_cost.LayerShape:
        shard = self.shard
        return parallel_cost.LayerShape(self.num_experts, shard.hidden_size, shard.intermediate_size, top_k,
                                        shard.dtype.itemsize)

    def __call__(self, hidden: Tensor, expert_ids: Tensor, expert_weights: Tensor) -> Tensor:
        rt, layer = self.runtime, self.layer_idx
        world, num_experts = rt.world_size, self.num_experts
        num_tokens, top_k = expert_ids.shape
        flat_ids = expert_ids.reshape(-1)

        # one small collective: every rank's pair counts per expert and token count
        local = torch.zeros(num_experts + 1, dtype=torch.int64)
        local[:num_experts] = torch.bincount(flat_ids.cpu(), minlength=num_experts)[:num_experts]
        local[num_experts] = num_tokens
        gathered = [torch.empty_like(local) for _ in range(world)]
        if dist.get_backend() == "nccl":
            local_dev = local.to(hidden.device)
            gathered_dev = [torch.empty_like(local_dev) for _ in range(world)]
            collective("exchanging pair counts", layer, dist.all_gather, gathered_dev, local_dev)
            gathered = [g.cpu() for g in gathered_dev]
        else:
            collective("exchanging pair counts", layer, dist.all_gather, gathered, local)
        table = torch.stack(gathered).numpy()  # [W, E + 1]
        raw_counts, tokens = table[:, :num_experts], table[:, num_experts]

        # capacity: at most C pairs per (rank, expert), the same C on every rank (fixed shapes)
        keep = torch.ones(flat_ids.shape[0], dtype=torch.bool, device=flat_ids.device)
        capacity = None
        if rt.capacity_factor is not None:
            capacity = max(1, int(np.ceil(rt.capacity_factor * int(tokens.max()) * top_k / num_experts)))
            keep = _position_in_expert(flat_ids, num_experts) < capacity
            counts = np.minimum(raw_counts, capacity)
        else:
            counts = raw_counts
        dropped = int(raw_counts.sum() - counts.sum())

        r, estimates = rt.fixed_r(), None
        if r is None:
            if rt.links is None:
                rt.measure(hidden.device, hidden.dtype)
            r, all_est = parallel_cost.choose(counts, self.layer_shape(top_k), rt.links, rt.device_rates, self._devices())
            estimates = {e.r: e.seconds * 1e3 for e in all_est}

        if r == 0:
            out, weight_bytes, token_bytes = self._data_parallel(hidden, flat_ids, keep, expert_weights)
        else:
            layout = np.full_like(counts, capacity) if capacity is not None else counts
            out, weight_bytes, token_bytes = self._sliced(hidden, flat_ids, keep, expert_weights, r, layout)
        rt.record(CallRecord(layer, r, int(tokens.sum()), token_bytes, weight_bytes, dropped, estimates))
        return out

    # r = 0: gather every expert, compute locally (exactly moe_forward's arithmetic)
    def _data_parallel(self, hidden, flat_ids, keep, expert_weights):
        rt, shard = self.runtime, self.shard
        w = shard.stacked()  # [E, 3, S, H]
        world = rt.world_size
        num_experts = self.num_experts
        send = w.unsqueeze(0).expand(world, *w.shape).reshape(world * num_experts, *w.shape[1:])
        recv = all_to_all(send, [num_experts] * world, [num_experts] * world, "gathering expert weights", self.layer_idx)
        full = recv.view(world, *w.shape).permute(1, 2, 0, 3, 4).reshape(num_experts, 3, -1, w.shape[-1])
        ids = torch.where(keep, flat_ids, torch.full_like(flat_ids, -1)).view(expert_weights.shape)
        out = moe_forward(hidden, ids, expert_weights, GatheredExperts(full, shard.b13, shard.b2), num_experts,
                          self.shard.activation)
        return out, (world - 1) * w.numel() * w.element_size(), 0

    # r >= 1: weights of the column's experts gathered per piece; pairs to the column's r ranks and back
    def _sliced(self, hidden, flat_ids, keep, expert_weights, r, layout):
        rt, shard, layer = self.runtime, self.shard, self.layer_idx
        world, rank, num_experts = rt.world_size, rt.rank, self.num_experts
        num_columns = world // r
        col = self.columns(num_columns)  # [E]
        my_col, my_piece = rank % num_columns, rank // num_columns
        my_experts = np.flatnonzero(col == my_col)  # ascending
        slice_width = shard.slice_width
        hidden_size = shard.hidden_size
        lo = my_piece * num_columns * slice_width  # start of this rank's piece in the intermediate dim

        # weights: rank q sends its slice of expert e to rank (q // D) * D + col(e); pieces arrive by source
        weight_bytes = 0
        if num_columns > 1:
            dest = (rank // num_columns) * num_columns + col
            order = np.argsort(dest, kind="stable")
            send_counts = np.bincount(dest, minlength=world).tolist()
            recv_counts = [len(my_experts) if q // num_columns == my_piece else 0 for q in range(world)]
            send = shard.stacked(torch.from_numpy(order).to(hidden.device))
            recv = all_to_all(send, send_counts, recv_counts, "exchanging expert weight slices", layer)
            pieces = (recv.view(num_columns, len(my_experts), *send.shape[1:]).permute(1, 2, 0, 3, 4)
                      .reshape(len(my_experts), 3, num_columns * slice_width, hidden_size))
            weight_bytes = (num_experts - send_counts[rank]) * send[0].numel() * send.element_size()
            piece_of = lambda j: tuple(pieces[j])  # noqa: E731
        else:  # r = W: every rank computes its own slice of every expert, from the stored views
            views = shard.views()
            piece_of = lambda j: tuple(v[j] for v in views)  # noqa: E731

        # dispatch: pair (slot i, piece s) goes to rank s * D + col(e_i), at a row fixed by `layout`
        col_t = torch.from_numpy(col).to(flat_ids.device)
        layout_t = torch.from_numpy(layout).to(flat_ids.device)  # [W, E] rows per (sender, expert)
        slots = torch.nonzero(keep).squeeze(1)
        expert_of = flat_ids[slots]
        position = _position_in_expert(flat_ids, num_experts)[slots]
        mine = layout_t[rank]  # rows this rank sends per expert (to each of the expert's r ranks)
        # rows for dest d: the experts of column d % D in ascending order
        per_column = torch.zeros(num_columns, dtype=torch.int64, device=flat_ids.device).index_add_(0, col_t, mine)
        send_counts_t = per_column[torch.arange(world, device=flat_ids.device) % num_columns]
        dest_start = torch.cumsum(send_counts_t, 0) - send_counts_t
        # offset of expert e inside its column's block: sum of rows of lower experts of the same column
        expert_offset = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
        for c in range(num_columns):
            members = torch.nonzero(col_t == c).squeeze(1)
            expert_offset[members] = torch.cumsum(mine[members], 0) - mine[members]
        piece_idx = torch.arange(r, device=flat_ids.device)
        dest = piece_idx[None, :] * num_columns + col_t[expert_of][:, None]  # [n, r]
        rows = dest_start[dest] + (expert_offset[expert_of] + position)[:, None]  # [n, r]
        send_counts = send_counts_t.tolist()
        send = hidden.new_zeros((sum(send_counts), hidden.shape[-1]))
        send[rows.reshape(-1)] = hidden[slots // expert_weights.shape[1]].repeat_interleave(r, dim=0)

        recv_layout = layout[:, my_experts]  # [W, n_mine] rows from each sender per expert of my column
        recv_counts = recv_layout.sum(axis=1).tolist()
        received = all_to_all(send, send_counts, recv_counts, "dispatching tokens", layer)
        row_expert = np.repeat(np.tile(my_experts, world), recv_layout.reshape(-1))
        partial = torch.zeros_like(received)
        row_expert_t = torch.from_numpy(row_expert).to(received.device)
        b13, b2 = shard.b13, shard.b2
        for j, e in enumerate(my_experts.tolist()):
            idx = torch.nonzero(row_expert_t == e).squeeze(1)
            if idx.numel():
                partial[idx] = shard.piece_forward(received[idx], e, piece_of(j), lo, b13, b2)
        returned = all_to_all(partial, recv_counts, send_counts, "combining expert outputs", layer)

        out_dtype = torch.promote_types(hidden.dtype, expert_weights.dtype)
        num_tokens, top_k = expert_weights.shape
        summed = torch.zeros((num_tokens * top_k, hidden.shape[-1]), dtype=out_dtype, device=hidden.device)
        summed.index_add_(0, slots.repeat_interleave(r), returned[rows.reshape(-1)].to(out_dtype))
        out = (summed * expert_weights.reshape(-1, 1)).view(num_tokens, top_k, hidden.shape[-1]).sum(dim=1).to(hidden.dtype)
        row_bytes = hidden.shape[-1] * hidden.element_size()
        to_others = sum(send_counts) - send_counts[rank]
        back_to_others = sum(recv_counts) - recv_counts[rank]
        return out, weight_bytes, (to_others + back_to_others) * row_bytes


def _position_in_expert(flat_ids: Tensor, num_experts: int) -> Tensor:
    """For each slot, how many earlier slots chose the same expert (0 for the first)."""
    ids = flat_ids.clamp(0, num_experts - 1)
    sorted_ids, order = torch.sort(ids, stable=True)
    counts = torch.bincount(sorted_ids, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(ids)
    position[order] = torch.arange(ids.numel(), device=ids.device) - starts[sorted_ids]
    return position


def build_runtime(layers: list, setting: str | int, *, placement: Placement | None = None,
                  capacity_factor: float | None = None) -> ParallelRuntime:
    """Join the process group, shard every layer's experts and attach the parallel path to the layers."""
    runtime = ParallelRuntime(setting, placement=placement, capacity_factor=capacity_factor)
    for layer in layers:
        valid = runtime.valid_rs(layer.expert_source.intermediate_size)
        if not valid:
            raise ConfigError(
                f"MoEConfig.parallel: MoE layer {layer.layer_idx} has intermediate size "
                f"{layer.expert_source.intermediate_size}, not divisible by the world size {runtime.world_size}"
            )
    # every layer was checked above: cutting the slices cannot fail half-way on a shape
    shards = [ExpertShard.from_source(layer.expert_source, runtime.rank, runtime.world_size) for layer in layers]
    for layer, shard in zip(layers, shards):
        layer.parallel = ParallelExperts(runtime, layer.layer_idx, shard)
        if shard.in_place:  # the layer's expert source now reads this rank's slice
            layer.expert_source = ModuleExperts(shard.module, shard.activation)
    return runtime


def release(layers: list) -> None:
    """Collective (every rank calls it): detach the parallel path from `layers` and put the full
    expert weights back into the experts modules that were cut in place (an all-gather per layer:
    exact, and the memory of the full weights again on every rank)."""
    for layer in layers:
        if getattr(layer, "parallel", None) is None:
            continue
        shard = layer.parallel.shard
        if shard.in_place:
            shard.gather_full(layer.layer_idx)
        layer.expert_source = shard.source
        layer.parallel = None
