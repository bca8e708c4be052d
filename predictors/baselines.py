"""Baseline predictors: ``frequency`` (popularity prior), ``markov`` (cross-layer transition counts)
and ``gate-lookahead`` (the routers of later layers applied to an earlier layer's hidden state).

``gate-lookahead`` is what mixtral-offloading and Pre-gated MoE rely on; it needs no training but
needs the model's routers: at runtime those of the wrapped model, offline those of the model named
by the trace (loaded with ``moe_infer.models.load_model``) or given as ``model=``.

Shape legend: N tokens, L MoE layers, K top-k, E experts, H hidden size, T tokens of a call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe_infer.predictors.base import ModelSignature, Predictor, check_shape, source_position
from moe_infer.predictors.blocks import moe_blocks
from moe_infer.predictors.features import (model_moe_inputs, recorded_embeddings, recorded_moe_inputs)
from moe_infer.models import load_model
from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError


class FrequencyPredictor(Predictor):
    """How often each expert is used at each layer, the same for every token."""

    kind = "frequency"

    def __init__(self, signature: ModelSignature, usage: torch.Tensor, options=None, training=None):
        super().__init__(signature, options, training)
        self.usage = usage.float()  # [L, E] share of tokens that use each expert

    @classmethod
    def fit(cls, trace: Trace, *, smoothing: float = 1.0) -> FrequencyPredictor:
        counts = _layer_counts(trace)  # [L, E]
        usage = (counts + smoothing * trace.top_k / trace.num_experts) / (trace.num_tokens + smoothing)
        return cls(ModelSignature.of(trace), torch.from_numpy(usage), {"smoothing": smoothing},
                   {"tokens": trace.num_tokens})

    def _predict(self, trace: Trace, distance: int) -> np.ndarray:
        return np.broadcast_to(self.usage.numpy(), (trace.num_tokens, *self.usage.shape)).copy()

    def runtime_scores(self, position: int, state, max_depth: int) -> dict[int, torch.Tensor]:
        return {target: self.usage[target].expand(state.num_tokens, -1)
                for target in state.targets(position, max_depth)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"usage": self.usage}

    @classmethod
    def _from_tensors(cls, signature, options, training, tensors):
        layers, experts = len(signature.moe_layers), signature.num_experts
        return cls(signature, check_shape("usage", tensors["usage"], (layers, experts)), options, training)


class MarkovPredictor(Predictor):
    """P(expert e' at layer l | expert e at layer s) for every pair s < l, counted on a trace.

    The score of e' at l given the K experts of the token at s is the mean of P(e' | e) over those
    K experts (an estimate of the chance that e' is among the token's experts at l). Below the
    first MoE layer (l < distance) the popularity at l is used.
    """

    kind = "markov"

    def __init__(self, signature: ModelSignature, transitions: torch.Tensor, usage: torch.Tensor,
                 options=None, training=None):
        super().__init__(signature, options, training)
        self.transitions = transitions.float()  # [L, L, E, E]: [s, l, e, e'] = P(e' at l | e at s)
        self.usage = usage.float()  # [L, E]

    @classmethod
    def fit(cls, trace: Trace, *, smoothing: float = 1.0) -> MarkovPredictor:
        num_layers, num_experts = trace.num_layers, trace.num_experts
        one_hot = np.zeros((trace.num_tokens, num_layers, num_experts), dtype=np.float64)  # [N, L, E]
        np.put_along_axis(one_hot, trace.expert_ids.numpy().astype(np.int64), 1.0, axis=-1)
        prior = FrequencyPredictor.fit(trace, smoothing=smoothing).usage.numpy().astype(np.float64)  # [L, E]
        flat = one_hot.reshape(trace.num_tokens, num_layers * num_experts)  # [N, L*E]
        joint = (flat.T @ flat).reshape(num_layers, num_experts, num_layers, num_experts)
        joint = joint.transpose(0, 2, 1, 3)  # [L, L, E, E]: [s, l, e, e'] co-occurrence counts
        from_counts = one_hot.sum(0)  # [L, E]
        transitions = (joint + smoothing * prior[None, :, None, :]) / (from_counts[:, None, :, None] + smoothing)
        return cls(ModelSignature.of(trace), torch.from_numpy(transitions), torch.from_numpy(prior),
                   {"smoothing": smoothing}, {"tokens": trace.num_tokens})

    def _scores(self, source: int, target: int, expert_ids: np.ndarray) -> np.ndarray:
        """[T, E] from the experts [T, K] a token used at ``source``."""
        if source < 0:
            return np.broadcast_to(self.usage[target].numpy(), (len(expert_ids), self.num_experts))
        return self.transitions[source, target].numpy()[expert_ids].mean(1)

    def _predict(self, trace: Trace, distance: int) -> np.ndarray:
        expert_ids = trace.expert_ids.numpy().astype(np.int64)
        return np.stack([self._scores(source_position(layer, distance), layer,
                                      expert_ids[:, max(layer - distance, 0)])
                         for layer in range(self.num_layers)], 1)

    def runtime_scores(self, position: int, state, max_depth: int) -> dict[int, torch.Tensor]:
        expert_ids = state.routing[position].cpu().numpy().astype(np.int64)
        return {target: torch.from_numpy(self._scores(position, target, expert_ids).astype(np.float32))
                for target in state.targets(position, max_depth)}

    def macs_per_token(self) -> int:
        return self.num_layers * self.top_k * self.num_experts  # table rows summed

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"transitions": self.transitions, "usage": self.usage}

    @classmethod
    def _from_tensors(cls, signature, options, training, tensors):
        layers, experts = len(signature.moe_layers), signature.num_experts
        return cls(signature, check_shape("transitions", tensors["transitions"], (layers, layers, experts, experts)),
                   check_shape("usage", tensors["usage"], (layers, experts)), options, training)


def router_scores(routing, num_experts: int) -> torch.Tensor:
    """[T, E] scores of a ``Routing``: the router's own top-k first (0.5 + ...), then the others by
    router probability (softmax of the logits, halved), so the top-K is exactly the router's."""
    chosen = torch.zeros(routing.num_tokens, num_experts, device=routing.expert_ids.device)
    chosen.scatter_(1, routing.expert_ids.long(), 0.5)
    if routing.router_logits is None:
        return chosen
    return chosen + 0.5 * torch.softmax(routing.router_logits.float(), -1)


class GateLookaheadPredictor(Predictor):
    """Apply the router of layer l to the MoE input of layer l - d (no training).

    Below the first MoE layer (l < d) the router of l sees the token's embedding, RMS-normalised
    (the scale the MoE input has after its norm).
    """

    kind = "gate-lookahead"

    def __init__(self, signature: ModelSignature, model: nn.Module | None = None, options=None, training=None):
        super().__init__(signature, options, training)
        self._model = model
        self._blocks: list | None = None  # the model's MoE blocks (moe_infer.predictors.blocks), on first use

    @classmethod
    def fit(cls, trace: Trace, *, model: nn.Module | str | None = None) -> GateLookaheadPredictor:
        name = model if isinstance(model, str) else trace.model
        loaded = model if isinstance(model, nn.Module) else None
        return cls(ModelSignature.of(trace), loaded, {"model": name}, {"tokens": 0})

    def model(self) -> nn.Module:
        """The model whose routers are applied, as given or loaded by name on first use (not wrapped)."""
        if self._model is None:
            self._model, _ = load_model(self.options["model"], device="cpu")
        return self._model

    def _routers(self) -> list:
        """The model's MoE blocks, checked against the predictor's MoE layers."""
        if self._blocks is None:
            blocks = moe_blocks(self.model())
            layers = [block.layer_idx for block in blocks]
            if tuple(layers) != self.signature.moe_layers:
                raise ConfigError(f"model {self.options['model']!r} has MoE layers {layers}, the predictor "
                                  f"{list(self.signature.moe_layers)}")
            self._blocks = blocks
        return self._blocks

    @torch.inference_mode()
    def _apply(self, target: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self._routers()[target]
        weight = next(layer.router.parameters())
        return router_scores(layer.route(hidden.to(weight.device, weight.dtype)), self.num_experts).float()

    def _predict(self, trace: Trace, distance: int) -> np.ndarray:
        hidden, embeddings = recorded_moe_inputs(trace), recorded_embeddings(trace)
        if hidden is None or embeddings is None:
            self._routers()  # the model's MoE layers are the predictor's
            hidden, embeddings = model_moe_inputs(trace, self.model())
        normed = torch.from_numpy(embeddings)
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + 1e-6)
        out = []
        for layer in range(self.num_layers):
            source = source_position(layer, distance)
            inputs = normed if source < 0 else torch.from_numpy(hidden[:, source]).float()
            out.append(self._apply(layer, inputs).cpu())
        return torch.stack(out, 1).numpy()

    def runtime_scores(self, position: int, state, max_depth: int) -> dict[int, torch.Tensor]:
        layers = state.executor.layers
        with torch.inference_mode():
            return {target: router_scores(layers[target].route(state.hidden[position]), self.num_experts)
                    for target in state.targets(position, max_depth)}

    def macs_per_token(self) -> int:
        return self.num_layers * self._routers()[0].hidden_size * self.num_experts

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}  # the routers are the model's; the file names the model

    @classmethod
    def _from_tensors(cls, signature, options, training, tensors):
        return cls(signature, None, options, training)


def _layer_counts(trace: Trace) -> np.ndarray:
    """[L, E] tokens that use each expert at each layer."""
    one_hot = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float64)
    np.put_along_axis(one_hot, trace.expert_ids.numpy().astype(np.int64), 1.0, axis=-1)
    return one_hot.sum(0)

