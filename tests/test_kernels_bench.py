"""The GPU kernel benchmark (`moe-infer bench kernels`) and the config tuner (`scripts/tune_fused_moe.py`)
rehearsed end to end with --smoke: the same code path at a tiny layer, the kernels in Triton's CPU
interpreter (tests/conftest.py), so that the lent GPU's minutes are not spent finding their bugs."""

from __future__ import annotations

import json

import pytest
import torch

from moe_infer.benchmarks.kernels import IMPLEMENTATIONS, main
from moe_infer.experts.quant import QuantScheme
from moe_infer.kernels import get_config
from moe_infer.kernels.benchmarking import SMOKE_GROUP_SIZE, SMOKE_SHAPE, SMOKE_TOKEN_COUNTS
from moe_infer.kernels.config import KernelConfig, parse_config_table
from moe_infer.kernels.tuning import main as tune_main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="rehearsals of the GPU runs, for machines without one")
PROG = "moe-infer bench kernels"


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_measures_every_row_in_order(tmp_path):
    out = tmp_path / "kernels.jsonl"
    returned = main(["--smoke", "--out", str(out)], prog=PROG) == 0
    rows = read_rows(out)
    assert returned and len(rows) == len(SMOKE_TOKEN_COUNTS) * len(IMPLEMENTATIONS)
    assert [(row["shape"]["T"], row["impl"]) for row in rows] == [(t, name) for t in SMOKE_TOKEN_COUNTS
                                                                  for name in IMPLEMENTATIONS]
    by_key = {(row["shape"]["T"], row["impl"]): row for row in rows}
    for row in rows:
        assert row["command"] == f"{PROG} --smoke --out {out}" and row["smoke"] is True
        assert set(row["versions"]) >= {"torch", "triton", "transformers", "moe_infer"}
        assert row["device"].startswith("cpu") and row["dtype"] == "fp32" and row["model"] == SMOKE_SHAPE.name
        if row["impl"] == "ours-graph":
            assert row["skipped"] == "CUDA graphs need CUDA" and row["median_ms"] is None
            continue
        assert row["skipped"] is None and row["check"]["close"], row
        assert row["check"]["against"] == ("reference_moe_quantized" if row["quant"] else "reference_moe")
        assert row["ratio_to_floor"] == pytest.approx(row["median_ms"] / row["floor_ms"])
        grouped_mm = by_key[row["shape"]["T"], "grouped_mm"]["median_ms"]
        assert row["ratio_to_grouped_mm"] == pytest.approx(row["median_ms"] / grouped_mm)
        assert row["floor_ms"] == pytest.approx(max(row["bytes"] / row["hbm_bytes_per_s"],
                                                    row["flops"] / row["matmul_flop_per_s"]) * 1e3)
    for num_tokens in SMOKE_TOKEN_COUNTS:  # quantized rows' floors count their own bytes
        ours, w8, w4 = (by_key[num_tokens, name] for name in ("ours", "w8a16", "w4a16"))
        assert ours["bytes"] > w8["bytes"] > w4["bytes"] and ours["flops"] == w4["flops"]
        assert w8["quant"] == {"method": "int8"} and w4["quant"] == {"method": "int4", "group_size": SMOKE_GROUP_SIZE}


def test_caps_and_time_budget_skip_rows_with_their_reason(tmp_path):
    out = tmp_path / "kernels.jsonl"
    argv = ["--smoke", "--impls", "grouped_mm", "batched_mm", "eager", "--max-tokens", "eager=1",
            "--gather-limit", "0", "--out", str(out)]
    assert main(argv, prog=PROG) == 0
    skipped = {(row["shape"]["T"], row["impl"]): row["skipped"] for row in read_rows(out)}
    assert skipped[1, "eager"] is None and skipped[72, "eager"] == "T > --max-tokens eager=1"
    assert all(skipped[t, "batched_mm"].startswith("would gather") for t in SMOKE_TOKEN_COUNTS)
    assert skipped[72, "grouped_mm"] is None
    assert main(["--smoke", "--impls", "grouped_mm", "--time-budget", "0", "--out", str(out)], prog=PROG) == 0
    last = read_rows(out)[-len(SMOKE_TOKEN_COUNTS):]
    assert [row["skipped"] for row in last] == ["time budget of 0 s spent"] * len(SMOKE_TOKEN_COUNTS)


def test_bad_options_are_one_line(capsys, tmp_path):
    for argv, message in ((["--smoke", "--max-tokens", "eager"], "--max-tokens takes IMPL=T"),
                          (["--smoke", "--models", "mixtral-8x7b"], "--smoke runs its own tiny layer"),
                          (["--smoke", "--dtype", "bf16"], "mishandles bf16"),
                          (["--smoke", "--group-size", "7"], "--group-size must be an even int")):
        assert main([*argv, "--out", str(tmp_path / "k.jsonl")], prog=PROG) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"{PROG}: ") and message in line
    assert not (tmp_path / "k.jsonl").exists()


def test_smoke_without_interpreter_reruns_itself_under_it(tmp_path, monkeypatch, capfd):
    """`moe-infer bench kernels --smoke` on a CPU machine as a user types it (no TRITON_INTERPRET): this
    process defined the kernels for a GPU, so the run happens in a child process under the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET")
    out = tmp_path / "kernels.jsonl"
    assert main(["--smoke", "--tokens", "1", "--impls", "ours", "--out", str(out)], prog=PROG) == 0
    assert "running again under TRITON_INTERPRET=1" in capfd.readouterr().err
    (row,) = read_rows(out)
    assert row["impl"] == "ours" and row["check"]["close"] and row["command"].startswith(f"{PROG} --smoke")


def test_tuner_smoke_writes_configs_the_lookup_reads(tmp_path, monkeypatch):
    assert tune_main(["--smoke", "--tokens", "1", "--quant", "none", "int4", "--out-dir", str(tmp_path)]) == 0
    int4 = QuantScheme("int4", SMOKE_GROUP_SIZE)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["E=4,N=48,device_name=cpu,dtype=float32,quant=int4_g32.json",
                     "E=4,N=48,device_name=cpu,dtype=float32.json"]
    # a second run adds its token counts to the file; with no time left only the default is timed
    assert tune_main(["--smoke", "--tokens", "4", "--quant", "int4", "--time-budget", "0",
                      "--out-dir", str(tmp_path)]) == 0
    path = tmp_path / names[0]
    raw = json.loads(path.read_text())
    table = parse_config_table(raw, str(path))
    assert sorted(table) == [1, 4] and all(isinstance(c, KernelConfig) for c in table.values())
    assert raw["quant"] == {"method": "int4", "group_size": SMOKE_GROUP_SIZE} and raw["smoke"] is True
    assert raw["command"].startswith("python scripts/tune_fused_moe.py --smoke --tokens 4 --quant int4")
    first, second = raw["timings"]["1"], raw["timings"]["4"]
    assert first["configs_timed"] >= 3 and first["ms"] <= first["default_ms"] and first["failures"] == {}
    assert second["configs_timed"] == 1 and second["configs_skipped_for_time"] >= 2
    assert second["ms"] == second["default_ms"]
    monkeypatch.setenv("MOE_INFER_KERNEL_CONFIG_DIR", str(tmp_path))
    shape = SMOKE_SHAPE
    assert get_config(shape.num_experts, shape.intermediate_size, shape.top_k, 1, torch.float32,
                      torch.device("cpu"), quant=int4) == table[1]


def test_tuner_refuses_without_gpu_or_smoke(capsys):
    assert tune_main(["--models", "mixtral-8x7b"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
