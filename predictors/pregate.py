"""``pregate``: a router decoupled from the backbone (after Read-ME's pre-gating router).

From token ids alone (a window of ``window`` tokens ending ``lookahead`` tokens before the token)
it predicts the experts of every MoE layer, so the routing of a whole token is known before the
backbone's first layer runs (``lookahead=0``: as soon as the token is known; ``lookahead=1``:
while the previous token still computes). It never reads hidden states or the backbone's routing,
so its prediction is the same at every layer distance, and a batching scheduler can route queued
tokens with it. Trained by distillation from a trace's routing.

Shape legend: N tokens, T tokens of a call, L MoE layers, E experts, W window width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from moe_infer.predictors.base import ModelSignature
from moe_infer.predictors.features import token_windows
from moe_infer.predictors.nets import NetPredictor, TokenWindowEmbedding, loss_targets, mlp, routing_loss, train_loop
from moe_infer.traces.trace import Trace

DEFAULTS = {"window": 8, "lookahead": 0, "embed_dim": 16, "hidden": 96, "group_limit": True, "loss": "membership",
            "epochs": 6, "batch_size": 256, "learning_rate": 3e-3, "max_seconds": None, "seed": 0}
_EVAL_BATCH = 8192


class PreGateNet(nn.Module):
    def __init__(self, vocab_size: int, num_layers: int, num_experts: int, *, window: int, embed_dim: int,
                 hidden: int):
        super().__init__()
        self.num_layers, self.num_experts = num_layers, num_experts
        self.embed = TokenWindowEmbedding(vocab_size, window, embed_dim)
        self.router = mlp(window * embed_dim, hidden, num_layers * num_experts)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [B, W] token ids -> logits [B, L, E]."""
        return self.router(self.embed(windows)).view(len(windows), self.num_layers, self.num_experts)


class PreGatePredictor(NetPredictor):
    kind = "pregate"
    defaults = DEFAULTS

    @classmethod
    def fit(cls, trace: Trace, **options: Any) -> PreGatePredictor:
        options = cls.fit_options(options, trace)
        net = cls.initial_net(trace.num_layers, trace.num_experts, options, trace.top_k)
        windows = torch.from_numpy(token_windows(trace, options["window"], options["lookahead"]))
        targets = loss_targets(trace, options["loss"])  # [N, L, E]
        summary = train_loop(net, trace.num_tokens,
                             lambda rows: routing_loss(net(windows[rows]), targets[rows], options["loss"]),
                             epochs=options["epochs"], batch_size=options["batch_size"],
                             learning_rate=options["learning_rate"], max_seconds=options["max_seconds"],
                             seed=options["seed"])
        return cls(ModelSignature.of(trace), net, options, summary)

    @torch.inference_mode()
    def scores(self, windows: torch.Tensor) -> torch.Tensor:
        """[T, L, E] scores of every MoE layer from token windows [T, W] (ids, oldest first)."""
        param = next(self.net.parameters())
        return torch.cat([self.logit_scores(self.net(windows[first:first + _EVAL_BATCH].to(param.device)))
                          for first in range(0, len(windows), _EVAL_BATCH)])

    def _predict(self, trace: Trace, distance: int) -> np.ndarray:
        windows = token_windows(trace, self.options["window"], self.options["lookahead"])
        return self.scores(torch.from_numpy(windows)).cpu().numpy()

    def runtime_scores(self, position: int, state, max_depth: int) -> dict[int, torch.Tensor]:
        # computed once per forward call, at its first MoE layer, for every layer of every token
        scores = state.cached(self.kind, lambda: self.scores(state.token_window(self.options["window"],
                                                                                self.options["lookahead"])))
        return {target: scores[:, target] for target in state.targets(position, max_depth)}

    @classmethod
    def build_net(cls, num_layers: int, num_experts: int, options: dict[str, Any]) -> PreGateNet:
        return PreGateNet(options["vocab_size"], num_layers, num_experts, window=options["window"],
                          embed_dim=options["embed_dim"], hidden=options["hidden"])
