"""Attention lookahead (moe_infer.predictors.lookahead): the estimate of the next MoE layer's input is
exact where it is offered (equal to the model's own next MoE input when the block's routed experts
are left out), in prefill and in decode, never writes the KV cache, and is refused where the decoder
is not the plain pre-norm layer it assumes. An ``expertflow`` predictor that reads it predicts the
same offline as at runtime, round-trips through its file and leaves generation unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import moe_infer
import moe_infer.assets
import tiny_models
from moe_infer import Trace
from moe_infer.models import cache_argument, output_cache
from moe_infer.predictors import attach, load, train
from moe_infer.predictors.lookahead import AttentionLookahead
from moe_infer.traces.profiler import record_trace

pytestmark = pytest.mark.usefixtures("single_thread")

# families whose decoder layers are not plain pre-norm full-attention layers, and why
REFUSED = {
    "minimax": "full attention", "qwen3_next": "full attention", "granitemoehybrid": "full attention",
    "lfm2_moe": "full attention", "lfm2_moe_no_bias": "full attention", "gpt_oss": "full attention",
    "exaone_moe": "full attention", "deepseek_v32": "full attention",
    "qwen3_moe_mlp_only": "consecutive MoE layers", "jamba": "consecutive MoE layers",
    "glm4_moe_lite": "consecutive MoE layers",
    "flex_olmo": "pre-norm decoder layers", "granitemoe": "plain residual", "granitemoeshared": "plain residual",
}


def _routed_left_out(layer, args, output):
    """Forward hook on a wrapped MoE layer: its output with the routed experts left out."""
    hidden = args[0].reshape(-1, args[0].shape[-1])
    shared = layer.shared_output(hidden)
    out = (torch.zeros_like(hidden) if shared is None else shared).reshape(args[0].shape)
    return (out, output[1]) if isinstance(output, tuple) else out


@pytest.mark.parametrize("name", sorted(tiny_models.TINY_MODELS))
def test_estimate_is_the_next_moe_input_without_routed_experts_or_refused(tiny_model, name):
    model = tiny_model(name)
    with tiny_models.wrapped(model):
        executor = moe_infer.executor(model)
        if name in REFUSED:
            with pytest.raises(ValueError, match=REFUSED[name]):
                AttentionLookahead(model, executor.layers)
            return
        lookahead = AttentionLookahead(model, executor.layers)
        if len(executor.layers) < 2:  # qwen2_moe_sparse_step: no next MoE layer to estimate
            with pytest.raises(ValueError, match="last MoE layer"):
                lookahead.estimate(0, torch.zeros(1, model.config.hidden_size))
            lookahead.detach()
            return
        estimated, actual = {}, {}

        def observer(layer, hidden, routing):
            position = executor.layers.index(layer)
            if position == 0:
                estimated["x"] = lookahead.estimate(0, hidden)
            elif position == 1:
                actual["x"] = hidden.clone()

        for layer in executor.layers:
            layer.routing_observers.append(observer)
        try:
            prompt = tiny_models.token_ids(0, 2, 10)
            with torch.no_grad():
                cache = output_cache(model(prompt, use_cache=True))
                assert cache.get_seq_length() == prompt.shape[1], "the lookahead wrote to the KV cache"
                handle = executor.layers[0].register_forward_hook(_routed_left_out)
                try:
                    model(prompt, use_cache=False)  # prefill
                    torch.testing.assert_close(estimated["x"], actual["x"], rtol=1e-5, atol=1e-5)
                    # decode: the earlier tokens' keys and values come from the cache, read only
                    cache = copy.deepcopy(cache)
                    length = cache.get_seq_length()
                    model(tiny_models.token_ids(1, 2, 1), **cache_argument(model, cache), use_cache=True)
                    torch.testing.assert_close(estimated["x"], actual["x"], rtol=1e-5, atol=1e-5)
                    assert estimated["x"].shape[0] == 2 and cache.get_seq_length() == length + 1
                finally:
                    handle.remove()
        finally:
            lookahead.detach()
            for layer in executor.layers:
                layer.routing_observers.remove(observer)
        assert not any(d._forward_pre_hooks for d in lookahead.decoders)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """The shipped tiny-deepseek, a short trace of it, and an expertflow predictor trained on it with
    attention lookahead."""
    model, _ = moe_infer.assets.load_model("tiny-deepseek")
    directory = tmp_path_factory.mktemp("lookahead")
    text = "def main(argv):\n    total = 0\n    for name in argv:\n        total += len(name)\n    return total\n"
    (directory / "code.py").write_text(text * 6, encoding="utf-8")
    result = record_trace(model, directory / "t.safetensors", texts=[directory / "code.py"], seq_len=96,
                          progress=False, model_name="tiny-deepseek")
    trace = Trace.load(result.path)
    predictor = train("expertflow", trace, model=model, attention_lookahead=True, epochs=3)
    return model, trace, predictor, directory


def test_expertflow_with_lookahead_predicts_the_same_offline_and_at_runtime(deepseek):
    model, trace, predictor, _ = deepseek
    assert predictor.reads_attention_lookahead and predictor.options["lookahead_macs"] > 0
    assert predictor.macs_per_token() > train("expertflow", trace, model=model, epochs=1).macs_per_token()
    first = trace.select_sequences([next(iter(trace.sequences()))[0]])
    offline = predictor.evaluate(first, max_distance=1)["recall_per_layer"][1]
    with tiny_models.wrapped(model):
        hook = attach(model, predictor, depth=1)
        assert hook.lookahead is not None
        cache = None
        with torch.no_grad():  # decode the trace's first sequence one token per call: every feature is known
            for token in first.token_ids.long():
                cache = output_cache(model(token.view(1, 1), **cache_argument(model, cache), use_cache=True))
        hook.detach()
        assert not any(d._forward_pre_hooks for d in hook.lookahead.decoders)
    # at runtime the first MoE layer is not predicted (nothing runs before it within a call)
    assert hook.recall()[1] == pytest.approx(np.mean(offline[1:]), abs=0.01)


def test_expertflow_with_lookahead_round_trips_and_leaves_generation_unchanged(deepseek):
    model, trace, predictor, directory = deepseek
    path = directory / "ef-lookahead.safetensors"
    predictor.save(path)
    loaded = load(path)
    assert loaded.reads_attention_lookahead
    np.testing.assert_allclose(loaded.predict_trace(trace, 1), predictor.predict_trace(trace, 1), atol=1e-5)

    ids = torch.tensor([list(b"def main(argv):\n    total = 0\n")])
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=8, do_sample=False)
    with tiny_models.wrapped(model):
        layer = moe_infer.executor(model).layers[0]
        half = layer.expert_source.expert_nbytes() * layer.num_experts * len(trace.moe_layers) // 2
    with tiny_models.wrapped(model, cpu_memory=half, cache_policy="expertflow", predictor=str(path),
                             prefetch_depth=1):
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=8, do_sample=False)
        stats = moe_infer.executor(model).stats()
    assert torch.equal(generated, reference)
    assert stats["prefetch"]["used"] > 0 and stats["predictor_recall"][1] > 0.5


def test_training_with_lookahead_on_a_model_it_cannot_estimate_is_refused(tiny_model, tmp_path):
    model = tiny_model("gpt_oss")  # alternating sliding-window and full attention
    (tmp_path / "code.py").write_text("def f(x):\n    return x + 1\n" * 8, encoding="utf-8")
    result = record_trace(model, tmp_path / "t.safetensors", texts=[tmp_path / "code.py"], seq_len=32,
                          progress=False, model_name="gpt_oss")
    trace = Trace.load(result.path)
    with pytest.raises(ValueError, match="needs full attention in every MoE layer"):
        train("expertflow", trace, model=model, attention_lookahead=True, epochs=1)
    with pytest.raises(ValueError, match="attention_lookahead='yes': expected true or false"):
        train("expertflow", trace, model=model, attention_lookahead="yes")
    assert not moe_infer.is_wrapped(model)
    assert not any(m._forward_pre_hooks for m in model.modules())
