"""`RoutingReplay`: replace the router's choice by a recorded trace (`MoEConfig.routing_override`).

For benchmarks only: an offloading run can then see the expert sequence of a real model (or a
calibrated synthetic one) on a model with random weights. Each MoE layer keeps its own cursor
into the trace; a forward of T tokens takes the next T rows of that layer's column (wrapping
around at the end), ids and weights both; the weights are cast to the router's dtype.
"""

from __future__ import annotations

import os

import torch

from moe_infer.routing.adapters import Routing
from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError


class RoutingReplay:
    def __init__(self, trace: Trace | str | os.PathLike, moe_layers: list[int], num_experts: int, top_k: int):
        if not isinstance(trace, Trace):
            trace = Trace.load(trace)
        if trace.num_experts != num_experts or trace.top_k != top_k:
            raise ConfigError(f"routing_override: the trace has {trace.num_experts} experts top-{trace.top_k}; "
                             f"the model has {num_experts} experts top-{top_k}")
        if trace.num_layers < len(moe_layers):
            raise ConfigError(f"routing_override: the trace has {trace.num_layers} MoE layers; the model has "
                             f"{len(moe_layers)}")
        self.trace = trace
        self.column = {layer_idx: i for i, layer_idx in enumerate(moe_layers)}
        self.cursor = dict.fromkeys(moe_layers, 0)

    def apply(self, layer_idx: int, routing: Routing) -> Routing:
        num_tokens = routing.num_tokens
        total = self.trace.num_tokens
        rows = (torch.arange(num_tokens) + self.cursor[layer_idx]) % total
        self.cursor[layer_idx] = (self.cursor[layer_idx] + num_tokens) % total
        column = self.column[layer_idx]
        ids = self.trace.expert_ids[rows, column].to(routing.expert_ids.device, routing.expert_ids.dtype)
        weights = self.trace.expert_weights[rows, column].to(routing.expert_weights.device,
                                                             routing.expert_weights.dtype)
        return Routing(ids, weights, routing.router_logits)

    def rewind(self) -> None:
        for layer_idx in self.cursor:
            self.cursor[layer_idx] = 0
