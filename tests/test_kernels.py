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
from moe_infer.kernels.benchmarking import MoEShape, floor_ms, make_inputs, make_weights, transformers_experts
from moe_infer.kernels.config import KernelConfig, config_file_name, default_config

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
    (40, 3, 2, 72, 40),    # several row blocks per expert; H > BLOCK_K (K loop with a ragged tail)
    (6, 4, 2, 136, 72),    # H > sum-kernel block and I > BLOCK_N: ragged column tiles in both GEMMs
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("T, E, K, H, I", CASES)
def test_fused_moe_matches_reference(T, E, K, H, I, dtype):
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(T, E, K, H, I, dtype, seed=T * 31 + E))
    got = fused_moe(hidden, w13, w2, ids, weights)
    assert got.dtype == dtype and got.shape == hidden.shape
    torch.testing.assert_close(got, reference_moe(hidden, w13, w2, ids, weights), **TOLERANCES[dtype])


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


def test_custom_op_fake_and_torch_compile():
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(6, 4, 2, 16, 8, torch.float32, seed=7))
    op_args = (hidden, w13, w2, ids, weights, None, None, "silu", 1.702, 7.0, False)
    torch.library.opcheck(torch.ops.moe_infer.fused_moe.default, op_args,
                          test_utils=("test_schema", "test_faketensor"))

    def layer(h, i, w):
        return fused_moe(torch.nn.functional.silu(h), w13, w2, i, w) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hidden, ids, weights), layer(hidden, ids, weights))


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


@pytest.mark.parametrize("tokens", [1, 64, 4096, 65536])
def test_default_configs_are_valid(tokens):
    for num_experts, top_k in ((8, 2), (64, 6), (256, 8)):
        config = default_config(num_experts, top_k, tokens, torch.bfloat16)
        assert config.gate_up.BLOCK_K >= 16 and config.down.BLOCK_N >= 16


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


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "moe_infer"])
def test_benchmark_layers_agree(implementation):
    """The benchmark's setup: transformers' experts implementations on the same weights and routing
    compute what fused_moe computes."""
    # sizes multiples of 4: grouped_mm wants 16-byte strides
    shape = MoEShape("tiny", num_experts=6, hidden_size=24, intermediate_size=12, top_k=3)
    weights = make_weights(shape, torch.float32, DEVICE)
    inputs = make_inputs(shape, 5, weights)
    experts = transformers_experts(shape, weights, implementation)
    got = experts(inputs.hidden, inputs.expert_ids, inputs.expert_weights)
    expected = fused_moe(inputs.hidden, inputs.w13, inputs.w2, inputs.expert_ids, inputs.expert_weights)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
    assert floor_ms(shape, inputs, 3e12, 7e14)["flops"] == 2 * 5 * 3 * 3 * 24 * 12


def test_no_warnings_under_interpreter():
    hidden, w13, w2, ids, weights, _, _ = on_device(*make_case(3, 4, 2, 16, 8, torch.float32, seed=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if DEVICE == "cpu":
            fused_moe(hidden, w13, w2, ids, weights)
