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


def test_bench_predictors_tunes_on_validation_and_reports_reproducible_recall(tmp_path, capsys):
    from moe_infer.benchmarks.predictors import TUNING
    from moe_infer.predictors import train
    from moe_infer.traces.trace import Trace

    out, work = tmp_path / "results", tmp_path / "work"
    threads = torch.get_num_threads()  # the benchmark pins one thread
    try:
        status = main(["bench", "predictors", "--models", "tiny-mixtral", "--train-tokens", "384",
                       "--eval-tokens", "256", "--epochs", "1", "--sim-sequences", "1", "--prompts", "1",
                       "--prompt-tokens", "8", "--new-tokens", "2", "--work-dir", str(work),
                       "--out", str(out), "--tune"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0, capsys.readouterr().err
    report = json.loads((out / "predictors.json").read_text())
    assert report["command"].startswith("moe-infer bench predictors --models tiny-mixtral")
    (model,) = report["models"]
    assert set(model["predictors"]) == {"frequency", "markov", "gate-lookahead", "expertflow",
                                        "expertflow (attention lookahead)", "expertflow (previous_dim=0)",
                                        "pregate", "pregate (next token)", "expertflow, shipped file"}
    # tuning saw the validation trace only, and every combination of the grids
    tuning = json.loads((out / "predictors-tune.json").read_text())["models"][0]
    assert len(tuning["tuning"]) == sum(len(grid["hidden"]) * len(grid["loss"]) for *_, grid in TUNING)
    assert all(set(row["eval"]) == {"validation"} for row in tuning["tuning"])
    for group, options in tuning["tuned"].items():  # the best score of its group was chosen ...
        rows = [row for row in tuning["tuning"] if row["group"] == group]
        assert max(rows, key=lambda row: row["score"])["options"] == options
    for row, group in (("expertflow", "expertflow"), ("expertflow (attention lookahead)", "expertflow"),
                       ("pregate", "pregate")):
        used = model["predictors"][row]["options"]  # ... and trained for the reported rows (under their own options)
        tuned = {name: value for name, value in tuning["tuned"][group].items() if name != "attention_lookahead"}
        assert {name: used[name] for name in tuned} == tuned
    assert model["predictors"]["expertflow (attention lookahead)"]["options"]["attention_lookahead"] is True
    assert model["predictors"]["expertflow (previous_dim=0)"]["options"]["previous_dim"] == 0
    # the validation files are neither training nor held-out files
    files = {name: set(Trace.load(work / f"tiny-mixtral-{name}.safetensors").source.split('"')) for name in
             ("train", "validation", "heldout")}
    assert not {f for f in files["validation"] if f.endswith(".py")} & (files["train"] | files["heldout"])
    # a reported figure is what the recorded traces give again
    training = Trace.load(work / "tiny-mixtral-train.safetensors")
    heldout = Trace.load(work / "tiny-mixtral-heldout.safetensors")
    for kind in ("frequency", "markov"):
        again = train(kind, training).evaluate(heldout, max_distance=4)["recall"]
        reported = model["predictors"][kind]["eval"]["heldout"]["recall"]
        assert {int(d): r for d, r in reported.items()} == pytest.approx(again, abs=1e-12)
    assert all(row["outputs_equal"] for row in model["executor"]["rows"].values())
    assert (out / "predictors.md").read_text().startswith("# Routing predictors")
    assert "**" in (out / "predictors-tune.md").read_text()  # the chosen rows are marked


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
