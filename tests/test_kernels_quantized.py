"""`kernels.fused_moe_quantized` (w8a16 / w4a16: int8 and int4 experts dequantized inside the fused
kernels) against `reference_moe_quantized` (`quant.dequantize`, then `reference_moe`), its custom op
under torch.compile, its input checks, and which BLOCK_K / group size pairs run.

Without a GPU the kernels run in Triton's CPU interpreter (fp32 and fp16; tests/conftest.py); bf16
at the benchmark's model shapes and CUDA-graph capture run on a GPU (skipped here).
"""

import pytest
import torch
from test_kernels import DEVICE, TOLERANCES, check_custom_op_and_compile, on_device, row_blocks
from test_reference import make_case

from moe_infer.experts import Activation, ExpertTensors
from moe_infer.experts.quant import QuantizedWeight, QuantScheme, dequantize, quantize
from moe_infer.kernels import fused_experts, fused_moe_quantized, reference_moe, reference_moe_quantized
from moe_infer.kernels.align import CHUNK
from moe_infer.kernels.config import GemmConfig, KernelConfig, default_config
from moe_infer.kernels.fused_moe import _GemmWeight, fused_moe_with_config

SCHEMES = {"int8": QuantScheme("int8"), "int4": QuantScheme("int4", 32)}


def quantized_case(T, E, K, H, I, dtype, scheme, seed, bias=False):
    """make_case's layer with w13 / w2 quantized from their float32 values; hidden and biases in dtype."""
    hidden, w13, w2, ids, weights, b13, b2 = make_case(T, E, K, H, I, torch.float32, seed=seed, bias=bias)
    q13, q2 = (quantize(w, scheme).map(lambda t: t.to(DEVICE)) for w in (w13, w2))
    hidden, ids, weights, b13, b2 = on_device(hidden.to(dtype), ids, weights,
                                              *(None if b is None else b.to(dtype) for b in (b13, b2)))
    return hidden, q13, q2, ids, weights, b13, b2


CASES = [  # (T, E, K, H, I); int4 groups of 32
    (1, 4, 2, 64, 32),     # decode: one row block; H two whole groups, I one
    (256, 8, 2, 80, 48),   # 2-3 row blocks per expert, 3 GROUP_M groups, T*K > chunk; short last group in both
                           # GEMMs (H = 32 + 32 + 16, I = 32 + 16)
    (20, 4, 2, 96, 40),    # I = 40: the down GEMM's last K tile is ragged and its last group short
]


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("T, E, K, H, I", CASES)
def test_quantized_matches_reference(T, E, K, H, I, dtype, scheme):
    hidden, q13, q2, ids, weights, _, _ = quantized_case(T, E, K, H, I, dtype, SCHEMES[scheme], seed=T * 7 + E)
    got = fused_moe_quantized(hidden, q13, q2, ids, weights)
    assert got.dtype == dtype and got.shape == hidden.shape
    torch.testing.assert_close(got, reference_moe_quantized(hidden, q13, q2, ids, weights), **TOLERANCES[dtype])


def test_the_large_case_reaches_its_edge_cases():
    T, E, K, H, I = CASES[1]
    _, _, _, ids, _, _, _ = make_case(T, E, K, H, I, torch.float32, seed=T * 7 + E)
    for dtype in (torch.float32, torch.float16):
        config = default_config(E, K, T, dtype, SCHEMES["int4"])
        blocks = row_blocks(ids, E, config.BLOCK_M)
        assert config.BLOCK_M == 32 and min(blocks) >= 2 and -(-sum(blocks) // config.gate_up.GROUP_M) == 3
        assert config.gate_up.BLOCK_K == 32  # lowered from fp16's 64 to divide the group of 32
    assert T * K > CHUNK and H % 32 and I % 32


# (BLOCK_K, group size, whether a K tile lies in one group); every pair with BLOCK_K >= 32 runs
BLOCK_K_GROUPS = [
    (32, 64, True),     # G a multiple of BLOCK_K: one scale per column per tile
    (64, 32, False),    # a tile spans two groups
    (32, 48, False),    # G not a power of two: group edges fall inside tiles
    (128, 48, False),   # a tile spans several groups; K = 80 < BLOCK_K: one ragged tile
]


@pytest.mark.parametrize("block_k, group_size, one_group_per_tile", BLOCK_K_GROUPS)
def test_int4_block_k_and_group_size_pairs(block_k, group_size, one_group_per_tile):
    scheme = QuantScheme("int4", group_size)
    hidden, q13, q2, ids, weights, _, _ = quantized_case(20, 4, 2, 80, 48, torch.float16, scheme, seed=3)
    assert _GemmWeight.of(q13).group_per_tile(block_k) == one_group_per_tile
    config = KernelConfig(16, GemmConfig(BLOCK_N=64, BLOCK_K=block_k, GROUP_M=2))
    torch.testing.assert_close(fused_moe_with_config(hidden, q13, q2, ids, weights, config),
                               reference_moe_quantized(hidden, q13, q2, ids, weights), **TOLERANCES[torch.float16])


def test_int4_refuses_block_k_below_32():
    hidden, q13, q2, ids, weights, _, _ = quantized_case(4, 4, 2, 64, 32, torch.float32, SCHEMES["int4"], seed=4)
    config = KernelConfig(16, GemmConfig(BLOCK_N=32, BLOCK_K=32), GemmConfig(BLOCK_N=32, BLOCK_K=16))
    with pytest.raises(ValueError, match=r"int4 experts need BLOCK_K >= 32 .*; the config has down BLOCK_K=16"):
        fused_moe_with_config(hidden, q13, q2, ids, weights, config)
    for tokens in (1, 64, 4096, 65536):  # no default asks for it, whatever the group size
        for group_size in (2, 16, 48, 128):
            config = default_config(8, 2, tokens, torch.float16, QuantScheme("int4", group_size))
            assert min(config.gate_up.BLOCK_K, config.down.BLOCK_K) >= 32


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_gpt_oss_interleaved_rows_biases_and_clamped_activation(scheme):
    """GPT-OSS's layout quantized as stored (gate and up rows alternating) runs through `fused_experts`
    with interleaved=True; the reference gets the canonical (de-interleaved) dequantized weights."""
    act = Activation("gpt_oss", alpha=1.702, limit=7.0)
    hidden, q13, q2, ids, weights, b13, b2 = quantized_case(10, 4, 2, 64, 32, torch.float32, SCHEMES[scheme],
                                                            seed=2, bias=True)
    hidden = hidden * 4  # reach the clamps
    w13 = dequantize(q13)  # [E, 2I, H], rows read as interleaved below
    w2 = dequantize(q2)
    canonical = [ExpertTensors(w13[e], w2[e], b13[e], b2[e], interleaved=True).canonical() for e in range(w13.shape[0])]
    got = fused_experts(hidden, q13, q2, ids, weights, activation=act, b13=b13, b2=b2, interleaved=True)
    expected = reference_moe(hidden, torch.stack([c.w13 for c in canonical]), w2, ids, weights,
                             activation=act, b13=torch.stack([c.b13 for c in canonical]), b2=b2)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
    # the public entry point, gate rows first
    torch.testing.assert_close(fused_moe_quantized(hidden, q13, q2, ids, weights, activation=act, b13=b13, b2=b2),
                               reference_moe_quantized(hidden, q13, q2, ids, weights, activation=act, b13=b13, b2=b2),
                               **TOLERANCES[torch.float32])


def test_skipped_ids_int32_ids_and_fp32_routing_weights():
    hidden, q13, q2, ids, weights, _, _ = quantized_case(12, 6, 3, 64, 32, torch.float16, SCHEMES["int4"], seed=1)
    ids[0, 0], ids[3, 1], ids[5, 2], ids[7] = -1, 6, 100, -1  # another rank's experts / no expert
    ids = ids.to(torch.int32)
    got = fused_moe_quantized(hidden, q13, q2, ids, weights.float())
    torch.testing.assert_close(got, reference_moe_quantized(hidden, q13, q2, ids, weights.float()),
                               **TOLERANCES[torch.float16])
    assert torch.count_nonzero(got[7]) == 0  # a token with no local expert gets nothing


def test_bad_inputs_are_named():
    hidden, q13, q2, ids, weights, _, _ = quantized_case(4, 4, 2, 64, 32, torch.float32, SCHEMES["int4"], seed=5)
    with pytest.raises(TypeError, match="must be QuantizedWeight .* got Tensor and QuantizedWeight"):
        fused_moe_quantized(hidden, dequantize(q13), q2, ids, weights)
    with pytest.raises(TypeError, match="must both be tensors or both QuantizedWeight, got QuantizedWeight and Tensor"):
        fused_experts(hidden, q13, dequantize(q2), ids, weights)
    int8_w2 = quantize(dequantize(q2), "int8").map(lambda t: t.to(DEVICE))
    with pytest.raises(ValueError, match="share one quantization scheme"):
        fused_moe_quantized(hidden, q13, int8_w2, ids, weights)
    bad_scales = QuantizedWeight(q13.scheme, q13.qweight, q13.scales[..., :1], q13.zeros, q13.in_features)
    with pytest.raises(ValueError, match=r"w13 \(int4, group 32\) of \[E,N,K\] = \[4, 64, 64\] must hold qweight uint8 "
                                         r"\[4, 64, 32\], scales float32 \[4, 64, 2\], zeros uint8 \[4, 64, 2\]; got "
                                         r"qweight uint8 \[4, 64, 32\], scales float32 \[4, 64, 1\]"):
        fused_moe_quantized(hidden, bad_scales, q2, ids, weights)
    with pytest.raises(ValueError, match=r"got hidden \(4, 64\), w13 \(4, 64, 64\), w2 \(4, 32, 64\)"):
        fused_moe_quantized(hidden, q13, q13.map(lambda t: t[:, :32]), ids, weights)  # not w2 [E, H, I] = [4, 64, 32]
    with pytest.raises(TypeError, match="hidden must be float32, float16 or bfloat16, got torch.int64"):
        fused_moe_quantized(hidden.long(), q13, q2, ids, weights)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_custom_op_fake_and_torch_compile(scheme):
    hidden, q13, q2, ids, weights, _, _ = quantized_case(6, 4, 2, 64, 32, torch.float32, SCHEMES[scheme], seed=7)
    quant = SCHEMES[scheme]
    op_args = (hidden, q13.qweight, q13.scales, q13.zeros, q2.qweight, q2.scales, q2.zeros, ids, weights, None, None,
               quant.name, quant.group_size, "silu", 1.702, 7.0, False)
    check_custom_op_and_compile(torch.ops.moe_infer.fused_moe_quantized.default, op_args,
                                lambda h, i, w: fused_moe_quantized(torch.nn.functional.silu(h), q13, q2, i, w) * 2,
                                hidden, ids, weights)


def test_torch_compile_across_group_sizes():
    """One compiled layer called with int4 experts of two group sizes: after the recompile torch.compile
    traces group_size as a symbolic int, which comparing the schemes as dataclasses (or the tensor
    layout as dicts) in the input checks could not trace."""
    layers = [quantized_case(6, 4, 2, 64, 32, torch.float32, QuantScheme("int4", g), seed=8) for g in (32, 64)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(h, q13, q2, i, w):
        return fused_moe_quantized(h, q13, q2, i, w)

    for hidden, q13, q2, ids, weights, _, _ in layers:
        torch.testing.assert_close(layer(hidden, q13, q2, ids, weights),
                                   reference_moe_quantized(hidden, q13, q2, ids, weights), **TOLERANCES[torch.float32])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantized_decode_step_replays_from_a_cuda_graph(scheme):
    hidden, q13, q2, ids, weights, _, _ = quantized_case(4, 8, 2, 256, 128, torch.bfloat16, SCHEMES[scheme], seed=9)
    static = [hidden.clone(), ids.clone(), weights.clone()]
    fused_moe_quantized(static[0], q13, q2, static[1], static[2])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_quantized(static[0], q13, q2, static[1], static[2])
    new_hidden, _, _, new_ids, new_weights, _, _ = quantized_case(4, 8, 2, 256, 128, torch.bfloat16,
                                                                  SCHEMES[scheme], seed=10)
    for buffer, value in zip(static, (new_hidden, new_ids, new_weights)):
        buffer.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, reference_moe_quantized(new_hidden, q13, q2, new_ids, new_weights),
                               **TOLERANCES[torch.bfloat16])
