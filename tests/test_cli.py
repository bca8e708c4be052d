"""The `moe-infer` command line, run the way users run it (a real subprocess)."""

import re
import shutil
import subprocess
import sys

import pytest


def run_cli(*args, entry="module"):
    command = [sys.executable, "-m", "moe_infer"] if entry == "module" else [shutil.which("moe-infer")]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("entry", ["module", "console-script"])
def test_demo_on_random_model_reports_exact_outputs_and_counts(entry):
    if entry == "console-script" and shutil.which("moe-infer") is None:
        pytest.fail("the moe-infer console script is not installed (pip install -e .)")
    result = run_cli("demo", "--model", "random-mixtral", "--new-tokens", "8", entry=entry)
    assert result.returncode == 0, result.stderr
    diff = float(re.search(r"max \|diff\| = (\S+)", result.stdout).group(1))
    assert diff < 1e-4
    assert re.search(r"[0-9.]+ tokens/s wrapped", result.stdout)
    layers = re.findall(r"layer +(\d+): ([\d ]+?)\s+imbalance", result.stdout)
    assert [int(layer) for layer, _ in layers] == [0, 1, 2, 3]
    # 8 new tokens through a KV cache: the prompt once, then one token per step, top-2 each
    prompt_len = len("def main(".encode())
    for _, counts in layers:
        assert sum(map(int, counts.split())) == 2 * (prompt_len + 7)
    # part 7: under half the expert bytes, ours and plain LRU generate the same text as unlimited
    budget_rows = re.findall(r"^  (ours|plain LRU) +[0-9.]+ +([0-9.]+) +([0-9.]+) .* (yes|NO)$", result.stdout, re.M)
    assert [(name, same) for name, _, _, same in budget_rows] == [("ours", "yes"), ("plain LRU", "yes")]
    # half the expert bytes: the generation touches more experts than fit, so both runs miss and move bytes
    assert all(0.0 < float(rate) < 1.0 and float(moved) > 0 for _, rate, moved, _ in budget_rows), budget_rows


def test_demo_on_a_shipped_model_prefetches_with_its_shipped_predictor():
    result = run_cli("demo", "--model", "tiny-mixtral", "--new-tokens", "16")
    assert result.returncode == 0, result.stderr
    budget_rows = re.findall(r"^  (ours|plain LRU) +[0-9.]+ +([0-9.]+) .* (yes|NO)$", result.stdout, re.M)
    assert [(name, same) for name, _, same in budget_rows] == [("ours", "yes"), ("plain LRU", "yes")]
    assert re.search(r"ours = cache_policy=expertflow, cpu_compute=auto, predictor=predictor-expertflow.safetensors, "
                     r"prefetch_depth=1;", result.stdout)


def test_user_error_is_one_line_without_traceback():
    result = run_cli("demo", "--model", "/no/such/model")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-infer demo: error:") and "/no/such/model" in lines[0]


def test_unknown_command_is_rejected():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
