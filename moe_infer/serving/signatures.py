"""Routing signatures: how likely each request's next token is to use each expert.

Owns the `SignatureSource` protocol the expert-aware scheduler reads, its default (`RecentRouting`:
a request's own recent routing) and the predicted one (`PredictedRouting`: a "pregate" or
"expertflow" predictor's routing of the request's next token, made before its forward pass), and
which source a run uses (`signature_source`). Does not schedule (`moe_infer.serving.schedule`).

Shape legend: T tokens of a forward pass, L MoE layers, E experts, K top-k, W window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from moe_infer.api import executor
from moe_infer.errors import ConfigError


class SignatureSource(Protocol):
    """Where the scheduler gets each request's routing signature from.

    ``observe`` is called from the MoE layers' routing observers during every forward pass the
    scheduler runs: ``request_ids`` names the request of each row of ``hidden`` [T, H] (one row per
    token: a prompt's tokens during prefill, one token per request during decode), ``layer`` is
    the MoE-layer position (0..L-1) and ``routing`` the layer's `Routing` (``expert_ids`` [T, K]).
    ``signature`` returns float [L, E] in [0, 1]: how likely the request's next token uses each
    expert. ``extend`` is told every token of a request as soon as it is known, before the forward
    pass that routes it: the prompt at admission, then each chosen token (the next input). A
    predictor plugs in here: from token ids (`PredictedRouting`) or from observed hidden states.
    """

    def extend(self, request_id: int, token_ids: Sequence[int]) -> None: ...

    def observe(self, request_ids: Sequence[int], layer: int, hidden: Tensor, routing: Any) -> None: ...

    def signature(self, request_id: int) -> np.ndarray: ...

    def forget(self, request_id: int) -> None: ...


class RecentRouting:
    """The default signature: the request's own recent routing, without any predictor.

    Consecutive tokens of one sequence reuse experts far more than chance, so the experts of the
    last tokens predict the next token's. Per request and layer, an exponential moving average of
    the one-hot routing of its tokens (``decay`` is the weight of the past at each token), starting
    from its prompt.
    """

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.5):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay={decay!r}: expected a number in [0, 1)")
        self.num_layers, self.num_experts, self.decay = num_layers, num_experts, decay
        self._state: dict[int, np.ndarray] = {}  # request id -> [L, E]

    def observe(self, request_ids: Sequence[int], layer: int, hidden: Tensor, routing: Any) -> None:
        expert_ids = routing.expert_ids.detach().cpu().numpy().astype(np.int64)  # [T, K]
        start = 0
        while start < len(request_ids):  # runs of rows of one request: tokens in order
            end = start + 1
            while end < len(request_ids) and request_ids[end] == request_ids[start]:
                end += 1
            state = self._state.setdefault(request_ids[start], np.zeros((self.num_layers, self.num_experts)))
            # the last token weighs (1 - decay), the one before decay * (1 - decay), ...
            weights = (1.0 - self.decay) * self.decay ** np.arange(end - start - 1, -1, -1)  # [n]
            state[layer] *= self.decay ** (end - start)
            np.add.at(state[layer], expert_ids[start:end], weights[:, None])
            start = end

    def signature(self, request_id: int) -> np.ndarray:
        return self._state.get(request_id, np.zeros((self.num_layers, self.num_experts)))

    def forget(self, request_id: int) -> None:
        self._state.pop(request_id, None)

    def extend(self, request_id: int, token_ids: Sequence[int]) -> None:
        pass  # routing only


class PredictedRouting:
    """Signatures predicted for each request's next token before its forward pass runs.

    ``predictor`` is a `moe_infer.predictors` predictor that can route a token before the first MoE
    layer: "pregate" (Read-ME's pre-gating router: ``scores(windows [T, W]) -> [T, L, E]``, token
    ids only) or "expertflow" (the routing-path predictor at its first source:
    ``first_layer_scores(windows, previous [T, L, K])``, token ids and the previous token's routing,
    observed through the MoE layers). Per request id it keeps the request's last ``window +
    lookahead`` token ids (and, for expertflow, its last token's experts); the signature is the
    predicted routing of the request's next input token (its last known token). State is per
    request, never per row: consecutive forward passes are different micro-batches. Scores are
    computed when a request's last token changes, in one predictor call for all such requests.
    """

    def __init__(self, predictor: Any):
        kind = getattr(predictor, "kind", type(predictor).__name__)
        self.uses_routing = callable(getattr(predictor, "first_layer_scores", None))
        if not (self.uses_routing or callable(getattr(predictor, "scores", None))) \
                or "window" not in getattr(predictor, "options", {}):
            raise ConfigError(f"PredictedRouting needs a predictor that routes a token before the first MoE layer "
                             f"(kind 'pregate' or 'expertflow'), got {kind!r}")
        self.predictor = predictor
        self.num_layers, self.num_experts = predictor.num_layers, predictor.num_experts
        self.width = int(predictor.options["window"])
        self.lookahead = int(predictor.options.get("lookahead", 0))
        self._tokens: dict[int, list[int]] = {}  # request id -> its last width + lookahead token ids
        self._previous: dict[int, np.ndarray] = {}  # request id -> [L, K] experts of its last routed token
        self._scores: dict[int, np.ndarray] = {}  # request id -> [L, E] for its current last token

    def extend(self, request_id: int, token_ids: Sequence[int]) -> None:
        tokens = self._tokens.setdefault(request_id, [])
        tokens.extend(int(t) for t in token_ids)
        del tokens[:-(self.width + self.lookahead)]
        self._scores.pop(request_id, None)

    def observe(self, request_ids: Sequence[int], layer: int, hidden: Tensor, routing: Any) -> None:
        if not self.uses_routing:
            return  # pregate: token ids only, the backbone's routing is never read
        expert_ids = routing.expert_ids.detach().cpu().numpy().astype(np.int64)  # [T, K]
        last = {request: row for row, request in enumerate(request_ids)}  # each request's last token
        for request, row in last.items():
            previous = self._previous.setdefault(request, np.full((self.num_layers, expert_ids.shape[1]), -1))
            previous[layer] = expert_ids[row]
            self._scores.pop(request, None)

    def signature(self, request_id: int) -> np.ndarray:
        if request_id not in self._tokens:
            return np.zeros((self.num_layers, self.num_experts))
        if request_id not in self._scores:
            # one predictor call for every request whose last token changed (the planner asks for
            # the whole pool in a row)
            stale = [i for i in self._tokens if i not in self._scores]
            windows = []
            for i in stale:
                tokens = self._tokens[i]
                known = tokens[:len(tokens) - self.lookahead] if self.lookahead else tokens
                windows.append([-1] * (self.width - len(known)) + known[-self.width:])  # -1: before the start
            windows = torch.tensor(windows, dtype=torch.long)
            if self.uses_routing:
                top_k = self.predictor.top_k
                previous = np.stack([self._previous.get(i, np.full((self.num_layers, top_k), -1)) for i in stale])
                scores = self.predictor.first_layer_scores(windows, torch.from_numpy(previous))
            else:
                scores = self.predictor.scores(windows)  # [len(stale), L, E]
            for i, row in zip(stale, scores.float().cpu().numpy().astype(np.float64)):
                self._scores[i] = row
        return self._scores[request_id]

    def forget(self, request_id: int) -> None:
        self._tokens.pop(request_id, None)
        self._previous.pop(request_id, None)
        self._scores.pop(request_id, None)


def signature_source(model: nn.Module, scheduler: str, signatures: SignatureSource | None = None,
                     predictor: Any = None) -> SignatureSource:
    """The expert scheduler's signatures: ``signatures`` as given, else ``predictor`` (a "pregate" or
    "expertflow" predictor or its file: `PredictedRouting`), else the wrapped model's
    ``MoEConfig.predictor`` when it is such a predictor and the scheduler is "expert", else each
    request's recent routing."""
    ex = executor(model)
    if predictor is not None and signatures is not None:
        raise ConfigError("give signatures or predictor, not both")
    if predictor is None and signatures is None and ex.predictor_hook is not None and scheduler == "expert":
        hooked = ex.predictor_hook.predictor  # MoEConfig.predictor, when it can route queued tokens
        predictor = hooked if hooked.kind in ("pregate", "expertflow") else None
    if predictor is not None:
        from moe_infer.predictors.runtime import checked_predictor

        return PredictedRouting(checked_predictor(ex, getattr(model.config, "_name_or_path", ""), predictor))
    return signatures or RecentRouting(len(ex.layers), ex.layers[0].num_experts)


def signature_name(scheduler: str, signatures: SignatureSource) -> str:
    if scheduler == "fcfs":
        return "none"
    if isinstance(signatures, PredictedRouting):
        return f"{signatures.predictor.kind} predictor"
    return "recent routing" if isinstance(signatures, RecentRouting) else type(signatures).__name__
