"""Benchmark one MoE layer on the GPU: moe_infer's fused Triton kernels against `transformers`' own
experts implementations (`eager`, `grouped_mm`) and the roofline floor
max(bytes / measured HBM bandwidth, FLOPs / measured bf16 matmul rate).

    moe-infer bench kernels                       # all shapes, T = 1 .. 16384, bf16
    moe-infer bench kernels --models mixtral-8x7b --tokens 1 64 1024

(``python scripts/bench_kernels.py ...`` is the same.) Prints a table and appends one JSON line per
(model, T) to bench/results/kernels.jsonl under the current directory (``--out``). Times are
`triton.testing.do_bench` medians; "ours (graph)" replays the layer from a CUDA graph (no launch
overhead). Every row is also checked against `grouped_mm`'s output (bf16 tolerance). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path("bench") / "results" / "kernels.jsonl"  # under the current directory


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from moe_infer.kernels.benchmarking import MODEL_SHAPES, TOKEN_COUNTS

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKEN_COUNTS))
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--baselines", nargs="*", default=["eager", "grouped_mm"],
                        help="transformers experts implementations to time beside ours")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file the results are appended to")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{parser.prog}: needs a CUDA GPU (torch.cuda.is_available() is False); the kernels' correctness "
              "tests run on the CPU with `python -m pytest tests/test_kernels.py`", file=sys.stderr)
        return 2
    if any(t < 1 for t in args.tokens):
        print(f"{parser.prog}: --tokens must be positive, got {args.tokens}", file=sys.stderr)
        return 2
    run(args)
    return 0


def run(args: argparse.Namespace) -> None:
    import triton
    import transformers

    import moe_infer
    from moe_infer.kernels import fused_moe
    from moe_infer.kernels.benchmarking import (MODEL_SHAPES, floor_ms, make_inputs, make_weights,
                                                measure_hbm_bandwidth, measure_matmul_rate, time_ms,
                                                transformers_experts)

    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name()
    bandwidth = measure_hbm_bandwidth()
    flop_rate = measure_matmul_rate(dtype=dtype)
    print(f"{device_name}: HBM copy {bandwidth / 1e12:.2f} TB/s, {args.dtype} matmul {flop_rate / 1e12:.0f} TFLOP/s")
    versions = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
                "moe_infer": moe_infer.__version__, "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    header = f"{'model':<18}{'T':>7}{'floor':>9}{'ours':>9}{'graph':>9}" + "".join(
        f"{name:>12}" for name in args.baselines) + f"{'%floor':>8}{'vs gmm':>8}"
    print(header + "   (ms)")
    for model in args.models:
        shape = MODEL_SHAPES[model]
        weights = make_weights(shape, dtype)
        baselines = {name: transformers_experts(shape, weights, name) for name in args.baselines}
        for num_tokens in args.tokens:
            inputs = make_inputs(shape, num_tokens, weights)
            call_args = (inputs.hidden, inputs.w13, inputs.w2, inputs.expert_ids, inputs.expert_weights)
            with torch.no_grad():
                ours = fused_moe(*call_args)
                times = {"ours": time_ms(lambda: fused_moe(*call_args)),
                         "ours_cuda_graph": time_ms(lambda: fused_moe(*call_args), cuda_graph=True)}
                check = {}
                for name, module in baselines.items():
                    experts_args = (inputs.hidden, inputs.expert_ids, inputs.expert_weights)
                    times[name] = time_ms(lambda: module(*experts_args))
                    if name == "grouped_mm":
                        expected = module(*experts_args)
                        error = (ours.float() - expected.float()).abs().max().item()
                        scale = expected.float().abs().max().item()
                        check = {"max_abs_error_vs_grouped_mm": error, "max_abs_grouped_mm": scale,
                                 "close": bool(torch.allclose(ours.float(), expected.float(), rtol=4e-2, atol=4e-2))}
            floor = floor_ms(shape, inputs, bandwidth, flop_rate)
            fraction = floor["floor_ms"] / times["ours"]
            speedup = times["grouped_mm"] / times["ours"] if "grouped_mm" in times else None
            print(f"{model:<18}{num_tokens:>7}{floor['floor_ms']:>9.3f}{times['ours']:>9.3f}"
                  f"{times['ours_cuda_graph']:>9.3f}" + "".join(f"{times[n]:>12.3f}" for n in args.baselines)
                  + f"{100 * fraction:>7.0f}%" + (f"{speedup:>7.2f}x" if speedup else "")
                  + ("" if check.get("close", True) else "  MISMATCH vs grouped_mm"))
            record = {"bench": "kernels", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "device": device_name, "versions": versions, "dtype": args.dtype, "model": model,
                      "shape": {"E": shape.num_experts, "H": shape.hidden_size, "I": shape.intermediate_size,
                                "K": shape.top_k, "T": num_tokens},
                      "median_ms": times, "hbm_bytes_per_s": bandwidth, "matmul_flop_per_s": flop_rate, **floor,
                      "fraction_of_floor": fraction, "speedup_vs_grouped_mm": speedup, "check": check}
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
        del weights, baselines
        torch.cuda.empty_cache()
    print(f"appended to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
