"""The converter: layouts (sharded, fused transformers-5 keys, FP8 blocks, MTP layer), dtypes,
re-runs, and every bad input refused with one clear error and nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import tiny_models
from moe_infer.cli import main as cli_main
from moe_infer.experts.convert import PARTIAL_SUFFIX, convert
from moe_infer.experts.store import ExpertStore
from moe_infer.experts.synthetic import write_synthetic
from moe_infer.experts.tensorfile import CheckpointError
from moe_infer.families import UnsupportedModel


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    tiny_models.build("mixtral", 0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """A tiny DeepSeek-V3 in hub layout with FP8 projections (16 x 16 blocks), sharded, with an MTP layer."""
    path = tmp_path_factory.mktemp("fp8") / "hf"
    write_synthetic(str(path), tiny_models.config("deepseek_v3"), fp8=True, fp8_block=(16, 16), mtp_layer=True,
                    shard_bytes=50_000)
    return path


def _expert_bytes(path) -> list[tuple]:
    with open(os.path.join(path, "moe_infer.json")) as f:
        return [(e["layer"], e["expert"], e["sha256"]) for e in json.load(f)["experts"]]


def _nothing_written(dst) -> bool:
    return not os.path.exists(dst) and not os.path.exists(str(dst) + PARTIAL_SUFFIX)


def test_sharded_and_fused_sources_convert_to_the_same_experts(mixtral_dir, tmp_path):
    single = convert(mixtral_dir, tmp_path / "single")
    assert not single["skipped"] and single["moe_layers"] == [0, 1]
    # the same weights under transformers-5 in-memory names (fused experts.gate_up_proj), in 3 shards
    model = tiny_models.build("mixtral", 0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(mixtral_dir / "config.json", fused / "config.json")
    keys = sorted(state)
    weight_map = {}
    for i in range(3):
        part = {k: state[k] for k in keys[i::3]}
        save_file(part, fused / f"part-{i}.safetensors")
        weight_map.update({k: f"part-{i}.safetensors" for k in part})
    (fused / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert(fused, tmp_path / "from_fused")
    assert _expert_bytes(tmp_path / "from_fused") == _expert_bytes(tmp_path / "single")


def _reference_dequant(weight: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = weight[rows, cols].float() * scale[i, j]
    return out.to(torch.bfloat16)


def test_fp8_dequantize_matches_a_reference_and_keep_reads_the_same(fp8_dir, tmp_path):
    from safetensors import safe_open

    convert(fp8_dir, tmp_path / "deq", fp8="dequantize")
    convert(fp8_dir, tmp_path / "keep", fp8="keep")
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def source(key):
        with safe_open(fp8_dir / index[key], "pt") as f:
            return f.get_tensor(key)

    deq, keep = ExpertStore.open(tmp_path / "deq"), ExpertStore.open(tmp_path / "keep")
    assert deq.dtype == torch.bfloat16 and deq.manifest["quantization"] is None
    assert keep.dtype == torch.float8_e4m3fn and keep.manifest["quantization"]["block_size"] == [16, 16]
    assert keep.expert_nbytes(1) == deq.expert_nbytes(1) > keep.stored_nbytes(1)
    for layer, e in ((1, 0), (2, 7)):
        prefix = f"model.layers.{layer}.mlp.experts.{e}."
        ref = {p: _reference_dequant(source(prefix + p + ".weight"), source(prefix + p + ".weight_scale_inv"), 16)
               for p in ("gate_proj", "up_proj", "down_proj")}
        got = deq.read(layer, e)
        assert torch.equal(got.w13, torch.cat([ref["gate_proj"], ref["up_proj"]]))
        assert torch.equal(got.w2, ref["down_proj"])
        kept = keep.read(layer, e)
        assert torch.equal(kept.w13, got.w13) and torch.equal(kept.w2, got.w2)
    # the multi-token-prediction layer (index num_hidden_layers = 3) is skipped; dense FP8 dequantized
    skipped = deq.manifest["source"]["skipped_tensors"]
    assert skipped and all(k.startswith("model.layers.3.") for k in skipped)
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization_config" not in config
    deq.close(), keep.close()


def test_dtype_option_and_rerun(mixtral_dir, tmp_path):
    dst = tmp_path / "bf16"
    assert not convert(mixtral_dir, dst, dtype="bfloat16")["skipped"]
    with ExpertStore.open(dst) as store:
        assert store.dtype == torch.bfloat16
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert convert(mixtral_dir, dst, dtype="bfloat16", verify_after=True)["skipped"]  # same conversion: nothing to do
    with pytest.raises(CheckpointError, match="already holds a different conversion"):
        convert(mixtral_dir, dst)  # same model, other options


def test_rerun_after_interruption(mixtral_dir, tmp_path):
    dst = tmp_path / "out"
    partial = tmp_path / ("out" + PARTIAL_SUFFIX)
    partial.mkdir()
    (partial / ".moe_infer_partial").write_text("an interrupted run")
    (partial / "dense.safetensors").write_bytes(b"half written")
    convert(mixtral_dir, dst)
    assert not partial.exists() and (dst / "moe_infer.json").exists()
    foreign = tmp_path / ("other" + PARTIAL_SUFFIX)
    foreign.mkdir()
    with pytest.raises(CheckpointError, match="was not left by the converter"):
        convert(mixtral_dir, tmp_path / "other")


def test_destination_holding_a_different_model(mixtral_dir, tmp_path):
    other = tmp_path / "olmoe"
    tiny_models.build("olmoe", 0).save_pretrained(other)
    convert(other, tmp_path / "dst")
    before = _expert_bytes(tmp_path / "dst")
    with pytest.raises(CheckpointError, match="already holds a different conversion"):
        convert(mixtral_dir, tmp_path / "dst")
    assert _expert_bytes(tmp_path / "dst") == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not empty and is not a converted checkpoint"):
        convert(mixtral_dir, tmp_path / "junk")


def _sharded_copy(fp8_dir, tmp_path):
    """A copy of the FP8 checkpoint, and its shard names."""
    src = tmp_path / "src"
    shutil.copytree(fp8_dir, src)
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) >= 3
    return src, shards


def test_missing_shard(fp8_dir, tmp_path):
    src, shards = _sharded_copy(fp8_dir, tmp_path)
    os.remove(src / shards[1])
    with pytest.raises(CheckpointError, match=f"missing shard {shards[1]}"):
        convert(src, tmp_path / "dst")
    assert _nothing_written(tmp_path / "dst")


def test_truncated_shard(fp8_dir, tmp_path):
    src, shards = _sharded_copy(fp8_dir, tmp_path)
    shard = src / shards[2]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, tmp_path / "dst")
    assert _nothing_written(tmp_path / "dst")


def test_missing_experts_in_source(mixtral_dir, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(mixtral_dir / "config.json", src / "config.json")
    state = load_file(mixtral_dir / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(state, src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts \[5\] lack gate/up/down"):
        convert(src, tmp_path / "dst")
    assert _nothing_written(tmp_path / "dst")


def test_unknown_and_unsupported_architectures(mixtral_dir, tmp_path):
    src = tmp_path / "unknown"
    shutil.copytree(mixtral_dir, src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="not_a_model", architectures=["NotAModelForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="architecture transformers does not know"):
        convert(src, tmp_path / "dst")
    dense = tmp_path / "llama"
    tiny_models.build("llama", 0).save_pretrained(dense)
    with pytest.raises(UnsupportedModel, match="no sparse MoE block.*Mixtral"):
        convert(dense, tmp_path / "dst")
    assert _nothing_written(tmp_path / "dst")


def test_cli_convert_and_verify(mixtral_dir, tmp_path, capsys):
    dst = tmp_path / "cli"
    assert cli_main(["convert", str(mixtral_dir), str(dst), "--verify", "--no-progress"]) == 0
    assert "2 MoE layers x 8 experts" in capsys.readouterr().out
    assert cli_main(["verify", str(dst)]) == 0
    assert "OK (2 MoE layers, 16 experts" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path)]) == 2
    assert "not a converted moe_infer checkpoint" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--no-progress"]) == 2
    assert "is not a directory" in capsys.readouterr().err
