"""Tuning the fused MoE kernels' launch configs on this GPU, written as the data `config.py` reads
(`E={E},N={I},device_name={GPU},dtype={dtype}[,quant=...].json`, keyed by token count). The CLI is
`scripts/tune_fused_moe.py`:

    python scripts/tune_fused_moe.py --models mixtral-8x7b --quick --time-budget 150
    python scripts/tune_fused_moe.py --models mixtral-8x7b --quant none int8 int4 --quick --time-budget 300
    python scripts/tune_fused_moe.py --experts 64 --hidden 2048 --intermediate 1408 --top-k 6 --tokens 1 64
    python scripts/tune_fused_moe.py --smoke      # rehearsal without a GPU: a tiny layer, Triton's interpreter

Tuned units are (shape, quantization, token count), in that order. For each: the default config
first, then the search space's shared configs (gate/up = down blocks; BLOCK_M nearest the default's
first; with --quick only BLOCK_M within a factor 2 of it), then the down GEMM's own BLOCK_N / BLOCK_K / warps with the best gate/up fixed; the best
whole-layer time (`triton.testing.do_bench` median) wins. A config whose output differs from the torch
reference is rejected, as is one the GPU cannot launch (shared memory, registers). --time-budget is
shared out over the units still to tune (time a unit leaves is passed on); a unit stops starting
configs when its share is spent. The file is rewritten after every unit, so a run cut short keeps
what it tuned; its metadata records, per token count, the tuned and the default milliseconds.
Quantized variants (w8a16, w4a16) are tuned like the float layer, in files of their own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from moe_infer.experts.quant import DEFAULT_GROUP_SIZE, QuantScheme

from .config import (CONFIG_DIR, INT4_MIN_BLOCK_K, GemmConfig, KernelConfig, config_file_name, default_config,
                     device_name, parse_config_table, quant_key, shared_memory_bytes)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMEM_LIMIT = 200 * 1024  # bytes of shared memory a config may ask for (H100 / H200: 227 KB per block)
SMOKE_OUT_DIR = Path("bench") / "results" / "tune-smoke"  # under the current directory


def main(argv: list[str] | None = None, prog: str = "tune_fused_moe") -> int:
    from moe_infer import envs

    from .benchmarking import (MODEL_SHAPES, SMOKE_GROUP_SIZE, SMOKE_SHAPE, SMOKE_TOKEN_COUNTS, TOKEN_COUNTS, MoEShape,
                               run_interpreted)

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--models", nargs="*", default=[], choices=list(MODEL_SHAPES))
    parser.add_argument("--experts", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--tokens", nargs="+", type=int, help=f"token counts (default {list(TOKEN_COUNTS)})")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bf16 (fp32 for a CPU --smoke)")
    parser.add_argument("--quant", nargs="+", default=["none"], choices=["none", "int8", "int4"],
                        help="which experts: float (none), w8a16 (int8), w4a16 (int4); default none")
    parser.add_argument("--group-size", type=int, help=f"int4 group size (default {DEFAULT_GROUP_SIZE}; "
                                                       f"the smoke layer's {SMOKE_GROUP_SIZE} with --smoke)")
    parser.add_argument("--quick", action="store_true", help="a smaller search space (minutes, not hours)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS", help="for the whole run (see above)")
    parser.add_argument("--smoke", action="store_true",
                        help="rehearse at a tiny shape with a tiny search space; without CUDA in Triton's interpreter")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where to write (default: the package's configs/ folder; {SMOKE_OUT_DIR} with --smoke)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        return _refuse(f"{prog}: needs a CUDA GPU (torch.cuda.is_available() is False); --smoke rehearses it on "
                       f"the CPU")
    custom = [args.experts, args.hidden, args.intermediate, args.top_k]
    if any(v is not None for v in custom) and not all(v is not None and v > 0 for v in custom):
        return _refuse(f"{prog}: give all of --experts --hidden --intermediate --top-k (positive ints)")
    if args.smoke and (args.models or custom[0] is not None):
        return _refuse(f"{prog}: --smoke tunes its own tiny layer; drop --models and the custom shape")
    if not args.smoke and not args.models and custom[0] is None:
        return _refuse(f"{prog}: give --models ({', '.join(MODEL_SHAPES)}) or a custom shape")
    if args.tokens is not None and any(t < 1 for t in args.tokens):
        return _refuse(f"{prog}: --tokens must be positive, got {args.tokens}")
    group_size = args.group_size or (SMOKE_GROUP_SIZE if args.smoke else DEFAULT_GROUP_SIZE)
    try:
        quants = [None if q == "none" else QuantScheme(q, group_size) for q in dict.fromkeys(args.quant)]
    except ValueError as err:
        return _refuse(f"{prog}: {err}")
    if not cuda and args.dtype == "bf16":
        return _refuse(f"{prog}: --smoke without CUDA runs fp32 or fp16 (Triton's interpreter mishandles bf16)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not cuda and not envs.triton_interpret():
        return run_interpreted("moe_infer.kernels.tuning", argv, prog)

    shapes = [SMOKE_SHAPE] if args.smoke else [MODEL_SHAPES[m] for m in args.models]
    if custom[0] is not None:
        shapes.append(MoEShape("custom", *custom))
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    tokens = args.tokens or list(SMOKE_TOKEN_COUNTS if args.smoke else TOKEN_COUNTS)
    out_dir = args.out_dir or (SMOKE_OUT_DIR if args.smoke else CONFIG_DIR)
    command = " ".join(["python scripts/tune_fused_moe.py", shlex.join(argv)])
    tune(shapes, quants, tokens, dtype, out_dir=out_dir, quick=args.quick, smoke=args.smoke,
         time_budget=args.time_budget, command=command.strip())
    return 0


def shared_space(num_tokens: int, shape, dtype: torch.dtype, quant: QuantScheme | None, quick: bool,
                 smoke: bool = False) -> list[KernelConfig]:
    """Configs with the same blocks for both GEMMs, the default's BLOCK_M first, that fit in shared memory."""
    default = default_config(shape.num_experts, shape.top_k, num_tokens, dtype, quant)
    if smoke:  # two alternatives to the default, enough to run every step
        return [KernelConfig(16, GemmConfig(32, 32, 1, 4, 2)), KernelConfig(32, GemmConfig(64, 64, 8, 4, 2))]
    rows = max(num_tokens * shape.top_k // shape.num_experts, 1)
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 4 * rows)
                and (not quick or default.BLOCK_M // 2 <= m <= 2 * default.BLOCK_M)]  # quick: near the default's
    block_ms.sort(key=lambda m: abs(m.bit_length() - default.BLOCK_M.bit_length()))
    block_ns = (64, 128) if quick else (32, 64, 128, 256)
    block_ks = (64, 128) if quick else (32, 64, 128, 256)
    groups = (8,) if quick else (1, 8, 16)
    warps = (4, 8)
    stages = (3, 4) if quick else (2, 3, 4, 5)
    space = []
    for bm, bn, bk, group, warp, stage in itertools.product(block_ms, block_ns, block_ks, groups, warps, stages):
        config = KernelConfig(bm, GemmConfig(bn, bk, group, warp, stage))
        if _launchable(config, dtype, quant):
            space.append(config)
    return space


def down_space(best: KernelConfig, dtype: torch.dtype, quant: QuantScheme | None, quick: bool,
               smoke: bool = False) -> list[KernelConfig]:
    """`best` with other blocks for the down GEMM (N = H, K = I), whose best blocks may differ from gate/up's."""
    gate_up = best.gate_up
    if smoke:
        return [KernelConfig(best.BLOCK_M, gate_up, GemmConfig(32, 32, gate_up.GROUP_M, 4, 2))]
    block_ns = (64, 128, 256) if quick else (32, 64, 128, 256)
    block_ks = (64, 128) if quick else (32, 64, 128)
    stages = (gate_up.num_stages,) if quick else (2, 3, 4, 5)
    space = []
    for bn, bk, warp, stage in itertools.product(block_ns, block_ks, (4, 8), stages):
        config = KernelConfig(best.BLOCK_M, gate_up, GemmConfig(bn, bk, gate_up.GROUP_M, warp, stage))
        if config.down != best.down and _launchable(config, dtype, quant):
            space.append(config)
    return space


def _launchable(config: KernelConfig, dtype: torch.dtype, quant: QuantScheme | None) -> bool:
    if quant is not None and quant.name == "int4" and min(config.gate_up.BLOCK_K, config.down.BLOCK_K) < INT4_MIN_BLOCK_K:
        return False
    wide_with_few_warps = any(config.BLOCK_M * cfg.BLOCK_N >= 128 * 128 and cfg.num_warps == 4
                              for cfg in (config.gate_up, config.down))
    return shared_memory_bytes(config, dtype, quant) <= SMEM_LIMIT and not wide_with_few_warps


def tune(shapes: list, quants: list[QuantScheme | None], tokens: list[int], dtype: torch.dtype, *, out_dir: Path,
         quick: bool, smoke: bool, time_budget: float | None, command: str) -> list[Path]:
    """Tune every (shape, quantization, token count) and write one file per (shape, quantization)."""
    import triton

    from moe_infer.kernels import reference_moe, reference_moe_quantized

    from .benchmarking import make_inputs, make_weights, quantize_weights, time_ms
    from .fused_moe import fused_moe_with_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    units_left = len(shapes) * len(quants) * len(tokens)
    written = []
    for shape in shapes:
        weights = make_weights(shape, dtype, device)
        for quant in quants:
            layer = weights if quant is None else quantize_weights(weights, quant)
            path = Path(out_dir) / config_file_name(shape.num_experts, shape.intermediate_size,
                                                    device_name(torch.device(device)), dtype, quant)
            table, timings = _existing(path)
            for num_tokens in tokens:
                unit_started = time.perf_counter()
                unit_budget = None
                if time_budget is not None:
                    unit_budget = max(time_budget - (unit_started - started), 0.0) / units_left
                units_left -= 1
                inputs = make_inputs(shape, num_tokens, weights)
                call = (inputs.hidden, *layer, inputs.expert_ids, inputs.expert_weights)
                expected = (reference_moe(*call) if quant is None else reference_moe_quantized(*call)).float()
                tolerance = 1e-4 if dtype == torch.float32 else 4e-2
                failures: dict[str, int] = {}

                def measure(config: KernelConfig) -> float:
                    try:
                        out = fused_moe_with_config(*call, config)
                    except Exception as err:  # noqa: BLE001 - a config the GPU cannot launch is no candidate
                        name = type(err).__name__
                        if name not in failures:
                            print(f"  {config.to_dict()}: {name}: {str(err).splitlines()[0][:200]}", flush=True)
                        failures[name] = failures.get(name, 0) + 1
                        return float("inf")
                    if not torch.allclose(out.float(), expected, rtol=tolerance, atol=tolerance):
                        failures["wrong result"] = failures.get("wrong result", 0) + 1
                        return float("inf")
                    return time_ms(lambda: fused_moe_with_config(*call, config), device=device,
                                   reps=1 if smoke else 3)

                default = default_config(shape.num_experts, shape.top_k, num_tokens, dtype, quant)
                best, best_ms = default, measure(default)
                default_ms, timed, out_of_time = best_ms, 1, 0
                shared = shared_space(num_tokens, shape, dtype, quant, quick, smoke)
                for down_phase in (False, True):  # the down space varies the best shared config
                    for config in down_space(best, dtype, quant, quick, smoke) if down_phase else shared:
                        if config == default:
                            continue
                        if unit_budget is not None and time.perf_counter() - unit_started > unit_budget:
                            out_of_time += 1
                            continue
                        ms = measure(config)
                        timed += 1
                        if ms < best_ms:
                            best, best_ms = config, ms
                if best_ms == float("inf"):
                    raise RuntimeError(f"tune_fused_moe: no config ran correctly for {shape.name} T={num_tokens} "
                                       f"({quant_key(quant) or 'float'}); failures {failures}")
                table[str(num_tokens)] = best.to_dict()
                timings[str(num_tokens)] = {"ms": best_ms, "default_ms": default_ms, "configs_timed": timed,
                                            "configs_skipped_for_time": out_of_time, "failures": failures,
                                            "seconds": time.perf_counter() - unit_started}
                _write(path, table, timings, shape, dtype, quant, device, command, triton.__version__, smoke)
                print(f"{shape.name} {quant_key(quant) or dtype_name(dtype)} T={num_tokens}: {best_ms:.3f} ms "
                      f"(default {default_ms:.3f} ms) with {best.to_dict()}; {timed} configs timed"
                      + (f", {out_of_time} skipped for time" if out_of_time else "")
                      + (f", failures {failures}" if failures else "")
                      + f" ({time.perf_counter() - unit_started:.0f} s)", flush=True)
            written.append(path)
            print(f"wrote {path}", flush=True)
        del weights
    print(f"tuned in {time.perf_counter() - started:.0f} s", flush=True)
    return written


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _existing(path: Path) -> tuple[dict, dict]:
    """Token entries and timings already in `path` (a run tuning other token counts adds to them)."""
    if not path.is_file():
        return {}, {}
    raw = json.loads(path.read_text())
    parse_config_table(raw, str(path))  # refuses a malformed file before it is extended
    return {k: v for k, v in raw.items() if k.isdigit()}, dict(raw.get("timings", {}))


def _write(path: Path, table: dict, timings: dict, shape, dtype: torch.dtype, quant: QuantScheme | None, device: str,
           command: str, triton_version: str, smoke: bool) -> None:
    metadata = {"triton_version": triton_version, "torch_version": torch.__version__,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                "dtype": str(dtype).removeprefix("torch."), "quant": None if quant is None else quant.as_json(),
                "hidden_size": shape.hidden_size, "top_k": shape.top_k, "command": command, "smoke": smoke,
                "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timings": timings}
    ordered = dict(sorted(table.items(), key=lambda item: int(item[0])))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({**metadata, **ordered}, indent=1) + "\n")
    temporary.replace(path)  # atomic: a reader never sees half a file


def _refuse(message: str) -> int:
    """A user's mistake: one line on stderr, exit status 2 (nothing measured, nothing written)."""
    print(message, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(prog="scripts/tune_fused_moe.py"))
