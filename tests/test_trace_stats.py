"""Routing statistics on traces with known structure: hand-counted, planted, and uniform random."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_infer.traces import stats as trace_stats
from moe_infer.traces.trace import Trace
from moe_infer.traces.stats import analyze, trace_statistics, write_report

E, K, L = 8, 2, 4
LAYERS = (1, 3, 5, 7)  # decoder-layer indices, not 0..L-1, so a mix-up shows


def make_trace(expert_ids, seq_len):
    num_tokens = expert_ids.shape[0]
    generator = torch.Generator().manual_seed(3)
    return Trace.from_arrays(
        expert_ids=expert_ids, expert_weights=torch.rand(expert_ids.shape, generator=generator),
        seq_ids=torch.arange(num_tokens) // seq_len, positions=torch.arange(num_tokens) % seq_len,
        token_ids=torch.randint(0, 256, (num_tokens,), generator=generator), num_experts=E,
        moe_layers=LAYERS[:expert_ids.shape[1]], model="synthetic", family="test")


def uniform_ids(num_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, L, E, generator=generator).topk(K, dim=-1).indices


def planted_ids(num_tokens, seq_len, seed):
    """Each sequence keeps one of 4 fixed expert pairs for all its tokens (reuse 1, co-activation in
    pairs); layer l + 1 uses a fixed permutation of layer l's experts (cross-layer determinism)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    per_sequence = pairs[torch.randint(0, 4, (num_tokens // seq_len,), generator=generator)]
    ids = torch.empty(num_tokens, L, K, dtype=torch.long)
    ids[:, 0] = per_sequence.repeat_interleave(seq_len, 0)
    permutation = torch.randperm(E, generator=generator)
    for layer in range(1, L):
        ids[:, layer] = permutation[ids[:, layer - 1]]
    return ids


def test_statistics_of_a_hand_counted_trace():
    # one layer, two sequences: tokens 0,1,2 | 3; top-2 of 8
    ids = torch.tensor([[[0, 1]], [[1, 2]], [[1, 2]], [[0, 1]]])
    trace = Trace.from_arrays(expert_ids=ids, expert_weights=torch.ones(4, 1, 2), seq_ids=torch.tensor([0, 0, 0, 1]),
                              positions=torch.tensor([0, 1, 2, 0]), token_ids=torch.zeros(4, dtype=torch.long),
                              num_experts=E, moe_layers=[0])
    stats = trace_statistics(trace)
    layer = stats["layers"][0]
    # counts: expert 0: 2, expert 1: 4, expert 2: 2 of 8 activations; mean per expert 1
    assert layer["popularity"] == [0.5, 1.0, 0.5, 0, 0, 0, 0, 0]
    assert layer["load_imbalance"] == pytest.approx(4.0)
    assert layer["entropy_bits"] == pytest.approx(1.5)  # p = 1/4, 1/2, 1/4
    # pairs (0,1): {0,1}->{1,2} shares 1 of 2; (1,2): identical; token 3 starts a new sequence
    assert layer["reuse"] == pytest.approx((0.5 + 1.0) / 2)
    assert stats["summary"]["reuse"]["uniform_analytic"] == pytest.approx(K / E)
    assert stats["cross_layer"] == [] and stats["summary"]["cross_layer_predictability"] == {}
    assert (stats["tokens"], stats["sequences"], stats["moe_layers"]) == (4, 2, [0])


def test_planted_structure_is_found_and_beats_the_uniform_router():
    trace = make_trace(planted_ids(2000, seq_len=50, seed=0), seq_len=50)
    summary = trace_statistics(trace)["summary"]
    assert summary["reuse"]["trace"] == pytest.approx(1.0)
    assert summary["reuse"]["uniform"] == pytest.approx(K / E, abs=0.03)
    for d in ("1", "2", "3"):
        assert summary["cross_layer_predictability"][d]["trace"] == pytest.approx(1.0)
        assert summary["cross_layer_predictability"][d]["uniform"] == pytest.approx(K / E, abs=0.06)
    assert summary["coactivation_top_pair_share"]["trace"] > 0.7  # 3 of 28 pairs carry 3/4 or more
    assert summary["coactivation_top_pair_share"]["uniform"] < 0.2
    assert summary["entropy_bits"]["trace"] <= summary["entropy_bits"]["max"] == 3.0


def test_uniform_random_routing_sits_at_the_uniform_baselines():
    trace = make_trace(uniform_ids(4000, seed=1), seq_len=40)
    stats = trace_statistics(trace)
    summary = stats["summary"]
    assert summary["reuse"]["trace"] == pytest.approx(K / E, abs=0.02)
    assert summary["entropy_bits"]["trace"] == pytest.approx(3.0, abs=0.01)
    assert summary["load_imbalance"]["trace"] == pytest.approx(summary["load_imbalance"]["uniform"], abs=0.05)
    assert summary["load_imbalance"]["trace"] < 1.15
    for d, values in summary["cross_layer_predictability"].items():
        # in-sample fitting lifts both a little above K/E, by the same amount
        assert values["trace"] == pytest.approx(values["uniform"], abs=0.02)
        assert values["trace"] == pytest.approx(K / E, abs=0.05)
    assert summary["coactivation_top_pair_share"]["trace"] == pytest.approx(
        summary["coactivation_top_pair_share"]["uniform"], abs=0.03)
    assert [(p["from_layer"], p["to_layer"], p["distance"]) for p in stats["cross_layer"]] == [
        (1, 3, 1), (3, 5, 1), (5, 7, 1), (1, 5, 2), (3, 7, 2), (1, 7, 3)]


def test_chunked_counting_equals_one_pass(monkeypatch):
    trace = make_trace(uniform_ids(600, seed=2), seq_len=7)
    whole = trace_statistics(trace)
    monkeypatch.setattr(trace_stats, "_CHUNK_VALUES", 5 * L * E)  # 5-token chunks: sequences straddle them
    assert_same_numbers(trace_statistics(trace), whole)


def assert_same_numbers(a, b, where="statistics"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_numbers(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{where}[{index}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


def test_report_files(tmp_path):
    trace = make_trace(planted_ids(400, seq_len=20, seed=4), seq_len=20)
    statistics, written = write_report(trace, plots=tmp_path / "plots", json_path=tmp_path / "stats.json",
                                       markdown_path=tmp_path / "stats.md")
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["affinity_l1_l3.png", "affinity_l3_l5.png", "affinity_l5_l7.png", "popularity.png"]
    for name in pngs:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "stats.json").read_text()) == statistics
    markdown = (tmp_path / "stats.md").read_text()
    assert "| same-layer reuse, consecutive tokens | 1.000 |" in markdown
    assert len(written) == 6


def test_conditional_table_rows_sum_to_top_k():
    analysis = analyze(make_trace(uniform_ids(300, seed=5), seq_len=10))
    for table in analysis.conditionals.values():
        torch.testing.assert_close(table.sum(-1), torch.full(table.shape[:2], float(K), dtype=table.dtype))


def run_cli(*args):
    # from the repository root, so `-m moe_infer` is this checkout's package
    return subprocess.run([sys.executable, "-m", "moe_infer", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def test_cli_trace_stats(tmp_path):
    path = tmp_path / "trace.safetensors"
    make_trace(planted_ids(200, seq_len=20, seed=6), seq_len=20).save(path)
    result = run_cli("trace-stats", str(path), "--plots", str(tmp_path / "plots"), "--json", str(tmp_path / "s.json"),
                     "--markdown", str(tmp_path / "s.md"))
    assert result.returncode == 0, result.stderr
    assert "| same-layer reuse, consecutive tokens | 1.000 |" in result.stdout
    assert (tmp_path / "plots" / "popularity.png").exists()
    assert json.loads((tmp_path / "s.json").read_text())["tokens"] == 200
    assert (tmp_path / "s.md").read_text().startswith("# Routing statistics: synthetic")

    bad = run_cli("trace-stats", str(tmp_path / "s.json"))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-infer trace-stats: error:") and "s.json" in lines[0]
