"""Predictor kinds by name, and ``train`` / ``load``.

``train(kind, trace, **options) -> Predictor``; ``load(path)`` reads any saved predictor;
``resolve(spec, ...)`` turns a ``MoEConfig.predictor`` value (a kind or a saved file) into one.
"""

from __future__ import annotations

import os
from typing import Any

from moe_infer.predictors.base import Predictor
from moe_infer.predictors.baselines import FrequencyPredictor, GateLookaheadPredictor, MarkovPredictor
from moe_infer.predictors.expertflow import ExpertFlowPredictor
from moe_infer.predictors.pregate import PreGatePredictor
from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError

PREDICTORS: dict[str, type[Predictor]] = {
    klass.kind: klass
    for klass in (GateLookaheadPredictor, MarkovPredictor, FrequencyPredictor, ExpertFlowPredictor,
                  PreGatePredictor)
}


def predictor_class(kind: str) -> type[Predictor]:
    if kind not in PREDICTORS:
        raise ConfigError(f"unknown predictor kind {kind!r}; kinds are {', '.join(PREDICTORS)}")
    return PREDICTORS[kind]


def train(kind: str, trace: Trace, **options: Any) -> Predictor:
    """Fit a predictor of ``kind`` on ``trace`` (its routing, token ids and recorded features).

    Options per kind: ``frequency`` / ``markov``: ``smoothing``; ``gate-lookahead``: ``model`` (a
    model or name; default the trace's model); ``expertflow``: ``window``, ``embed_dim``,
    ``hidden``, ``epochs``, ``batch_size``, ``learning_rate``, ``max_seconds``, ``seed``, ``model``
    (to recompute hidden states of a trace recorded without ``moe_input`` features); ``pregate``:
    the same without ``model``, plus ``lookahead`` (tokens ahead).
    """
    klass = predictor_class(kind)
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moe_infer.Trace, got {type(trace).__name__}")
    if trace.num_tokens == 0:
        raise ConfigError("the training trace holds no tokens")
    try:
        return klass.fit(trace, **options)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise ConfigError(f"{kind}: {error}") from None
        raise


def load(path: str | os.PathLike) -> Predictor:
    """A predictor saved with ``Predictor.save``."""
    return Predictor.load(path)
