"""Routing predictors: a planted routing path is learned exactly, files round-trip without pickle,
another model's trace is refused, gate-lookahead agrees offline and at runtime, the runtime hook
leaves outputs unchanged, and `moe-infer predictor train/eval` works end to end."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import moe_infer
import moe_infer.assets
import tiny_models
from moe_infer import Trace
from moe_infer.predictors import PREDICTORS, Predictor, PredictorMismatch, attach, load, train
from moe_infer.predictors.blocks import BlockView, moe_blocks
from moe_infer.predictors.features import model_features, recorded_moe_inputs
from moe_infer.traces.profiler import record_trace

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_EXPERTS, TOP_K, LAYERS, HIDDEN = 8, 2, (0, 1, 2, 3), 8
FAST = {"expertflow": dict(epochs=25, batch_size=128, learning_rate=1e-2),
        "pregate": dict(epochs=25, batch_size=128, learning_rate=1e-2)}
TEXT = ("def main(argv):\n    total = 0\n    for name in argv:\n        total += len(name)\n"
        "    return total  # the sum of lengths\n\nclass Tree:\n    def __init__(self):\n        self.children = []\n")


def planted_trace(seed: int = 0, num_tokens: int = 1200, model: str = "planted") -> Trace:
    """Routing fully determined by the token id: layer 0 uses {t, t+3} mod E, and each next layer
    maps every expert e of the previous layer to (3e + l) mod E (a bijection, so the two stay
    distinct). Hidden-state features are noise: only the path carries information."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, 16, num_tokens)
    expert_ids = np.empty((num_tokens, len(LAYERS), TOP_K), dtype=np.int64)
    expert_ids[:, 0] = np.stack([token_ids % NUM_EXPERTS, (token_ids + 3) % NUM_EXPERTS], 1)
    for layer in range(1, len(LAYERS)):
        expert_ids[:, layer] = (3 * expert_ids[:, layer - 1] + layer) % NUM_EXPERTS
    seq_len = 100
    names = {"embedding": [0, HIDDEN], **{f"moe_input:{l}": [HIDDEN * (l + 1), HIDDEN * (l + 2)] for l in LAYERS}}
    return Trace.from_arrays(
        expert_ids=expert_ids, expert_weights=np.full(expert_ids.shape, 0.5, dtype=np.float32),
        seq_ids=np.arange(num_tokens) // seq_len, positions=np.arange(num_tokens) % seq_len, token_ids=token_ids,
        num_experts=NUM_EXPERTS, moe_layers=LAYERS, model=model, family="mixtral", source="planted",
        features=rng.standard_normal((num_tokens, HIDDEN * (len(LAYERS) + 1))).astype(np.float32),
        feature_names=names)


@pytest.fixture(scope="module")
def planted():
    return planted_trace(0), planted_trace(1)


@pytest.fixture(scope="module")
def planted_predictors(planted):
    trace, _ = planted
    return {kind: train(kind, trace, **FAST.get(kind, {})) for kind in ("frequency", "markov", "expertflow", "pregate")}


@pytest.mark.parametrize("kind", ["expertflow", "pregate"])
def test_learned_predictors_recover_a_planted_routing_path(planted, planted_predictors, kind):
    _, held_out = planted
    result = planted_predictors[kind].evaluate(held_out, max_distance=3)
    assert result["recall"] == {1: 1.0, 2: 1.0, 3: 1.0}


@pytest.mark.parametrize("kind", ["expertflow", "pregate"])
def test_distillation_loss_recovers_the_path_too_and_files_without_a_loss_read_as_distillation(tmp_path, planted,
                                                                                               kind):
    trace, held_out = planted
    predictor = train(kind, trace, loss="distillation", **FAST[kind])
    assert predictor.evaluate(held_out, max_distance=2)["recall"] == {1: 1.0, 2: 1.0}
    expected = predictor.predict_trace(held_out, 1)
    del predictor.options["loss"]  # as saved before the option existed
    predictor.save(tmp_path / "old.safetensors")
    old = load(tmp_path / "old.safetensors")
    assert "loss" not in old.options
    np.testing.assert_array_equal(old.predict_trace(held_out, 1), expected)
    old.options["loss"] = "membership"  # the other reading of the same logits differs
    assert not np.allclose(old.predict_trace(held_out, 1), expected)


def test_expertflow_without_previous_token_inputs_as_saved_before_they_existed(tmp_path, planted):
    trace, held_out = planted
    predictor = train("expertflow", trace, previous_dim=0, **FAST["expertflow"])
    assert predictor.net.previous_projection is None
    assert predictor.evaluate(held_out, max_distance=1)["recall"] == {1: 1.0}
    del predictor.options["previous_dim"]  # files from before the option hold no projection
    predictor.save(tmp_path / "old.safetensors")
    np.testing.assert_array_equal(load(tmp_path / "old.safetensors").predict_trace(held_out, 2),
                                  predictor.predict_trace(held_out, 2))
    with_previous = train("expertflow", trace, epochs=1)
    assert with_previous.macs_per_token() > predictor.macs_per_token()  # the projection is counted


def test_markov_recovers_the_path_from_the_layer_it_sees(planted, planted_predictors):
    _, held_out = planted
    result = planted_predictors["markov"].evaluate(held_out, max_distance=2)
    for distance, per_layer in result["recall_per_layer"].items():
        assert per_layer[distance:] == [1.0] * (len(LAYERS) - distance)  # layers with a source layer
        assert max(per_layer[:distance]) < 0.75  # below the first MoE layer: popularity only
    frequency = planted_predictors["frequency"].evaluate(held_out, max_distance=1)["recall"][1]
    assert frequency < result["recall"][1]


def test_predictions_are_probabilities_of_the_right_shape(planted, planted_predictors):
    _, held_out = planted
    for kind, predictor in planted_predictors.items():
        scores = predictor.predict_trace(held_out, 2)
        assert scores.shape == (held_out.num_tokens, len(LAYERS), NUM_EXPERTS) and scores.dtype == np.float32
        assert scores.min() >= 0 and scores.max() <= 1, kind
    # the planted path is known from layer 0 on: markov's counted probabilities are sharper than popularity's
    brier = {kind: planted_predictors[kind].evaluate(held_out, max_distance=1)["calibration"][1]["brier"]
             for kind in ("frequency", "markov")}
    assert brier["markov"] < 0.5 * brier["frequency"], brier


def test_calibration_scores_match_their_definitions():
    from moe_infer.predictors.evaluation import calibration

    # 2 tokens, 1 layer, 2 experts, top-1; both tokens use expert 0
    scores = np.array([[[0.9, 0.1]], [[0.3, 0.7]]], dtype=np.float32)
    expert_ids = np.array([[[0]], [[0]]])
    result = calibration(scores, expert_ids)
    # Brier: ((0.9-1)^2 + 0.1^2 + (0.3-1)^2 + 0.7^2) / 4; ECE: every score alone in its bin,
    # |0.9-1| + |0.1-0| + |0.3-1| + |0.7-0| over 4 scores
    assert result["brier"] == pytest.approx(0.25) and result["ece"] == pytest.approx(0.4)
    perfect = calibration(np.array([[[1.0, 0.0]]]), np.array([[[0]]]))
    assert perfect == {"brier": 0.0, "ece": 0.0}


def test_save_load_round_trip_without_pickle(tmp_path, planted, planted_predictors):
    _, held_out = planted
    for kind, predictor in planted_predictors.items():
        path = tmp_path / f"{kind}.safetensors"
        predictor.save(path)
        with safe_open(path, framework="pt") as file:  # a plain safetensors file: tensors + JSON metadata
            metadata = file.metadata()
        assert metadata["format"] == "moe_infer.predictor/1" and metadata["kind"] == kind
        assert json.loads(metadata["signature"])["moe_layers"] == list(LAYERS)
        loaded = load(path)
        assert type(loaded) is type(predictor) and loaded.options == predictor.options
        for distance in (1, 3):
            np.testing.assert_array_equal(loaded.predict_trace(held_out, distance),
                                          predictor.predict_trace(held_out, distance))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("change", [dict(model="other-model"), dict(num_experts=16), dict(moe_layers=(1, 2, 3, 4))])
def test_another_models_trace_is_refused(tmp_path, planted, planted_predictors, change):
    _, held_out = planted
    other = dataclasses.replace(held_out, **change)
    field = next(iter(change))
    predictor = planted_predictors["markov"]
    predictor.save(tmp_path / "p.safetensors")
    for candidate in (predictor, load(tmp_path / "p.safetensors")):
        with pytest.raises(PredictorMismatch, match=f"trace has {field}=.*trained for {field}="):
            candidate.evaluate(other)
        with pytest.raises(ValueError, match=field):
            candidate.predict_trace(other, 1)


def test_bad_requests_get_one_clear_error(tmp_path, planted):
    trace, _ = planted
    with pytest.raises(ValueError, match="unknown predictor kind 'oracle'; kinds are gate-lookahead"):
        train("oracle", trace)
    with pytest.raises(ValueError, match=r"unknown expertflow option\(s\) \['layers'\]"):
        train("expertflow", trace, layers=3)
    with pytest.raises(ValueError, match=r"loss='mse': expected one of \['membership', 'distillation'\]"):
        train("expertflow", trace, loss="mse")
    with pytest.raises(ValueError, match="previous_dim=-1: expected an int >= 0"):
        train("expertflow", trace, previous_dim=-1)
    with pytest.raises(ValueError, match="hidden=0"):
        train("pregate", trace, hidden=0)
    with pytest.raises(ValueError, match="window=30 \\+ lookahead=3: at most 32 tokens"):
        train("pregate", trace, window=30, lookahead=3)
    markov = train("markov", trace)
    with pytest.raises(ValueError, match="distance=0"):
        markov.predict_trace(trace, 0)
    with pytest.raises(ValueError, match="top_k=9"):
        markov.evaluate(trace, top_k=9)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a predictor")
    with pytest.raises(ValueError, match="not a safetensors predictor file"):
        load(garbage)
    with pytest.raises(ValueError, match="not a moe_infer predictor"):
        Predictor.load(_a_trace_file(tmp_path, trace))
    assert set(PREDICTORS) == {"gate-lookahead", "markov", "frequency", "expertflow", "pregate"}


def _a_trace_file(tmp_path: Path, trace: Trace) -> Path:
    path = tmp_path / "trace.safetensors"
    trace.save(path)
    return path


# ----------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped tiny-mixtral and a short trace of it with every MoE input recorded."""
    model, _ = moe_infer.assets.load_model("tiny-mixtral")
    directory = tmp_path_factory.mktemp("shipped")
    (directory / "code.py").write_text(TEXT * 2, encoding="utf-8")
    layers = [int(i) for i in range(model.config.num_hidden_layers)]
    features = ("embedding", *(f"moe_input:{layer}" for layer in layers))
    result = record_trace(model, directory / "t.safetensors", texts=[directory / "code.py"], seq_len=128,
                          features=features, progress=False, model_name="tiny-mixtral")
    return model, Trace.load(result.path), directory


def test_gate_lookahead_offline_from_features_equals_recomputed_and_runtime(shipped):
    model, trace, _ = shipped
    predictor = train("gate-lookahead", trace, model=model)
    from_features = predictor.evaluate(trace, max_distance=2)["recall"]
    bare = dataclasses.replace(trace, features=None, feature_names=None)  # hidden states recomputed by the model
    recomputed = predictor.evaluate(bare, max_distance=2)["recall"]
    assert from_features == pytest.approx(recomputed, abs=0.01)
    assert from_features[1] > 0.5  # far above a uniform guess (K/E = 0.25)

    # the same sequences through the wrapped model with the hook attached (prefill, one call each)
    received = []
    moe_infer.wrap(model)
    try:
        hook = attach(model, "gate-lookahead", depth=2, sink=lambda *call: received.append(call))
        with torch.no_grad():
            for _, span in trace.sequences():
                model(trace.token_ids[span][None].long())
        hook.detach()
    finally:
        moe_infer.unwrap(model)
    runtime = hook.recall()
    # offline, layers below the first MoE layer come from the embedding; at runtime they are not predicted
    offline = predictor.evaluate(trace, max_distance=2)["recall_per_layer"]
    for distance in (1, 2):
        assert runtime[distance] == pytest.approx(np.mean(offline[distance][distance:]), abs=0.01)
    assert {layer for layer, _, _ in received} == set(range(1, len(trace.moe_layers)))
    for layer, experts, scores in received:
        assert experts and all(0 <= e < trace.num_experts for e in experts) and scores == sorted(scores, reverse=True)


def test_model_features_run_the_model_as_it_is_and_see_what_the_wrapped_model_sees(shipped):
    """`model_features` neither wraps the model nor leaves hooks on it, and the MoE inputs and lookahead
    features it captures on the plain model are those of the wrapped model (and, to float16, of the
    profiler's recording, which ran the wrapped model)."""
    model, trace, _ = shipped
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    plain = model_features(trace, model, attention_lookahead=True)
    assert not moe_infer.is_wrapped(model) and hooks() == before
    with tiny_models.wrapped(model):
        wrapped = model_features(trace, model, attention_lookahead=True)
    for name in ("hidden", "embeddings", "lookahead", "lookahead_macs"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(wrapped, name), err_msg=name)
    # the profiler ran the sequences batched and padded, and stored float16: equal to about one fp16 step
    np.testing.assert_allclose(plain.hidden, recorded_moe_inputs(trace).astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", sorted(tiny_models.TINY_MODELS))
def test_block_views_route_and_share_as_the_wrapped_layers(tiny_model, name):
    """The predictors' view of a plain model's MoE blocks (`moe_blocks`) routes, adds shared experts
    and sizes each block exactly as the wrapped model's `MoELayer` does, in every family."""
    model = tiny_model(name)
    views = moe_blocks(model)
    assert all(isinstance(view, BlockView) for view in views)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with tiny_models.wrapped(model), torch.no_grad():
        layers = moe_infer.executor(model).layers
        assert moe_blocks(model) == layers
        assert [v.block_name for v in views] == [layer.block_name for layer in layers]
        for view, layer in zip(views, layers):
            assert (view.layer_idx, view.num_experts, view.hidden_size) == \
                (layer.layer_idx, layer.num_experts, layer.hidden_size)
            ours, theirs = view.route(hidden), layer.route(hidden)
            assert torch.equal(ours.expert_ids, theirs.expert_ids)
            assert torch.equal(ours.expert_weights, theirs.expert_weights)
            shared, expected = view.shared_output(hidden), layer.shared_output(hidden)
            assert (shared is None) == (expected is None)
            if shared is not None:
                assert torch.equal(shared, expected)


def test_runtime_hook_keeps_outputs_and_follows_decoding(shipped):
    model, trace, _ = shipped
    predictor = train("expertflow", trace, epochs=1)
    ids = torch.tensor([list(b"def main(argv):\n    total")])
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=6, do_sample=False)
    moe_infer.wrap(model)
    try:
        hook = attach(model, predictor, depth=3, sink=lambda *call: None)
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, reference)
        assert set(hook.recall()) == {1, 2, 3} and hook.sunk > 0
        assert hook._last_routing is not None and hook._history[0, -1] == generated[0, -2]
        # the last token's MoE inputs, one per MoE layer, feed the next step's previous-token features
        assert hook._last_hidden.shape == (1, len(trace.moe_layers), model.config.hidden_size)
        assert bool(hook._last_hidden.abs().sum(-1).gt(0).all())
        hook.detach()
        assert all(not layer.routing_observers for layer in moe_infer.executor(model).layers)
        with pytest.raises(ValueError, match="must be trained first"):
            attach(model, "expertflow")
        with pytest.raises(PredictorMismatch, match="the model has moe_layers=.*trained for moe_layers="):
            attach(model, train("markov", planted_trace(model="tiny-mixtral")))
    finally:
        moe_infer.unwrap(model)


def test_cli_predictor_train_and_eval(tmp_path, planted, capsys):
    from moe_infer.cli import main

    trace, held_out = planted
    trace.save(tmp_path / "train.safetensors")
    held_out.save(tmp_path / "held.safetensors")
    out = tmp_path / "p.safetensors"
    assert main(["predictor", "train", "--kind", "markov", "--trace", str(tmp_path / "train.safetensors"),
                 "--out", str(out), "--option", "smoothing=0.5"]) == 0
    assert load(out).options == {"smoothing": 0.5}
    assert main(["predictor", "eval", "--predictor", str(out), "--trace", str(tmp_path / "held.safetensors"),
                 "--max-distance", "2", "--json", str(tmp_path / "eval.json")]) == 0
    assert re.search(r"\| 1 \| 0\.\d+ \| 0\.\d+ 1\.000 1\.000 1\.000 \|", capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text())["recall_per_layer"]["2"][2:] == [1.0, 1.0]
    dataclasses.replace(held_out, model="other").save(tmp_path / "other.safetensors")
    assert main(["predictor", "eval", "--predictor", str(out), "--trace", str(tmp_path / "other.safetensors")]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "model='other'" in error
    assert main(["predictor", "train", "--kind", "markov", "--trace", str(tmp_path / "train.safetensors"),
                 "--out", str(out), "--option", "smoothing"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("skip, previous_dim, lookahead_dim, depth, known_previous", [
    (False, 8, 0, 1, True),  # the shipped layout, prefetch one layer ahead
    (False, 8, 0, 3, False),  # several layers ahead; the previous token unknown (a prefill call)
    (True, 0, 0, 2, True),  # skip path, no previous-token MoE inputs
    (False, 4, 9, 5, True),  # attention lookahead; depth beyond the last layer
])
def test_runtime_weights_equal_the_nets_forward(skip, previous_dim, lookahead_dim, depth, known_previous):
    """RuntimeWeights splits each source's first layer into one per-call matmul and per-layer parts:
    the logits must be the net's own, layer by layer (up to float rounding)."""
    from moe_infer.predictors.expertflow import ExpertFlowNet, RuntimeWeights
    from moe_infer.predictors.runtime import _multi_hot

    torch.manual_seed(0)
    num_layers, hidden_size, tokens = 5, 12, 3
    net = ExpertFlowNet(20, num_layers, NUM_EXPERTS, hidden_size, window=3, embed_dim=4, hidden=16,
                        previous_dim=previous_dim, skip=skip, lookahead_dim=lookahead_dim).eval()
    windows = torch.randint(-1, 25, (tokens, 32))  # ids out of the vocabulary and unknown (-1) too
    previous = torch.stack([torch.randperm(NUM_EXPERTS)[:TOP_K] for _ in range(tokens * num_layers)])
    previous_hot = _multi_hot(previous.view(tokens, num_layers, TOP_K), NUM_EXPERTS).flatten(1)
    previous_hidden = torch.randn(tokens, num_layers, hidden_size) if known_previous else None
    hidden = torch.randn(tokens, num_layers, hidden_size)
    routing = torch.stack([torch.randperm(NUM_EXPERTS)[:TOP_K] for _ in range(tokens * num_layers)]
                          ).view(tokens, num_layers, TOP_K)
    routed_hot = _multi_hot(routing, NUM_EXPERTS).flatten(1)
    lookahead = torch.randn(tokens, num_layers, lookahead_dim)
    weights = RuntimeWeights(net, depth)
    with torch.no_grad():
        step = weights.step(windows, previous_hot, previous_hidden)
        for source in range(num_layers - 1):
            weights.add_routing(source, step, routing[:, source])
            got = weights.layer(source, step, hidden[:, source], lookahead[:, source] if lookahead_dim else None)
            expected = net(source, windows[:, -3:], previous_hot,
                           previous_hidden if known_previous else None, hidden[:, source],
                           routed_hot[:, :(source + 1) * NUM_EXPERTS], lookahead[:, source] if lookahead_dim else None)
            targets = min(depth, num_layers - 1 - source)
            assert got.shape == (tokens, targets, NUM_EXPERTS)
            torch.testing.assert_close(got, expected[:, :targets], rtol=1e-5, atol=1e-5)


class _CheckedExpertFlow:
    """The shipped predictor, each runtime prediction also computed by the net's own forward."""

    def __init__(self, predictor):
        self.predictor, self.checked = predictor, 0

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def runtime_scores(self, position, state, max_depth):
        got = self.predictor.runtime_scores(position, state, max_depth)
        if got:
            routed = torch.cat([torch.nn.functional.one_hot(state.routing[p].long(), NUM_EXPERTS).sum(1)
                                for p in range(position + 1)], 1).float()
            with torch.no_grad():
                expected = self.predictor.logit_scores(self.predictor.net(
                    position, state.windows, state.previous_hot(), state.previous_hidden, state.hidden[position],
                    routed))
            for target, scores in got.items():
                torch.testing.assert_close(scores, expected[:, target - position - 1], rtol=1e-5, atol=1e-6)
                self.checked += 1
        return got


def test_runtime_scores_of_the_shipped_predictor_equal_its_nets_forward(shipped):
    """In prefill (several tokens, previous token unknown) and in decode steps (the previous token's
    routing and MoE inputs carried over), the per-call batched prediction is the net's."""
    from moe_infer.predictors.runtime import PredictionHook

    model, _, _ = shipped
    checked = _CheckedExpertFlow(load(moe_infer.assets.predictor_path("tiny-mixtral")))
    moe_infer.wrap(model)
    try:
        executor = moe_infer.executor(model)
        hook = PredictionHook(executor, model.get_input_embeddings(), checked, 2, None)
        with torch.no_grad():
            model.generate(torch.tensor([list(b"def main(argv):")]), max_new_tokens=4, do_sample=False)
        hook.detach()
    finally:
        moe_infer.unwrap(model)
    layers = len(executor.layers)
    # 4 calls (the prefill, 3 decode steps: the last token needs no forward); two targets at each MoE layer
    # but the last two (one, none)
    assert checked.checked == 4 * (2 * (layers - 2) + 1)
    assert set(hook.recall()) == {1, 2}


def _settled(cache):
    """``cache.prefetch``, then wait until the loader has taken every queued prediction in hand
    (loaded it or given it up): a prefetch is then ahead of use however the threads are scheduled."""
    def prefetch(layer_idx, expert_ids, scores):
        cache.prefetch(layer_idx, expert_ids, scores)
        deadline = time.monotonic() + 60
        with cache.cond:
            while len(cache.queue) or cache.loader.current is not None:
                assert time.monotonic() < deadline, "the loader did not settle the predictions within 60 s"
                cache.cond.wait(0.01)
    return prefetch


def test_executor_prefetches_from_predictions_with_outputs_unchanged(shipped):
    model, trace, directory = shipped
    ids = torch.tensor([list(b"def main(argv):\n    total = 0\n")])
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=8, do_sample=False)
    expertflow = train("expertflow", trace, epochs=1)
    expertflow.save(directory / "ef.safetensors")
    moe_infer.wrap(model)
    half = moe_infer.executor(model).layers[0].expert_source.expert_nbytes() * 8 * 6 // 2  # half of every layer
    moe_infer.unwrap(model)
    for predictor, policy in [("gate-lookahead", "lru"), (str(directory / "ef.safetensors"), "expertflow")]:
        moe_infer.wrap(model, cpu_memory=half, cache_policy=policy, predictor=predictor, prefetch_depth=2)
        try:
            # whether a prediction is loaded before its layer needs it, and not evicted by the next ones first,
            # otherwise depends on how the loader thread is scheduled: with plain LRU nearly every prefetch here
            # is evicted before use (1 of 113 used when each completes at once), so under load `used` could be 0.
            # The observer runs between a layer's routing and its experts, none of the call pinned yet, so the
            # loader is free to finish the predictions before the model goes on.
            executor = moe_infer.executor(model)
            executor.predictor_hook.sink = _settled(executor.cache)
            with torch.no_grad():
                generated = model.generate(ids, max_new_tokens=8, do_sample=False)
            stats = moe_infer.executor(model).stats()
        finally:
            moe_infer.unwrap(model)
        assert torch.equal(generated, reference), predictor
        assert stats["prefetch"]["issued"] > 0 and stats["prefetch"]["used"] > 0
        assert set(stats["predictor_recall"]) == {1, 2} and stats["predictor_recall"][1] > 0.4
        assert not model.get_input_embeddings()._forward_pre_hooks  # unwrap detached the hook

    with pytest.raises(ValueError, match="must be trained first"):
        moe_infer.wrap(model, cpu_memory=half, predictor="pregate")
    assert not moe_infer.is_wrapped(model) and not model.get_input_embeddings()._forward_pre_hooks


def test_training_is_deterministic_and_leaves_the_callers_random_stream(planted):
    trace, _ = planted
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = train("pregate", trace, epochs=1)
    assert torch.equal(torch.rand(3), expected)
    second = train("pregate", trace, epochs=1)
    for name, tensor in first.tensors().items():
        assert torch.equal(tensor, second.tensors()[name]), name


def random_routing_trace(*, group_limited: bool, num_tokens: int = 600, seed: int = 0) -> Trace:
    """Random routing of 3 of 8 experts per token and layer; ``group_limited``: drawn from 2 of 4
    blocks of 2 experts (a DeepSeek-V3-style group-limited router), else from all 8."""
    rng = np.random.default_rng(seed)
    expert_ids = np.empty((num_tokens, len(LAYERS), 3), dtype=np.int64)
    for row in expert_ids.reshape(-1, 3):
        allowed = (np.repeat(rng.choice(4, 2, replace=False) * 2, 2) + [0, 1, 0, 1]) if group_limited \
            else np.arange(NUM_EXPERTS)
        row[:] = rng.choice(allowed, 3, replace=False)
    return Trace.from_arrays(
        expert_ids=expert_ids, expert_weights=np.full(expert_ids.shape, 1 / 3, dtype=np.float32),
        seq_ids=np.arange(num_tokens) // 100, positions=np.arange(num_tokens) % 100,
        token_ids=rng.integers(0, 16, num_tokens), num_experts=NUM_EXPERTS, moe_layers=LAYERS, model="random",
        family="deepseek_v3", source="random")


def test_group_limit_is_read_off_the_routing_and_bounds_the_predicted_top_k():
    from moe_infer.predictors.features import group_limit
    from moe_infer.predictors.nets import scores_from_logits

    assert group_limit(random_routing_trace(group_limited=True)) == [4, 2]
    assert group_limit(random_routing_trace(group_limited=False)) is None
    assert group_limit(planted_trace()) is None  # top-2 over 8 experts: nothing to limit
    logits = torch.randn(500, 8)
    scores = scores_from_logits(logits, 3, [4, 2])
    blocks_used = (scores > 0).unflatten(-1, (4, 2)).any(-1).sum(-1)
    assert int(blocks_used.max()) == 2  # only the two kept blocks score at all
    top = scores.topk(3, -1).indices // 2
    assert all(len(set(row)) <= 2 for row in top.tolist())
    assert torch.allclose(scores, scores_from_logits(logits.masked_fill(scores == 0, -1e9), 3))
    membership = scores_from_logits(logits, 3, [4, 2], "membership")
    kept = membership > 0
    assert int(kept.unflatten(-1, (4, 2)).any(-1).sum(-1).max()) == 2
    assert torch.equal(membership[kept], torch.sigmoid(logits)[kept])
    limited = random_routing_trace(group_limited=True)
    assert train("pregate", limited, epochs=1).options["expert_groups"] == [4, 2]
    assert train("pregate", limited, epochs=1, group_limit=False).options["expert_groups"] is None
    with pytest.raises(ValueError, match="group_limit"):
        train("expertflow", limited, group_limit="yes")
