"""The search behind `placement.plan`: placing experts on devices over a trace's count arrays.

Owns `_Problem` (maximise the consecutive-layer pairs whose experts share a device, under each
layer's capacity and load bound: the exact integer program with `scipy.optimize.milp`, and the
greedy start plus block-coordinate ascent with exact per-layer assignment), the load-only
baseline (`_load_only`), replica placement (`_replicate`, DeepSeek EPLB) and the measures of a
placement (`_holds`, `_cross_rate`, `_device_load`). Everything here works on numpy arrays
(`affinity` [L-1, E, E], `expert_load` [L, E]); the `PlacementPlan`, its file format and the
checks on `plan`'s arguments are `placement.py`.

Shape legend: L MoE layers, E experts per layer, D devices.
"""

from __future__ import annotations

import numpy as np

def _holds(devices: np.ndarray, num_devices: int) -> np.ndarray:
    return np.eye(num_devices, dtype=bool)[devices]  # [L, E, D]


def _cross_rate(pair_counts: np.ndarray, holds: np.ndarray) -> float:
    total = pair_counts.sum()
    if total == 0:
        return 0.0
    local = 0.0
    for l in range(pair_counts.shape[0]):
        together = (holds[l].astype(np.float64) @ holds[l + 1].T.astype(np.float64)) > 0  # [E, E]
        local += pair_counts[l][together].sum()
    return float(1.0 - local / total)


def _device_load(load: np.ndarray, holds: np.ndarray) -> np.ndarray:
    copies = holds.sum(axis=2)  # [L, E]
    return np.einsum("le,led->ld", load / copies, holds.astype(np.float64))


def _load_only(load: np.ndarray, num_devices: int, capacity: int) -> np.ndarray:
    """Longest processing time first, per layer: the hottest expert to the least loaded device with a
    free slot. [L, E]."""
    num_layers, num_experts = load.shape
    devices = np.zeros((num_layers, num_experts), dtype=np.int64)
    for l in range(num_layers):
        totals, counts = np.zeros(num_devices), np.zeros(num_devices, dtype=np.int64)
        for e in np.argsort(-load[l], kind="stable"):
            free = np.flatnonzero(counts < capacity)
            d = free[np.argmin(totals[free])]
            devices[l, e] = d
            totals[d] += load[l, e]
            counts[d] += 1
    return devices


class _Problem:
    """One placement problem: maximise the pairs whose experts share a device (no replicas)."""

    def __init__(self, pair_counts: np.ndarray, load: np.ndarray, num_devices: int, capacity: int,
                 bound: np.ndarray):
        self.pair_counts = pair_counts  # [L-1, E, E]
        self.load = load  # [L, E]
        self.num_layers, self.num_experts = load.shape
        self.num_devices = num_devices
        self.capacity = capacity
        self.bound = bound * (1 + 1e-9)  # [L] max load per device and layer

    def local_pairs(self, devices: np.ndarray) -> float:
        return float(sum(self.pair_counts[l][devices[l][:, None] == devices[l + 1][None, :]].sum()
                         for l in range(self.num_layers - 1)))

    def feasible(self, devices: np.ndarray, l: int) -> bool:
        totals = np.bincount(devices[l], weights=self.load[l], minlength=self.num_devices)
        counts = np.bincount(devices[l], minlength=self.num_devices)
        return bool((totals <= self.bound[l]).all() and (counts <= self.capacity).all())

    # -- exact: mixed-integer linear program
    def milp_variables(self) -> int:
        pairs = int((self.pair_counts > 0).sum())
        return (self.num_layers * self.num_experts + pairs) * self.num_devices

    def solve_milp(self, time_limit: float) -> tuple[np.ndarray | None, str]:
        """x[l, e, d] binary (expert e of layer l on device d); z[p, d] in [0, 1] for every pair p = (l, a, b)
        with a count, z <= x[l, a, d], z <= x[l + 1, b, d]; maximise sum count * z."""
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix

        L, E, D = self.num_layers, self.num_experts, self.num_devices
        num_x = L * E * D

        def x_index(l, e, d):
            return (l * E + e) * D + d

        pairs = [(l, a, b, self.pair_counts[l, a, b]) for l in range(L - 1)
                 for a, b in zip(*np.nonzero(self.pair_counts[l]))]
        num_vars = num_x + len(pairs) * D
        cost = np.zeros(num_vars)
        rows, cols, vals, lower, upper = [], [], [], [], []

        def constraint(entries, lo, hi):
            row = len(lower)
            for col, val in entries:
                rows.append(row)
                cols.append(col)
                vals.append(val)
            lower.append(lo)
            upper.append(hi)

        for l in range(L):
            for e in range(E):  # every expert on exactly one device
                constraint([(x_index(l, e, d), 1.0) for d in range(D)], 1, 1)
            for d in range(D):  # memory and load per device
                constraint([(x_index(l, e, d), 1.0) for e in range(E)], 0, self.capacity)
                constraint([(x_index(l, e, d), self.load[l, e]) for e in range(E)], 0, self.bound[l])
        for p, (l, a, b, count) in enumerate(pairs):
            for d in range(D):
                z = num_x + p * D + d
                cost[z] = -count
                constraint([(z, 1.0), (x_index(l, a, d), -1.0)], -np.inf, 0)
                constraint([(z, 1.0), (x_index(l + 1, b, d), -1.0)], -np.inf, 0)
        # devices are interchangeable: relabel them in order of first use by the first layer's experts,
        # so expert e of that layer uses one of devices 0..e (removes the D! symmetric copies)
        lower_bounds, upper_bounds = np.zeros(num_vars), np.ones(num_vars)
        for e in range(min(E, D)):
            for d in range(e + 1, D):
                upper_bounds[x_index(0, e, d)] = 0
        matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), num_vars)).tocsr()
        integrality = np.zeros(num_vars)
        integrality[:num_x] = 1
        result = milp(cost, constraints=LinearConstraint(matrix, lower, upper), integrality=integrality,
                      bounds=Bounds(lower_bounds, upper_bounds),
                      options={"time_limit": time_limit, "disp": False})
        if result.x is None:
            return None, ""
        x = result.x[:num_x].reshape(L, E, D)
        status = "milp (optimal)" if result.status == 0 else "milp (time limit, best found)"
        return np.argmax(x, axis=2).astype(np.int64), status

    # -- heuristic: greedy start, then block-coordinate ascent over layers
    def layer_gain(self, devices: np.ndarray, l: int, *, forward_only: bool = False) -> np.ndarray:
        """Pairs expert e of layer l would share with its neighbour layers (only the layer before
        with ``forward_only``) on device d: [E, D]."""
        gain = np.zeros((self.num_experts, self.num_devices))
        one_hot = np.eye(self.num_devices)
        if l > 0:
            gain += self.pair_counts[l - 1].T @ one_hot[devices[l - 1]]
        if l < self.num_layers - 1 and not forward_only:
            gain += self.pair_counts[l] @ one_hot[devices[l + 1]]
        return gain

    def best_layer(self, devices: np.ndarray, l: int, *, forward_only: bool = False) -> np.ndarray:
        """The assignment of layer l that shares the most pairs with its neighbours (exact, by
        linear assignment of experts to device slots), repaired for load if needed."""
        from scipy.optimize import linear_sum_assignment

        gain = self.layer_gain(devices, l, forward_only=forward_only)
        slots = np.repeat(np.arange(self.num_devices), self.capacity)
        rows, cols = linear_sum_assignment(-gain[:, slots])
        candidate = devices.copy()
        candidate[l, rows] = slots[cols]
        if not self.feasible(candidate, l):
            candidate[l] = self.repair_load(candidate[l], l, gain)
        return candidate[l]

    def repair_load(self, assignment: np.ndarray, l: int, gain: np.ndarray) -> np.ndarray:
        """Moves and swaps that bring every device under the load bound, cheapest in pairs first;
        the load-only assignment when they cannot."""
        assignment = assignment.copy()
        load = self.load[l]
        for _ in range(self.num_experts * self.num_devices):
            totals = np.bincount(assignment, weights=load, minlength=self.num_devices)
            counts = np.bincount(assignment, minlength=self.num_devices)
            hot = int(np.argmax(totals - self.bound[l]))
            if totals[hot] <= self.bound[l]:
                return assignment
            best, best_loss = None, np.inf
            for e in np.flatnonzero(assignment == hot):
                for d in range(self.num_devices):
                    if d == hot:
                        continue
                    if counts[d] < self.capacity and totals[d] + load[e] <= self.bound[l]:
                        loss = gain[e, hot] - gain[e, d]
                        if loss < best_loss:
                            best, best_loss = (e, d, None), loss
                    for other in np.flatnonzero(assignment == d):
                        if load[other] < load[e] and totals[d] + load[e] - load[other] <= self.bound[l]:
                            loss = gain[e, hot] + gain[other, d] - gain[e, d] - gain[other, hot]
                            if loss < best_loss:
                                best, best_loss = (e, d, other), loss
            if best is None:
                break
            e, d, other = best
            assignment[e] = d
            if other is not None:
                assignment[other] = hot
        return _load_only(load[None], self.num_devices, self.capacity)[0]

    def relabel_after(self, devices: np.ndarray, l: int) -> np.ndarray:
        """Rename the devices of layers l+1.. (a permutation: memory and load stay the same) so that
        the groups of layer l and l+1 that share the most pairs get the same device; a move of whole
        groups that one-layer steps cannot make."""
        from scipy.optimize import linear_sum_assignment

        one_hot = np.eye(self.num_devices)
        shared = one_hot[devices[l]].T @ self.pair_counts[l] @ one_hot[devices[l + 1]]  # [D, D]
        rows, cols = linear_sum_assignment(-shared)
        rename = np.empty(self.num_devices, dtype=np.int64)
        rename[cols] = rows  # layer l+1 device cols[i] becomes rows[i]
        if shared[rows, cols].sum() <= np.trace(shared) + 1e-9:
            return devices
        relabelled = devices.copy()
        relabelled[l + 1:] = rename[devices[l + 1:]]
        return relabelled

    def solve_heuristic(self, restarts: int, seed: int, *, start: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(seed)
        best, best_value = start, self.local_pairs(start)
        for restart in range(max(restarts, 1)):
            devices = start.copy()
            if restart > 0:
                devices[0] = rng.permutation(np.repeat(np.arange(self.num_devices), self.capacity))[: self.num_experts]
                if not self.feasible(devices, 0):
                    devices[0] = start[0]
            # greedy: each layer placed to follow the one before it
            for l in range(1, self.num_layers):
                devices[l] = self.best_layer(devices, l, forward_only=True)
            value = self.local_pairs(devices)
            for _ in range(50):  # block-coordinate ascent: every layer re-solved given both neighbours
                for l in list(range(self.num_layers)) + list(range(self.num_layers - 2, 0, -1)):
                    candidate = devices.copy()
                    candidate[l] = self.best_layer(devices, l)
                    if self.local_pairs(candidate) > self.local_pairs(devices) + 1e-9:
                        devices = candidate
                for l in range(self.num_layers - 1):
                    devices = self.relabel_after(devices, l)
                new_value = self.local_pairs(devices)
                if new_value <= value + 1e-9:
                    break
                value = new_value
            if value > best_value:
                best, best_value = devices, value
        return best


def _replicate(holds: np.ndarray, pair_counts: np.ndarray, load: np.ndarray, replicas: int,
               capacity: int, bound: np.ndarray) -> np.ndarray:
    """EPLB: each extra copy goes to the expert with the most load per copy. Among the devices with a
    free slot that do not hold it yet, those where the layer's busiest device stays under
    max(load bound, its current load) are eligible (else the candidate that keeps the busiest device
    least loaded: greedy, so the bound can be exceeded slightly when slots force the choice); of
    these, the one sharing the most pairs with the neighbour layers gets the copy."""
    holds = holds.copy()
    num_layers, num_experts, num_devices = holds.shape
    for l in range(num_layers):
        gain = np.zeros((num_experts, num_devices))
        if l > 0:
            gain += pair_counts[l - 1].T @ holds[l - 1].astype(np.float64)
        if l < num_layers - 1:
            gain += pair_counts[l] @ holds[l + 1].astype(np.float64)
        for _ in range(replicas):
            copies = holds[l].sum(axis=1)  # [E]
            free = holds[l].sum(axis=0) < capacity  # [D]
            device_load = _device_load(load[l:l + 1], holds[l:l + 1])[0]  # [D]
            for e in np.argsort(-(load[l] / copies), kind="stable"):
                candidates = np.flatnonzero(free & ~holds[l, e])
                if not len(candidates):
                    continue
                # with one more copy, each holder's share of e drops from load/c to load/(c+1)
                relieved = device_load - holds[l, e] * (load[l, e] / copies[e] - load[l, e] / (copies[e] + 1))
                busiest = np.array([max(np.delete(relieved, d).max(initial=0.0), relieved[d] + load[l, e] / (copies[e] + 1))
                                    for d in candidates])
                eligible = candidates[busiest <= max(bound[l], device_load.max()) + 1e-9]
                if not len(eligible):
                    eligible = candidates[[int(np.argmin(busiest))]]
                holds[l, e, int(eligible[np.argmax(gain[e, eligible])])] = True
                break
    return holds
