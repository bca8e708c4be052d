"""Routing predictors: which experts a token will use at later MoE layers.

Baselines ``frequency``, ``markov`` and ``gate-lookahead``; the ``expertflow`` routing-path
predictor with runtime correction; the ``pregate`` router decoupled from the backbone (Read-ME).
``train(kind, trace, **options)``, ``load(path)``, ``Predictor.evaluate`` / ``predict_trace`` /
``save``; ``attach`` feeds a running wrapped model's predictions to a callback (prefetch).
"""

from moe_infer.predictors.base import FORMAT, ModelSignature, Predictor, PredictorMismatch
from moe_infer.predictors.registry import PREDICTORS, load, predictor_class, train
from moe_infer.predictors.runtime import PredictionHook, attach

__all__ = ["FORMAT", "PREDICTORS", "ModelSignature", "PredictionHook", "Predictor", "PredictorMismatch", "attach",
           "load", "predictor_class", "train"]
