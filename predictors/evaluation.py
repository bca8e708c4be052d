"""Scoring predictions against a trace: recall among the predicted top-k, and calibration.

This module owns the metrics only; ``Predictor.evaluate`` runs them per layer distance.

Shape legend: N tokens, L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

import numpy as np


def top_experts(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices [..., top_k] of the ``top_k`` highest scores along the last axis (ties: lower id)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :top_k]


def hits(scores: np.ndarray, expert_ids: np.ndarray, top_k: int) -> np.ndarray:
    """Per token and layer [N, L]: how many of the true experts are among the predicted top-k."""
    predicted = top_experts(scores, top_k)  # [N, L, k]
    return (expert_ids[..., :, None] == predicted[..., None, :]).any(-1).sum(-1)


def recall(scores: np.ndarray, expert_ids: np.ndarray, top_k: int) -> np.ndarray:
    """Per MoE layer [L]: mean fraction of a token's K true experts found in the predicted top-k.

    ``scores`` [N, L, E], ``expert_ids`` [N, L, K] (the trace's routing).
    """
    if len(scores) == 0:
        return np.zeros(scores.shape[1])
    return hits(scores, expert_ids, top_k).mean(0) / expert_ids.shape[-1]


def calibration(scores: np.ndarray, expert_ids: np.ndarray, bins: int = 10) -> dict[str, float]:
    """How well scores read as probabilities that a token uses an expert at a layer.

    ``brier``: mean squared error over every (token, layer, expert); ``ece``: expected calibration
    error over ``bins`` equal-width bins of the score (scores clipped to [0, 1]).
    """
    used = np.zeros(scores.shape, dtype=bool)  # [N, L, E]
    np.put_along_axis(used, expert_ids.astype(np.int64), True, axis=-1)
    probability = np.clip(scores, 0.0, 1.0).reshape(-1)
    used = used.reshape(-1)
    if len(probability) == 0:
        return {"brier": 0.0, "ece": 0.0}
    bin_ids = np.minimum((probability * bins).astype(np.int64), bins - 1)
    sum_probability = np.bincount(bin_ids, weights=probability, minlength=bins)
    sum_used = np.bincount(bin_ids, weights=used, minlength=bins)
    ece = float(np.abs(sum_probability - sum_used).sum() / len(probability))
    brier = float(np.mean(np.square(probability - used)))
    return {"brier": brier, "ece": ece}
