"""Tune the fused MoE kernels' launch configs on this GPU and write them as data
(`E={E},N={I},device_name={GPU},dtype={dtype}.json`, keyed by token count) to moe_infer/kernels/configs/.

    python scripts/tune_fused_moe.py --models mixtral-8x7b deepseek-v2-lite qwen3-30b-a3b
    python scripts/tune_fused_moe.py --experts 64 --hidden 2048 --intermediate 1408 --top-k 6 --tokens 1 64

For each token count: time the whole layer (`triton.testing.do_bench` median) for every shared
config of the search space (BLOCK_M, then gate/up = down blocks), keep the best, then search the
down projection's own BLOCK_N/BLOCK_K/warps/stages with that gate/up config fixed. A config whose
result differs from `reference_moe` is rejected. Needs CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMEM_LIMIT = 200 * 1024  # bytes of shared memory a config may ask for (H100: 227 KB per block)


def main(argv: list[str] | None = None) -> int:
    from moe_infer.kernels.benchmarking import MODEL_SHAPES, TOKEN_COUNTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[], choices=list(MODEL_SHAPES))
    parser.add_argument("--experts", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKEN_COUNTS))
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="a smaller search space (minutes, not hours)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write (default: the package's configs/ folder)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_fused_moe: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    custom = [args.experts, args.hidden, args.intermediate, args.top_k]
    if any(v is not None for v in custom) and not all(v is not None and v > 0 for v in custom):
        print("tune_fused_moe: give all of --experts --hidden --intermediate --top-k (positive ints)", file=sys.stderr)
        return 2
    if not args.models and custom[0] is None:
        print(f"tune_fused_moe: give --models ({', '.join(MODEL_SHAPES)}) or a custom shape", file=sys.stderr)
        return 2
    from moe_infer.kernels.benchmarking import MoEShape

    shapes = [MODEL_SHAPES[m] for m in args.models]
    if custom[0] is not None:
        shapes.append(MoEShape("custom", *custom))
    for shape in shapes:
        tune_shape(shape, args)
    return 0


def search_space(num_tokens: int, shape, dtype: torch.dtype, quick: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tuples that fit in shared memory."""
    element = torch.finfo(dtype).bits // 8
    rows = max(num_tokens * shape.top_k // shape.num_experts, 1)
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 4 * rows)]
    block_ns = (64, 128) if quick else (32, 64, 128, 256)
    block_ks = (64, 128) if quick else (32, 64, 128, 256)
    groups = (1, 8) if quick else (1, 8, 16)
    warps = (4, 8)
    stages = (3, 4) if quick else (2, 3, 4, 5)
    for bm, bn, bk, group, warp, stage in itertools.product(block_ms, block_ns, block_ks, groups, warps, stages):
        smem = stage * (bm * bk + 2 * bk * bn) * element  # gate/up kernel: x tile + gate and up tiles
        if smem <= SMEM_LIMIT and not (bm * bn >= 128 * 128 and warp == 4):
            yield bm, bn, bk, group, warp, stage


def tune_shape(shape, args: argparse.Namespace) -> None:
    import triton
    from triton.runtime.errors import OutOfResources

    from moe_infer.kernels import reference_moe
    from moe_infer.kernels.benchmarking import make_inputs, make_weights, time_ms
    from moe_infer.kernels.config import CONFIG_DIR, GemmConfig, KernelConfig, config_file_name, device_name
    from moe_infer.kernels.fused_moe import fused_moe_with_config

    dtype = DTYPES[args.dtype]
    weights = make_weights(shape, dtype)
    best_configs: dict[str, dict] = {}
    for num_tokens in args.tokens:
        inputs = make_inputs(shape, num_tokens, weights)
        call = (inputs.hidden, inputs.w13, inputs.w2, inputs.expert_ids, inputs.expert_weights)
        expected = reference_moe(*call).float()
        tolerance = 1e-3 if dtype == torch.float32 else 4e-2

        def measure(config: KernelConfig) -> float:
            try:
                out = fused_moe_with_config(*call, config)
            except OutOfResources:  # more shared memory or registers than this GPU has: not a candidate
                return float("inf")
            if not torch.allclose(out.float(), expected, rtol=tolerance, atol=tolerance):
                return float("inf")
            return time_ms(lambda: fused_moe_with_config(*call, config))

        started = time.time()
        best, best_ms = None, float("inf")
        for bm, bn, bk, group, warp, stage in search_space(num_tokens, shape, dtype, args.quick):
            config = KernelConfig(bm, GemmConfig(bn, bk, group, warp, stage))
            ms = measure(config)
            if ms < best_ms:
                best, best_ms = config, ms
        # the down GEMM (N = H, K = I) may prefer other blocks than gate/up (N = I, K = H)
        for bn, bk, warp, stage in itertools.product((32, 64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4, 5)):
            config = KernelConfig(best.BLOCK_M, best.gate_up, GemmConfig(bn, bk, best.gate_up.GROUP_M, warp, stage))
            ms = measure(config)
            if ms < best_ms:
                best, best_ms = config, ms
        best_configs[str(num_tokens)] = best.to_dict()
        print(f"{shape.name} T={num_tokens}: {best_ms:.3f} ms with {best.to_dict()} ({time.time() - started:.0f} s)")

    out_dir = args.out_dir or CONFIG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / config_file_name(shape.num_experts, shape.intermediate_size, device_name(weights[0].device),
                                      dtype)
    table = {"triton_version": triton.__version__, "hidden_size": shape.hidden_size,
             "top_k": shape.top_k, **best_configs}
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
