"""`MoEConfig.offload_dir`: an in-memory model's experts written once in the converted layout,
then read from disk like a converted checkpoint's; a directory holding them is reused, one
holding anything else is refused and nothing changes."""

from __future__ import annotations

import os

import pytest
import torch

import moe_infer
import tiny_models
from moe_infer.experts.offload import SOURCE_KIND
from moe_infer.experts.store import ExpertStore, StoreExperts, load_manifest

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3"])  # plain, transposed+interleaved+biases, shared experts
def test_offloaded_model_reads_its_experts_from_disk_with_the_same_outputs(name, tmp_path):
    reference = moe_infer.wrap(tiny_models.build(name, 0))
    originals = {layer.layer_idx: [layer.expert_source(e).canonical() for e in range(layer.num_experts)]
                 for layer in moe_infer.executor(reference).layers}
    model = moe_infer.wrap(tiny_models.build(name, 0), offload_dir=tmp_path / "experts")
    ex = moe_infer.executor(model)
    for layer in ex.layers:
        assert isinstance(layer.expert_source, StoreExperts)
        assert all(p.is_meta for p in layer.experts.parameters())  # released from memory
    with ExpertStore.open(tmp_path / "experts") as store:  # the converted layout, canonical tensors
        for layer_idx, experts in originals.items():
            for e, expected in enumerate(experts):
                got = store.read(layer_idx, e)
                for kind in ("w13", "w2", "b13", "b2"):
                    want = getattr(expected, kind)
                    assert (getattr(got, kind) is None) == (want is None)
                    if want is not None:
                        assert torch.equal(getattr(got, kind), want), (layer_idx, e, kind)
    assert load_manifest(str(tmp_path / "experts"))["source"]["kind"] == SOURCE_KIND
    ids, mask = tiny_models.left_padded(1, (7, 4))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="offload_dir"):
        moe_infer.unwrap(model)


def test_offload_dir_is_reused_for_the_same_experts_and_refused_for_others(tmp_path):
    directory = tmp_path / "experts"
    first = moe_infer.wrap(tiny_models.build("mixtral", 0), offload_dir=directory)
    layer_file = directory / "experts" / f"layer_{moe_infer.executor(first).moe_layer_indices[0]:03d}.safetensors"
    written = layer_file.stat().st_mtime_ns
    again = moe_infer.wrap(tiny_models.build("mixtral", 0), offload_dir=directory)
    assert layer_file.stat().st_mtime_ns == written  # written once
    ids = tiny_models.token_ids(2, 1, 6)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, first(ids).logits, rtol=0, atol=0)

    other = tiny_models.build("mixtral", 1)  # other weights, same shapes
    before = {name: p.clone() for name, p in other.named_parameters()}
    with pytest.raises(ValueError, match="holds other experts"):
        moe_infer.wrap(other, offload_dir=directory)
    assert not moe_infer.is_wrapped(other)
    assert all(torch.equal(p, before[name]) for name, p in other.named_parameters())  # nothing changed
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        moe_infer.wrap(other, offload_dir=tmp_path / "notes")
    assert os.listdir(tmp_path / "notes") == ["todo.txt"] and not moe_infer.is_wrapped(other)
    assert not list(tmp_path.glob("*partial*"))


def test_offloaded_model_under_a_budget_generates_the_same_tokens(tmp_path):
    reference = tiny_models.build("mixtral", 0)
    prompt = tiny_models.token_ids(3, 1, 5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = reference.generate(prompt, **kwargs)
    model = tiny_models.build("mixtral", 0)
    model.generation_config.eos_token_id = None
    moe_infer.wrap(model, offload_dir=tmp_path / "experts")
    ex = moe_infer.executor(model)
    half = ex.layers[0].expert_source.expert_nbytes() * ex.layers[0].num_experts // 2
    moe_infer.wrap(model, cpu_memory=half)  # reconfigure: the cache's backing is the offload store
    with torch.no_grad():
        got = model.generate(prompt, **kwargs)
    assert torch.equal(got, expected)
    stats = moe_infer.executor(model).stats()["tiers"]
    assert stats["disk"]["bytes_read"] > 0 and stats["cpu"]["misses"] > 0  # read from the offload files
    with pytest.raises(ValueError, match="already read from"):
        moe_infer.wrap(model, offload_dir=tmp_path / "elsewhere")
