"""Predictions in a running wrapped model: the hook the executor's prefetch is driven by.

``attach(model, predictor, depth=1, sink=None)`` registers a routing observer on every MoE layer
(``MoELayer.routing_observers``) and a forward pre-hook on the input embedding (to see token ids).
At MoE layer position p it asks the predictor for the layers p+1 .. p+depth and calls
``sink(layer_idx, expert_ids, scores)`` once per predicted layer with the experts that some token
of the call is predicted to use (each token's top-K), most likely first — the signature of
``executor.cache.prefetch``. When the predicted layer routes, the hook scores the prediction
(``recall()``, per distance). Outputs of the model are never changed.

Cost per MoE layer is kept small (it is on the critical path of every decode step): the
predictor may do its shared work once per call (``CallState.cached``; ``expertflow`` computes what
is known at the call's start for every layer in one matmul), the hook takes one top-K over all the
layers predicted and reads the sink's experts back in two host reads, and recall is scored once per
call, on the device, read back only by ``recall()``.

What is known differs from a trace in one respect: in a call of several tokens (prefill) the
earlier tokens' routing at later layers is not known yet, so the previous-token features are
"unknown" there; in decode steps (one token per row, same rows as the last call) the previous
token's routing, its MoE inputs and the token window carry over from the last call.

Shape legend: B rows, S tokens per row, T = B * S tokens of a call, L MoE layers, K top-k,
E experts, W window width.
"""

from __future__ import annotations

import time

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moe_infer.predictors.base import ModelSignature, Predictor, PredictorMismatch
from moe_infer.predictors.lookahead import AttentionLookahead
from moe_infer.predictors.nets import MAX_WINDOW as _MAX_WINDOW
from moe_infer.errors import ConfigError
from moe_infer.wrapped import executor_of

Sink = Callable[[int, list, list], Any]


class CallState:
    """What the running model has revealed so far in one forward call (read by
    ``Predictor.runtime_scores``)."""

    def __init__(self, executor, num_tokens: int, windows: torch.Tensor, previous: torch.Tensor,
                 previous_hidden: torch.Tensor | None = None, lookahead=None):
        self.executor = executor
        self.num_tokens = num_tokens
        self.num_layers = len(executor.layers)
        self.num_experts = executor.layers[0].num_experts
        self.windows_full = windows  # [T, _MAX_WINDOW] token ids, oldest first, -1 unknown
        self.previous = previous  # [T, L, K] the previous token's experts, -1 unknown
        self.previous_hidden = previous_hidden  # [T, L, H] the previous token's MoE inputs; None unknown
        self.hidden: dict[int, torch.Tensor] = {}  # position -> [T, H]
        self.routing: dict[int, torch.Tensor] = {}  # position -> [T, K]
        self.lookahead = lookahead  # AttentionLookahead, for predictors that read it
        self._cache: dict[str, Any] = {}

    def targets(self, position: int, max_depth: int) -> list[int]:
        return list(range(position + 1, min(self.num_layers, position + max_depth + 1)))

    @property
    def windows(self) -> torch.Tensor:
        return self.windows_full

    def token_window(self, width: int, lookahead: int = 0) -> torch.Tensor:
        """[T, width] ids of tokens n - lookahead - width + 1 .. n - lookahead."""
        end = self.windows_full.shape[1] - lookahead
        return self.windows_full[:, end - width:end]

    def previous_hot(self) -> torch.Tensor:
        """[T, L*E] float32 multi-hot of the previous token's experts (zeros where unknown)."""
        return self.cached("previous_hot", lambda: _multi_hot(self.previous, self.num_experts).flatten(1))

    def lookahead_features(self, position: int) -> torch.Tensor:
        """[T, H+E] ``AttentionLookahead.features`` of layer position + 1, made at layer ``position``."""
        if self.lookahead is None:
            raise RuntimeError("this predictor reads attention lookahead, which the prediction hook was built without")
        return self.cached(f"lookahead:{position}",
                           lambda: self.lookahead.features(position, self.hidden[position]))

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def _multi_hot(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., E] float32 from ids [..., K], on their device; ids < 0 are ignored."""
    out = torch.zeros(*expert_ids.shape[:-1], num_experts, device=expert_ids.device)
    ids = expert_ids.long()  # ids < 0 add 0 at expert 0; a row's valid ids are distinct (a router's top-k)
    return out.scatter_add_(-1, ids.clamp(min=0), (ids >= 0).to(out.dtype))


class PredictionHook:
    """The attached predictor of one wrapped model; ``detach()`` removes every hook."""

    def __init__(self, executor, embedding: nn.Module, predictor: Predictor, depth: int, sink: Sink | None,
                 lookahead=None):
        self.executor = executor
        self.predictor, self.depth, self.sink = predictor, depth, sink
        self.lookahead = lookahead  # AttentionLookahead when the predictor reads it (its hooks are ours)
        self.layers = self.executor.layers
        self.positions = {layer.layer_idx: p for p, layer in enumerate(self.layers)}
        self.top_k = self.layers[0].adapter.top_k
        self.state: CallState | None = None
        self._input_ids: torch.Tensor | None = None
        self._history: torch.Tensor | None = None  # [B, _MAX_WINDOW] last tokens of each row
        self._last_routing: torch.Tensor | None = None  # [B, L, K] routing of each row's last token
        self._last_hidden: torch.Tensor | None = None  # [B, L, H] MoE inputs of each row's last token
        self._shape: tuple[int, int] | None = None  # (B, S) of the current call, None when unknown
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # this call's (target, distance, top [T, K])
        self.reset_stats()
        self._handles = [embedding.register_forward_pre_hook(self._see_tokens)]
        for layer in self.layers:
            layer.routing_observers.append(self)

    # ----------------------------------------------------------------- statistics
    def reset_stats(self) -> None:
        self._found_counts: torch.Tensor | None = None  # [depth + 1] true experts found among the predicted top-K
        self.needed: dict[int, int] = {}  # distance -> true experts
        self.sunk = 0  # sink calls
        self.seconds = 0.0  # wall time spent in the hook (predicting, scoring, prefetch requests)

    @property
    def found(self) -> dict[int, int]:
        """Distance -> true experts found among the predicted top-K."""
        counts = [0] * (self.depth + 1) if self._found_counts is None else self._found_counts.tolist()
        return {d: counts[d] for d in sorted(self.needed)}

    def recall(self) -> dict[int, float]:
        """Recall of the true experts among each token's predicted top-K, per distance."""
        found = self.found
        return {d: found[d] / self.needed[d] for d in sorted(self.needed) if self.needed[d]}

    # ----------------------------------------------------------------- hooks
    def _see_tokens(self, module, args) -> None:
        self._input_ids = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def _new_call(self, num_tokens: int) -> CallState:
        ids = self._input_ids
        self._input_ids = None
        num_layers = len(self.layers)
        if ids is None or ids.numel() != num_tokens:  # inputs_embeds, or a call we cannot follow
            self._history = self._last_routing = self._last_hidden = self._shape = None
            return CallState(self.executor, num_tokens, torch.full((num_tokens, _MAX_WINDOW), -1),
                             torch.full((num_tokens, num_layers, self.top_k), -1), lookahead=self.lookahead)
        ids = ids.reshape(ids.shape[0], -1).long().cpu()  # [B, S]
        rows, width = ids.shape
        decode = width == 1 and self._history is not None and self._history.shape[0] == rows
        before = self._history if decode else torch.full((rows, _MAX_WINDOW), -1)
        joined = torch.cat([before, ids], 1)  # [B, _MAX_WINDOW + S]
        windows = joined.unfold(1, _MAX_WINDOW, 1)[:, 1:]  # [B, S, _MAX_WINDOW], ending at each token
        previous = (self._last_routing[:, None] if decode
                    else torch.full((rows, 1, num_layers, self.top_k), -1)).expand(rows, width, -1, -1)
        previous_hidden = self._last_hidden if decode else None  # [B, L, H] = [T, L, H] in decode
        self._history = joined[:, -_MAX_WINDOW:]
        self._shape = (rows, width)
        return CallState(self.executor, num_tokens, windows.reshape(num_tokens, _MAX_WINDOW),
                         previous.reshape(num_tokens, num_layers, self.top_k), previous_hidden, self.lookahead)

    def __call__(self, layer, hidden: torch.Tensor, routing) -> None:
        start = time.perf_counter()
        try:
            self._observe(layer, hidden, routing)
        finally:
            self.seconds += time.perf_counter() - start

    def _observe(self, layer, hidden: torch.Tensor, routing) -> None:
        position = self.positions[layer.layer_idx]
        if position == 0 or self.state is None:
            if self.state is not None:  # the last call stopped before its last MoE layer
                self._score_call(self.state)
            self.state = self._new_call(hidden.shape[0])
        state = self.state
        state.hidden[position] = hidden
        state.routing[position] = routing.expert_ids
        predictions = self.predictor.runtime_scores(position, state, self.depth)
        if predictions:
            targets = list(predictions)
            scores = (predictions[targets[0]][:, None] if len(targets) == 1
                      else torch.stack([predictions[target] for target in targets], 1))  # [T, D, E]
            if scores.dtype != torch.float32:
                scores = scores.float()
            top = torch.topk(scores, self.top_k, dim=-1).indices  # [T, D, K]
            self._pending += [(target, target - position, top[:, i]) for i, target in enumerate(targets)]
            if self.sink is not None:
                self._emit(targets, scores, top)
        if position == len(self.layers) - 1:
            self._end_call(state)

    def _emit(self, targets: list[int], scores: torch.Tensor, top: torch.Tensor) -> None:
        """One sink call per target: the experts in some token's top-K, by their score summed over
        the call's tokens (highest first, ties to the lower id); two host reads for all targets."""
        totals = scores.sum(0).tolist()  # [D][E]
        chosen = top.transpose(0, 1).reshape(len(targets), -1).tolist()  # [D][T*K]
        for target, total, ids in zip(targets, totals, chosen):
            experts = sorted(set(ids), key=lambda e: (-total[e], e))
            self.sink(self.layers[target].layer_idx, experts, [total[e] for e in experts])
            self.sunk += 1

    def _score_call(self, state: CallState) -> None:
        """Score the call's predictions of the layers that routed, all at once (no host read)."""
        pending = [(target, distance, top) for target, distance, top in self._pending if target in state.routing]
        self._pending = []
        if not pending:
            return
        device = pending[0][2].device
        top = torch.stack([top for _, _, top in pending])  # [P, T, K]
        truth = torch.stack([state.routing[target] for target, _, _ in pending]).to(device)  # [P, T, K]
        found = (truth[..., None] == top[..., None, :]).any(-1).flatten(1).sum(1)  # [P]
        distances = torch.tensor([distance for _, distance, _ in pending], device=device)
        if self._found_counts is None or self._found_counts.device != device:
            self._found_counts = torch.zeros(self.depth + 1, dtype=torch.long, device=device)
        self._found_counts.index_add_(0, distances, found)
        for _, distance, _ in pending:
            self.needed[distance] = self.needed.get(distance, 0) + truth[0].numel()

    def _end_call(self, state: CallState) -> None:
        if len(state.routing) == len(self.layers) and self._shape is not None:
            rows, width = self._shape
            routed = torch.stack([state.routing[p].cpu() for p in range(len(self.layers))], 1)  # [T, L, K]
            self._last_routing = routed.reshape(rows, width, len(self.layers), -1)[:, -1]
            last = [state.hidden[p].reshape(rows, width, -1)[:, -1] for p in range(len(self.layers))]
            self._last_hidden = torch.stack(last, 1)  # [B, L, H]
        self._score_call(state)
        if self.lookahead is not None:
            self.lookahead.end_call()
        self.state = None

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.lookahead is not None:
            self.lookahead.detach()
        for layer in self.layers:
            if self in layer.routing_observers:
                layer.routing_observers.remove(self)


def attach(model: nn.Module, predictor: Predictor | str, *, depth: int = 1, sink: Sink | None = None
           ) -> PredictionHook:
    """Attach ``predictor`` (a ``Predictor``, the path of a saved one, or "gate-lookahead") to the
    wrapped ``model``; ``sink(layer_idx, expert_ids, scores)`` receives the predictions."""
    executor = executor_of(model)
    if executor is None:
        raise ConfigError("attach needs a wrapped model: call moe_infer.wrap(model) first")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth={depth!r}: expected an int >= 1 (MoE layers ahead)")
    predictor = checked_predictor(executor, getattr(model.config, "_name_or_path", ""), predictor)
    lookahead = AttentionLookahead(model, executor.layers) if predictor.reads_attention_lookahead else None
    return PredictionHook(executor, model.get_input_embeddings(), predictor, depth, sink, lookahead)


def checked_predictor(executor, model_name: str, spec: Predictor | str) -> Predictor:
    """The predictor ``spec`` names (``resolve``), refused (``PredictorMismatch``) unless it was
    trained for the executor's routing shape (family, experts, top-k, MoE layers)."""
    layers = executor.layers
    signature = ModelSignature(model_name, layers[0].family, layers[0].num_experts, layers[0].adapter.top_k,
                               tuple(executor.moe_layer_indices))
    predictor = resolve(spec, signature)
    mine = predictor.signature
    for field in ("family", "num_experts", "top_k", "moe_layers"):
        if getattr(mine, field) != getattr(signature, field):
            raise PredictorMismatch(f"the model has {field}={getattr(signature, field)!r}, but the predictor was "
                                    f"trained for {field}={getattr(mine, field)!r} (model {mine.model!r})")
    return predictor


def resolve(spec: Predictor | str, signature: ModelSignature) -> Predictor:
    """A ``Predictor`` from a ``MoEConfig.predictor`` value."""
    import os

    from moe_infer.predictors.baselines import GateLookaheadPredictor
    from moe_infer.predictors.registry import PREDICTORS, load

    if isinstance(spec, Predictor):
        return spec
    if spec == GateLookaheadPredictor.kind:  # at runtime it routes through the executor's own layers
        return GateLookaheadPredictor(signature, None, {"model": signature.model})
    if isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec):
        return load(spec)
    if spec in PREDICTORS:
        raise ConfigError(f"predictor {spec!r} must be trained first (`moe-infer predictor train --kind {spec} "
                         "--trace T --out P`); give the path of the saved predictor")
    raise ConfigError(f"predictor {spec!r}: expected a Predictor, the path of a saved predictor, or "
                     "'gate-lookahead'")
