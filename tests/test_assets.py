"""The shipped tiny trained models: what issue 3 promises about them, checked on the real files.

Each model must load from `moe_infer.assets`, have the architecture its card describes, predict
held-out standard-library text far better than a unigram byte model, generate Python-looking
text, and run bit-exactly under `wrap`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import moe_infer
from moe_infer import assets
from moe_infer.traces.corpus import is_heldout, stdlib_files  # the split the models were trained with

NAMES = ["tiny-deepseek", "tiny-mixtral"]
MAX_BYTES = 10 * 2**20  # the size limit per shipped model
UNIGRAM_BITS_PER_BYTE = 4.76  # from the training summaries: a unigram byte model on held-out files
HELDOUT_RECALL = {"tiny-mixtral": 0.88, "tiny-deepseek": 0.80}  # shipped predictor, d=1, on one held-out file (0.916, 0.845)


@pytest.fixture(scope="module", params=NAMES)
def shipped(request):
    model, tok = assets.load_model(request.param)
    return request.param, model, tok


@pytest.fixture(scope="module")
def heldout_text() -> str:
    _, files = stdlib_files()
    held = sorted(p for rel, p in files if is_heldout(rel))
    assert held, "the held-out split of the stdlib is empty"
    return held[0].read_text(encoding="utf-8", errors="replace")[:4096]


def test_names_and_paths():
    assert assets.names() == NAMES
    for name in NAMES:
        directory = assets.path(name)
        for required in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                         "README.md", "training_summary.json"):
            assert (directory / required).is_file(), f"{name} lacks {required}"
        assert (directory / "model.safetensors").stat().st_size <= MAX_BYTES
    with pytest.raises(ValueError, match="unknown asset 'tiny-llama'.*tiny-mixtral"):
        assets.path("tiny-llama")


def test_architectures_match_the_cards(shipped):
    name, model, _ = shipped
    cfg = model.config
    moe_infer.wrap(model)
    moe_layers = moe_infer.executor(model).moe_layer_indices
    try:
        if name == "tiny-mixtral":
            assert type(model).__name__ == "MixtralForCausalLM"
            assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2)
            assert len(moe_layers) >= 4
        else:
            assert type(model).__name__ == "DeepseekV3ForCausalLM"
            assert moe_layers[0] == 1, "the first layer must be dense"
            assert cfg.n_shared_experts == 1 and 16 <= cfg.n_routed_experts <= 32
            assert cfg.num_experts_per_tok == 4 and cfg.n_group > 1 and 1 <= cfg.topk_group < cfg.n_group
            # the aux-loss-free rule moved the correction bias away from its zero initialisation
            biases = [moe_infer.executor(model).layer(i).gate.e_score_correction_bias for i in moe_layers]
            assert all(b.abs().max() > 1e-3 for b in biases)
    finally:
        moe_infer.unwrap(model)


@torch.no_grad()
def test_heldout_bits_per_byte_far_below_unigram(shipped, heldout_text):
    _, model, tok = shipped
    ids = torch.tensor([tok(heldout_text, add_special_tokens=False, verbose=False)["input_ids"]])
    windows = ids[:, : (ids.shape[1] // 256) * 256].reshape(-1, 256)
    logits = model(windows).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    bits_per_byte = nll.item() / math.log(2)
    assert bits_per_byte < 0.6 * UNIGRAM_BITS_PER_BYTE, bits_per_byte


@torch.no_grad()
def test_generates_python_and_wrap_is_exact(shipped, heldout_text):
    _, model, tok = shipped
    probe = torch.tensor([tok(heldout_text[:300], add_special_tokens=False, verbose=False)["input_ids"]])
    prompts = {"def ": r"^def \w+\(", "import ": r"^import \w+", "    if ": r"^    if [\w.(]"}
    expected_logits = model(probe).logits
    expected_text = {}
    for prompt in prompts:
        inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
        expected_text[prompt] = tok.decode(model.generate(**inputs, max_new_tokens=24, do_sample=False)[0])
    moe_infer.wrap(model)
    try:
        assert torch.equal(model(probe).logits, expected_logits)
        for prompt, pattern in prompts.items():
            inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
            text = tok.decode(model.generate(**inputs, max_new_tokens=24, do_sample=False)[0])
            assert text == expected_text[prompt]
            assert re.match(pattern, text), f"{prompt!r} continued as {text!r}"
    finally:
        moe_infer.unwrap(model)


def test_shipped_predictor_fits_its_model_and_predicts_held_out_routing(shipped, heldout_text, tmp_path):
    from moe_infer.predictors import load
    from moe_infer.traces.profiler import record_trace

    name, model, _ = shipped
    path = assets.predictor_path(name)
    assert path is not None and path.stat().st_size <= 2 * 2**20
    predictor = load(path)
    assert predictor.kind == "expertflow" and predictor.options["loss"] == "membership"
    text = tmp_path / "heldout.py"
    text.write_text(heldout_text, encoding="utf-8")
    layers = moe_infer.executor(moe_infer.wrap(model)).moe_layer_indices
    try:
        result = record_trace(model, tmp_path / "t.safetensors", texts=[text], seq_len=512, progress=False,
                              features=[f"moe_input:{layer}" for layer in layers], model_name=name)
    finally:
        moe_infer.unwrap(model)
    from moe_infer.traces.trace import Trace

    recall = predictor.evaluate(Trace.load(result.path), max_distance=4)["recall"]
    # held-out text the predictor never saw (bench/results/predictors.md: 0.916 / 0.841 at d=1 on all of it)
    assert recall[1] >= HELDOUT_RECALL[name] and recall[4] >= HELDOUT_RECALL[name] - 0.06, recall
