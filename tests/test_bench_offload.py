"""`moe-infer bench offload` (issues 15, 18, 19): the calibrated routing, the reuse calibration, row
formatting, the accelerate baseline (CUDA), and a `--smoke` run from outside any checkout whose
every row is checked against what its label says it configured."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_infer.benchmarks import offload
from moe_infer.cache.simulate import simulate

STATS = offload.ROUTING_STATS


def test_the_routing_statistics_ship_with_the_package():
    stats = json.loads(STATS.read_text())
    assert STATS.parent.parent.name == "assets" and "Apache-2.0" in (STATS.parent / "README.md").read_text()
    assert stats["layers_sampled"] == [0, 7, 15] and stats["models"]["mixtral-8x7b"]["num_experts"] == 8
    assert len(stats["expert_counts"]["mixtral-8x7b"]["github"]) == 3


def test_calibration_says_which_statistics_feed_which_layer():
    plan = offload.calibration(STATS, 32)
    assert plan["file"] == "mixtral-8x7b.json" and plan["model"] == "mixtral-8x7b"
    assert [plan["popularity_from_layer"][l] for l in (0, 3, 4, 7, 11, 12, 31)] == [0, 0, 7, 7, 7, 15, 15]
    assert plan["pairs_from"][6] == "0->7" and plan["pairs_from"][7] == "7->15" and 0 not in plan["pairs_from"]
    short = offload.calibration(STATS, 2)  # a 2-layer model spans the 32 layers: first and last
    assert short["popularity_from_layer"] == {0: 0, 1: 15} and short["pairs_from"] == {1: "7->15"}


def test_calibrated_trace_has_mixtral_routing():
    trace = offload.calibrated_trace(STATS, 4, 8, 2, 400, reuse=0.3, seed=3)
    ids = trace.expert_ids.numpy()
    assert ids.shape == (400, 4, 2) and ids.min() >= 0 and ids.max() < 8
    assert (ids[:, :, 0] != ids[:, :, 1]).all()  # a token's K experts are distinct
    again = offload.calibrated_trace(STATS, 4, 8, 2, 400, reuse=0.3, seed=3)
    assert np.array_equal(again.expert_ids.numpy(), ids)  # the seed fixes it
    # temporal reuse: consecutive tokens repeat their first expert more often with more reuse
    repeat = lambda t: float((t.expert_ids[1:, :, 0] == t.expert_ids[:-1, :, 0]).float().mean())  # noqa: E731
    assert repeat(offload.calibrated_trace(STATS, 4, 8, 2, 400, reuse=0.6)) > repeat(trace) + 0.2
    # the popularity skew is the real layer 0's: its most selected expert leads the first layer here too
    counts = np.array(json.loads(STATS.read_text())["expert_counts"]["mixtral-8x7b"]["github"][0])
    big = offload.calibrated_trace(STATS, 1, 8, 2, 3000, reuse=0.0)
    assert np.bincount(big.expert_ids.numpy().reshape(-1), minlength=8).argmax() == counts.argmax()
    with pytest.raises(ValueError, match="8 experts"):
        offload.calibrated_trace(STATS, 2, 16, 2, 10, 0.0)


def test_calibrate_reuse_reaches_the_real_hit_rate():
    reuse, rate = offload.calibrate_reuse(STATS, 4, 2)
    assert 0.0 <= reuse < 0.75 and abs(rate - 0.615) < 0.05
    check = simulate(offload.calibrated_trace(STATS, 4, 8, 2, 600, reuse, seed=1), "lru", 4).hit_rate
    assert check == pytest.approx(rate)


def test_format_row():
    row = {"routing": "calibrated", "config": "plain LRU (mixtral-offloading design)", "decode_tokens_per_s": 4.0,
           "prefill_tokens_per_s": 900.0, "hit_rate": 0.5, "bytes_moved_per_token": 2 * 2**20,
           "cpu_experts_per_token": 0.0}
    line = offload.format_row(row, bandwidth=2**20 * 10, cost=None)
    assert "decode     4.00 tok/s" in line and "hit 0.500" in line and "moved      2.0 MiB/token" in line
    assert row["floor_decode_tokens_per_s"] == pytest.approx(5.0) and "floor 5.00 tok/s" in line
    accelerate = {**row, "config": "accelerate offload (3 of 8 layers' experts on GPU)", "hit_rate": None}
    assert "hit   n/a" in offload.format_row(accelerate, bandwidth=None, cost=None)  # never a rate it did not measure


def test_smoke_from_a_directory_outside_the_checkout(tmp_path):
    """The CI run: `moe-infer bench offload --smoke` from an empty directory (the routing statistics
    come from the package); every row appended as its own line, and each row ran what it says."""
    out = tmp_path / "offload.jsonl"
    command = [sys.executable, "-m", "moe_infer", "bench", "offload", "--smoke", "--repeats", "1",
               "--decode-tokens", "4", "--prompt-tokens", "16", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    run, rows = lines[0], lines[1:]
    assert run["kind"] == "run" and all(r["kind"] == "row" and r["run"] == run["run"] for r in rows)
    calibration = run["calibration"]
    assert calibration["file"] == "mixtral-8x7b.json" and calibration["domain"] == "github"
    assert abs(calibration["lru_4_of_8_hit_rate"] - 0.615) < 0.05
    quant_rows = [r for r in rows if r.get("quantization_row")]
    rows = [r for r in rows if not r.get("quantization_row")]
    check_quantization_rows(run, quant_rows)
    assert {(r["routing"], r["config"]) for r in rows} == {
        (routing, name) for routing in ("random", "calibrated") for name in offload.CONFIGS
        if offload.ORACLE not in name or routing == "calibrated"}
    for row in rows:
        fields, ran = offload.CONFIGS[row["config"]], row["ran"]
        assert {k: ran[k] for k in fields} == fields, row["config"]
        assert ran["cpu_memory"] == run["budget_bytes"] and ran["routing_override"] == (row["routing"] == "calibrated")
        assert row["peak_bytes"] <= run["budget_bytes"] and row["tokens"] > 0
        name = row["config"]
        if offload.ORACLE in name:  # it really prefetches, at the recall it says
            assert ran["prefetch"] == f"{offload.ORACLE}, recall {offload.SHIPPED_PREDICTOR_RECALL:.3f}"
            assert row["prefetch"]["issued"] > 0 and abs(row["oracle_recall_measured"] - 0.918) < 0.15
        else:
            assert ran["prefetch"] is None
            if fields.get("loader") != "ring":  # nothing loads ahead of use but the ring
                assert row["prefetch"]["issued"] == 0
        if fields["cpu_compute"] == "always":
            assert row["cpu_experts_per_token"] > 0 and row["hit_rate"] == 0
        if fields.get("loader") == "ring":  # it streams ahead (or tries: at 4 slots for 2 layers most are cancelled)
            assert row["prefetch"]["issued"] + row["prefetch"]["cancelled"] > 0
    assert "appended to" in result.stdout


def check_quantization_rows(run: dict, rows: list[dict]) -> None:
    """bf16, int8 and int4-g128 rows of the quantization config, per routing, each at the run's budget,
    each running the experts its label names: slots of that format's expert size, bytes moved a whole
    number of those experts."""
    from moe_infer.experts.quant import QuantScheme, part_specs

    h, i = run["shape"]["hidden"], run["shape"]["intermediate"]
    assert run["shape"]["dtype"] == "bfloat16" and run["expert_bytes"] == 3 * h * i * 2
    expected = {"bfloat16": (None, run["expert_bytes"])}
    for name, scheme in (("int8", QuantScheme("int8")), ("int4-g128", QuantScheme("int4"))):
        specs = [*part_specs(scheme, 2 * i, h).values(), *part_specs(scheme, h, i).values()]
        expected[name] = (scheme.as_json(), sum(d.itemsize * torch.Size(shape).numel() for d, shape in specs))
    assert {(r["routing"], r["experts"]) for r in rows} == {(routing, name) for routing in ("random", "calibrated")
                                                            for name in expected}
    for row in rows:
        quantization, nbytes = expected[row["experts"]]
        ran = row["ran"]
        assert row["config"] == f"{offload.QUANT_CONFIG} [experts {row['experts']}]"
        assert {k: ran[k] for k in row["fields"]} == offload.CONFIGS[offload.QUANT_CONFIG]
        assert ran["quantization"] == quantization and ran["cpu_memory"] == run["budget_bytes"]
        assert nbytes <= ran["slot_bytes"] <= nbytes + 64
        assert ran["slots"] == min(run["budget_bytes"] // ran["slot_bytes"], 2 * 8)  # 2 layers x 8 experts at most
        assert row["peak_bytes"] <= run["budget_bytes"] and row["tokens"] > 0
        moved = round(row["bytes_moved_per_token"] * row["tokens"])
        assert moved % nbytes == 0, (row["experts"], moved, nbytes)  # whole experts, in their own format's bytes
    assert expected["int4-g128"][1] < 0.3 * run["expert_bytes"] < expected["int8"][1] < 0.55 * run["expert_bytes"]


def test_a_spent_time_budget_measures_no_row(tmp_path, capsys):
    out = tmp_path / "offload.jsonl"
    # --decode-tokens 32 is the option's usual default: given beside --smoke it still wins over the smoke's 16
    assert offload.main(["--smoke", "--routing", "random", "--time-budget", "0", "--decode-tokens", "32",
                         "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["run"] and "time budget" in capsys.readouterr().out
    assert lines[0]["decode_tokens"] == 32 and lines[0]["prompt_tokens"] == offload.SMOKE["prompt_tokens"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's offload baseline runs on CUDA only")
def test_accelerate_row_reports_no_hit_rate(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "offload.jsonl"
    assert offload.main(["--smoke", "--dtype", "bfloat16", "--routing", "random", "--configs", "plain LRU",
                         "--repeats", "1", "--decode-tokens", "4", "--prompt-tokens", "16", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()][1:]
    accelerate = [r for r in rows if r["config"].startswith("accelerate offload")]
    assert len(accelerate) == 1 and accelerate[0]["hit_rate"] is None
    assert accelerate[0]["ran"]["accelerate_layers_on_gpu"] < 2 and accelerate[0]["decode_tokens_per_s"] > 0
