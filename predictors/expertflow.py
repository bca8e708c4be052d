"""``expertflow``: a lightweight routing-path predictor with runtime correction (after ExpertFlow).

Before the first MoE layer it predicts the experts of every MoE layer of a token from what is known
then: the ids of the token and of the ``window - 1`` tokens before it, and the previous token's full
routing and MoE inputs (each layer's projected to ``previous_dim`` numbers by a learned per-layer
matrix; unknown in a prefill call, where they count as zeros). At each MoE layer s the prediction
of the later layers is corrected with what the model has just revealed: the MoE input (hidden
state) of layer s and the token's actual experts at layers 0..s. One small MLP per source position
(-1 = before the first MoE layer, then 0..L-2), sharing the token-window embedding and the
projections; the MLP of source s predicts layers s+1..L-1 and reads the previous token's projected
MoE inputs of those layers.

With ``attention_lookahead`` (off by default) the MLP of source s >= 0 also reads an estimate of
layer s+1's MoE input, made by running that layer's attention on the residual stream
(``moe_infer.predictors.lookahead``), and the experts layer s+1's router picks for it. It costs one
extra attention pass per MoE layer and needs the model, in training and at runtime.

Shape legend: N tokens, T tokens of a call, L MoE layers, K top-k, E experts, H hidden size,
W window width.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from moe_infer.predictors.base import ModelSignature, source_position
from moe_infer.predictors.features import (model_features, multi_hot, previous_routing, recorded_moe_inputs,
                                           same_sequence_offsets, token_windows)
from moe_infer.predictors.nets import (NetPredictor, TokenWindowEmbedding, loss_targets, mlp, routing_loss,
                                       train_loop)
from moe_infer.trace import Trace
from moe_infer.errors import ConfigError

# hidden 192 and the membership loss: chosen on validation text only (`moe-infer bench predictors --tune`;
# bench/results/predictors-tune.md: best of hidden 80/192 x both losses on both shipped models); about a quarter
# of a percent of Mixtral-8x7B's MACs per token (bench/results/predictors.md)
DEFAULTS = {"window": 4, "embed_dim": 16, "hidden": 192, "previous_dim": 8, "skip": False, "group_limit": True,
            "attention_lookahead": False, "loss": "membership", "epochs": 6, "batch_size": 256,
            "learning_rate": 3e-3, "max_seconds": None, "seed": 0}
_EVAL_BATCH = 8192


class ExpertFlowNet(nn.Module):
    def __init__(self, vocab_size: int, num_layers: int, num_experts: int, hidden_size: int, *, window: int,
                 embed_dim: int, hidden: int, previous_dim: int = 0, skip: bool = False, lookahead_dim: int = 0):
        super().__init__()
        self.num_layers, self.num_experts, self.previous_dim = num_layers, num_experts, previous_dim
        self.lookahead_dim = lookahead_dim  # H + E with attention lookahead, else 0
        self.embed = TokenWindowEmbedding(vocab_size, window, embed_dim)
        # [L, H, previous_dim]: the previous token's MoE input of each layer -> previous_dim numbers
        self.previous_projection = None
        if previous_dim:
            scale = hidden_size ** -0.5
            self.previous_projection = nn.Parameter(torch.randn(num_layers, hidden_size, previous_dim) * scale)
        common = window * embed_dim + num_layers * num_experts
        # index s + 1 holds the MLP of source position s (s = -1 .. L-2)
        self.sources = nn.ModuleList(
            mlp(common + (num_layers - 1 - s) * previous_dim
                + (0 if s < 0 else hidden_size + (s + 1) * num_experts + lookahead_dim),
                hidden, (num_layers - 1 - s) * num_experts, skip)
            for s in range(-1, num_layers - 1))

    def forward(self, source: int, windows: torch.Tensor, previous_hot: torch.Tensor,
                previous_hidden: torch.Tensor | None, hidden: torch.Tensor | None = None,
                routed_hot: torch.Tensor | None = None, lookahead: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L-1-source, E] of layers source+1 .. L-1.

        windows [B, W] token ids; previous_hot [B, L*E] the previous token's experts;
        previous_hidden [B, L, H] its MoE inputs (zeros where there is none), or None where unknown;
        for source >= 0 hidden [B, H] the MoE input of layer ``source`` and routed_hot
        [B, (source+1)*E] the token's experts at layers 0..source, and with attention lookahead
        ``lookahead`` [B, H+E] the ``AttentionLookahead.features`` of layer source+1."""
        parts = [self.embed(windows), previous_hot]
        if self.previous_projection is not None:
            targets = self.num_layers - 1 - source
            if previous_hidden is None:
                parts.append(previous_hot.new_zeros(len(windows), targets * self.previous_dim))
            else:
                parts.append(torch.einsum("blh,lhr->blr", previous_hidden[:, source + 1:],
                                          self.previous_projection[source + 1:]).flatten(1))
        if source >= 0:
            parts += [hidden, routed_hot]
            if self.lookahead_dim:
                parts.append(lookahead)
        logits = self.sources[source + 1](torch.cat(parts, 1))
        return logits.view(len(windows), self.num_layers - 1 - source, self.num_experts)


class ExpertFlowPredictor(NetPredictor):
    kind = "expertflow"
    defaults = DEFAULTS

    def __init__(self, signature: ModelSignature, net: ExpertFlowNet, options: dict[str, Any],
                 training: dict[str, Any] | None = None, model: nn.Module | None = None):
        super().__init__(signature, net, options, training)
        self._model = model  # recomputes MoE inputs of traces recorded without them (not saved)

    @property
    def reads_attention_lookahead(self) -> bool:
        return bool(self.options.get("attention_lookahead"))

    # ----------------------------------------------------------------- training
    @classmethod
    def fit(cls, trace: Trace, *, model: nn.Module | str | None = None, **options: Any) -> ExpertFlowPredictor:
        options = cls.fit_options(options, trace)
        inputs = _Inputs.of(trace, model, options["window"], options["attention_lookahead"])
        options.update(hidden_size=inputs.hidden.shape[-1],
                       model=model if isinstance(model, str) else trace.model)
        if options["attention_lookahead"]:
            options["lookahead_macs"] = inputs.lookahead_macs
        net = cls.initial_net(trace.num_layers, trace.num_experts, options, trace.top_k)
        targets = loss_targets(trace, options["loss"])  # [N, L, E]

        def batch_loss(rows: np.ndarray) -> torch.Tensor:
            batch = inputs.batch(rows)
            loss = 0.0
            for source in range(-1, trace.num_layers - 1):
                logits = net(source, *batch.source_inputs(source))
                loss = loss + routing_loss(logits, targets[rows, source + 1:], options["loss"])
            return loss / trace.num_layers

        summary = train_loop(net, trace.num_tokens, batch_loss, epochs=options["epochs"],
                             batch_size=options["batch_size"], learning_rate=options["learning_rate"],
                             max_seconds=options["max_seconds"], seed=options["seed"])
        return cls(ModelSignature.of(trace), net, options, summary,
                   model if isinstance(model, nn.Module) else None)

    # ----------------------------------------------------------------- prediction
    @torch.inference_mode()
    def _source_scores(self, inputs: _Inputs, source: int) -> np.ndarray:
        """[N, L-1-source, E] scores of layers after ``source``."""
        out = []
        for first in range(0, len(inputs.windows), _EVAL_BATCH):
            rows = np.arange(first, min(first + _EVAL_BATCH, len(inputs.windows)))
            logits = self.net(source, *inputs.batch(rows).source_inputs(source))
            out.append(self.logit_scores(logits))
        return torch.cat(out).numpy()

    def _predict(self, trace: Trace, distance: int) -> np.ndarray:
        inputs = _Inputs.of(trace, self._model or self.options["model"], self.options["window"],
                            self.options.get("attention_lookahead", False))
        if inputs.hidden.shape[-1] != self.options["hidden_size"]:
            raise ConfigError(f"the trace's MoE inputs have hidden size {inputs.hidden.shape[-1]}, the "
                             f"predictor was trained on {self.options['hidden_size']}")
        out = np.empty((trace.num_tokens, self.num_layers, self.num_experts), dtype=np.float32)
        by_source: dict[int, np.ndarray] = {}
        for layer in range(self.num_layers):
            source = source_position(layer, distance)
            if source not in by_source:
                by_source[source] = self._source_scores(inputs, source)
            out[:, layer] = by_source[source][:, layer - source - 1]
        return out

    @torch.inference_mode()
    def first_layer_scores(self, windows: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """[T, L, E] scores of every MoE layer from what is known before the first one: token windows
        [T, W] (ids ending at the token, oldest first, -1 before the sequence start) and the previous
        token's experts [T, L, K] (-1 unknown). What a batching scheduler routes queued tokens with."""
        param = next(self.net.parameters())
        previous_hot = torch.from_numpy(multi_hot(previous.cpu().numpy(), self.num_experts)).flatten(1)
        return self.logit_scores(self.net(-1, windows.to(param.device), previous_hot.to(param.device), None))

    @torch.inference_mode()
    def runtime_scores(self, position: int, state, max_depth: int) -> dict[int, torch.Tensor]:
        targets = state.targets(position, max_depth)
        if not targets:
            return {}
        routed = torch.cat([state.routing_hot(s) for s in range(position + 1)], 1)
        param = next(self.net.parameters())
        previous_hidden = state.previous_hidden
        if previous_hidden is not None:
            previous_hidden = previous_hidden.to(param.device, param.dtype)
        lookahead = None
        if self.net.lookahead_dim:
            lookahead = state.lookahead_features(position).to(param.device, param.dtype)
        logits = self.net(position, state.windows.to(param.device), state.previous_hot().to(param.device),
                          previous_hidden, state.hidden[position].to(param.device, param.dtype),
                          routed.to(param.device), lookahead)
        scores = self.logit_scores(logits)  # [T, L-1-position, E]
        return {target: scores[:, target - position - 1] for target in targets}

    @classmethod
    def build_net(cls, num_layers: int, num_experts: int, options: dict[str, Any]) -> ExpertFlowNet:
        lookahead_dim = options["hidden_size"] + num_experts if options.get("attention_lookahead") else 0
        return ExpertFlowNet(options["vocab_size"], num_layers, num_experts, options["hidden_size"],
                             window=options["window"], embed_dim=options["embed_dim"], hidden=options["hidden"],
                             previous_dim=options.get("previous_dim", 0), skip=options.get("skip", False),
                             lookahead_dim=lookahead_dim)

    def macs_per_token(self) -> int:
        projection = self.net.previous_projection
        return (super().macs_per_token() + (projection.numel() if projection is not None else 0)
                + self.options.get("lookahead_macs", 0))


class _Inputs:
    """Every predictor input of a trace, as arrays indexed by token."""

    def __init__(self, windows, previous_hot, hidden, routed_hot, has_previous, lookahead=None, lookahead_macs=0):
        self.windows = windows  # [N, W] int64
        self.previous_hot = previous_hot  # [N, L*E] float32
        self.hidden = hidden  # [N, L, H] (float16 or float32)
        self.routed_hot = routed_hot  # [N, L*E] float32, layer-major
        self.has_previous = has_previous  # [N] bool: token n - 1 is of the same sequence
        self.lookahead = lookahead  # [N, L, H+E] float16 attention-lookahead features, or None
        self.lookahead_macs = lookahead_macs  # per token, of computing them at runtime

    @classmethod
    def of(cls, trace: Trace, model: nn.Module | str | None, window: int, attention_lookahead: bool = False
           ) -> _Inputs:
        hidden, lookahead = recorded_moe_inputs(trace), None
        if hidden is None or attention_lookahead:
            from moe_infer.models import load_model

            if model is None or isinstance(model, str):
                model, _ = load_model(model or trace.model, device="cpu")
            computed = model_features(trace, model, attention_lookahead=attention_lookahead)
            hidden, lookahead = computed.hidden, computed.lookahead
        num_experts = trace.num_experts
        previous = multi_hot(previous_routing(trace), num_experts).reshape(trace.num_tokens, -1)
        routed = multi_hot(trace.expert_ids.numpy(), num_experts).reshape(trace.num_tokens, -1)
        return cls(token_windows(trace, window), previous, hidden, routed, same_sequence_offsets(trace, 1),
                   lookahead, computed.lookahead_macs if lookahead is not None else 0)

    def batch(self, rows: np.ndarray) -> _Batch:
        has_previous = self.has_previous[rows]
        previous_hidden = np.asarray(self.hidden[np.where(has_previous, rows - 1, rows)], dtype=np.float32)
        previous_hidden[~has_previous] = 0.0
        hidden = np.asarray(self.hidden[rows], dtype=np.float32)
        return _Batch(torch.from_numpy(self.windows[rows]), torch.from_numpy(self.previous_hot[rows]),
                      torch.from_numpy(previous_hidden), torch.from_numpy(hidden),
                      torch.from_numpy(self.routed_hot[rows]), self.routed_hot.shape[1] // self.hidden.shape[1],
                      None if self.lookahead is None else torch.from_numpy(self.lookahead[rows].astype(np.float32)))


class _Batch:
    def __init__(self, windows, previous_hot, previous_hidden, hidden, routed_hot, num_experts, lookahead=None):
        self.windows, self.previous_hot, self.previous_hidden = windows, previous_hot, previous_hidden
        self.hidden, self.routed_hot, self.num_experts = hidden, routed_hot, num_experts
        self.lookahead = lookahead  # [B, L, H+E] or None

    def source_inputs(self, source: int) -> tuple:
        if source < 0:
            return self.windows, self.previous_hot, self.previous_hidden
        return (self.windows, self.previous_hot, self.previous_hidden, self.hidden[:, source],
                self.routed_hot[:, :(source + 1) * self.num_experts],
                None if self.lookahead is None else self.lookahead[:, source + 1])

