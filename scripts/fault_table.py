"""The fault-injection table of issue 17: runs tests/test_faults.py and counts, per kind of fault,
the cases tried, those that got one clear error (or, for kills, a clean re-run), those that were
silently wrong (a failed case: wrong output or no error), and hangs (a case stopped by the timeout).

    python scripts/fault_table.py [--timeout 300]

Writes bench/results/faults.md (and prints it). A case is one parametrized test, except the kill
test, which kills `KILLS` converter processes and counts each.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test function -> (kind of fault, how many cases one run of it tries)
KINDS = {
    "test_converted_load_equals_the_source": ("converted load equals the source (control)", 1),
    "test_flipped_expert_byte_fails_the_forward_that_reads_it": ("flipped byte in an expert (xxh3 / sha256-only manifest)", 1),
    "test_flipped_dense_byte_fails_load": ("flipped byte in dense.safetensors", 1),
    "test_zeroed_region_after_load_is_caught": ("zeroed region of a layer file after load", 1),
    "test_checksum_modes": ("checksum modes first / every / invalid", 1),
    "test_checkpoints_differing_in_one_weight_are_never_confused": ("two checkpoints differing in one weight", 1),
    "test_config_disagreeing_with_the_manifest": ("config.json vs manifest (top_k, experts, sizes, layers, type, missing)", 1),
    "test_kill_between_publish_and_marker_removal": ("kill between publish and marker removal", 1),
    "test_bad_source_is_refused_by_convert": ("bad source: missing dense tensor, hidden/intermediate size, expert dtype", 1),
    "test_bad_predictor_file_is_a_file_format_error": ("predictor file: wrong shape, missing tensor, options", 1),
    "test_frequency_predictor_with_a_wrong_shaped_table": ("predictor file: wrong-shaped frequency table", 1),
    "test_cli_prints_checkpoint_errors_as_one_line_and_bugs_as_tracebacks": ("CLI: user error one line, bug traceback", 1),
    "test_kills_at_random_points_of_convert": ("convert killed at random points (SIGKILL/TERM/INT, +-verify)", None),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=300)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_faults import KILLS

    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "faults.xml")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--timeout={args.timeout}",
                        f"--junitxml={report}", os.path.join(REPO, "tests", "test_faults.py")], cwd=REPO)
        seconds = time.perf_counter() - start
        cases = ET.parse(report).getroot().iter("testcase")
        rows: dict[str, list[int]] = {}
        for case in cases:
            function = case.get("name").split("[")[0]
            kind, count = KINDS.get(function, (function, 1))
            count = KILLS if count is None else count
            failure = case.find("failure")
            if failure is None:
                failure = case.find("error")
            hang = failure is not None and "Timeout" in (failure.get("message", "") + (failure.text or ""))
            row = rows.setdefault(kind, [0, 0, 0, 0])
            row[0] += count
            row[1] += count if failure is None else 0
            row[2] += count if failure is not None and not hang else 0
            row[3] += count if hang else 0
    lines = [f"# Fault injection: tests/test_faults.py ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores visible (shared); command: "
             f"`python scripts/fault_table.py`; the module ran in {seconds:.0f} s.", "",
             "| fault | cases tried | clear error (or clean re-run) | silent-wrong | hangs |", "|---|---|---|---|---|"]
    lines += [f"| {kind} | {tried} | {clear} | {wrong} | {hangs} |" for kind, (tried, clear, wrong, hangs) in rows.items()]
    total = [sum(row[i] for row in rows.values()) for i in range(4)]
    lines += [f"| **total** | {total[0]} | {total[1]} | {total[2]} | {total[3]} |", ""]
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "faults.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
