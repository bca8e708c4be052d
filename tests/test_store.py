"""ExpertStore / StoreExperts over a real converted checkpoint: reads, buffers, manifest checks, verify."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import tiny_models
from moe_infer.experts.convert import convert
from moe_infer.experts.layout import ModuleExperts
from moe_infer.experts.math import moe_forward
from moe_infer.experts.store import ExpertStore, StoreExperts, verify
from moe_infer.experts.tensorfile import CheckpointError


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(model, converted dir) of tiny GPT-OSS (biases, transposed interleaved experts) and tiny Mixtral."""
    root = tmp_path_factory.mktemp("store")
    out = {}
    for name in ("gpt_oss", "mixtral"):
        model = tiny_models.build(name, 0)
        model.save_pretrained(root / name / "hf")
        convert(root / name / "hf", root / name / "converted")
        out[name] = (model, str(root / name / "converted"))
    return out


def _module_experts(model, layer_idx: int) -> ModuleExperts:
    block = model.model.layers[layer_idx].mlp
    return ModuleExperts.from_module(block.experts, model.config.hidden_act)


@pytest.mark.parametrize("name", ["gpt_oss", "mixtral"])
def test_read_returns_the_canonical_experts(converted, name):
    model, path = converted[name]
    with ExpertStore.open(path) as store:
        assert store.moe_layers == [0, 1] and store.num_experts == 8
        for layer in store.moe_layers:
            source = _module_experts(model, layer)
            for e in range(store.num_experts):
                expected = source(e).canonical()
                got = store.read(layer, e)
                for a, b in ((got.w13, expected.w13), (got.w2, expected.w2), (got.b13, expected.b13),
                             (got.b2, expected.b2)):
                    assert (a is None) == (b is None)
                    if a is not None:
                        assert torch.equal(a, b)
                # one buffer: every tensor is a view into the same storage
                assert got.w13.untyped_storage().data_ptr() == got.w2.untyped_storage().data_ptr()
                assert store.expert_nbytes(layer) == got.w13.untyped_storage().nbytes()


def test_read_into_a_given_buffer(converted):
    _, path = converted["mixtral"]
    with ExpertStore.open(path) as store:
        buffer = torch.empty(store.expert_nbytes(0) + 16, dtype=torch.uint8)
        got = store.read(0, 3, out=buffer, pin=True)  # pin without CUDA: an ordinary buffer
        assert got.w13.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert torch.equal(got.w2, store.read(0, 3).w2)
        with pytest.raises(ValueError, match="uint8 CPU tensor of at least"):
            store.read(0, 3, out=torch.empty(10, dtype=torch.uint8))
        with pytest.raises(KeyError, match="no expert"):
            store.read(5, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_pinned_reads_on_cuda(converted):
    _, path = converted["mixtral"]
    with ExpertStore.open(path) as store:
        assert store.read(0, 1, pin=True).w13.is_pinned()
        source = StoreExperts(store, 0, "silu", device="cuda")
        assert source(1).w13.device.type == "cuda"


@pytest.mark.parametrize("name", ["gpt_oss", "mixtral"])
def test_store_experts_is_an_expert_source(converted, name):
    model, path = converted[name]
    module_source = _module_experts(model, 1)
    with ExpertStore.open(path) as store:
        source = StoreExperts(store, 1, module_source.activation)
        assert (source.num_experts, source.hidden_size, source.intermediate_size) == (
            module_source.num_experts, module_source.hidden_size, module_source.intermediate_size)
        assert source.device == torch.device("cpu") and source.expert_nbytes() == module_source.expert_nbytes()
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(9, source.hidden_size, generator=generator)
        ids = torch.randint(0, 8, (9, 2), generator=generator)
        weights = torch.rand(9, 2, generator=generator)
        expected = moe_forward(hidden, ids, weights, module_source, 8, module_source.activation)
        torch.testing.assert_close(moe_forward(hidden, ids, weights, source, 8, source.activation), expected,
                                   rtol=1e-6, atol=1e-6)


def _copy(converted, tmp_path) -> str:
    _, path = converted["mixtral"]
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return str(target)


def _edit_manifest(path: str, edit) -> None:
    with open(os.path.join(path, "moe_infer.json")) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(os.path.join(path, "moe_infer.json"), "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["experts"][3].update(file="../../etc/passwd"), "escapes the checkpoint directory"),
    (lambda m: m["experts"][3].update(file="/etc/passwd"), "must be a relative path"),
    (lambda m: m["experts"][3].update(offset=10**9), "past the end of the file"),
    (lambda m: m["experts"][3].update(offset=m["experts"][3]["offset"] + 4), "not contiguous"),
    (lambda m: m["experts"].pop(), "lacks 1 of the 2 x 8 experts"),
    (lambda m: m["experts"].append(dict(m["experts"][0])), "listed twice"),
    (lambda m: m.update(format="moe_infer.checkpoint/0"), "is not 'moe_infer.checkpoint/1'"),
    (lambda m: m.update(dtype="bfloat16"), "the manifest says bfloat16"),
    (lambda m: m.update(moe_layers="all"), "moe_layers"),
], ids=["escaping-path", "absolute-path", "offset-past-end", "offset-inside", "missing-expert", "duplicate",
        "format", "dtype", "moe-layers-type"])
def test_bad_manifest_is_refused(converted, tmp_path, edit, message):
    path = _copy(converted, tmp_path)
    _edit_manifest(path, edit)
    with pytest.raises(CheckpointError, match=message):
        ExpertStore.open(path)


def test_truncated_layer_file_is_refused(converted, tmp_path):
    path = _copy(converted, tmp_path)
    layer_file = os.path.join(path, "experts", "layer_001.safetensors")
    size = os.path.getsize(layer_file)
    with open(layer_file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        ExpertStore.open(path)


@pytest.mark.parametrize("target", ["experts/layer_000.safetensors", "dense.safetensors"])
def test_verify_finds_a_flipped_byte(converted, tmp_path, target):
    path = _copy(converted, tmp_path)
    assert verify(path) == {"experts": 16, "moe_layers": 2, "bytes": verify(path)["bytes"]}
    file = os.path.join(path, target)
    with open(file, "r+b") as f:
        f.seek(os.path.getsize(file) - 7)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    ExpertStore.open(path).close()  # headers and layout are intact: only the checksum can tell
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        verify(path)


def test_not_a_converted_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a converted moe_infer checkpoint"):
        ExpertStore.open(tmp_path)
    (tmp_path / "moe_infer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        ExpertStore.open(tmp_path)
