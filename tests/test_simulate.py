"""The trace-driven cache simulator: counts checked by hand, belady as the bound of every policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_infer.cache import simulate
from moe_infer.cache.simulate import TraceOracle as Oracle, format_table
from moe_infer.traces.trace import Trace


def make_trace(ids, num_experts: int, seq_len: int | None = None) -> Trace:
    ids = np.asarray(ids, dtype=np.int32)
    if ids.ndim == 2:  # [N, K] -> one layer
        ids = ids[:, None, :]
    n = ids.shape[0]
    seq_len = seq_len or n
    seq = np.arange(n) // seq_len
    return Trace.from_arrays(expert_ids=ids, expert_weights=np.full(ids.shape, 1.0 / ids.shape[2], np.float32),
                             seq_ids=seq, positions=np.arange(n) % seq_len, token_ids=np.zeros(n, np.int32),
                             num_experts=num_experts, moe_layers=list(range(ids.shape[1])))


def random_trace(seed: int, n=300, layers=3, experts=8, k=2, skew=1.5) -> Trace:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(experts, skew), size=layers)  # [L, E]
    ids = np.stack([np.stack([rng.choice(experts, size=k, replace=False, p=p[l]) for l in range(layers)])
                    for _ in range(n)])
    return make_trace(ids, experts, seq_len=50)


SEQUENCE = [[0], [1], [2], [0], [1], [3], [0]]  # one layer, K=1, capacity 2


@pytest.mark.parametrize("policy, hits, bypasses", [
    ("lru", 0, 0),  # 0 1 | 2 evicts 0 | 0 evicts 1 | 1 evicts 2 | 3 evicts 0 | 0 evicts 1
    ("lfu", 0, 0),  # counts tie until the 4th access; every eviction removes the next expert used
    ("belady", 3, 2),  # 2 and 3 are never used again: bypassed; 0 and 1 stay
    ("static", 3, 2),  # hot set {0, 1} (3 and 2 uses); 2 and 3 cannot push them out
])
def test_counts_by_hand_one_layer(policy, hits, bypasses):
    result = simulate(make_trace(SEQUENCE, 4), policy, 2)
    assert (result.hits, result.misses, result.bypasses) == (hits, 7 - hits, bypasses)
    assert result.accesses == 7 and result.hit_rate == pytest.approx(hits / 7)


def test_an_expert_of_the_same_token_and_layer_is_never_evicted():
    # capacity 1, K=2: the token's second expert cannot evict its first; it is bypassed
    result = simulate(make_trace([[0, 1], [0, 2]], 4), "lru", 1)
    assert (result.hits, result.misses, result.bypasses) == (1, 3, 2)


def test_per_layer_and_total_capacity():
    # two layers using experts {0,1} and {2,3} alternately; 2 slots per layer hold everything,
    # 2 slots in total do not
    ids = np.array([[[0], [2]], [[1], [3]]] * 3, dtype=np.int32)
    per_layer = simulate(make_trace(ids, 4), "lru", 2, per_layer=True)
    total = simulate(make_trace(ids, 4), "lru", 2, per_layer=False)
    assert (per_layer.hits, per_layer.misses) == (8, 4)
    assert per_layer.per_layer == [4 / 6, 4 / 6]
    assert (total.hits, total.misses) == (0, 12)  # each access evicts the expert used 2 accesses later


def test_prefetch_counts_by_hand():
    # perfect predictions one layer ahead with 1 slot per layer: every use of layer 1 was prefetched
    ids = np.array([[[0], [1]], [[2], [3]], [[0], [1]]], dtype=np.int32)
    result = simulate(make_trace(ids, 4), "expertflow", 1, predictor=Oracle(), prefetch_depth=1)
    # layer 0 is prefetched at the token's start, layer 1 after layer 0: all 6 uses hit
    assert (result.hits, result.misses) == (6, 0)
    assert (result.prefetches_issued, result.prefetches_used, result.prefetches_wasted) == (6, 6, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_layer", [True, False])
def test_belady_bounds_every_policy_on_random_traces(seed, per_layer):
    trace = random_trace(seed)
    for capacity in (1, 3, 5) if per_layer else (4, 10):
        best = simulate(trace, "belady", capacity, per_layer=per_layer)
        for policy in ("lru", "lfu", "static"):
            other = simulate(trace, policy, capacity, per_layer=per_layer)
            assert best.hits >= other.hits, (policy, capacity)
        for noise in (0.0, 0.6):
            ef = simulate(trace, "expertflow", capacity, per_layer=per_layer, predictor=Oracle(noise, seed))
            assert best.loads <= ef.loads, (noise, capacity)  # prefetching never needs fewer loads
            assert ef.prefetches_used + ef.prefetches_wasted == ef.prefetches_issued


def test_belady_bounds_every_policy_on_a_real_trace(real_trace):
    for capacity in (2, 4, 6):
        best = simulate(real_trace, "belady", capacity)
        for policy in ("lru", "lfu", "static"):
            assert best.hit_rate >= simulate(real_trace, policy, capacity).hit_rate
        oracle = simulate(real_trace, "expertflow", capacity, predictor=Oracle())
        assert best.loads <= oracle.loads
        assert oracle.hit_rate > simulate(real_trace, "lru", capacity).hit_rate  # good predictions help


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(policy="fifo", capacity=2), ValueError, "valid policies are"),
    (dict(policy="lru", capacity=0), ValueError, "capacity=0"),
    (dict(policy="expertflow", capacity=2), ValueError, "needs predictor"),
    (dict(policy="belady", capacity=2, predictor=Oracle()), ValueError, "takes no predictor"),
    (dict(policy="lru", capacity=2, predictor=object()), TypeError, "predict_trace"),
    (dict(policy="lru", capacity=2, prefetch_depth=0), ValueError, "prefetch_depth"),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        simulate(make_trace(SEQUENCE, 4), **kwargs)


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory):
    """A trace of the shipped tiny-mixtral over a stdlib file (trained routing, real structure)."""
    import inspect

    from moe_infer.traces.profiler import ProfileOptions, record_trace
    from moe_infer.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model("tiny-mixtral", device="cpu", dtype="float32")
    path = tmp_path_factory.mktemp("trace") / "t.safetensors"
    record_trace(model, path, texts=[inspect.getsourcefile(inspect)], tokenizer=tokenizer,
                 model_name="tiny-mixtral", options=ProfileOptions(max_tokens=1024, seq_len=256, progress=False))
    return Trace.load(path)


def test_format_table_lists_every_result():
    trace = random_trace(4, n=40)
    table = format_table([simulate(trace, p, 2) for p in ("lru", "belady")])
    assert table.count("\n") == 4 and "| belady | 2 per layer |" in table


def test_cli_simulate_prints_a_table_and_writes_json(tmp_path, capsys):
    import json

    from moe_infer.cli import main

    path = tmp_path / "t.safetensors"
    make_trace(SEQUENCE, 4).save(path)
    assert main(["simulate", "--trace", str(path), "--policy", "lru,belady", "--capacity", "2",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| lru | 2 per layer | 0.000 | 0 | 7 |" in out and "| belady | 2 per layer | 0.429 | 3 | 4 |" in out
    assert [r["hits"] for r in json.loads((tmp_path / "r.json").read_text())["results"]] == [0, 3]
    assert main(["simulate", "--trace", str(path), "--policy", "lru", "--capacity", "two"]) == 2
    assert main(["simulate", "--trace", str(path), "--policy", "expertflow", "--capacity", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("moe-infer simulate: error:") for line in err)


def test_loads_are_counted_in_the_bytes_of_the_experts_format(tmp_path, capsys):
    """`moe-infer simulate --checkpoint DIR --budget B`: the same byte budget holds more int4 experts than
    bf16 ones, and loads are counted in each format's bytes (the int4 size computed for a float
    checkpoint with --quantize is the size `convert --quantize int4` writes)."""
    import json

    from moe_infer import assets
    from moe_infer.cache.simulate import checkpoint_expert_bytes
    from moe_infer.cli import main
    from moe_infer.errors import ConfigError
    from moe_infer.experts.convert import convert
    from moe_infer.experts.store import ExpertStore

    src = str(assets.path("tiny-mixtral"))
    bf16, int4 = str(tmp_path / "bf16"), str(tmp_path / "int4")
    convert(src, bf16, dtype="bfloat16")
    convert(src, int4, quantize="int4")
    with ExpertStore.open(bf16) as a, ExpertStore.open(int4) as b:
        sizes = {"bf16": a.expert_nbytes(a.moe_layers[0]), "int4": b.expert_nbytes(b.moe_layers[0])}
    assert checkpoint_expert_bytes(bf16) == sizes["bf16"] and checkpoint_expert_bytes(int4) == sizes["int4"]
    assert checkpoint_expert_bytes(bf16, "int4") == sizes["int4"] < 0.3 * sizes["bf16"]
    assert checkpoint_expert_bytes(int4, "int4") == sizes["int4"]
    with pytest.raises(ConfigError, match="quantized to int4"):
        checkpoint_expert_bytes(int4, "int8")

    path = tmp_path / "t.safetensors"
    random_trace(5, n=200, layers=3, experts=8).save(path)
    budget = 3 * sizes["bf16"]
    results = {}
    for name, flags in (("bf16", ["--checkpoint", bf16]), ("int4", ["--checkpoint", int4]),
                        ("bf16 as int4", ["--checkpoint", bf16, "--quantize", "int4"])):
        out = tmp_path / f"{name}.json"
        assert main(["simulate", "--trace", str(path), "--policy", "lru", "--budget", str(budget), *flags,
                     "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())["results"][0]
    assert "bytes loaded" in capsys.readouterr().out
    assert results["bf16"]["capacity"] == 3 and results["int4"]["capacity"] == budget // sizes["int4"] > 8
    for name, size in (("bf16", sizes["bf16"]), ("int4", sizes["int4"])):
        assert results[name]["expert_bytes"] == size and results[name]["bytes_loaded"] == results[name]["loads"] * size
    assert {k: v for k, v in results["bf16 as int4"].items()} == results["int4"]
    # 3 slots of 8 per layer miss often; more than 8 slots hold every expert: 24 cold loads only
    assert results["int4"]["loads"] == 24 < results["bf16"]["loads"]
    assert results["int4"]["bytes_loaded"] < 0.3 * 24 / results["bf16"]["loads"] * results["bf16"]["bytes_loaded"]
    assert main(["simulate", "--trace", str(path), "--policy", "lru", "--budget", "1MiB"]) == 2
    assert main(["simulate", "--trace", str(path), "--policy", "lru", "--capacity", "2", "--quantize", "int4"]) == 2
    assert main(["simulate", "--trace", str(path), "--policy", "lru", "--capacity", "2", "--budget", "1MiB",
                 "--checkpoint", int4]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("moe-infer simulate: error:") for line in err)
