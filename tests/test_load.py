"""`moe_infer.load` of a plain transformers directory (save_pretrained output); converted directories:
tests/test_load_converted.py."""

import json

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moe_infer


@pytest.fixture(scope="module")
def saved_mixtral(tmp_path_factory):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    return model, path


def test_load_wraps_and_keeps_outputs(saved_mixtral):
    original, path = saved_mixtral
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model = moe_infer.load(path, dtype=torch.float32)
    assert moe_infer.is_wrapped(model) and not model.training
    assert moe_infer.executor(model).moe_layer_indices == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_passes_config_fields(saved_mixtral):
    _, path = saved_mixtral
    model = moe_infer.load(path, kernel="torch")
    assert moe_infer.executor(model).config.kernel == "torch"


def test_load_errors(tmp_path, saved_mixtral):
    _, path = saved_mixtral
    with pytest.raises(ValueError, match="not a directory"):
        moe_infer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        moe_infer.load(tmp_path)
    with pytest.raises(ValueError, match="MoEConfig.kernel"):
        moe_infer.load(path, kernel="fast")
    with pytest.raises(TypeError, match="unknown MoEConfig field"):
        moe_infer.load(path, gpu_mem="1GiB")
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "moe_infer.json").write_text(json.dumps({"format": "moe_infer.checkpoint/1"}))
    with pytest.raises(ValueError, match="field 'num_experts' missing"):
        moe_infer.load(converted)  # a converted checkpoint's manifest is validated (tests/test_store.py)
