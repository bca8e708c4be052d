"""Expert placement: affinity, plans on planted clusters, exactness of the integer program, files, CLI."""

from __future__ import annotations

import itertools
import json
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moe_infer.distributed import placement
from moe_infer.cli import main
from moe_infer.distributed.placement import PlacementPlan
from moe_infer.traces.trace import Trace


def make_trace(expert_ids: np.ndarray, num_experts: int) -> Trace:
    num_tokens = expert_ids.shape[0]
    return Trace.from_arrays(expert_ids=expert_ids, expert_weights=np.full(expert_ids.shape, 0.5),
                             seq_ids=np.zeros(num_tokens, dtype=np.int64), positions=np.arange(num_tokens),
                             token_ids=np.full(num_tokens, -1), num_experts=num_experts,
                             moe_layers=list(range(1, expert_ids.shape[1] + 1)))


def planted_clusters(num_tokens=3000, num_layers=4, num_experts=16, top_k=2, clusters=4, noise=0.05, seed=0):
    """Tokens of cluster c use, at every layer, top_k experts of that layer's (randomly permuted)
    cluster c; with probability `noise` a layer's experts are uniform instead. Returns the trace and
    the planted plan (cluster c on device c)."""
    rng = np.random.default_rng(seed)
    size = num_experts // clusters
    members = [rng.permutation(num_experts).reshape(clusters, size) for _ in range(num_layers)]  # [L][C, size]
    ids = np.zeros((num_tokens, num_layers, top_k), dtype=np.int64)
    token_cluster = rng.integers(clusters, size=num_tokens)
    for n, c in enumerate(token_cluster):
        for l in range(num_layers):
            if rng.random() < noise:
                ids[n, l] = rng.choice(num_experts, top_k, replace=False)
            else:
                ids[n, l] = members[l][c, rng.choice(size, top_k, replace=False)]
    devices = np.zeros((num_layers, num_experts), dtype=np.int64)
    for l in range(num_layers):
        for c in range(clusters):
            devices[l, members[l][c]] = c
    trace = make_trace(ids, num_experts)
    planted = PlacementPlan(devices=devices, holds=np.eye(clusters, dtype=bool)[devices], moe_layers=trace.moe_layers,
                            num_devices=clusters, capacity=size)
    return trace, planted


@pytest.fixture(scope="module")
def planted():
    return planted_clusters()


def test_affinity_and_load_count_pairs():
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]]])  # 2 tokens, 2 layers, top-2 of 4 experts
    trace = make_trace(ids, 4)
    pairs = placement.affinity(trace)
    assert pairs.shape == (1, 4, 4) and pairs.sum() == 8  # 2 tokens x 2 x 2 pairs
    assert pairs[0, 0, 2] == 2 and pairs[0, 1, 3] == 1 and pairs[0, 2, 1] == 1 and pairs[0, 3, 3] == 0
    np.testing.assert_array_equal(placement.expert_load(trace), [[2, 1, 1, 0], [0, 1, 2, 1]])


def test_plan_recovers_planted_clusters(planted):
    trace, planted_plan = planted
    minimum = planted_plan.cross_device_rate(trace)
    plan = placement.plan(trace, 4, method="heuristic")
    rate = plan.cross_device_rate(trace)
    round_robin = placement.round_robin_plan(trace, 4).cross_device_rate(trace)
    load_only = placement.load_balanced_plan(trace, 4).cross_device_rate(trace)
    assert minimum < 0.1  # only the noise crosses
    assert rate <= minimum + 0.005
    assert round_robin > 0.6 and load_only > 0.6
    assert plan.stats["cross_device_rate"] == pytest.approx(rate)
    # the clusters themselves: every planted cluster lands on one device
    for position, layer in enumerate(trace.moe_layers):
        for c in range(4):
            experts = np.flatnonzero(planted_plan.devices[position] == c)
            assert len({plan.device_of(layer, int(e)) for e in experts}) == 1
    # memory and load balance: 4 experts per device and layer, load within the bound
    assert plan.holds.sum(axis=1).max() <= plan.capacity == 4
    assert plan.stats["load_imbalance"] <= 1.1 + 1e-9 or plan.stats["load_imbalance"] <= \
        placement.load_balanced_plan(trace, 4).stats["load_imbalance"] + 1e-9


def _brute_force_local_pairs(pair_counts: np.ndarray, num_experts: int, num_devices: int, capacity: int) -> float:
    layouts = [np.array(p) for p in itertools.product(range(num_devices), repeat=num_experts)
               if max(np.bincount(p, minlength=num_devices)) <= capacity]
    best = 0.0
    for assignment in itertools.product(layouts, repeat=pair_counts.shape[0] + 1):
        local = sum(pair_counts[l][assignment[l][:, None] == assignment[l + 1][None, :]].sum()
                    for l in range(pair_counts.shape[0]))
        best = max(best, local)
    return best


def test_milp_is_exact_on_a_small_instance():
    rng = np.random.default_rng(3)
    ids = np.stack([np.stack([rng.choice(4, 2, replace=False) for _ in range(3)]) for _ in range(60)])  # [60, 3, 2]
    trace = make_trace(ids, 4)
    pair_counts = placement.affinity(trace)
    optimum = _brute_force_local_pairs(pair_counts, 4, 2, 2)
    total = pair_counts.sum()
    exact = placement.plan(trace, 2, method="milp", load_tolerance=10.0)
    assert exact.method == "milp (optimal)"
    assert exact.cross_device_rate(trace) == pytest.approx(1 - optimum / total)
    heuristic = placement.plan(trace, 2, method="heuristic", load_tolerance=10.0)
    # restarts + group relabelling reach the optimum here
    assert heuristic.cross_device_rate(trace) == pytest.approx(exact.cross_device_rate(trace))


def test_load_bound_is_respected():
    # expert 0 of every layer is very hot: affinity alone would pack hot experts together
    rng = np.random.default_rng(1)
    ids = np.stack([np.stack([[0, rng.integers(1, 8)] if rng.random() < 0.8 else rng.choice(8, 2, replace=False)
                              for _ in range(3)]) for _ in range(500)])
    trace = make_trace(ids, 8)
    plan = placement.plan(trace, 2, method="heuristic", load_tolerance=0.1)
    load = plan.device_load(trace)  # [L, D]
    bound = np.maximum(1.1 * load.sum(axis=1) / 2,
                       placement.load_balanced_plan(trace, 2).device_load(trace).max(axis=1))
    assert (load.max(axis=1) <= bound + 1e-6).all()


def test_replicas_of_hot_experts(planted):
    trace, _ = planted
    base = placement.plan(trace, 4, method="heuristic")
    replicated = placement.plan(trace, 4, method="heuristic", replicas=4)
    assert replicated.num_replicas() == 4 * trace.num_layers
    assert replicated.capacity == 5 and replicated.holds.sum(axis=1).max() <= 5
    layer = trace.moe_layers[0]
    hottest = int(np.argmax(placement.expert_load(trace)[0]))
    copies = replicated.devices_of(layer, hottest)
    assert len(copies) == 2 and copies[0] == replicated.device_of(layer, hottest) and len(set(copies)) == 2
    assert replicated.cross_device_rate(trace) <= base.cross_device_rate(trace) + 1e-12
    assert replicated.device_load(trace).sum() == pytest.approx(placement.expert_load(trace).sum())
    # copies go where the busiest device stays near the bound (1.1 x mean here)
    assert replicated.stats["load_imbalance"] <= 1.15


def test_hot_set_takes_the_most_used_experts():
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[0, 3], [2, 3]]])
    trace = make_trace(ids, 4)
    assert placement.hot_set(trace, 1) == {1: [0], 2: [2]}
    assert placement.hot_set(trace, 2) == {1: [0, 1], 2: [2, 3]}  # ties: lower id first
    assert placement.hot_set(trace, 2, per_layer=False) == {1: [0], 2: [2]}


def test_save_load_round_trip_and_lookups(planted, tmp_path):
    trace, _ = planted
    plan = placement.plan(trace, 4, method="heuristic", replicas=2)
    path = tmp_path / "plan.safetensors"
    plan.save(path)
    loaded = PlacementPlan.load(path)
    np.testing.assert_array_equal(loaded.devices, plan.devices)
    np.testing.assert_array_equal(loaded.holds, plan.holds)
    assert (loaded.moe_layers, loaded.num_devices, loaded.capacity, loaded.method) == \
        (plan.moe_layers, 4, plan.capacity, plan.method)
    assert loaded.stats == json.loads(json.dumps(plan.stats))
    assert loaded.cross_device_rate(trace) == plan.cross_device_rate(trace)
    layer = trace.moe_layers[1]
    assert all(loaded.device_of(layer, e) in loaded.devices_of(layer, e) for e in range(16))
    assert sorted(e for d in range(4) for e in loaded.experts_on(layer, d)) == sorted(
        [e for e in range(16) for _ in loaded.devices_of(layer, e)])
    with pytest.raises(KeyError, match="not a MoE layer"):
        loaded.device_of(0, 1)
    with pytest.raises(KeyError, match="expert 16"):
        loaded.device_of(layer, 16)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


def test_load_rejects_bad_files(tmp_path, planted):
    trace, _ = planted
    with pytest.raises(FileNotFoundError, match="no such placement plan"):
        PlacementPlan.load(tmp_path / "missing.safetensors")
    trace_file = tmp_path / "trace.safetensors"
    trace.save(trace_file)
    with pytest.raises(ValueError, match="not a placement plan"):
        PlacementPlan.load(trace_file)
    good = tmp_path / "plan.safetensors"
    placement.plan(trace, 2, method="load").save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated"):
        PlacementPlan.load(truncated)
    bad_devices = tmp_path / "bad.safetensors"
    metadata = {"format": placement.FORMAT, "num_devices": "2", "num_experts": "16", "capacity": "8",
                "moe_layers": json.dumps(list(trace.moe_layers))}
    devices = torch.full((4, 16), 5, dtype=torch.int32)  # device 5 of 2
    save_file({"devices": devices, "holds": torch.zeros(4, 16, 2, dtype=torch.uint8)}, bad_devices, metadata=metadata)
    with pytest.raises(ValueError, match=r"devices must be in \[0, 2\)"):
        PlacementPlan.load(bad_devices)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_devices": 0}, "num_devices=0"),
    ({"num_devices": 4, "capacity": 3}, "cannot hold 16 experts"),
    ({"num_devices": 4, "method": "magic"}, "method='magic'"),
    ({"num_devices": 4, "replicas": -1}, "replicas=-1"),
    ({"num_devices": 4, "load_tolerance": -0.5}, "load_tolerance=-0.5"),
])
def test_plan_rejects_bad_arguments(planted, kwargs, message):
    trace, _ = planted
    num_devices = kwargs.pop("num_devices")
    with pytest.raises(ValueError, match=message):
        placement.plan(trace, num_devices, **kwargs)


def test_plan_of_another_trace_is_refused(planted):
    trace, _ = planted
    plan = placement.plan(trace, 2, method="load")
    other = make_trace(np.zeros((3, 2, 2), dtype=np.int64) + np.array([0, 1]), 8)
    with pytest.raises(ValueError, match="the plan 16 on"):
        plan.cross_device_rate(other)


def test_cli_writes_a_plan_and_prints_its_rate(planted, tmp_path, capsys):
    trace, _ = planted
    trace_file, plan_file = tmp_path / "trace.safetensors", tmp_path / "plan.safetensors"
    trace.save(trace_file)
    assert main(["placement", "--trace", str(trace_file), "--devices", "4", "--out", str(plan_file),
                 "--method", "heuristic"]) == 0
    plan = PlacementPlan.load(plan_file)
    assert f"expected cross-device rate {plan.cross_device_rate(trace):.4f}" in capsys.readouterr().out
    assert main(["placement", "--trace", str(trace_file), "--devices", "0", "--out", str(plan_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_devices=0" in err
