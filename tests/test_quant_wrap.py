"""Quantized experts in memory: torch's CPU weight-only kernels against the dequantized matmul,
and `wrap(model, quantize=...)` against the same model with its experts replaced by their
dequantized values (what the quantized model must compute), its stats and its refusals."""

import pytest
import torch
import tiny_models

import moe_infer
from moe_infer.errors import ConfigError, NotSupported
from moe_infer.experts.quant import QuantScheme, dequantize, quantize, quantized_linear
from moe_infer.experts.quant_matmul import kernel_group, quantized_matmul

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("scheme, n, k, kernel", [
    ("int8", 48, 64, True),
    ("int4", 192, 128, True),    # one group of 128 per row: kernel group 128
    ("int4", 128, 96, True),     # a row shorter than G: one group of 96, kernel groups of 32
    ("int4", 64, 384, True),     # three groups of 128
    ("int4", 40, 128, False),    # N not a multiple of 16: dequantize, then matmul
    ("int4", 32, 200, False),    # a short last group (128 + 72): no kernel group fits
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_kernels_match_the_dequantized_matmul(scheme, n, k, kernel, dtype):
    generator = torch.Generator().manual_seed(n + k)
    weight = quantize(torch.randn(n, k, generator=generator) * 0.05, scheme)
    x = torch.randn(7, k, generator=generator).to(dtype)
    got = quantized_matmul(x, weight)
    assert got.dtype == dtype and got.shape == (7, n)
    torch.testing.assert_close(got, quantized_linear(x.float(), weight).to(dtype), **TOLERANCES[dtype])
    used_kernel = bool(weight.prepared) and all(v is not None for v in weight.prepared.values())
    assert used_kernel == kernel
    if scheme == "int4":
        assert (kernel_group(k, 128, n) is not None) == kernel


def _dequantized_reference(model, scheme):
    """`model` with every routed expert replaced by its quantized-then-dequantized weights."""
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(experts, name)
                param.copy_(dequantize(quantize(param, scheme), param.dtype))
    return model


@pytest.mark.parametrize("scheme", ["int8", QuantScheme("int4", 32)], ids=["int8", "int4-g32"])
def test_wrap_quantize_computes_the_dequantized_model(scheme):
    scheme = QuantScheme(scheme) if isinstance(scheme, str) else scheme
    reference = _dequantized_reference(tiny_models.build("mixtral", seed=3), scheme)
    model = tiny_models.build("mixtral", seed=3)
    ids = torch.randint(3, tiny_models.VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(5))
    moe_infer.wrap(model, quantize=scheme)
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    stats = moe_infer.executor(model).stats()
    assert stats["quantization"] == scheme.as_json() and stats["kernel"] == "torch"
    float_bytes = 2 * 32 * 64 * 3 * 4  # w13 [2I,H] + w2 [H,I] in fp32, one expert
    assert stats["tiers"]["cpu"]["peak_bytes"] < 0.4 * float_bytes * 8 * 2  # 8 experts x 2 layers
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.is_meta and experts.down_proj.is_meta  # the float copy is released
    moe_infer.wrap(model, quantize=scheme)  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, got, rtol=0, atol=0)


def test_wrap_quantize_refusals():
    model = moe_infer.wrap(tiny_models.build("mixtral", seed=1), quantize="int8")
    with pytest.raises(ConfigError, match="quantized to int8"):
        moe_infer.wrap(model, quantize="int4")
    with pytest.raises(ConfigError, match="unwrap: .*quantized in memory"):
        moe_infer.unwrap(model)
    with pytest.raises(ConfigError, match="MoEConfig.quantize='int3'"):
        moe_infer.MoEConfig(quantize="int3")
    fresh = tiny_models.build("mixtral", seed=1)
    with pytest.raises(ConfigError, match="smaller than one expert"):
        moe_infer.wrap(fresh, quantize="int4", cpu_memory=100)
    assert not moe_infer.is_wrapped(fresh) and not fresh.model.layers[0].mlp.experts.gate_up_proj.is_meta
    with pytest.raises(NotSupported, match="offload_dir"):
        moe_infer.wrap(fresh, quantize="int4", offload_dir="/nonexistent/x")
    assert not moe_infer.is_wrapped(fresh)


@pytest.mark.parametrize("family, scheme, kernel", [
    ("mixtral", "int8", "torch"), ("mixtral", QuantScheme("int4", 32), "torch"),
    ("gpt_oss", QuantScheme("int4", 32), "torch"), ("mixtral", QuantScheme("int4", 32), "triton"),
], ids=["int8", "int4-g32", "gpt_oss", "int4-g32-triton"])
def test_a_budget_caches_the_experts_quantized_in_memory(family, scheme, kernel):
    """wrap(quantize=, cpu_memory=): the cache holds the quantized experts (slots of their quantized
    bytes, so a budget below one float expert still fits several) and computes exactly what the model
    quantized without a budget computes (the torch path; the fused w4a16 kernel over the slot pool,
    in Triton's interpreter, to rounding); bytes moved are quantized bytes."""
    scheme = QuantScheme(scheme) if isinstance(scheme, str) else scheme
    ids = torch.randint(3, tiny_models.VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(4))
    reference = moe_infer.wrap(tiny_models.build(family, seed=2), quantize=scheme)
    source = moe_infer.executor(reference).layers[0].expert_source
    quantized, float_bytes = source.expert_nbytes(), tiny_models.build(family, seed=2).model.layers[0].mlp.experts
    float_bytes = sum(p[0].numel() * p.element_size() for p in float_bytes.parameters())
    budget = 3 * quantized + 16
    assert budget < float_bytes  # no float expert would fit
    model = moe_infer.wrap(tiny_models.build(family, seed=2), quantize=scheme, cpu_memory=budget, kernel=kernel)
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, **(dict(rtol=1e-4, atol=1e-4) if kernel == "triton" else
                                                 dict(rtol=0, atol=0)))
    stats = moe_infer.executor(model).stats()
    tier = stats["tiers"]["cpu"]
    assert stats["quantization"] == scheme.as_json() and stats["kernel"] == kernel
    assert tier["slots"] == 3 and quantized <= tier["slot_bytes"] <= quantized + 64
    loaded = tier["misses"] - stats["cpu_computed_experts"]  # the others ran from the backing, unmoved
    assert loaded > 0 and tier["bytes_moved"] == loaded * quantized
    assert tier["peak_bytes"] <= budget


@pytest.mark.parametrize("family, scheme", [("mixtral", "int8"), ("gpt_oss", "int4")])
def test_quantized_experts_move_their_tensors_in_place(family, scheme):
    """What a budget on CUDA does to experts quantized in memory (moves them to page-locked host
    memory, and back at unwrap), on copies here: every expert then reads the new tensors, with the
    same values, and the layer computes the same output."""
    from moe_infer.cache.setup import move_experts

    model = moe_infer.wrap(tiny_models.build(family, seed=6), quantize=scheme)
    layer = moe_infer.executor(model).layers[0]
    source = layer.expert_source
    ids = torch.randint(3, tiny_models.VOCAB_SIZE, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    old = source.tensors()
    assert move_experts(layer, torch.device("cpu")) is None and source.tensors()[0] is old[0]  # already there
    source.replace_tensors([t.clone() for t in old])
    new = source.tensors()
    assert len(new) == len(old) and all(a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in zip(old, new))
    expert = source(5)
    assert expert.w13.qweight.data_ptr() == new[0][5].data_ptr()  # the views follow the new tensors
    assert (expert.b13 is not None) == (family == "gpt_oss")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs a CUDA device")
@pytest.mark.parametrize("scheme", ["int8", QuantScheme("int4", 32)], ids=["int8", "int4-g32"])
def test_a_gpu_budget_caches_the_experts_quantized_in_memory(scheme):
    """On CUDA, wrap(quantize=, gpu_memory=): the quantized experts move to page-locked host memory
    (the backing), the GPU tier holds slots of their quantized bytes, and the output is the one of
    the model quantized on the GPU without a budget; unwrapping the budget puts them back."""
    scheme = QuantScheme(scheme) if isinstance(scheme, str) else scheme
    ids = torch.randint(3, tiny_models.VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(4)).cuda()
    reference = moe_infer.wrap(tiny_models.build("mixtral", seed=2).cuda(), quantize=scheme)
    quantized = moe_infer.executor(reference).layers[0].expert_source.expert_nbytes()
    model = moe_infer.wrap(tiny_models.build("mixtral", seed=2).cuda(), quantize=scheme, gpu_memory=3 * quantized + 16)
    source = moe_infer.executor(model).layers[0].expert_source
    assert all(t.device.type == "cpu" and t.is_pinned() for t in source.tensors())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-3, atol=1e-3)
    tier = moe_infer.executor(model).stats()["tiers"]["gpu"]
    assert tier["slots"] == 3 and quantized <= tier["slot_bytes"] <= quantized + 64
    moe_infer.wrap(model, moe_infer.MoEConfig())  # no budget: the experts back on the GPU
    assert all(t.device.type == "cuda" for t in source.tensors())


@pytest.mark.parametrize("rows", [64, 128])
def test_int4_kernel_form_is_built_in_row_blocks_exactly(monkeypatch, rows):
    """The int4 CPU kernel's tiles built REPACK_ROWS rows at a time (bounding the int32 values it
    needs) are the tiles of the whole weight, a short last block included, and compute the same."""
    import moe_infer.experts.quant_matmul as qm
    from moe_infer.experts.quant import unpack_int4

    weight = quantize(torch.randn(208, 256, generator=torch.Generator().manual_seed(3)) * 0.05, "int4")
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(weight.qweight).to(torch.int32), 2)
    monkeypatch.setattr(qm, "REPACK_ROWS", rows)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    got = quantized_matmul(x, weight)
    tiles = weight.prepared[("int4_tiles", torch.float32)][0]
    assert 208 % rows and torch.equal(tiles, whole)
    torch.testing.assert_close(got, quantized_linear(x, weight), rtol=1e-5, atol=1e-5)
