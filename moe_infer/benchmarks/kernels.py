"""Benchmark one MoE layer: moe_infer's fused Triton kernels (bf16, w8a16, w4a16) against `transformers`'
own experts implementations (`grouped_mm`, `batched_mm`, `eager`) and the roofline floor
max(bytes / measured HBM bandwidth, FLOPs / measured matmul rate), all in one process.

    moe-infer bench kernels                         # three model shapes, T = 1 .. 16384, every implementation
    moe-infer bench kernels --models mixtral-8x7b --tokens 1 64 1024 --impls grouped_mm ours w4a16
    moe-infer bench kernels --time-budget 170       # start no row after 170 s (the rest is recorded as skipped)
    moe-infer bench kernels --smoke                 # rehearsal without a GPU: a tiny layer, Triton's interpreter

(``python scripts/bench_kernels.py ...`` is the same.) One row per (model, T, implementation), printed
and appended to bench/results/kernels.jsonl (``--out``) as soon as it is measured, so a run that is cut
short keeps what it measured. A row holds the median milliseconds (`triton.testing.do_bench`; "ours-graph"
replays the layer from a CUDA graph), the floor and median / floor, median / grouped_mm's median at the
same T (grouped_mm runs first), a check of the output against the torch reference (`reference_moe`;
`reference_moe_quantized` for the quantized rows, in fp32 on the same values), and the seconds the
row took, compilation included.
Quantized rows' floors count the quantized bytes (values, scales, zero points). Every line names the
device, the library versions and the command. Rows that would take too long are skipped and recorded
with the reason: batched_mm when it would copy more than --gather-limit GiB of expert weights (it
gathers every slot's expert), an implementation above its --max-tokens cap, every row once
--time-budget is spent.

--smoke runs the same code end to end at a tiny shape: on a machine without CUDA in Triton's CPU
interpreter (it re-runs itself under TRITON_INTERPRET=1 if need be), fp32, timed with
`time.perf_counter`; its figures are not measurements (default output bench/results/kernels-smoke.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from moe_infer.errors import ConfigError
from moe_infer.helpformat import RawDescriptionHelpFormatter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = Path("bench") / "results" / "kernels.jsonl"  # under the current directory
SMOKE_RESULTS = Path("bench") / "results" / "kernels-smoke.jsonl"
# measured in this order at each (model, T): grouped_mm first, the baseline of every row's ratio
IMPLEMENTATIONS = {
    "grouped_mm": "transformers grouped_mm",
    "ours": "moe_infer fused_moe",
    "ours-graph": "moe_infer fused_moe, replayed from a CUDA graph (no L2 flush between runs)",
    "w8a16": "moe_infer fused_moe_quantized, int8 experts",
    "w4a16": "moe_infer fused_moe_quantized, int4 experts",
    "batched_mm": "transformers batched_mm",
    "eager": "transformers eager",
}
QUANTIZED = {"w8a16": "int8", "w4a16": "int4"}
TRANSFORMERS = ("grouped_mm", "batched_mm", "eager")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from moe_infer import envs
    from moe_infer.kernels.benchmarking import MODEL_SHAPES, TOKEN_COUNTS, run_interpreted

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=RawDescriptionHelpFormatter,
                                     epilog="implementations:\n" + "\n".join(
                                         f"  {name:<11} {label}" for name, label in IMPLEMENTATIONS.items()))
    parser.add_argument("--models", nargs="+", choices=list(MODEL_SHAPES),
                        help=f"layer shapes (default: all of {', '.join(MODEL_SHAPES)})")
    parser.add_argument("--tokens", nargs="+", type=int, help=f"token counts T (default {list(TOKEN_COUNTS)})")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS),
                        metavar="IMPL", help="implementations to time (default: all; listed below)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="hidden / weight dtype (default bf16; fp32 for a "
                                                              "CPU --smoke: the interpreter mishandles bf16)")
    parser.add_argument("--group-size", type=int, help="int4 group size of the w4a16 rows (default 128)")
    parser.add_argument("--max-tokens", nargs="+", default=[], metavar="IMPL=T",
                        help="skip an implementation above T tokens, e.g. eager=4096")
    parser.add_argument("--gather-limit", type=float, default=16.0, metavar="GIB",
                        help="skip batched_mm when it would gather more than this many GiB of expert weights "
                             "(default 16)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="start no row after this many seconds (counted from the start, setup included)")
    parser.add_argument("--smoke", action="store_true",
                        help="rehearse at a tiny shape; without CUDA in Triton's CPU interpreter (not a measurement)")
    parser.add_argument("--out", type=Path, help=f"JSON lines file rows are appended to (default {RESULTS}, "
                                                 f"{SMOKE_RESULTS} with --smoke)")
    args = parser.parse_args(argv)
    try:
        args.max_tokens = _parse_caps(args.max_tokens)
    except ValueError as err:
        return _refuse(f"{parser.prog}: {err}")
    if args.tokens is not None and any(t < 1 for t in args.tokens):
        return _refuse(f"{parser.prog}: --tokens must be positive, got {args.tokens}")
    if args.group_size is not None and (args.group_size < 2 or args.group_size % 2):
        return _refuse(f"{parser.prog}: --group-size must be an even int >= 2, got {args.group_size}")
    cuda = torch.cuda.is_available()
    if args.smoke and args.models:
        return _refuse(f"{parser.prog}: --smoke runs its own tiny layer; drop --models")
    if not cuda and not args.smoke:
        return _refuse(f"{parser.prog}: needs a CUDA GPU (torch.cuda.is_available() is False); --smoke rehearses "
                       f"it on the CPU, and `python -m pytest tests/test_kernels.py` checks the kernels there")
    if not cuda and args.dtype == "bf16":
        return _refuse(f"{parser.prog}: --smoke without CUDA runs fp32 or fp16 (Triton's interpreter mishandles "
                       f"bf16 loads)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not cuda and not envs.triton_interpret():
        return run_interpreted("moe_infer.benchmarks.kernels", argv, parser.prog)
    run(args, command=" ".join([parser.prog, shlex.join(argv)]).strip())
    return 0


def _parse_caps(items: list[str]) -> dict[str, int]:
    caps = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in IMPLEMENTATIONS or not value.isdigit():
            raise ConfigError(f"--max-tokens takes IMPL=T with IMPL one of {', '.join(IMPLEMENTATIONS)}, got {item!r}")
        caps[name] = int(value)
    return caps


def run(args: argparse.Namespace, command: str) -> list[dict]:
    """Measure every selected row (see the module docstring); returns the rows it appended."""
    import triton
    import transformers

    import moe_infer
    from moe_infer.experts.quant import DEFAULT_GROUP_SIZE, QuantScheme
    from moe_infer.kernels import fused_moe, fused_moe_quantized, reference_moe, reference_moe_quantized
    from moe_infer.kernels.benchmarking import (MODEL_SHAPES, SMOKE_GROUP_SIZE, SMOKE_SHAPE, SMOKE_TOKEN_COUNTS,
                                                TOKEN_COUNTS, floor_ms, make_inputs, make_weights,
                                                measure_hbm_bandwidth, measure_matmul_rate, quantize_weights,
                                                quantized_expert_bytes, time_ms, transformers_experts)

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    shapes = [SMOKE_SHAPE] if args.smoke else [MODEL_SHAPES[m] for m in args.models or MODEL_SHAPES]
    tokens = args.tokens or list(SMOKE_TOKEN_COUNTS if args.smoke else TOKEN_COUNTS)
    group_size = args.group_size or (SMOKE_GROUP_SIZE if args.smoke else DEFAULT_GROUP_SIZE)
    schemes = {"w8a16": QuantScheme("int8"), "w4a16": QuantScheme("int4", group_size)}
    impls = [name for name in IMPLEMENTATIONS if name in args.impls]  # grouped_mm first
    out = args.out or (SMOKE_RESULTS if args.smoke else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu_reps = 1 if args.smoke else 3

    if device == "cuda":
        device_name = torch.cuda.get_device_name()
        bandwidth, flop_rate = measure_hbm_bandwidth(), measure_matmul_rate(dtype=dtype)
    else:
        device_name = f"cpu ({platform.machine()}, {os.cpu_count()} cores; Triton interpreter)"
        bandwidth = measure_hbm_bandwidth("cpu", nbytes=2**24)
        flop_rate = measure_matmul_rate("cpu", size=256, dtype=dtype)
    versions = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
                "moe_infer": moe_infer.__version__, "python": platform.python_version(),
                "cuda": torch.version.cuda if device == "cuda" else None}
    print(f"{device_name}: HBM copy {bandwidth / 1e12:.3f} TB/s, {dtype_name} matmul {flop_rate / 1e12:.1f} TFLOP/s "
          f"(measured in {time.perf_counter() - started:.1f} s)" + ("; SMOKE: not a measurement" if args.smoke else ""),
          flush=True)
    print(f"{'model':<17}{'T':>6}  {'impl':<11}{'median':>9}{'floor':>9}{'x floor':>10}{'x gmm':>9}  {'check':<6}"
          f"{'s':>6}   (ms; s: the row's wall time, compilation and check included)", flush=True)

    rows = []
    for shape in shapes:
        setup_started = time.perf_counter()
        weights = make_weights(shape, dtype, device)
        quantized = {name: quantize_weights(weights, schemes[name]) for name in QUANTIZED if name in impls}
        modules = {name: transformers_experts(shape, weights, name) for name in TRANSFORMERS if name in impls}
        print(f"{shape.name}: weights, quantization and modules set up in {time.perf_counter() - setup_started:.1f} s",
              flush=True)
        model_started = time.perf_counter()
        for num_tokens in tokens:
            inputs = make_inputs(shape, num_tokens, weights)
            routing = (inputs.expert_ids, inputs.expert_weights)
            calls = {
                "grouped_mm": lambda: modules["grouped_mm"](inputs.hidden, *routing),
                "ours": lambda: fused_moe(inputs.hidden, inputs.w13, inputs.w2, *routing),
                "ours-graph": lambda: fused_moe(inputs.hidden, inputs.w13, inputs.w2, *routing),
                "w8a16": lambda: fused_moe_quantized(inputs.hidden, *quantized["w8a16"], *routing),
                "w4a16": lambda: fused_moe_quantized(inputs.hidden, *quantized["w4a16"], *routing),
                "batched_mm": lambda: modules["batched_mm"](inputs.hidden, *routing),
                "eager": lambda: modules["eager"](inputs.hidden, *routing),
            }
            references: dict[str, torch.Tensor] = {}

            def reference(name: str) -> torch.Tensor:
                """The fp32 ground truth on the same values: bf16 rounding in a bf16 reference would be
                as large as the error the check looks for, at the largest T."""
                key = QUANTIZED.get(name, "float")
                if key not in references:
                    hidden, fp32_routing = inputs.hidden.float(), (routing[0], routing[1].float())
                    references[key] = (
                        reference_moe(hidden, inputs.w13.float(), inputs.w2.float(), *fp32_routing) if key == "float"
                        else reference_moe_quantized(hidden, *quantized[name], *fp32_routing))
                return references[key]

            grouped_mm_ms = None
            for name in impls:
                row_started = time.perf_counter()
                expert_bytes = quantized_expert_bytes(quantized[name]) if name in QUANTIZED else None
                floor = floor_ms(shape, inputs, bandwidth, flop_rate, expert_bytes)
                skipped = _skip_reason(name, num_tokens, shape, dtype, device, args, started)
                median, check = None, None
                if skipped is None:
                    with torch.no_grad():
                        got = calls[name]()  # compiles on first use
                        check = _check(got, reference(name), dtype, "reference_moe_quantized" if name in QUANTIZED
                                       else "reference_moe")
                        median = time_ms(calls[name], cuda_graph=name == "ours-graph", device=device, reps=cpu_reps)
                    if name == "grouped_mm":
                        grouped_mm_ms = median
                record = {
                    "bench": "kernels", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
                    "device": device_name, "versions": versions, "smoke": args.smoke, "dtype": dtype_name,
                    "model": shape.name, "shape": {"E": shape.num_experts, "H": shape.hidden_size,
                                                   "I": shape.intermediate_size, "K": shape.top_k, "T": num_tokens},
                    "impl": name, "label": IMPLEMENTATIONS[name],
                    "quant": schemes[name].as_json() if name in QUANTIZED else None,
                    "median_ms": median, **floor, "hbm_bytes_per_s": bandwidth, "matmul_flop_per_s": flop_rate,
                    "ratio_to_floor": None if median is None else median / floor["floor_ms"],
                    "ratio_to_grouped_mm": None if median is None or grouped_mm_ms is None else median / grouped_mm_ms,
                    "check": check, "seconds": time.perf_counter() - row_started, "skipped": skipped,
                }
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                rows.append(record)
                print(_format_row(record), flush=True)
        print(f"{shape.name}: {len(tokens)} token counts in {time.perf_counter() - model_started:.1f} s", flush=True)
        del weights, quantized, modules
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"appended {len(rows)} rows to {out} in {time.perf_counter() - started:.1f} s", flush=True)
    return rows


def _skip_reason(name: str, num_tokens: int, shape, dtype: torch.dtype, device: str, args: argparse.Namespace,
                 started: float) -> str | None:
    if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
        return f"time budget of {args.time_budget:g} s spent"
    if name in args.max_tokens and num_tokens > args.max_tokens[name]:
        return f"T > --max-tokens {name}={args.max_tokens[name]}"
    if name == "batched_mm":
        gathered = num_tokens * shape.top_k * shape.expert_bytes(dtype)
        if gathered > args.gather_limit * 2**30:
            return f"would gather {gathered / 2**30:.1f} GiB of expert weights > --gather-limit {args.gather_limit:g}"
    if name == "ours-graph" and device != "cuda":
        return "CUDA graphs need CUDA"
    return None


def _check(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, against: str) -> dict:
    """The row's output against the torch reference, with the test suite's tolerance for the dtype."""
    tolerance = 1e-4 if dtype == torch.float32 else 4e-2
    got, expected = got.float(), expected.float()
    return {"against": against, "max_abs_error": (got - expected).abs().max().item(),
            "max_abs_reference": expected.abs().max().item(),
            "close": bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance))}


def _format_row(row: dict) -> str:
    head = f"{row['model']:<17}{row['shape']['T']:>6}  {row['impl']:<11}"
    if row["skipped"]:
        return head + f"{'-':>9}{row['floor_ms']:>9.3f}  skipped: {row['skipped']}"
    gmm = row["ratio_to_grouped_mm"]
    return (head + f"{row['median_ms']:>9.3f}{row['floor_ms']:>9.3f}{row['ratio_to_floor']:>9.2f}x"
            + (f"{gmm:>8.2f}x" if gmm is not None else f"{'-':>9}")
            + f"  {'ok' if row['check']['close'] else 'WRONG':<6}{row['seconds']:>6.1f}")


def _refuse(message: str) -> int:
    """A user's mistake: one line on stderr, exit status 2 (nothing measured, nothing written)."""
    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(prog="moe-infer bench kernels"))
