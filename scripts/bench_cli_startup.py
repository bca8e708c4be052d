#!/usr/bin/env python
"""Start-up cost of the command line: wall time of `moe-infer --help`, an argument error and
`import moe_infer`, beside `python -c "import torch"` measured in the same run (interleaved
repeats, medians, and each row's ratio to the torch import).

    python scripts/bench_cli_startup.py [--repeats 9] [--out-dir bench/results]

Appends one JSON line to bench/results/cli_startup.jsonl and writes cli_startup.md (under the current
directory unless --out-dir says otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from moe_infer.helpformat import HelpFormatter


def commands() -> dict[str, list[str]]:
    console = shutil.which("moe-infer")
    cli = [console] if console else [sys.executable, "-m", "moe_infer"]
    return {
        "moe-infer --help": [*cli, "--help"],
        "moe-infer demo --bogus-flag (argument error)": [*cli, "demo", "--bogus-flag"],
        'python -c "import moe_infer"': [sys.executable, "-c", "import moe_infer"],
        'python -c "import torch" (baseline)': [sys.executable, "-c", "import torch"],
    }


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="runs of each command, interleaved")
    parser.add_argument("--out-dir", default=os.path.join("bench", "results"), help="folder of the results")
    args = parser.parse_args(argv)
    rows = commands()
    for command in rows.values():
        wall_seconds(command)  # warm the page cache: every row starts from the same state
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, command in rows.items():
            times[name].append(wall_seconds(command))
    baseline = statistics.median(times['python -c "import torch" (baseline)'])
    lines = ["| command | median wall s | min | max | / import torch |", "|---|---|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| `{name}` | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {median / baseline:.2f} |")
    load = os.getloadavg()
    machine = f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    header = [f"# CLI start-up ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
              f"Machine: {machine}; load average {load[0]:.1f} at the start. Python {platform.python_version()}. "
              f"Command: `python scripts/bench_cli_startup.py --repeats {args.repeats}`; {args.repeats} interleaved "
              "runs of each row after one warm-up run.", ""]
    text = "\n".join(header + lines) + "\n"
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "cli_startup.md"), "w") as file:
        file.write(text)
    record = {"benchmark": "cli_startup", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine, "load_average": load, "python": platform.python_version(),
              "repeats": args.repeats, "seconds": times,
              "medians": {name: statistics.median(values) for name, values in times.items()}}
    with open(os.path.join(args.out_dir, "cli_startup.jsonl"), "a") as file:
        file.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
