"""`kernels.fused_moe` against `reference_moe`, its custom op under torch.compile, its launch configs,
and the two ways models use it: `wrap(kernel="triton")` and `set_experts_implementation("moe_infer")`.

Without a GPU the Triton kernels run in the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET);
the interpreter mishandles bf16 loads, so bf16 is checked only on a GPU. Shapes stay tiny: the
interpreter runs every program in Python.
"""

import json
import warnings

import pytest
import torch
from test_reference import make_case

import moe_infer
import tiny_models
from moe_infer.experts import Activation, ExpertTensors
from moe_infer.kernels import fused_experts, fused_moe, get_config, reference_moe
from moe_infer.kernels.align import CHUNK
from moe_infer.experts.quant import QuantScheme
from moe_infer.kernels import fused_moe_quantized, reference_moe_quantized
from moe_infer.kernels.benchmarking import (MODEL_SHAPES, MoEShape, floor_ms, make_inputs, make_weights,
                                            quantize_weights, transformers_experts)
from moe_infer.kernels.config import (DEFAULT_SMEM_LIMIT, GemmConfig, KernelConfig, config_file_name, default_config,
                                      shared_memory_bytes)
from moe_infer.kernels.fused_moe import fused_moe_with_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# fp32: both sides accumulate in fp32, differences are summation order; half precision: the reference
# rounds gate/up and the activation to the dtype, the kernel keeps them in fp32 until the store
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
              torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


CASES = [  # (T, E, K, H, I)
    (1, 4, 2, 20, 12),     # decode: one token, T < BLOCK_M
    (7, 8, 2, 20, 12),     # odd sizes everywhere
    (33, 8, 1, 16, 8),     # K = 1
    (9, 4, 4, 16, 8),      # K = E: every expert for every token
    (3, 16, 2, 24, 10),    # E > T: most experts get no token
    (40, 3, 2, 72, 40),    # one full row block per expert (BLOCK_M=32); H > BLOCK_K (K loop with a ragged tail)
    (6, 4, 2, 136, 72),    # H > sum-kernel block and I > BLOCK_N: ragged column tiles in both GEMMs
]
# The shapes below reach what the small ones cannot; test_large_cases_reach_their_edge_cases checks
# each claim against the default config and the routing the case draws (the last GROUP_M group of
# each is partial).
LARGE_CASES = [  # (T, E, K, H, I)
    (256, 8, 2, 40, 24),   # BLOCK_M=32: 2-3 row blocks per expert, 3 GROUP_M groups; T*K > chunk: three-launch alignment
    (600, 4, 1, 24, 16),   # BLOCK_M=64: 3 row blocks per expert, 2 GROUP_M groups; 5 alignment chunks
    (1100, 2, 1, 16, 8),   # BLOCK_M=128 (the prefill config): 5 row blocks per expert, 2 groups; 9 chunks
]
# T -> (BLOCK_M of the default config, fewest row blocks of an expert, GROUP_M groups the blocks fill)
LARGE_CASE_CLAIMS = {256: (32, 2, 3), 600: (64, 3, 2), 1100: (128, 5, 2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("T, E, K, H, I", CASES)
def test_fused_moe_matches_reference(T, E, K, H, I, dtype):
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(T, E, K, H, I, dtype, seed=T * 31 + E))
    got = fused_moe(hidden, w13, w2, ids, weights)
    assert got.dtype == dtype and got.shape == hidden.shape
    torch.testing.assert_close(got, reference_moe(hidden, w13, w2, ids, weights), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("T, E, K, H, I", LARGE_CASES)
def test_large_cases_match_reference(T, E, K, H, I, dtype):
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(T, E, K, H, I, dtype, seed=T * 31 + E))
    torch.testing.assert_close(fused_moe(hidden, w13, w2, ids, weights), reference_moe(hidden, w13, w2, ids, weights),
                               **TOLERANCES[dtype])


def row_blocks(expert_ids, num_experts, block_m):
    """Row blocks of block_m each expert gets from a routing (what the alignment gives it)."""
    counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts)
    return [-(-int(c) // block_m) for c in counts]


@pytest.mark.parametrize("T, E, K, H, I", LARGE_CASES)
def test_large_cases_reach_their_edge_cases(T, E, K, H, I):
    """What the comments of LARGE_CASES claim, for the default config of both tested dtypes."""
    _, _, _, ids, _, _, _ = make_case(T, E, K, H, I, torch.float32, seed=T * 31 + E)
    for dtype in (torch.float32, torch.float16):
        config = default_config(E, K, T, dtype)
        blocks = row_blocks(ids, E, config.BLOCK_M)
        group_m = config.gate_up.GROUP_M
        assert (config.BLOCK_M, min(blocks), -(-sum(blocks) // group_m)) == LARGE_CASE_CLAIMS[T], blocks
        assert sum(blocks) % group_m != 0  # the last group is partial
    assert T * K > CHUNK  # more slots than one alignment chunk: the three-launch path


def test_explicit_configs_with_odd_group_m_and_separate_down_blocks():
    """GROUP_M = 3 (a partial last group, program order not a power of two), BLOCK_M = 16, and a down
    GEMM with its own BLOCK_N / BLOCK_K; then every default config's block sizes on one shape."""
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(44, 4, 2, 40, 24, torch.float32, seed=12))
    expected = reference_moe(hidden, w13, w2, ids, weights)
    odd = KernelConfig(16, GemmConfig(BLOCK_N=16, BLOCK_K=16, GROUP_M=3), GemmConfig(BLOCK_N=32, BLOCK_K=32, GROUP_M=3))
    assert min(row_blocks(ids, 4, 16)) == 2 and sum(row_blocks(ids, 4, 16)) % 3 != 0
    torch.testing.assert_close(fused_moe_with_config(hidden, w13, w2, ids, weights, odd), expected,
                               **TOLERANCES[torch.float32])
    for tokens in (1, 64, 1024, 65536):  # the four regimes of default_config
        config = default_config(4, 2, tokens, torch.float32)
        torch.testing.assert_close(fused_moe_with_config(hidden, w13, w2, ids, weights, config), expected,
                                   **TOLERANCES[torch.float32])


def test_widest_routing():
    # E = 256, K = 8, the widest routing of the contract (fp32 only: the interpreter is slow at E = 256)
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(4, 256, 8, 16, 8, torch.float32, seed=11))
    torch.testing.assert_close(fused_moe(hidden, w13, w2, ids, weights), reference_moe(hidden, w13, w2, ids, weights),
                               **TOLERANCES[torch.float32])


def test_skipped_ids_and_int32_ids():
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(12, 6, 3, 16, 8, torch.float32, seed=1))
    ids[0, 0], ids[3, 1], ids[5, 2], ids[7] = -1, 6, 100, -1  # another rank's experts / no expert
    ids = ids.to(torch.int32)
    got = fused_moe(hidden, w13, w2, ids, weights)
    torch.testing.assert_close(got, reference_moe(hidden, w13, w2, ids, weights), **TOLERANCES[torch.float32])
    assert torch.count_nonzero(got[7]) == 0  # a token with no local expert gets nothing


def test_fp32_routing_weights_with_half_hidden():
    # families that keep routing weights in fp32: rows are weighted and summed in fp32, as the reference does
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(5, 4, 2, 16, 8, torch.float16, seed=6))
    got = fused_moe(hidden, w13, w2, ids, weights.float())
    torch.testing.assert_close(got, reference_moe(hidden, w13, w2, ids, weights.float()),
                               **TOLERANCES[torch.float16])


def test_gpt_oss_layout_biases_and_clamped_activation():
    """GPT-OSS stores w13 transposed [E, H, 2I] with gate/up interleaved: the kernels read the strided
    views in place; the reference gets the canonical (de-interleaved) copy."""
    act = Activation("gpt_oss", alpha=1.702, limit=7.0)
    hidden, w13, w2, ids, weights, b13, b2 = on_device(*make_case(10, 4, 2, 16, 8, torch.float32, seed=2,
                                                                  bias=True))
    hidden = hidden * 4  # reach the clamps
    stored_w13 = w13.transpose(1, 2).contiguous()  # [E, H, 2I], as GPT-OSS keeps it (interleaved below)
    canonical = [ExpertTensors(stored_w13[e].t(), w2[e], b13[e], b2[e], interleaved=True).canonical()
                 for e in range(w13.shape[0])]
    got = fused_experts(hidden, stored_w13.transpose(1, 2), w2, ids, weights, activation=act, b13=b13, b2=b2,
                        interleaved=True)
    expected = reference_moe(hidden, torch.stack([c.w13 for c in canonical]), w2, ids, weights, activation=act,
                             b13=torch.stack([c.b13 for c in canonical]), b2=b2)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_other_activations(name):
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(5, 4, 2, 16, 8, torch.float32, seed=3))
    torch.testing.assert_close(fused_moe(hidden, w13, w2, ids, weights, activation=name),
                               reference_moe(hidden, w13, w2, ids, weights, activation=name),
                               **TOLERANCES[torch.float32])


def test_deterministic():
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(40, 3, 2, 72, 40, torch.float16, seed=4))
    first = fused_moe(hidden, w13, w2, ids, weights)
    assert torch.equal(first, fused_moe(hidden, w13, w2, ids, weights))


def test_bad_inputs_are_named():
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(4, 4, 2, 16, 8, torch.float32, seed=5))
    with pytest.raises(ValueError, match=r"got hidden \(4, 16\), w13 \(4, 12, 16\)"):
        fused_moe(hidden, w13[:, :12], w2, ids, weights)
    with pytest.raises(ValueError, match="expert_weights"):
        fused_moe(hidden, w13, w2, ids, weights[:, :1])
    with pytest.raises(TypeError, match="share one dtype"):
        fused_moe(hidden.half(), w13, w2, ids, weights)
    with pytest.raises(ValueError, match="activation 'tanh' has no fused kernel; supported: gelu"):
        fused_moe(hidden, w13, w2, ids, weights, activation="tanh")
    with pytest.raises(ValueError, match="b13 and b2"):
        fused_moe(hidden, w13, w2, ids, weights, b13=torch.zeros(4, 16, device=DEVICE))


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the refusal on a machine without CUDA")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, w13, w2, ids, weights, _, _ = make_case(2, 4, 2, 16, 8, torch.float32, seed=5)
    with pytest.raises(ValueError, match="need CUDA tensors .got cpu.; set TRITON_INTERPRET=1"):
        fused_moe(hidden, w13, w2, ids, weights)


def check_custom_op_and_compile(op, op_args, layer, *inputs):
    """The op's schema and fake implementation against a real run, and `layer` (which calls it)
    traced whole by torch.compile, computing what it computes eagerly."""
    torch.library.opcheck(op, op_args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), layer(*inputs))


def test_custom_op_fake_and_torch_compile():
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(6, 4, 2, 16, 8, torch.float32, seed=7))
    check_custom_op_and_compile(torch.ops.moe_infer.fused_moe.default,
                                (hidden, w13, w2, ids, weights, None, None, "silu", 1.702, 7.0, False),
                                lambda h, i, w: fused_moe(torch.nn.functional.silu(h), w13, w2, i, w) * 2,
                                hidden, ids, weights)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_decode_step_replays_from_a_cuda_graph():
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(4, 8, 2, 64, 32, torch.bfloat16, seed=9))
    static = [hidden.clone(), ids.clone(), weights.clone()]
    fused_moe(static[0], w13, w2, static[1], static[2])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(static[0], w13, w2, static[1], static[2])
    new_hidden, _, _, new_ids, new_weights, _, _ = on_device(*make_case(4, 8, 2, 64, 32, torch.bfloat16, seed=10))
    for buffer, value in zip(static, (new_hidden, new_ids, new_weights)):
        buffer.copy_(value)
    graph.replay()
    torch.testing.assert_close(out, reference_moe(new_hidden, w13, w2, new_ids, new_weights),
                               **TOLERANCES[torch.bfloat16])


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 at model shapes needs a GPU (the interpreter mishandles bf16)")
@pytest.mark.parametrize("experts", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_bf16_at_model_shapes(model, experts):
    """The benchmark's layer shapes in bf16, float or quantized experts (int4 in groups of 128), from
    decode to prefill, against the fp32 reference on the same bf16 values (torch's bf16 reference
    rounds more than the kernels, which accumulate in fp32)."""
    shape = MODEL_SHAPES[model]
    weights = make_weights(shape, torch.bfloat16, DEVICE)
    layer = weights if experts == "bf16" else quantize_weights(weights, QuantScheme(experts))
    with torch.no_grad():
        for num_tokens in (1, 64, 1024):
            inputs = make_inputs(shape, num_tokens, weights)
            routing = (inputs.expert_ids, inputs.expert_weights.float())
            if experts == "bf16":
                got = fused_moe(inputs.hidden, *layer, *routing)
                expected = reference_moe(inputs.hidden.float(), *(w.float() for w in layer), *routing)
            else:
                got = fused_moe_quantized(inputs.hidden, *layer, *routing)
                expected = reference_moe_quantized(inputs.hidden.float(), *layer, *routing)
            torch.testing.assert_close(got.float(), expected, **TOLERANCES[torch.bfloat16],
                                       msg=lambda text: f"{model} {experts} T={num_tokens}: {text}")


def test_configs_nearest_token_key_wins_and_missing_file_warns(tmp_path, monkeypatch):
    name = config_file_name(6, 10, "cpu", torch.float16)
    table = {"triton_version": "3.x", "1": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1,
                                           "num_warps": 4, "num_stages": 2},
             "64": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3,
                    "down": {"BLOCK_N": 128}}}
    (tmp_path / name).write_text(json.dumps(table))
    monkeypatch.setenv("MOE_INFER_KERNEL_CONFIG_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    assert get_config(6, 10, 2, 20, torch.float16, cpu).BLOCK_M == 16  # |20-1| < |20-64|
    wide = get_config(6, 10, 2, 40, torch.float16, cpu)
    assert (wide.BLOCK_M, wide.gate_up.BLOCK_N, wide.down.BLOCK_N, wide.down.BLOCK_K) == (64, 64, 128, 32)
    assert KernelConfig.from_dict(table["64"]).to_dict() == table["64"]

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(UserWarning, match="no tuned kernel config E=5,N=10,device_name=cpu,dtype=float16.json"):
        assert get_config(5, 10, 2, 40, torch.float16, cpu) == default_config(5, 2, 40, torch.float16)
    with pytest.raises(ValueError, match="BLOCK_K=48: must be a power of two"):
        KernelConfig.from_dict({**table["1"], "BLOCK_K": 48})


def test_default_configs_grow_with_rows_and_fit_any_gpu():
    """BLOCK_M never shrinks as an expert's rows grow, and every default asks for less shared memory
    than DEFAULT_SMEM_LIMIT (the promise that it launches on any GPU since Ampere)."""
    for num_experts, top_k in ((8, 2), (64, 6), (256, 8)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            block_ms = [default_config(num_experts, top_k, tokens, dtype).BLOCK_M for tokens in
                        (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)]
            assert block_ms == sorted(block_ms) and block_ms[0] == 16 and block_ms[-1] == 128, block_ms
            for tokens in (1, 64, 4096, 65536):
                for quant in (None, QuantScheme("int8"), QuantScheme("int4", 128), QuantScheme("int4", 48)):
                    config = default_config(num_experts, top_k, tokens, dtype, quant)
                    assert shared_memory_bytes(config, dtype, quant) <= DEFAULT_SMEM_LIMIT, (config, dtype, quant)


# gpt_oss: transposed, interleaved, biased experts; deepseek_v3: shared expert, grouped sigmoid routing
@pytest.mark.parametrize("case", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_wrapped_model_triton_matches_torch(case):
    model = tiny_models.build(case, 0).to(DEVICE)  # a fresh model: the shared one stays on the CPU
    ids = tiny_models.token_ids(0, 2, 5).to(DEVICE)
    with torch.no_grad(), tiny_models.wrapped(model, kernel="torch"):
        expected = model(ids).logits
        expected_stats = moe_infer.executor(model).stats()["layers"]
    with torch.no_grad(), tiny_models.wrapped(model, kernel="triton"):
        ex = moe_infer.executor(model)
        assert ex.kernel == "triton"
        got = model(ids).logits
        stats = ex.stats()["layers"]  # the fused path's counts, read back from the device here
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    top_k = tiny_models.TINY_MODELS[case].top_k
    assert stats == expected_stats
    assert all(sum(layer["expert_counts"]) == 2 * 5 * top_k for layer in stats.values())
    with tiny_models.wrapped(model):  # "auto": Triton exactly when the experts are on CUDA
        assert moe_infer.executor(model).kernel == ("triton" if DEVICE == "cuda" else "torch")


@pytest.mark.parametrize("case", ["mixtral", "gpt_oss"])
def test_transformers_experts_implementation(case):
    model = tiny_models.build(case, 0).to(DEVICE)
    ids = tiny_models.token_ids(1, 1, 6).to(DEVICE)
    with torch.no_grad():
        expected = model(ids).logits
        model.set_experts_implementation("moe_infer")
        assert model.config._experts_implementation == "moe_infer"
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm", "moe_infer"])
def test_benchmark_layers_agree(implementation):
    """The benchmark's setup: transformers' experts implementations (and ours, "moe_infer", through
    transformers' ExpertsInterface) on the same weights and routing compute what the torch reference does."""
    # sizes multiples of 4: grouped_mm wants 16-byte strides
    shape = MoEShape("tiny", num_experts=6, hidden_size=24, intermediate_size=12, top_k=3)
    weights = make_weights(shape, torch.float32, DEVICE)
    inputs = make_inputs(shape, 5, weights)
    experts = transformers_experts(shape, weights, implementation)
    got = experts(inputs.hidden, inputs.expert_ids, inputs.expert_weights)
    expected = reference_moe(inputs.hidden, inputs.w13, inputs.w2, inputs.expert_ids, inputs.expert_weights)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


def test_floor_counts_touched_experts_once():
    shape = MoEShape("tiny", num_experts=6, hidden_size=24, intermediate_size=12, top_k=3)
    inputs = make_inputs(shape, 5, make_weights(shape, torch.float32, "cpu"))
    inputs.expert_ids[:] = torch.tensor([0, 1, 2])  # every token on experts 0-2: three experts' bytes
    floor = floor_ms(shape, inputs, bandwidth=1e9, flop_rate=1e18)
    assert floor["experts_touched"] == 3 and floor["flops"] == 2 * 5 * 3 * 3 * 24 * 12
    assert floor["bytes"] == 3 * shape.expert_bytes(torch.float32) + 2 * 5 * 24 * 4
    assert floor["floor_ms"] == pytest.approx(floor["bytes"] / 1e9 * 1e3)  # bytes-bound at these rates
    quantized = floor_ms(shape, inputs, bandwidth=1e9, flop_rate=1e18, expert_bytes=100)
    assert quantized["bytes"] == 3 * 100 + 2 * 5 * 24 * 4


def test_an_untuned_shape_warns_once_on_a_gpu_and_never_under_the_interpreter():
    """E=7, I=24 has no tuned config file: on a GPU the first call warns, naming the file looked for,
    and later calls do not; the interpreter's speed does not depend on block sizes, so it never warns."""
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(3, 7, 2, 32, 24, torch.float32, seed=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(fused_moe(hidden, w13, w2, ids, weights),
                                       reference_moe(hidden, w13, w2, ids, weights), **TOLERANCES[torch.float32])
    if DEVICE == "cuda":
        (warning,) = [w for w in caught if "no tuned kernel config" in str(w.message)]
        assert "E=7,N=24,device_name=" in str(warning.message) and "dtype=float32.json" in str(warning.message)
    else:
        assert [str(w.message) for w in caught] == []
