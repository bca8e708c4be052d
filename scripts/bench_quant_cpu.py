"""CPU matmuls of quantized experts (experts/quant_matmul.py: torch's weight-only kernels) against
float `F.linear` in bf16 and fp32, at one Mixtral-8x7B expert's projections, decode and prefill.

    python scripts/bench_quant_cpu.py [--tokens 1 16 128] [--reps 7] [--threads N]

Appends one JSON line per (projection, T) to bench/results/quant_cpu.jsonl and rewrites
bench/results/quant_cpu.md: the median milliseconds of each implementation (kernels.benchmarking.time_ms,
one warm-up, then the median of --reps calls), its ratio to bf16 in the same run, and each quantized
result's relative error against its own dequantized matmul in fp32 (the check that the row computes
what it claims). Weights are random (normal, std 0.02): speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from moe_infer.experts.quant import QuantScheme, quantize, quantized_linear
from moe_infer.experts.quant_matmul import quantized_matmul
from moe_infer.kernels.benchmarking import time_ms

PROJECTIONS = {"w1 (gate/up row block) 14336x4096": (14336, 4096), "w2 (down) 4096x14336": (4096, 14336)}
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
               f"{torch.get_num_threads()} torch threads)")
    command = "python scripts/bench_quant_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    generator = torch.Generator().manual_seed(0)
    for name, (n, k) in PROJECTIONS.items():
        weight = torch.randn(n, k, generator=generator) * 0.02
        floats = {"fp32": weight, "bf16": weight.to(torch.bfloat16)}
        quantized = {"int8": quantize(weight, "int8"), "int4-g128": quantize(weight, QuantScheme("int4", 128))}
        for tokens in args.tokens:
            x = torch.randn(tokens, k, generator=generator)
            xb = x.to(torch.bfloat16)
            row = {"projection": name, "N": n, "K": k, "T": tokens, "ms": {}, "rel_error_vs_dequantized": {}}
            row["ms"]["fp32"] = time_ms(lambda: F.linear(x, floats["fp32"]), device="cpu", reps=args.reps)
            row["ms"]["bf16"] = time_ms(lambda: F.linear(xb, floats["bf16"]), device="cpu", reps=args.reps)
            for scheme, q in quantized.items():
                row["ms"][scheme] = time_ms(lambda: quantized_matmul(xb, q), device="cpu", reps=args.reps)
                got, want = quantized_matmul(xb, q).float(), quantized_linear(x, q)
                row["rel_error_vs_dequantized"][scheme] = float((got - want).norm() / want.norm())
            row["ratio_to_bf16"] = {impl: ms / row["ms"]["bf16"] for impl, ms in row["ms"].items()}
            row.update(device=machine, torch=torch.__version__, command=command,
                       time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            rows.append(row)
            print(f"{name:36s} T={tokens:4d} " + "  ".join(f"{impl} {ms:7.2f} ms" for impl, ms in row["ms"].items()),
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_cpu.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    impls = list(rows[0]["ms"])
    lines = [f"# Quantized expert matmuls on the CPU\n", f"Machine: {machine}; torch {torch.__version__}.",
             f"Command: `{command}`. Median ms of {args.reps} calls after one warm-up (bf16 activations for the "
             f"quantized rows); in brackets the ratio to bf16 in the same run.\n",
             "| projection | T | " + " | ".join(impls) + " | rel. error vs dequantized (int8, int4) |",
             "|---|---|" + "---|" * len(impls) + "---|"]
    for row in rows:
        cells = [f"{row['ms'][i]:.2f} ({row['ratio_to_bf16'][i]:.2f}x)" for i in impls]
        errors = ", ".join(f"{e:.1e}" for e in row["rel_error_vs_dequantized"].values())
        lines.append(f"| {row['projection']} | {row['T']} | " + " | ".join(cells) + f" | {errors} |")
    with open(os.path.join(args.out, "quant_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
