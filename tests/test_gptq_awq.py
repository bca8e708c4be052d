"""GPTQ and AWQ int4 linears re-packed into our int4 layout: the tests write the tensors as those
formats document them (eight 4-bit values per int32, value i at bits 4i; GPTQ packs qweight along
K and stores zero - 1, AWQ packs along N in the order 0 2 4 6 1 3 5 7), save them in a safetensors
file with the checkpoint's quantization_config, read them back and import them: the 4-bit values,
zero points and scales must come out exactly, and every unsupported variant is refused by name."""

import json
import os
import re
import tempfile

import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_infer
from moe_infer.errors import ConfigError, NotSupported
from moe_infer.experts.convert import convert
from moe_infer.experts.gptq_awq import ImportFormat, import_linear
from moe_infer.experts.quant import QuantScheme, dequantize, quantize, unpack_int4

N, K, G = 48, 256, 64
NG = K // G


def grid(seed: int, zero_max: int = 15):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=generator, dtype=torch.int32)  # W's 4-bit values, [N, K]
    zeros = torch.randint(0, zero_max + 1, (N, NG), generator=generator, dtype=torch.int32)
    scales = (torch.rand(N, NG, generator=generator) * 0.01 + 1e-3).half()
    return q, zeros, scales


def pack_words(values: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int [R, 8C] -> int32 [R, C]: word c holds values[:, 8c + order[i]] at bits 4i (written out per bit
    position, as the formats' own packers do)."""
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            words[:, c] |= values[:, 8 * c + order[i]].to(torch.int64) << (4 * i)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # as int32 bit patterns


def write_gptq(path, q, zeros, scales, g_idx, v1=True):
    tensors = {"layer.qweight": pack_words(q).t().contiguous(),  # [K/8, N]: packed along K
               "layer.qzeros": pack_words(zeros.t().contiguous() - (1 if v1 else 0)),  # [NG, N/8] along N
               "layer.scales": scales.t().contiguous(), "layer.g_idx": g_idx.to(torch.int32)}
    save_file(tensors, str(path))


def write_awq(path, q, zeros, scales):
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    save_file({"layer.qweight": pack_words(q.t().contiguous(), order),  # [K, N/8]
               "layer.qzeros": pack_words(zeros.t().contiguous(), order),  # [NG, N/8]
               "layer.scales": scales.t().contiguous()}, str(path))


def check(imported, q, zeros, scales):
    assert imported.shape == (N, K) and imported.scheme.group_size == G
    assert torch.equal(unpack_int4(imported.qweight).to(torch.int32), q)
    assert torch.equal(imported.zeros.to(torch.int32), zeros)
    assert torch.equal(imported.scales, scales.float())
    g = torch.arange(K) // G
    expected = (q - zeros[:, g]).float() * scales.float()[:, g]  # the formats' own dequantization
    torch.testing.assert_close(dequantize(imported), expected, rtol=0, atol=0)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_is_repacked_exactly(tmp_path, checkpoint_format):
    v1 = checkpoint_format == "gptq"
    q, zeros, scales = grid(1)
    if v1:  # v1 stores zero - 1 in 4 bits: zero 0 would be stored as -1 (refused below)
        zeros = zeros.clamp(min=1)
    write_gptq(tmp_path / "m.safetensors", q, zeros, scales, torch.arange(K) // G, v1=v1)
    config = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": False, "sym": False,
              "checkpoint_format": checkpoint_format}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    t = load_file(str(tmp_path / "m.safetensors"))
    fmt = ImportFormat.from_config(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    check(import_linear(fmt, t["layer.qweight"], t["layer.qzeros"], t["layer.scales"], t["layer.g_idx"]),
          q, zeros, scales)


def test_awq_is_repacked_exactly(tmp_path):
    q, zeros, scales = grid(2)
    write_awq(tmp_path / "m.safetensors", q, zeros, scales)
    t = load_file(str(tmp_path / "m.safetensors"))
    fmt = ImportFormat.from_config({"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
                                    "version": "gemm"})
    check(import_linear(fmt, t["layer.qweight"], t["layer.qzeros"], t["layer.scales"]), q, zeros, scales)


def test_unsupported_variants_are_refused_by_name(tmp_path):
    q, zeros, scales = grid(3)
    fmt = ImportFormat.from_config({"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": True,
                                    "checkpoint_format": "gptq_v2"})
    act_order = torch.randperm(K, generator=torch.Generator().manual_seed(0)) // G
    write_gptq(tmp_path / "a.safetensors", q, zeros, scales, act_order, v1=False)
    t = load_file(str(tmp_path / "a.safetensors"))
    with pytest.raises(NotSupported, match="act-order"):
        import_linear(fmt, t["layer.qweight"], t["layer.qzeros"], t["layer.scales"], t["layer.g_idx"])
    write_gptq(tmp_path / "z.safetensors", q, zeros.clamp(max=15), scales, torch.arange(K) // G, v1=False)
    t = load_file(str(tmp_path / "z.safetensors"))
    v1 = ImportFormat.from_config({"quant_method": "gptq", "bits": 4, "group_size": G})
    assert int(zeros.max()) == 15  # read as v1, a stored 15 means zero point 16
    with pytest.raises(NotSupported, match="zero point 16"):
        import_linear(v1, t["layer.qweight"], t["layer.qzeros"], t["layer.scales"], t["layer.g_idx"])
    for config, message in (({"quant_method": "gptq", "bits": 3}, "GPTQ bits=3"),
                            ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version='gemv'"),
                            ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point=False"),
                            ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'marlin'"),
                            ({"quant_method": "bitsandbytes"}, "only GPTQ and AWQ")):
        with pytest.raises(NotSupported, match=message):
            ImportFormat.from_config(config)


QUANTIZED = re.compile(r"(experts\.\d+\.w[123]|self_attn\.[qkvo]_proj)\.weight$")


def write_quantized_checkpoint(hf, out, method: str, group: int):
    """The tiny Mixtral at `hf` re-saved as a GPTQ (gptq_v2) or AWQ GEMM checkpoint: every expert and
    attention projection quantized (our quantizer gives the 4-bit grid, the writer packs it in the
    format's layout with fp16 scales). Returns {key: the weight its checkpoint stands for}."""
    state = load_file(str(hf / "model.safetensors"))
    out.mkdir()
    tensors, dequantized = {}, {}
    order = (0, 2, 4, 6, 1, 3, 5, 7) if method == "awq" else tuple(range(8))
    for key, weight in state.items():
        if not QUANTIZED.search(key):
            tensors[key] = weight
            continue
        ours = quantize(weight, QuantScheme("int4", group))
        q = unpack_int4(ours.qweight).to(torch.int32)  # [N, K]
        zeros, scales = ours.zeros.to(torch.int32), ours.scales.half()  # [N, NG]
        prefix = key.removesuffix(".weight")
        if method == "gptq":
            tensors[f"{prefix}.qweight"] = pack_words(q).t().contiguous()
            tensors[f"{prefix}.g_idx"] = (torch.arange(q.shape[1]) // group).to(torch.int32)
        else:
            tensors[f"{prefix}.qweight"] = pack_words(q.t().contiguous(), order)
        tensors[f"{prefix}.qzeros"] = pack_words(zeros.t().contiguous(), order)
        tensors[f"{prefix}.scales"] = scales.t().contiguous()
        g = torch.arange(q.shape[1]) // group
        dequantized[key] = ((q - zeros[:, g]).float() * scales.float()[:, g])
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                      "sym": False, "checkpoint_format": "gptq_v2"} if method == "gptq" else
                                     {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm"})
    (out / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_quantized_checkpoint_converts_and_loads(tmp_path, method):
    """convert of a GPTQ / AWQ Mixtral: the experts keep their 4-bit values (int4, the checkpoint's group
    size), the dense projections are dequantized; the loaded model computes the model those weights
    stand for."""
    hf = tmp_path / "hf"
    tiny_models.build("mixtral", 0).save_pretrained(hf)
    dequantized = write_quantized_checkpoint(hf, tmp_path / "q", method, 32)
    summary = convert(tmp_path / "q", tmp_path / "converted", verify_after=True)
    manifest = json.loads((tmp_path / "converted" / "moe_infer.json").read_text())
    assert manifest["quantization"]["method"] == "int4" and manifest["quantization"]["group_size"] == 32
    assert summary["moe_layers"] == [0, 1]
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    state = load_file(str(hf / "model.safetensors"))
    state.update(dequantized)
    with tempfile.TemporaryDirectory() as ref_dir:  # the same model with the checkpoint's weights, in float
        reference.save_pretrained(ref_dir)
        save_file(state, os.path.join(ref_dir, "model.safetensors"))
        reference = moe_infer.wrap(AutoModelForCausalLM.from_pretrained(ref_dir).eval())
    model = moe_infer.load(tmp_path / "converted")
    ids = torch.randint(3, tiny_models.VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits.to(model.dtype), rtol=2e-3, atol=2e-3)
    with pytest.raises(ConfigError, match="imported as they are"):
        convert(tmp_path / "q", tmp_path / "other", quantize="int8")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_expert_biases_all_zero_are_dropped_others_refused_by_name(tmp_path, method):
    """Older AutoGPTQ wrote an all-zero `bias` beside every quantized linear: on the experts it is
    dropped (the converted checkpoint is the one without it, byte for byte); a nonzero expert bias
    is refused, naming the tensor."""
    hf = tmp_path / "hf"
    tiny_models.build("mixtral", 0).save_pretrained(hf)
    write_quantized_checkpoint(hf, tmp_path / "q", method, 32)
    convert(tmp_path / "q", tmp_path / "plain")
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    experts = [k.removesuffix(".qweight") for k in state if k.endswith(".qweight") and ".experts." in k]
    for prefix in experts:
        state[f"{prefix}.bias"] = torch.zeros(state[f"{prefix}.scales"].shape[1], dtype=torch.float16)
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    convert(tmp_path / "q", tmp_path / "zero-bias", verify_after=True)
    plain = json.loads((tmp_path / "plain" / "moe_infer.json").read_text())["experts"]
    zero = json.loads((tmp_path / "zero-bias" / "moe_infer.json").read_text())["experts"]
    assert len(zero) == 16 and [e["sha256"] for e in zero] == [e["sha256"] for e in plain]
    bad = sorted(experts)[3] + ".bias"
    state[bad][5] = 0.25
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(NotSupported, match=re.escape(bad) + ": a nonzero bias on a routed expert's"):
        convert(tmp_path / "q", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
