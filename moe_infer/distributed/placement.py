"""Expert placement across devices from a routing trace (ExFlow-style affinity placement).

This module owns: the inter-layer affinity of experts measured on a trace, the `PlacementPlan`
(which device holds which expert of which MoE layer, replicas included) with its file format,
the planner `plan()` (exact integer programming with `scipy.optimize.milp` where the problem is
small enough, block-coordinate ascent with exact per-layer assignment beyond), the baselines it is
measured against (round-robin, load-only balancing). The search itself, over the trace's count
arrays, is `placement_solver.py`. It does not move weights or dispatch tokens:
the cache and the parallel executor consume plans. The trace counts it plans from (`affinity`,
`expert_load`) and the `static` policy's hot set live in `moe_infer.traces.popularity`.

Shape legend: N tokens, L MoE layers (positions in ``trace.moe_layers``), K top-k, E experts per
layer, D devices.

Cross-device rate. A token routed to expert ``a`` at MoE layer ``l`` and to expert ``b`` at layer
``l + 1`` sends its activation from ``a``'s device to ``b``'s. Each token contributes K x K such
(a, b) pairs per pair of consecutive MoE layers; the cross-device rate is the fraction of all these
pairs whose experts share no device. With replicas a pair is local when some device holds both
experts (the dispatcher sends the token to that replica). ``affinity(trace)[l, a, b]`` counts the
pairs, so the rate of a placement is linear in it, which is what makes the integer program exact.

File format (``save`` / ``load``; safetensors, no pickle): tensors ``devices`` int32 [L, E] (the
primary device of each expert) and ``holds`` uint8 [L, E, D] (1 where a device holds a copy of the
expert; the primary included); string metadata ``format`` = "moe_infer.placement/1",
``num_devices``, ``num_experts``, ``capacity`` (expert slots per device and MoE layer),
``moe_layers`` (JSON list of decoder-layer indices), ``method``, ``model``, and ``stats`` (JSON:
expected cross-device rate and per-device load of the planning trace).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from moe_infer.files import save_safetensors
from moe_infer.traces.popularity import affinity, expert_load, hot_set  # noqa: F401 (hot_set: moe_infer.placement's name)
from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError, MissingFile
from moe_infer.distributed.placement_solver import _Problem, _cross_rate, _device_load, _holds, _load_only, _replicate

FORMAT = "moe_infer.placement/1"
METHODS = ("auto", "milp", "heuristic", "load", "round-robin")
# integer programs up to this many variables go to scipy's HiGHS (with the time limit; its LP relaxation is
# weak, so beyond a few hundred variables it rarely proves optimality); larger ones use the heuristic only
MILP_MAX_VARIABLES = 800


# ----------------------------------------------------------------------------- the plan

@dataclass(eq=False)
class PlacementPlan:
    """Which device holds each expert of each MoE layer.

    ``devices`` int [L, E] is the primary device of every expert; ``holds`` bool [L, E, D] marks
    every device holding a copy (replicas of hot experts; the primary included).
    """

    devices: np.ndarray  # [L, E] int
    holds: np.ndarray  # [L, E, D] bool
    moe_layers: tuple[int, ...]
    num_devices: int
    capacity: int  # expert slots per device and MoE layer
    method: str = ""
    model: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.devices = np.asarray(self.devices, dtype=np.int64)
        self.holds = np.asarray(self.holds, dtype=bool)
        self.moe_layers = tuple(int(layer) for layer in self.moe_layers)
        _check_positive_int("num_devices", self.num_devices)
        _check_positive_int("capacity", self.capacity)
        num_layers, num_experts = self.devices.shape if self.devices.ndim == 2 else (None, None)
        if num_layers is None or num_layers != len(self.moe_layers):
            raise ConfigError(f"devices must be [L, E] with L = {len(self.moe_layers)} MoE layers, "
                             f"got shape {list(self.devices.shape)}")
        if self.holds.shape != (num_layers, num_experts, self.num_devices):
            raise ConfigError(f"holds must be [L, E, D] = {[num_layers, num_experts, self.num_devices]}, "
                             f"got {list(self.holds.shape)}")
        if self.devices.size and (self.devices.min() < 0 or self.devices.max() >= self.num_devices):
            raise ConfigError(f"devices must be in [0, {self.num_devices}), got values in "
                             f"[{self.devices.min()}, {self.devices.max()}]")
        primary = np.take_along_axis(self.holds, self.devices[..., None], axis=2)
        if not primary.all():
            raise ConfigError("holds must mark the primary device of every expert")
        slots = self.holds.sum(axis=1).max() if self.holds.size else 0
        if slots > self.capacity:
            raise ConfigError(f"a device holds {slots} experts of one layer, more than capacity={self.capacity}")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise ConfigError(f"moe_layers has duplicates: {list(self.moe_layers)}")
        self._position = {layer: index for index, layer in enumerate(self.moe_layers)}

    @property
    def num_experts(self) -> int:
        return self.devices.shape[1]

    def _layer_position(self, layer: int) -> int:
        if layer not in self._position:
            raise KeyError(f"layer {layer} is not a MoE layer of this plan; MoE layers are {list(self.moe_layers)}")
        return self._position[layer]

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise KeyError(f"expert {expert} out of range [0, {self.num_experts})")

    def device_of(self, layer: int, expert: int) -> int:
        """The primary device of ``expert`` of decoder layer ``layer``."""
        self._check_expert(expert)
        return int(self.devices[self._layer_position(layer), expert])

    def devices_of(self, layer: int, expert: int) -> list[int]:
        """Every device holding ``expert`` of decoder layer ``layer`` (primary first)."""
        self._check_expert(expert)
        position = self._layer_position(layer)
        primary = int(self.devices[position, expert])
        return [primary] + [d for d in np.flatnonzero(self.holds[position, expert]).tolist() if d != primary]

    def experts_on(self, layer: int, device: int) -> list[int]:
        """The experts of decoder layer ``layer`` that ``device`` holds (replicas included)."""
        if not 0 <= device < self.num_devices:
            raise KeyError(f"device {device} out of range [0, {self.num_devices})")
        return np.flatnonzero(self.holds[self._layer_position(layer), :, device]).tolist()

    def num_replicas(self) -> int:
        """Copies beyond the primary ones, over all layers."""
        return int(self.holds.sum() - self.devices.size)

    def cross_device_rate(self, trace: Trace) -> float:
        """Fraction of the (expert at l, expert at l + 1) pairs of ``trace``'s tokens that no device
        holds together (module docstring)."""
        self._check_trace(trace)
        return _cross_rate(affinity(trace), self.holds)

    def device_load(self, trace: Trace) -> np.ndarray:
        """(token, k) pairs each device computes per MoE layer: float64 [L, D]; a replicated expert's
        pairs are split evenly between its copies."""
        self._check_trace(trace)
        return _device_load(expert_load(trace), self.holds)

    def _check_trace(self, trace: Trace) -> None:
        if trace.num_experts != self.num_experts or tuple(trace.moe_layers) != self.moe_layers:
            raise ConfigError(f"trace has {trace.num_experts} experts on MoE layers {list(trace.moe_layers)}, "
                             f"the plan {self.num_experts} on {list(self.moe_layers)}")

    # -- files
    def save(self, path: str | os.PathLike) -> None:
        """Write the plan (module docstring); atomic: a temporary file renamed at the end."""
        path = Path(path)
        metadata = {
            "format": FORMAT,
            "num_devices": str(self.num_devices),
            "num_experts": str(self.num_experts),
            "capacity": str(self.capacity),
            "moe_layers": json.dumps(list(self.moe_layers)),
            "method": self.method,
            "model": self.model,
            "stats": json.dumps(self.stats),
        }
        tensors = {
            "devices": torch.from_numpy(self.devices.astype(np.int32)),
            "holds": torch.from_numpy(self.holds.astype(np.uint8)),
        }
        save_safetensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PlacementPlan:
        """Read and validate a plan written by ``save``; every error names ``path``."""
        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"{path}: no such placement plan file")
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                names = set(file.keys())
                if metadata.get("format") != FORMAT:
                    raise ConfigError(f"{path}: not a placement plan (format {metadata.get('format')!r}, "
                                     f"expected {FORMAT!r})")
                if names != {"devices", "holds"}:
                    raise ConfigError(f"{path}: expected tensors devices and holds, got {sorted(names)}")
                devices = file.get_tensor("devices")
                holds = file.get_tensor("holds")
        except SafetensorError as error:
            raise ConfigError(f"{path}: truncated or not a safetensors file ({error})") from error
        if devices.dtype != torch.int32 or holds.dtype != torch.uint8:
            raise ConfigError(f"{path}: devices must be int32 and holds uint8, got {devices.dtype} and {holds.dtype}")
        try:
            num_experts = int(metadata["num_experts"])
            plan = cls(devices=devices.numpy(), holds=holds.numpy().astype(bool),
                       moe_layers=json.loads(metadata["moe_layers"]), num_devices=int(metadata["num_devices"]),
                       capacity=int(metadata["capacity"]), method=metadata.get("method", ""),
                       model=metadata.get("model", ""), stats=json.loads(metadata.get("stats", "{}")))
        except (KeyError, ValueError, TypeError) as error:
            raise ConfigError(f"{path}: bad placement plan ({error})") from error
        if plan.num_experts != num_experts:
            raise ConfigError(f"{path}: metadata num_experts={num_experts} but devices has {plan.num_experts} columns")
        return plan

    def __repr__(self) -> str:
        return (f"PlacementPlan(devices={self.num_devices}, moe_layers={len(self.moe_layers)}, "
                f"experts={self.num_experts}, capacity={self.capacity}, replicas={self.num_replicas()}, "
                f"method={self.method!r})")


# ----------------------------------------------------------------------------- planning

def plan(trace: Trace, num_devices: int, *, capacity: int | None = None, method: str = "auto",
         load_tolerance: float = 0.1, replicas: int = 0, time_limit: float = 10.0,
         restarts: int = 32, seed: int = 0) -> PlacementPlan:
    """Assign every expert of every MoE layer to one of ``num_devices`` devices so that a token's
    consecutive layers' experts tend to share a device (fewest cross-device pairs), with at most
    ``capacity`` experts per device and layer (default: as even as possible) and, per layer, no
    device computing more than ``max((1 + load_tolerance) * mean, the load-only balancer's
    maximum)`` of the trace's (token, k) pairs.

    ``method``: "milp" (exact, `scipy.optimize.milp`; refused above ``MILP_MAX_VARIABLES``
    variables), "heuristic" (greedy start + block-coordinate ascent, each layer's assignment
    solved exactly given its neighbours, ``restarts`` starts), "auto" (both where the program is
    small enough, keeping the better; the heuristic alone beyond; the ascent also renames the devices
    of all layers after a layer boundary when that aligns co-routed groups), and the baselines "load"
    (per-layer longest-processing-time balancing, affinity ignored) and "round-robin" (expert e on
    device e mod D). ``replicas``: extra copies of the hottest experts per layer (DeepSeek EPLB:
    each copy goes to the hottest expert per copy), placed where they save the most pairs.
    """
    _check_positive_int("num_devices", num_devices)
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: allowed values are {', '.join(map(repr, METHODS))}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ConfigError(f"replicas={replicas!r}: expected an int >= 0 (extra expert copies per layer)")
    if not (isinstance(load_tolerance, (int, float)) and load_tolerance >= 0):
        raise ConfigError(f"load_tolerance={load_tolerance!r}: expected a number >= 0")
    if trace.num_tokens == 0:
        raise ConfigError("plan needs a trace with at least one token")
    num_experts = trace.num_experts
    slots_needed = num_experts + replicas
    if capacity is None:
        capacity = math.ceil(slots_needed / num_devices)
    _check_positive_int("capacity", capacity)
    if capacity * num_devices < slots_needed:
        raise ConfigError(f"capacity={capacity} expert slots x {num_devices} devices cannot hold {num_experts} "
                         f"experts + {replicas} replicas per layer; need capacity >= "
                         f"{math.ceil(slots_needed / num_devices)}")
    if replicas > num_experts * (num_devices - 1):
        raise ConfigError(f"replicas={replicas}: at most {num_experts * (num_devices - 1)} extra copies fit "
                         f"({num_experts} experts on {num_devices} devices)")

    pair_counts = affinity(trace)  # [L-1, E, E]
    load = expert_load(trace)  # [L, E]
    # primary copies get the slots not reserved for replicas, as evenly as capacity allows
    primary_capacity = min(capacity, max(math.ceil(num_experts / num_devices), capacity - replicas // num_devices))
    started = time.perf_counter()
    baseline = _load_only(load, num_devices, primary_capacity)
    bound = np.maximum((1.0 + load_tolerance) * load.sum(axis=1) / num_devices,
                       _device_load(load, _holds(baseline, num_devices)).max(axis=1))  # [L]
    problem = _Problem(pair_counts, load, num_devices, primary_capacity, bound)

    if method == "round-robin":
        devices, used = np.tile(np.arange(num_experts) % num_devices, (trace.num_layers, 1)), "round-robin"
        if capacity < math.ceil(num_experts / num_devices):
            raise ConfigError(f"round-robin needs capacity >= {math.ceil(num_experts / num_devices)}")
    elif method == "load":
        devices, used = baseline, "load"
    else:
        devices, used = None, ""
        variables = problem.milp_variables()
        if method == "milp" and variables > MILP_MAX_VARIABLES:
            raise ConfigError(f"method='milp': the integer program has {variables} variables, more than "
                             f"{MILP_MAX_VARIABLES}; use method='heuristic' or 'auto'")
        if method in ("milp", "auto") and variables <= MILP_MAX_VARIABLES:
            devices, used = problem.solve_milp(time_limit)
        if method in ("heuristic", "auto"):
            heuristic = problem.solve_heuristic(restarts, seed, start=baseline)
            if devices is None or problem.local_pairs(heuristic) > problem.local_pairs(devices):
                devices, used = heuristic, ("heuristic" if devices is None else "heuristic (better than " + used + ")")
        if devices is None:
            raise RuntimeError("milp found no feasible placement")  # cannot happen: the baseline is feasible
    holds = _holds(devices, num_devices)
    if replicas:
        holds = _replicate(holds, pair_counts, load, replicas, capacity, problem.bound)
    result = PlacementPlan(devices=devices, holds=holds, moe_layers=trace.moe_layers, num_devices=num_devices,
                           capacity=capacity, method=used, model=trace.model)
    device_load = _device_load(load, holds)
    result.stats = {
        "cross_device_rate": _cross_rate(pair_counts, holds),
        "load_imbalance": float((device_load.max(axis=1) / (load.sum(axis=1) / num_devices)).max()),
        "replicas": result.num_replicas(),
        "planning_seconds": round(time.perf_counter() - started, 3),
        "trace_tokens": trace.num_tokens,
    }
    return result


def round_robin_plan(trace: Trace, num_devices: int) -> PlacementPlan:
    """Baseline: expert e of every layer on device e mod D."""
    return plan(trace, num_devices, method="round-robin")


def load_balanced_plan(trace: Trace, num_devices: int) -> PlacementPlan:
    """Baseline: per-layer load balancing only (longest processing time first), affinity ignored."""
    return plan(trace, num_devices, method="load")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name}={value!r}: expected a positive int")
