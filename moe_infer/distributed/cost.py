"""Cost model of one MoE layer call under each sharding factor r (used by `parallel="auto"`
and by `scripts/parallel_scale_table.py`).

Owns the arithmetic only (numpy, no torch.distributed): which ranks compute which expert pieces
for a given r (the same rule `moe_infer.distributed.parallel` executes), how many bytes each rank sends and
receives, how many FLOPs and weight bytes each rank computes on, and the resulting time estimate
under stated link bandwidths. It does not measure anything; `moe_infer.distributed.parallel` measures the
bandwidths of the running job and passes them in as `Links`/`Device`.

Shape legend: W ranks, E experts, H hidden, I intermediate (per expert), K top-k.

Semantics of r (Tutel's adaptive r, on the layout "rank p holds intermediate slice p of every
expert"):
- r = 0: data parallel; every rank gathers every expert and computes its own tokens.
- r >= 1 dividing W: D = W / r columns; rank p is in column p % D and computes piece s = p // D
  (intermediate slices [s*D, (s+1)*D)) of the experts placed in its column; each (token, expert)
  pair goes to the r ranks of its expert's column. r = 1: expert parallel; r = W: tensor-sliced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from moe_infer.errors import ConfigError


@dataclass(frozen=True)
class Links:
    """Per-rank link bandwidths (bytes/s, one direction) and per-collective latency (s).

    Ranks `ranks_per_node` at a time share a node: traffic between them uses `intra_bw` (NVLink),
    traffic to other nodes `inter_bw` (InfiniBand); both links run at the same time.
    """

    intra_bw: float
    inter_bw: float
    ranks_per_node: int
    latency_s: float = 20e-6


@dataclass(frozen=True)
class Device:
    """Compute rate (FLOP/s) and memory bandwidth (bytes/s) of one rank."""

    flops: float
    mem_bw: float


@dataclass(frozen=True)
class LayerShape:
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    elem_bytes: int  # bytes per element of activations and weights

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size * self.elem_bytes


@dataclass(frozen=True)
class Estimate:
    """Expected cost of one layer call for one r (maxima over ranks; bytes per rank)."""

    r: int
    seconds: float
    comm_seconds: float
    compute_seconds: float
    token_bytes: int  # largest bytes of tokens + partial outputs one rank sends (excluding to itself)
    weight_bytes: int  # largest bytes of weight slices one rank sends


def valid_rs(world_size: int, intermediate_size: int) -> list[int]:
    """0 (data parallel) and every divisor of W (the layout needs I divisible by W)."""
    return [0] + [r for r in range(1, world_size + 1) if world_size % r == 0] if intermediate_size % world_size == 0 else []


def default_columns(num_experts: int, num_columns: int) -> np.ndarray:
    """Column of each expert without a placement plan: contiguous blocks, as expert parallelism does."""
    return (np.arange(num_experts) * num_columns) // num_experts


def columns_from_devices(devices: np.ndarray, num_columns: int) -> np.ndarray:
    """Column of each expert given its planned rank: the planned rank is one of the expert's r ranks."""
    return np.asarray(devices) % num_columns


def _pair_seconds(pair_bytes: np.ndarray, links: Links) -> tuple[float, int]:
    """Time of one all-to-all with `pair_bytes` [W, W] (sender, receiver), and the largest bytes a
    rank sends to others. Each rank's intra- and inter-node traffic move in parallel; a rank is done
    when both its sending and its receiving are done."""
    world = pair_bytes.shape[0]
    pb = pair_bytes.astype(np.float64).copy()
    np.fill_diagonal(pb, 0.0)
    node = np.arange(world) // links.ranks_per_node
    same = node[:, None] == node[None, :]
    times = []
    for axis in (1, 0):  # send, receive
        intra = np.where(same, pb, 0.0).sum(axis=axis)
        inter = np.where(same, 0.0, pb).sum(axis=axis)
        times.append(np.maximum(intra / links.intra_bw, inter / links.inter_bw))
    seconds = float(np.max(np.maximum(times[0], times[1]))) if world > 1 else 0.0
    return seconds, int(pb.sum(axis=1).max()) if world > 1 else 0


def estimate(r: int, counts: np.ndarray, shape: LayerShape, links: Links, device: Device,
             devices: np.ndarray | None = None) -> Estimate:
    """Cost of one layer call with sharding factor r.

    `counts` [W, E]: (token, expert) pairs each rank routes to each expert in this call.
    `devices` [E]: planned rank of each expert (a placement plan), or None for contiguous blocks.
    """
    counts = np.asarray(counts, dtype=np.float64)
    world, num_experts = counts.shape
    h, i_size, b = shape.hidden_size, shape.intermediate_size, shape.elem_bytes
    slice_bytes = 3 * h * (i_size // world) * b  # one rank's slice of one expert
    flops_per_pair_full = 6.0 * h * i_size  # three matmuls of 2*H*I FLOPs
    if r == 0:
        weight_pairs = np.full((world, world), num_experts * slice_bytes, dtype=np.float64)
        weight_s, weight_bytes = _pair_seconds(weight_pairs, links)
        token_s, token_bytes = 0.0, 0
        flops = counts.sum(axis=1) * flops_per_pair_full
        mem = np.where(counts.sum(axis=1) > 0, num_experts * shape.expert_bytes, 0)
        collectives = 2  # counts, weights
    else:
        num_columns = world // r
        cols = (columns_from_devices(devices, num_columns) if devices is not None
                else default_columns(num_experts, num_columns))
        onehot = np.zeros((num_experts, num_columns))
        onehot[np.arange(num_experts), cols] = 1.0
        to_column = counts @ onehot  # [W, D] pairs each rank sends to each column
        # every rank of column c (ranks c, c + D, ...) receives a copy of the pair
        row_bytes = h * b
        token_pairs = to_column[:, np.arange(world) % num_columns] * row_bytes  # [W, W]
        dispatch_s, dispatch_bytes = _pair_seconds(token_pairs, links)
        combine_s, combine_bytes = _pair_seconds(token_pairs.T, links)  # partial outputs come back
        token_s, token_bytes = dispatch_s + combine_s, dispatch_bytes + combine_bytes
        if num_columns > 1:
            # rank q sends its slice of expert e to rank (q // D) * D + col(e)
            per_column = onehot.sum(axis=0)  # experts per column
            block = np.arange(world) // num_columns
            same_block = block[:, None] == block[None, :]
            weight_pairs = np.where(same_block, per_column[np.arange(world) % num_columns][None, :], 0.0) * slice_bytes
            weight_s, weight_bytes = _pair_seconds(weight_pairs, links)
        else:
            weight_s, weight_bytes = 0.0, 0
        column_pairs = counts.sum(axis=0) @ onehot  # [D] pairs computed by each column
        rank_pairs = column_pairs[np.arange(world) % num_columns]
        flops = rank_pairs * flops_per_pair_full / r
        used = (counts.sum(axis=0) > 0).astype(np.float64) @ onehot  # experts with work per column
        mem = used[np.arange(world) % num_columns] * shape.expert_bytes / r
        collectives = 2 + (3 if num_columns > 1 else 2)  # counts, [weights], dispatch, combine
    compute = np.maximum(flops / device.flops, mem / device.mem_bw)
    compute_s = float(compute.max())
    comm_s = token_s + weight_s + (collectives * links.latency_s if world > 1 else 0.0)
    return Estimate(r, comm_s + compute_s, comm_s, compute_s, int(token_bytes), int(weight_bytes))


def choose(counts: np.ndarray, shape: LayerShape, links: Links, device: Device,
           devices: np.ndarray | None = None, candidates: list[int] | None = None) -> tuple[int, list[Estimate]]:
    """The r with the smallest estimate (ties: the larger r, which moves fewer weights) and all estimates."""
    world = np.asarray(counts).shape[0]
    rs = candidates if candidates is not None else valid_rs(world, shape.intermediate_size)
    if not rs:
        raise ConfigError(f"no valid sharding factor: intermediate size {shape.intermediate_size} is not "
                         f"divisible by the world size {world}")
    estimates = [estimate(r, counts, shape, links, device, devices) for r in rs]
    best = min(estimates, key=lambda est: (est.seconds, -est.r))
    return best.r, estimates


def balanced_counts(world_size: int, tokens_per_rank: int, num_experts: int, top_k: int,
                    skew: float = 0.0) -> np.ndarray:
    """Expected [W, E] pair counts: every rank routes `tokens_per_rank * top_k` pairs over the experts
    with Zipf-like popularity (skew 0 = uniform), the same distribution on every rank."""
    weights = 1.0 / np.power(np.arange(1, num_experts + 1, dtype=np.float64), skew)
    weights /= weights.sum()
    row = weights * tokens_per_rank * top_k
    return np.tile(row, (world_size, 1))


__all__ = ["Device", "Estimate", "LayerShape", "Links", "balanced_counts", "choose", "columns_from_devices",
           "default_columns", "estimate", "valid_rs"]
