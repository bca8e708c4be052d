"""The routing of the offloading benchmark (`offload.py`): Mixtral-8x7B routing without Mixtral.

The benchmark's model has random weights, so its own router says nothing about real routing. It
replays a synthetic trace instead, calibrated on the shipped Mixtral-8x7B routing statistics
(`assets/routing-stats/mixtral-8x7b.json`): `calibration` says which real statistics calibrate
which layer, `calibrated_trace` draws the trace (real popularity and cross-layer pairs, plus a
temporal reuse), and `calibrate_reuse` picks the reuse that gives LRU the real hit rate.
`OraclePrefetch` predicts from the same trace with a chosen recall and drives the cache's
prefetch. Nothing here builds a model or times a run (`offload.py` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_infer.cache.simulate import simulate
from moe_infer.errors import ConfigError
from moe_infer.traces.trace import Trace


def _nearest_sampled(layer: int, num_layers: int, sampled: list[int]) -> int:
    """The sampled layer of the 32-layer model nearest to `layer` of a `num_layers` model (scaled)."""
    position = layer * 31 / max(num_layers - 1, 1)
    return sampled[int(np.argmin([abs(position - s) for s in sampled]))]


def calibration(stats_path: Path, num_layers: int, domain: str = "github") -> dict:
    """Which real statistics calibrate which layer of a `num_layers` model: the popularity of the
    nearest sampled Mixtral layer, and the cross-layer pair counts (0->7 below layer 7 of the
    32-layer model, 7->15 above) for the first choice given the previous layer's."""
    stats = json.loads(stats_path.read_text())
    sampled = stats["layers_sampled"]
    return {"file": stats_path.name, "source": stats.get("source"), "model": "mixtral-8x7b", "domain": domain,
            "layers_sampled": sampled,
            "popularity_from_layer": {l: _nearest_sampled(l, num_layers, sampled) for l in range(num_layers)},
            "pairs_from": {l: ("0->7" if l * 31 / max(num_layers - 1, 1) < 7 else "7->15")
                           for l in range(1, num_layers)}}


def calibrated_trace(stats_path: Path, num_layers: int, num_experts: int, top_k: int, num_tokens: int, reuse: float,
                     seed: int = 0, domain: str = "github") -> Trace:
    """Synthetic Mixtral routing: first choice at layer l drawn from P(e | previous layer's first
    choice) (cross-layer pair counts of real Mixtral), tilted to the real popularity of the nearest
    sampled layer (`calibration`); with probability `reuse` a token repeats the previous token's
    expert at that layer (temporal locality); further choices from the layer's popularity without
    replacement."""
    if num_experts != 8:
        raise ConfigError(f"calibrated routing is Mixtral's: 8 experts, not {num_experts}")
    stats = json.loads(stats_path.read_text())
    model = "mixtral-8x7b"
    sampled = stats["layers_sampled"]  # [0, 7, 15]
    counts = np.array(stats["expert_counts"][model][domain], dtype=np.float64)  # [3, 8]
    transitions = {}
    for name, rows in zip(("0->7", "7->15"), stats["crosslayer_pairs"][model][domain]):  # [e1, e2, count] rows
        m = np.ones((8, 8))
        for e1, e2, c in rows:
            m[e1, e2] += c
        transitions[name] = m / m.sum(axis=1, keepdims=True)
    plan = calibration(stats_path, num_layers, domain)
    rng = np.random.default_rng(seed)
    popularity = [counts[sampled.index(plan["popularity_from_layer"][l])] for l in range(num_layers)]
    popularity = [p / p.sum() for p in popularity]
    ids = np.zeros((num_tokens, num_layers, top_k), dtype=np.int32)
    for n in range(num_tokens):
        prev_first = None
        for l in range(num_layers):
            p = popularity[l]
            if n > 0 and rng.random() < reuse:
                first = int(ids[n - 1, l, 0])
            elif prev_first is None:
                first = int(rng.choice(8, p=p))
            else:
                t = transitions[plan["pairs_from"][l]][prev_first] * p
                first = int(rng.choice(8, p=t / t.sum()))
            rest = p.copy()
            rest[first] = 0
            others = rng.choice(8, size=top_k - 1, replace=False, p=rest / rest.sum())
            ids[n, l] = [first, *others]
            prev_first = first
    weights = np.full(ids.shape, 1.0 / top_k, dtype=np.float32)
    return Trace.from_arrays(expert_ids=ids, expert_weights=weights, seq_ids=np.zeros(num_tokens, np.int32),
                             positions=np.arange(num_tokens), token_ids=np.zeros(num_tokens, np.int32),
                             num_experts=8, moe_layers=list(range(num_layers)), model="synthetic-mixtral",
                             family="mixtral", source=f"calibrated on {model}/{domain} routing statistics "
                                                      f"({stats_path.name}), reuse {reuse:.2f}")


def calibrate_reuse(stats_path: Path, num_layers: int, top_k: int, target: float = 0.615) -> tuple[float, float]:
    """The temporal reuse whose trace gives LRU (4 of 8 per layer) the real Mixtral hit rate:
    (reuse, the hit rate it gives)."""
    best = None
    for reuse in np.arange(0.0, 0.75, 0.05):
        rate = simulate(calibrated_trace(stats_path, num_layers, 8, top_k, 600, float(reuse), seed=1), "lru", 4).hit_rate
        if best is None or abs(rate - target) < abs(best[1] - target):
            best = (float(reuse), rate)
    return best


class OraclePrefetch:
    """A noisy oracle driving `cache.prefetch` (for random-weight models on a replayed trace): when
    MoE layer p routes a call of T tokens, the trace rows the replay gives layer p+1 next are known;
    each of their experts is predicted with probability `recall`, otherwise a random other expert
    is, and the predicted set is prefetched. Its measured recall is kept (`recall()`)."""

    def __init__(self, executor, recall: float, seed: int = 0):
        if not 0.0 <= recall <= 1.0:
            raise ConfigError(f"oracle recall {recall!r}: expected a probability in [0, 1]")
        self.executor, self.recall_target = executor, recall
        self.rng = np.random.default_rng(seed)
        self.layers = executor.moe_layer_indices
        self.kept = self.total = 0
        for layer in executor.layers:
            layer.routing_observers.append(self)

    def __call__(self, layer, hidden, routing) -> None:
        position = self.layers.index(layer.layer_idx)
        if position + 1 >= len(self.layers):
            return  # the next token's first layer: its rows are not known yet at this call
        replay = self.executor.replay
        target = self.layers[position + 1]
        trace = replay.trace
        rows = (np.arange(routing.num_tokens) + replay.cursor[target]) % trace.num_tokens
        true = trace.expert_ids[rows, replay.column[target]].numpy()  # [T, K]
        keep = self.rng.random(true.shape) < self.recall_target
        num_experts = trace.num_experts
        wrong = (true + self.rng.integers(1, num_experts, size=true.shape)) % num_experts
        predicted = np.where(keep, true, wrong)
        self.kept += int(keep.sum())
        self.total += keep.size
        self.executor.cache.prefetch(target, sorted(set(predicted.reshape(-1).tolist())))

    def recall(self) -> float | None:
        return self.kept / self.total if self.total else None

    def detach(self) -> None:
        for layer in self.executor.layers:
            if self in layer.routing_observers:
                layer.routing_observers.remove(self)
