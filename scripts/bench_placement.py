"""Cross-device rate of affinity placement against round-robin and load-only balancing.

For each shipped model, the mixed-text trace of ``scripts/bench_traces.py`` is split by sequence
into a planning half and a held-out half (`Trace.split(0.5)`); plans are made on the planning half
with `moe_infer.distributed.placement.plan` and every rate is measured on the held-out half (and on the
planning half, to show how much is fitted). Baselines: expert e on device e mod D (round-robin)
and per-layer longest-processing-time load balancing (load-only). Also the plan with D extra
replicas of hot experts per layer (EPLB-style).

Writes ``bench/results/placement.json`` (appends one JSON line per run) and ``placement.md``.

    python scripts/bench_placement.py [--models tiny-mixtral tiny-deepseek] [--devices 2 4 8]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_traces  # noqa: E402


def measure(model_name: str, trace_dir: Path, device_counts: list[int]) -> list[dict]:
    from moe_infer.distributed import placement
    from moe_infer.traces.trace import Trace

    path, _ = bench_traces.record(model_name, trace_dir)
    planning, held_out = Trace.load(path).split(0.5, seed=0)
    rows = []
    for num_devices in device_counts:
        plans = {
            "round-robin": placement.round_robin_plan(planning, num_devices),
            "load-only": placement.load_balanced_plan(planning, num_devices),
            "affinity": placement.plan(planning, num_devices),
            f"affinity + {num_devices} replicas": placement.plan(planning, num_devices, replicas=num_devices),
        }
        for name, plan in plans.items():
            load = plan.device_load(held_out)  # [L, D]
            rows.append({
                "model": model_name, "devices": num_devices, "plan": name, "method": plan.method,
                "capacity": plan.capacity, "replicas": plan.num_replicas(),
                "cross_device_rate_held_out": plan.cross_device_rate(held_out),
                "cross_device_rate_planning": plan.cross_device_rate(planning),
                "load_imbalance_held_out": float((load.max(axis=1) / load.mean(axis=1)).max()),
                "planning_seconds": plan.stats.get("planning_seconds"),
                "tokens": [planning.num_tokens, held_out.num_tokens],
            })
            print(f"  {model_name} D={num_devices} {name}: held-out rate {rows[-1]['cross_device_rate_held_out']:.4f} "
                  f"({plan.method})")
    return rows


def markdown(rows: list[dict], environment: dict) -> str:
    lines = ["# Expert placement: cross-device rate", "",
             f"CPU, {environment['when']}. Rate = fraction of a token's (expert at layer l, expert at layer l+1) "
             "pairs that no device holds together; planned on half of the sequences of the mixed-text trace "
             "(held-out stdlib .py, .rst, licenses, METADATA), measured on the other half.", "",
             "| model | devices | plan | method | rate (held-out) | vs round-robin | vs load-only | rate (planning half) | max load / mean (held-out) | planning s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["devices"], r["plan"]): r["cross_device_rate_held_out"] for r in rows}
    for r in rows:
        rr = base[(r["model"], r["devices"], "round-robin")]
        lo = base[(r["model"], r["devices"], "load-only")]
        rate = r["cross_device_rate_held_out"]
        lines.append(f"| {r['model']} | {r['devices']} | {r['plan']} | {r['method']} | {rate:.4f} | "
                     f"{rate / rr - 1:+.1%} | {rate / lo - 1:+.1%} | {r['cross_device_rate_planning']:.4f} | "
                     f"{r['load_imbalance_held_out']:.3f} | {r['planning_seconds']} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = bench_traces.benchmark_parser(__doc__)
    parser.add_argument("--devices", nargs="+", type=int, default=[2, 4, 8])
    args = parser.parse_args()
    environment = bench_traces.environment()
    rows = []
    for model_name in args.models:
        rows += measure(model_name, Path(args.trace_dir), args.devices)
    bench_traces.write_results(args.results, "placement", {"benchmark": "placement", **environment, "rows": rows},
                               markdown(rows, environment))


if __name__ == "__main__":
    main()
