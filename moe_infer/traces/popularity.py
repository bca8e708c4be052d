"""How often each expert is used in a trace, alone and in pairs across layers, and the hot set.

Owns the counts that both expert placement and the expert cache read from a trace: the load of
every expert of every MoE layer, the inter-layer affinity of expert pairs, and the static hot set
(the most used experts, what the `static` cache policy keeps resident). Below the cache and
`moe_infer.distributed.placement`; imports only the trace format.

Shape legend: N tokens, L MoE layers (positions in ``trace.moe_layers``), K top-k, E experts per layer.
"""

from __future__ import annotations

import numpy as np

from moe_infer.errors import ConfigError
from moe_infer.traces.trace import Trace


def affinity(trace: Trace) -> np.ndarray:
    """Counts of (expert at MoE layer l, expert at layer l + 1) pairs over all tokens:
    float64 [L - 1, E, E] (each token adds K x K pairs per layer pair)."""
    ids = trace.expert_ids.numpy().astype(np.int64)  # [N, L, K]
    num_experts = trace.num_experts
    out = np.zeros((max(trace.num_layers - 1, 0), num_experts, num_experts))
    for l in range(trace.num_layers - 1):
        pairs = ids[:, l, :, None] * num_experts + ids[:, l + 1, None, :]  # [N, K, K]
        out[l] = np.bincount(pairs.ravel(), minlength=num_experts * num_experts).reshape(num_experts, num_experts)
    return out


def expert_load(trace: Trace) -> np.ndarray:
    """(token, k) pairs routed to each expert of each MoE layer: float64 [L, E]."""
    ids = trace.expert_ids.numpy().astype(np.int64)  # [N, L, K]
    out = np.zeros((trace.num_layers, trace.num_experts))
    for l in range(trace.num_layers):
        out[l] = np.bincount(ids[:, l, :].ravel(), minlength=trace.num_experts)
    return out


def hot_set(trace: Trace, slots: int, *, per_layer: bool = True) -> dict[int, list[int]]:
    """The experts a `static` cache keeps resident: the most used ones of the trace.

    ``slots`` is expert slots per MoE layer (``per_layer=True``) or in total across layers (then
    layers compete: the slots go to the globally most used (layer, expert) pairs). Returns
    ``{decoder-layer index: sorted expert ids}``; ties go to the lower expert id.
    """
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots <= 0:
        raise ConfigError(f"slots={slots!r}: expected a positive int")
    load = expert_load(trace)  # [L, E]
    layers = list(trace.moe_layers)
    if per_layer:
        keep = min(slots, trace.num_experts)
        # stable sort on -load: equal loads keep expert order
        return {layers[l]: sorted(np.argsort(-load[l], kind="stable")[:keep].tolist()) for l in range(len(layers))}
    flat = np.argsort(-load.ravel(), kind="stable")[: min(slots, load.size)]
    chosen: dict[int, list[int]] = {layer: [] for layer in layers}
    for index in flat.tolist():
        chosen[layers[index // trace.num_experts]].append(index % trace.num_experts)
    return {layer: sorted(experts) for layer, experts in chosen.items()}

