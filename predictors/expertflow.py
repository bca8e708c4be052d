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

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_infer.predictors.base import ModelSignature, source_position
from moe_infer.predictors.features import (model_features, multi_hot, previous_routing, recorded_moe_inputs,
                                           same_sequence_offsets, token_windows)
from moe_infer.predictors.nets import (NetPredictor, TokenWindowEmbedding, loss_targets, mlp, routing_loss,
                                       train_loop)
from moe_infer.traces.trace import Trace
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


class RuntimeWeights:
    """The weights of an ``ExpertFlowNet`` laid out for prediction in a running model, ``depth``
    MoE layers ahead (``ExpertFlowPredictor.runtime_scores``).

    The input of the MLP of source s is [token window, previous token's experts, previous token's
    projected MoE inputs of layers s+1.., MoE input of layer s, the token's experts at layers
    0..s (multi-hot), lookahead], and its first layer is linear, so its pre-activation is a sum of
    parts that become known at different times:
    - ``step``: what is known when a forward call starts (the same inputs for every source), for
      every source in one matmul, once per call (the previous token's MoE inputs projected once for
      all layers, not once per source);
    - ``add_routing(j, ...)``: when layer j routes, its experts' columns of every source >= j (a
      multi-hot times a matrix is the sum of K of its rows);
    - ``layer(s, ...)``: layer s's MoE input (and lookahead), the activation, and only the output
      rows of the layers predicted (``depth`` of them, not every later layer).
    Equal to ``ExpertFlowNet.forward`` up to float rounding (sums in another order). It is a copy of
    the weights taken at first use: ``ExpertFlowPredictor`` makes a new one when its ``net`` is
    replaced (a trained predictor's weights do not change in place).
    """

    def __init__(self, net: ExpertFlowNet, depth: int):
        num_layers, num_experts, previous_dim = net.num_layers, net.num_experts, net.previous_dim
        common = net.embed.width * net.embed.dim + num_layers * num_experts
        self.net, self.depth, self.num_experts = net, depth, num_experts
        step_weights, step_biases, routed = [], [], []
        self.sources: list[_RuntimeSource] = []  # index s: the MLP of source position s >= 0
        start = 0
        with torch.no_grad():
            for source in range(num_layers - 1):
                head = net.sources[source + 1]
                first, activation, last = head.body
                targets = min(depth, num_layers - 1 - source)
                known = common + (num_layers - 1 - source) * previous_dim  # columns known at the call's start
                weight, bias = first.weight, first.bias  # [rows, inputs], [rows]
                if head.skip is not None:  # the skip path is linear too: its rows of the targets ride along
                    weight = torch.cat([weight, head.skip.weight[:targets * num_experts]])
                    bias = torch.cat([bias, bias.new_zeros(targets * num_experts)])
                # the step's input holds every layer's projected previous MoE input; this source reads layers s+1..
                step = weight.new_zeros(len(weight), common + num_layers * previous_dim)
                step[:, :common] = weight[:, :common]
                step[:, common + (source + 1) * previous_dim:] = weight[:, common:known]
                step_weights.append(step)
                step_biases.append(bias)
                hidden_size = weight.shape[1] - known - (source + 1) * num_experts - net.lookahead_dim
                routed_at = known + hidden_size  # the multi-hot of layers 0..source
                routed.append(weight[:, routed_at:routed_at + (source + 1) * num_experts])  # [rows, (s+1)*E]
                lookahead = weight[:, routed_at + (source + 1) * num_experts:]
                self.sources.append(_RuntimeSource(
                    start, first.out_features, targets, weight[:, known:routed_at].t().contiguous(),
                    lookahead.t().contiguous() if net.lookahead_dim else None,
                    last.weight[:targets * num_experts].t().contiguous(), last.bias[:targets * num_experts],
                    activation.approximate))
                start += len(weight)
            self.step_weight = torch.cat(step_weights)  # [rows of every source, step inputs]
            self.step_bias = torch.cat(step_biases)
            # layer j: [E, rows of sources j..L-2], the columns of its experts in every source that reads them
            self.routed = [torch.cat([block[:, j * num_experts:(j + 1) * num_experts] for block in routed[j:]]
                                     ).t().contiguous() for j in range(num_layers - 1)]

    def step(self, windows: torch.Tensor, previous_hot: torch.Tensor, previous_hidden: torch.Tensor | None
             ) -> torch.Tensor:
        """[T, rows of every source] the first layers' pre-activations from what is known when a call
        starts: token windows [T, W], the previous token's experts [T, L*E] and its MoE inputs
        [T, L, H] (None: unknown, zeros). ``add_routing`` and ``layer`` add to it in place."""
        net = self.net
        embed = net.embed
        # TokenWindowEmbedding's padding row for ids < 0 or >= V, in two ops: -1 and V both land on row V
        ids = windows[:, -embed.width:].clamp(-1, embed.vocab_size).remainder(embed.vocab_size + 1)
        parts = [F.embedding(ids, embed.table.weight).flatten(1), previous_hot]
        if net.previous_projection is not None:
            if previous_hidden is None:
                parts.append(previous_hot.new_zeros(len(windows), net.num_layers * net.previous_dim))
            else:  # [L, T, H] @ [L, H, r]: each layer's projection of the previous token's MoE input
                projected = torch.bmm(previous_hidden.transpose(0, 1), net.previous_projection)
                parts.append(projected.transpose(0, 1).flatten(1))
        return torch.addmm(self.step_bias, torch.cat(parts, 1), self.step_weight.t())

    def add_routing(self, position: int, step: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Add the token's experts [T, K] at MoE-layer ``position`` to ``step`` (every source >= position)."""
        if position < len(self.routed):
            table = self.routed[position]  # [E, rows]
            step[:, self.sources[position].start:] += table[expert_ids].sum(1)  # [T, K, rows] -> [T, rows]

    def layer(self, source: int, step: torch.Tensor, hidden: torch.Tensor, lookahead: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Logits [T, depth', E] of layers source+1 .. source+depth' (depth' = min(depth, L-1-source))
        from ``step`` (with the routing of layers 0..source added), the MoE input [T, H] of layer
        ``source`` and with attention lookahead its features [T, H+E]."""
        s = self.sources[source]
        pre = torch.addmm(step[:, s.start:s.start + s.hidden_weight.shape[1]], hidden, s.hidden_weight)
        if s.lookahead_weight is not None:
            pre = pre.addmm_(lookahead, s.lookahead_weight)
        logits = torch.addmm(s.out_bias, F.gelu(pre[:, :s.hidden], approximate=s.approximate), s.out_weight)
        if s.hidden < pre.shape[1]:  # the skip path's rows
            logits = logits + pre[:, s.hidden:]
        return logits.view(len(step), s.targets, self.num_experts)


class _RuntimeSource(NamedTuple):
    start: int  # first row of this source in RuntimeWeights.step's output
    hidden: int  # rows that go through the activation (the rest: the skip path)
    targets: int  # layers predicted
    hidden_weight: torch.Tensor  # [H, rows]
    lookahead_weight: torch.Tensor | None  # [H+E, rows]
    out_weight: torch.Tensor  # [hidden, targets * E]
    out_bias: torch.Tensor  # [targets * E]
    approximate: str  # GELU's


class ExpertFlowPredictor(NetPredictor):
    kind = "expertflow"
    defaults = DEFAULTS

    def __init__(self, signature: ModelSignature, net: ExpertFlowNet, options: dict[str, Any],
                 training: dict[str, Any] | None = None, model: nn.Module | None = None):
        super().__init__(signature, net, options, training)
        self._model = model  # recomputes MoE inputs of traces recorded without them (not saved)
        self._runtime: dict[int, RuntimeWeights] = {}  # depth -> the net's weights laid out for runtime_scores

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
        """One batched call per forward call for what is known when it starts (``RuntimeWeights.step``,
        cached in ``state``), then per MoE layer only what that layer revealed."""
        targets = state.targets(position, max_depth)
        if not targets:
            return {}
        run = state.cached(f"{self.kind}:step:{max_depth}", lambda: self._runtime_step(state, max_depth))
        weights = run.weights
        device, dtype = weights.step_bias.device, weights.step_bias.dtype
        while run.routed <= position:  # each layer's routing is added once
            weights.add_routing(run.routed, run.step, state.routing[run.routed].to(device))
            run.routed += 1
        lookahead = None
        if self.net.lookahead_dim:
            lookahead = state.lookahead_features(position).to(device, dtype)
        logits = weights.layer(position, run.step, state.hidden[position].to(device, dtype), lookahead)
        scores = self.logit_scores(logits)  # [T, len(targets), E]
        return {target: scores[:, target - position - 1] for target in targets}

    def _runtime_step(self, state, depth: int) -> _RuntimeCall:
        weights = self._runtime.get(depth)
        if weights is None or weights.net is not self.net:  # first use, or another net since
            weights = self._runtime[depth] = RuntimeWeights(self.net, depth)
        device, dtype = weights.step_bias.device, weights.step_bias.dtype
        previous_hidden = state.previous_hidden
        if previous_hidden is not None:
            previous_hidden = previous_hidden.to(device, dtype)
        step = weights.step(state.windows.to(device), state.previous_hot().to(device, dtype), previous_hidden)
        return _RuntimeCall(weights, step)

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


class _RuntimeCall:
    """One forward call's running pre-activations (``RuntimeWeights``)."""

    def __init__(self, weights: RuntimeWeights, step: torch.Tensor):
        self.weights, self.step = weights, step
        self.routed = 0  # MoE-layer positions whose routing was added to step


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

