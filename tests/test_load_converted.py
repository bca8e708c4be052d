"""HF checkpoint -> convert -> `moe_infer.load`: the same logits and greedy text as
`from_pretrained` + `wrap`, for every tiny family; experts stay in the store."""

from __future__ import annotations

import os

import pytest
import torch

import moe_infer
import tiny_models
from moe_infer.experts.convert import convert
from moe_infer.experts.store import StoreExperts
from moe_infer.loading import expert_store_of

# the cases that are a family (or a layout) of their own get a greedy-generation check too
GENERATE_CASES = ("mixtral", "qwen2_moe", "gpt_oss", "granitemoe", "deepseek_v3", "jamba", "lfm2_moe", "ernie4_5_moe")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(name)`: (hf_dir, converted_dir) of tiny model `name` (seed 0, fp32), made once."""
    root = tmp_path_factory.mktemp("families")
    done: dict[str, tuple[str, str]] = {}

    def get(name: str) -> tuple[str, str]:
        if name not in done:
            hf, converted = os.path.join(root, name, "hf"), os.path.join(root, name, "converted")
            tiny_models.build(name, 0).save_pretrained(hf)
            convert(hf, converted)
            done[name] = (hf, converted)
        return done[name]

    return get


@pytest.mark.parametrize("name", tiny_models.CASES)
def test_converted_model_matches_from_pretrained(name, saved, single_thread):
    from transformers import AutoModelForCausalLM

    hf, converted = saved(name)
    reference = moe_infer.wrap(AutoModelForCausalLM.from_pretrained(hf).eval())
    model = moe_infer.load(converted)
    assert moe_infer.executor(model).moe_layer_indices == list(tiny_models.TINY_MODELS[name].moe_layers)
    for layer in moe_infer.executor(model).layers:
        assert isinstance(layer.expert_source, StoreExperts)
        assert all(p.is_meta for p in layer.experts.parameters())  # the experts never enter memory
    ids, mask = tiny_models.left_padded(1, (7, 4))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if name in GENERATE_CASES:
        reference.generation_config.eos_token_id = model.generation_config.eos_token_id = None
        prompt = tiny_models.token_ids(2, 1, 5)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


def test_load_plain_directory_converts_into_the_cache(saved, tmp_path, monkeypatch):
    hf, _ = saved("mixtral")
    monkeypatch.setenv("MOE_INFER_CACHE", str(tmp_path / "cache"))
    model = moe_infer.load(hf)
    store = expert_store_of(model)
    assert store is not None and store.root.startswith(str(tmp_path / "cache" / "converted"))
    again = moe_infer.load(hf)  # converted once: the second load reuses it
    assert expert_store_of(again).root == store.root
    in_memory = moe_infer.load(hf, in_memory=True)
    assert expert_store_of(in_memory) is None and moe_infer.is_wrapped(in_memory)
    ids = tiny_models.token_ids(3, 2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, in_memory(ids).logits, rtol=1e-5, atol=1e-5)
    explicit = moe_infer.load(hf, converted_dir=tmp_path / "here")
    assert expert_store_of(explicit).root == str(tmp_path / "here")


def test_load_converted_bf16_and_unwrap_refused(saved):
    hf, converted = saved("mixtral")
    model = moe_infer.load(converted, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = tiny_models.token_ids(4, 1, 6)
    with torch.no_grad():
        reference = moe_infer.load(converted)(ids).logits
        got = model(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="converted checkpoint"):
        moe_infer.unwrap(model)
    with pytest.raises(ValueError, match="in_memory=True applies to plain"):
        moe_infer.load(converted, in_memory=True)
