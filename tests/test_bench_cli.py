"""`moe-infer bench {kernels,offload,predictors,cache,serve}` (DESIGN section 7): the benchmarks run from
the installed package, at tiny sizes here, with their own options and results where --out says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moe_infer.benchmarks import BENCHMARKS
from moe_infer.cli import main


def test_bench_help_lists_the_five_benchmarks(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert list(BENCHMARKS) == ["kernels", "offload", "predictors", "cache", "serve"]
    for name in BENCHMARKS:
        assert f"\n  {name} " in out


def test_bench_forwards_help_to_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "offload", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moe-infer bench offload") and "--smoke" in out and "--expert-memory" in out


def test_unknown_benchmark_is_one_line_exit_2(capsys):
    assert main(["bench", "frobnicate", "--fast"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["moe-infer bench: error: unknown benchmark 'frobnicate'; "
                     "benchmarks are kernels, offload, predictors, cache, serve"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("argv", [["kernels"], ["offload"], ["offload", "--device", "cuda"]])
def test_gpu_benchmarks_refuse_without_cuda(argv, capsys, tmp_path):
    assert main(["bench", *argv, "--out", str(tmp_path / "results.jsonl")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moe-infer bench {argv[0]}: ")
    assert "CUDA" in lines[0] or "cuda" in lines[0]
    assert not any(tmp_path.iterdir()), "a refused benchmark wrote results"


def test_bench_cache_on_a_shipped_model(tmp_path):
    """Through `python -m moe_infer` (the console path): the simulator comparison at two capacities."""
    out = tmp_path / "results"
    command = [sys.executable, "-m", "moe_infer", "bench", "cache", "--models", "tiny-mixtral", "--files", "1",
               "--eval-tokens", "384", "--train-tokens", "384", "--capacities", "0.25", "0.5",
               "--predictors", "markov", "oracle", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "cache.json").read_text())
    assert report["command"].startswith("moe-infer bench cache --models tiny-mixtral")
    (model,) = report["models"]
    assert model["model"] == "tiny-mixtral" and model["capacities"] == [2, 4]
    assert model["traces"]["heldout"]["tokens"] == 384 and model["traces"]["heldout"]["files"] == ["ast.py"]
    runs = {(run["row"], run["capacity"]): run for run in model["runs"]}
    rows = ["lru", "lfu", "static", "belady", "lru + markov", "expertflow + markov", "lru + oracle",
            "expertflow + oracle"]
    assert set(runs) == {(row, capacity) for row in rows for capacity in (2, 4)}
    for capacity in (2, 4):
        belady = runs["belady", capacity]
        for row in rows:
            run = runs[row, capacity]
            assert run["accesses"] == 384 * 6 * 2 and run["hits"] + run["misses"] == run["accesses"]
            assert 0.0 < run["hit_rate"] < 1.0
            assert belady["loads"] <= run["loads"]  # the offline optimum loads the fewest experts
        for row in ("lru", "lfu", "static"):  # ... and hits the most of every demand policy
            assert belady["hit_rate"] >= runs[row, capacity]["hit_rate"]
        assert runs["lru + oracle", capacity]["prefetches_issued"] > 0
    assert runs["lru", 4]["hit_rate"] > runs["lru", 2]["hit_rate"]
    markdown = (out / "cache.md").read_text()
    assert "| policy | 2 of 8 | 4 of 8 |" in markdown and "| expertflow + oracle |" in markdown
    assert not (tmp_path / "bench").exists(), "results went to the current directory despite --out"


def test_bench_predictors_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "results"
    threads = torch.get_num_threads()  # the benchmark pins one thread
    try:
        status = main(["bench", "predictors", "--models", "tiny-mixtral", "--train-tokens", "384",
                       "--eval-tokens", "256", "--epochs", "1", "--sim-sequences", "1", "--prompts", "1",
                       "--prompt-tokens", "8", "--new-tokens", "2", "--work-dir", str(tmp_path / "work"),
                       "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0, capsys.readouterr().err
    report = json.loads((out / "predictors.json").read_text())
    assert report["command"].startswith("moe-infer bench predictors --models tiny-mixtral")
    (model,) = report["models"]
    assert set(model["predictors"]) == {"frequency", "markov", "gate-lookahead", "expertflow",
                                        "expertflow (attention lookahead)", "expertflow (distillation loss)",
                                        "expertflow (previous_dim=0)", "pregate", "pregate (next token)"}
    ablations = {row: entry["options"] for row, entry in model["predictors"].items() if row.startswith("expertflow")}
    assert {row: (o["loss"], o["previous_dim"], o["attention_lookahead"]) for row, o in ablations.items()} == {
        "expertflow": ("membership", 8, False), "expertflow (attention lookahead)": ("membership", 8, True),
        "expertflow (distillation loss)": ("distillation", 8, False),
        "expertflow (previous_dim=0)": ("membership", 0, False)}
    for entry in model["predictors"].values():
        for recall in entry["eval"]["heldout"]["recall"].values():
            assert 0.0 <= recall <= 1.0
    assert all(row["outputs_equal"] for row in model["executor"]["rows"].values())
    assert (out / "predictors.md").read_text().startswith("# Routing predictors")


def test_bench_serve_against_servers_it_starts(tmp_path):
    """A tiny load: one fcfs server with every expert resident, one under half the expert bytes."""
    out = tmp_path / "results"
    command = [sys.executable, "-m", "moe_infer", "bench", "serve", "--schedulers", "fcfs", "--budget", "0.5",
               "--requests", "3", "--rate", "0", "--max-tokens", "3", "--prompt-tokens", "16", "--repeats", "1",
               "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in (out / "serve.jsonl").read_text().splitlines()]
    assert record["command"].startswith("moe-infer bench serve --schedulers fcfs") and record["device"].startswith("CPU")
    assert record["expert_bytes"] == 48 * 147456  # tiny-mixtral: 6 MoE layers x 8 experts
    resident, budgeted = record["rows"]
    assert (resident["scheduler"], resident["budget_bytes"]) == ("fcfs", None)
    assert (budgeted["scheduler"], budgeted["budget_bytes"]) == ("fcfs", 24 * 147456)
    for row in (resident, budgeted):
        assert row["completed"] == row["requests"] == 3 and not row["errors"] and len(row["runs"]) == 1
        assert row["runs"][0]["output_tokens"] == 9 and row["output_tokens_per_second"] > 0
        assert row["ttft_p50_s"] > 0 and row["itl_p50_s"] > 0 and 1 <= row["mean_micro_batch_size"] <= 3
        assert 1 <= row["distinct_experts_per_micro_batch"] <= 8
    assert resident["expert_hit_rate"] == 1.0 and resident["expert_bytes_moved"] == 0
    assert budgeted["expert_hit_rate"] < 1.0 and budgeted["expert_bytes_moved"] > 0
    assert resident["texts_sha256"] == budgeted["texts_sha256"]  # the budget changes no token
    markdown = (out / "serve.md").read_text()
    assert markdown.count("| fcfs | ") == 2 and "3.38 MiB (50%)" in markdown and "| yes |" in markdown
    assert not (tmp_path / "bench").exists(), "results went to the current directory despite --out"
