"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU: the interpreter runs
the kernels' arithmetic but not Triton's compiler, whose type rules are stricter. Arguments get the
specialisations a real launch gives them (16-divisible pointers, sizes and strides; unit strides).
Each GEMM's weight tile (float, int8, packed int4) must be loaded by asynchronous copies, the
software pipelining that hides the weight stream's latency: byte loads the compiler cannot
vectorise stay synchronous (the first w4a16 kernel's did).

Triton decides at import whether it interprets (even its own `tl.cdiv`, `tl.sigmoid`, ...), and
this suite interprets, so the compilation runs in a fresh process: this file run as a script.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles the kernels for real in test_kernels.py")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernels_compile_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    compiled = result.stdout.split()
    assert compiled == ["chunk_histogram_kernel", "expert_offsets_kernel", "scatter_rows_kernel",
                        "align_one_chunk_kernel", "gate_up_kernel:pipelined", "down_kernel:pipelined",
                        "gate_up_kernel:pipelined", "down_kernel:pipelined",
                        "gate_up_kernel:pipelined", "down_kernel:pipelined",  # w8a16
                        "gate_up_kernel:pipelined", "down_kernel:pipelined",  # w4a16, a group per K tile
                        "gate_up_kernel:pipelined", "down_kernel:pipelined",  # w4a16, groups within K tiles
                        "sum_topk_kernel"]


def _load(name: str):
    """The kernel module by file: only Triton is imported, not moe_infer (and transformers)."""
    spec = importlib.util.spec_from_file_location(f"_compiled_{name}", KERNELS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Triton resolves the kernels' annotations through it
    spec.loader.exec_module(module)
    return module


def _compile_for_h100(fn, pointer_types: dict, constexprs: dict, *, num_warps=4, num_stages=3,
                      weight_tile: str | None = None) -> None:
    """Compile `fn` for sm_90 and print its name, with ":pipelined" when `weight_tile` (the GEMM's
    weight tile type, "64x64xbf16") is loaded by asynchronous copies (software pipelining)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            constants[(index,)] = constexprs[name]
        else:
            signature[name] = pointer_types.get(name, "fp32" if name in ("alpha", "limit") else "i32")
            if name in pointer_types or name.endswith("_size") or name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    pipelined = False
    if weight_tile is not None:
        shape, element = weight_tile.rsplit("x", 1)
        pipelined = any("async_copy_global_to_local" in line and f"tensor<{shape}x!tt.ptr<{element}>" in line
                        for line in kernel.asm["ttgir"].splitlines())
    print(fn.__name__ + (":pipelined" if pipelined else ""))


def main() -> None:
    align_kernels, fused_moe_kernels = _load("align_kernels"), _load("fused_moe_kernels")
    align_pointers = {"expert_ids_ptr": "*i64", "chunk_counts_ptr": "*i32", "expert_counts_ptr": "*i32",
                      "padded_bounds_ptr": "*i32", "sorted_slot_ids_ptr": "*i32", "block_expert_ids_ptr": "*i32"}
    _compile_for_h100(align_kernels.chunk_histogram_kernel, align_pointers, {"CHUNK": 128, "E_PAD": 512})
    _compile_for_h100(align_kernels.expert_offsets_kernel, align_pointers,
                      {"BLOCK_M": 16, "E_PAD": 512, "CHUNK_TILE": 32})
    _compile_for_h100(align_kernels.scatter_rows_kernel, align_pointers,
                      {"BLOCK_M": 16, "CHUNK": 128, "E_PAD": 512, "BLOCK_TILE": 16})
    _compile_for_h100(align_kernels.align_one_chunk_kernel, align_pointers,
                      {"BLOCK_M": 16, "CHUNK": 128, "E_PAD": 512, "BLOCK_TILE": 16, "ROW_TILE": 1024})
    gemm_pointers = {"hidden_ptr": "*bf16", "w_gate_ptr": "*bf16", "w_up_ptr": "*bf16", "b_gate_ptr": "*bf16",
                     "b_up_ptr": "*bf16", "act_ptr": "*bf16", "w2_ptr": "*bf16", "b2_ptr": "*bf16",
                     "expert_weights_ptr": "*fp32", "slot_out_ptr": "*fp32", "sorted_slot_ids_ptr": "*i32",
                     "block_expert_ids_ptr": "*i32", **{name: "*fp32" for name in ("s_gate_ptr", "s_up_ptr", "s2_ptr")},
                     **{name: "*u8" for name in ("z_gate_ptr", "z_up_ptr", "z2_ptr")}}
    unit_strides = {"stride_hh": 1, "stride_wk": 1, "stride_an": 1, "stride_ak": 1, "stride_on": 1}
    float_weights = {"WEIGHTS": fused_moe_kernels.FLOAT_WEIGHTS, "GROUP_PER_TILE": False}
    for block_m, activation, has_bias, warps in (
        (16, fused_moe_kernels.SILU, False, 4),      # decode blocks (mma v2)
        (128, fused_moe_kernels.GPT_OSS, True, 8),   # prefill blocks (wgmma), biases, clamped SwiGLU
    ):
        blocks = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "HAS_BIAS": has_bias,
                  "DOT_PRECISION": "tf32", **unit_strides, **float_weights}
        _compile_for_h100(fused_moe_kernels.gate_up_kernel, gemm_pointers, {**blocks, "ACTIVATION": activation},
                          num_warps=warps, weight_tile="64x64xbf16")
        _compile_for_h100(fused_moe_kernels.down_kernel, gemm_pointers, blocks, num_warps=warps,
                          weight_tile="64x64xbf16")
    for weights, pointer, weight_tile, group_per_tile, block_m in (
        (fused_moe_kernels.INT8_WEIGHTS, "*i8", "64x64xi8", False, 16),  # w8a16 decode blocks
        (fused_moe_kernels.INT4_WEIGHTS, "*u8", "32x64xi8", True, 16),   # w4a16: BLOCK_K divides the group
        (fused_moe_kernels.INT4_WEIGHTS, "*u8", "32x64xi8", False, 64),  # w4a16: per-pair groups
    ):
        quantized = {**gemm_pointers, "w_gate_ptr": pointer, "w_up_ptr": pointer, "w2_ptr": pointer}
        blocks = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "HAS_BIAS": False,
                  "DOT_PRECISION": "tf32", "WEIGHTS": weights, "GROUP_PER_TILE": group_per_tile, **unit_strides}
        _compile_for_h100(fused_moe_kernels.gate_up_kernel, quantized,
                          {**blocks, "ACTIVATION": fused_moe_kernels.SILU}, weight_tile=weight_tile)
        _compile_for_h100(fused_moe_kernels.down_kernel, quantized, blocks, weight_tile=weight_tile)
    _compile_for_h100(fused_moe_kernels.sum_topk_kernel,
                      {"slot_out_ptr": "*fp32", "expert_ids_ptr": "*i64", "out_ptr": "*bf16"},
                      {"TOP_K": 8, "BLOCK_T": 16, "BLOCK_H": 128, "stride_on": 1, "stride_oh": 1})


if __name__ == "__main__":
    main()
