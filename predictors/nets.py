"""What the learned predictors (``expertflow``, ``pregate``) share: token embeddings, small MLPs,
the two training losses and the training loop.

Training fits the routing of a trace, with one of two losses (option ``loss``):
- ``membership`` (default): at each target layer, one sigmoid per expert is fitted (binary
  cross-entropy) to whether the token uses it. Scores are the sigmoids: the chance that the token
  uses each expert. On the shipped models' held-out text this gives more recall at every distance
  than ``distillation`` for the same network (validation recall, bench/results/predictors-tune.md).
- ``distillation``: the predictor's softmax over the E experts is fitted (cross-entropy) to the
  router's choice, the token's top-k weights renormalised (``features.routing_targets``). Scores
  are the softmax times K, clipped to 1. Files saved without a ``loss`` option were trained so.

Shape legend: B batch rows, L MoE layers, E experts, K top-k, W window width, V vocabulary.
"""

from __future__ import annotations

from abc import abstractmethod

import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_infer.predictors.base import ModelSignature, Predictor
from moe_infer.predictors.features import group_limit, multi_hot, routing_targets
from moe_infer.predictors.progress import bar
from moe_infer.traces.trace import Trace
from moe_infer.errors import ConfigError

MAX_WINDOW = 32  # tokens a running model's prediction hook keeps per row (window + lookahead)
LOSSES = ("membership", "distillation")


class TokenWindowEmbedding(nn.Module):
    """Embeds a window of token ids [B, W] into [B, W * D]; ids < 0 or >= V share one padding row."""

    def __init__(self, vocab_size: int, width: int, dim: int):
        super().__init__()
        self.vocab_size, self.width, self.dim = vocab_size, width, dim
        self.table = nn.Embedding(vocab_size + 1, dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        ids = torch.where((windows < 0) | (windows >= self.vocab_size), self.vocab_size, windows)
        return self.table(ids[:, -self.width:]).flatten(1)


class MLP(nn.Module):
    """One hidden layer, plus (``skip``) a linear path from the inputs to the outputs."""

    def __init__(self, inputs: int, hidden: int, outputs: int, skip: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, outputs))
        self.skip = nn.Linear(inputs, outputs, bias=False) if skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.skip is None else out + self.skip(x)


def mlp(inputs: int, hidden: int, outputs: int, skip: bool = False) -> MLP:
    return MLP(inputs, hidden, outputs, skip)


def mlp_macs(net: nn.Module) -> int:
    return sum(layer.in_features * layer.out_features for layer in net.modules() if isinstance(layer, nn.Linear))


def scores_from_logits(logits: torch.Tensor, top_k: int, groups: list[int] | None = None,
                       loss: str = "distillation") -> torch.Tensor:
    """[..., E] logits -> estimates of the chance that the token uses each expert: sigmoid
    (``membership``) or softmax * K clipped to 1 (``distillation``).

    ``groups`` = [G, keep] (``features.group_limit``): the router picks experts from ``keep`` of G
    equal blocks of expert ids only, so only the ``keep`` blocks with the largest sum of their two
    most probable experts (DeepSeek-V3's group score) keep their scores (for ``distillation``, the
    softmax is taken over those blocks); the other experts score 0. Their top-K then never spans
    more blocks than the router's can.
    """
    logits = logits.float()
    probability = torch.sigmoid(logits) if loss == "membership" else torch.softmax(logits, -1)
    if groups is None:
        return probability if loss == "membership" else (probability * top_k).clamp_(max=1.0)
    num_groups, keep = groups
    blocks = probability.unflatten(-1, (num_groups, -1))  # [..., G, E/G]
    group_score = blocks.topk(min(2, blocks.shape[-1]), -1).values.sum(-1)  # [..., G]
    kept = torch.zeros_like(group_score, dtype=torch.bool)
    kept.scatter_(-1, group_score.topk(keep, -1).indices, True)
    kept = kept.repeat_interleave(blocks.shape[-1], -1)  # [..., E]
    if loss == "membership":
        return probability.masked_fill_(~kept, 0.0)
    return (torch.softmax(logits.masked_fill(~kept, float("-inf")), -1) * top_k).clamp_(max=1.0)


def loss_targets(trace: Trace, loss: str) -> torch.Tensor:
    """[N, L, E] float32 what ``routing_loss`` fits: 0/1 expert use (``membership``) or the
    renormalised top-k weights (``distillation``)."""
    if loss == "membership":
        return torch.from_numpy(multi_hot(trace.expert_ids.numpy(), trace.num_experts))
    return torch.from_numpy(routing_targets(trace))


def routing_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over rows and layers of the loss of logits [B, L', E] against ``loss_targets`` rows
    [B, L', E]: binary cross-entropy summed over the experts (``membership``) or the cross-entropy
    of softmax(logits) (``distillation``)."""
    if loss == "membership":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    return -(targets * F.log_softmax(logits, -1)).sum(-1).mean()


def train_loop(module: nn.Module, num_rows: int, batch_loss: Callable[[np.ndarray], torch.Tensor], *,
               epochs: int, batch_size: int, learning_rate: float, max_seconds: float | None,
               seed: int) -> dict:
    """AdamW over shuffled row batches with cosine decay; stops after ``epochs`` or ``max_seconds``.

    ``batch_loss(rows)`` returns the loss of the rows (int64 indices). Returns a summary dict.
    """
    if num_rows == 0:
        raise ConfigError("the training trace holds no tokens")
    with torch.random.fork_rng():  # the caller's random stream is untouched
        torch.manual_seed(seed)
        return _train(module, num_rows, batch_loss, epochs=epochs, batch_size=batch_size,
                      learning_rate=learning_rate, max_seconds=max_seconds, seed=seed)


def _train(module, num_rows, batch_loss, *, epochs, batch_size, learning_rate, max_seconds, seed) -> dict:
    generator = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(num_rows / batch_size)
    total_steps = max(epochs * steps_per_epoch, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))
    progress = bar(total_steps, "step", "fit")
    start = time.perf_counter()
    module.train()
    losses: list[float] = []
    step = 0
    stopped_early = False
    for _ in range(epochs):
        order = generator.permutation(num_rows)
        epoch_loss, batches = 0.0, 0
        for first in range(0, num_rows, batch_size):
            loss = batch_loss(order[first:first + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += float(loss.detach())
            batches += 1
            step += 1
            progress.update(1)
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                stopped_early = True
                break
        losses.append(epoch_loss / max(batches, 1))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if stopped_early:
            break
    progress.close()
    module.eval()
    return {"tokens": num_rows, "steps": step, "epochs_run": len(losses), "loss_per_epoch": losses,
            "seconds": time.perf_counter() - start, "stopped_by_time": stopped_early}


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: expected an int >= 1")
    return value


class NetPredictor(Predictor):
    """A predictor whose learned state is one ``nn.Module`` (``net``), built from its options."""

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, signature: ModelSignature, net: nn.Module, options: dict[str, Any],
                 training: dict[str, Any] | None = None):
        super().__init__(signature, options, training)
        self.net = net.eval()

    @classmethod
    @abstractmethod
    def build_net(cls, num_layers: int, num_experts: int, options: dict[str, Any]) -> nn.Module:
        """The untrained network of this kind for a model of `num_layers` MoE layers and `num_experts`."""

    @classmethod
    def initial_net(cls, num_layers: int, num_experts: int, options: dict[str, Any], top_k: int) -> nn.Module:
        """``build_net`` with weights drawn from ``options["seed"]`` (same seed, same predictor). With
        the membership loss every output starts at the prior K/E (the bias of each MLP's last
        layer at log(K / (E - K))), so training does not spend its first steps learning the base rate."""
        with torch.random.fork_rng():
            torch.manual_seed(options["seed"])
            net = cls.build_net(num_layers, num_experts, options)
        if options.get("loss") == "membership" and top_k < num_experts:
            with torch.no_grad():
                for module in net.modules():
                    if isinstance(module, MLP):
                        module.body[-1].bias.fill_(math.log(top_k / (num_experts - top_k)))
        return net

    @classmethod
    def checked_options(cls, options: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """``options`` over the defaults; unknown names and non-positive sizes are refused."""
        unknown = sorted(set(options) - set(cls.defaults) - set(extra))
        if unknown:
            raise ConfigError(f"unknown {cls.kind} option(s) {unknown}; options are {sorted([*cls.defaults, *extra])}")
        options = {**cls.defaults, **options}
        for name in ("window", "embed_dim", "hidden", "epochs", "batch_size"):
            check_positive_int(name, options[name])
        lookahead = options.get("lookahead", 0)
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ConfigError(f"lookahead={lookahead!r}: expected an int >= 0 (tokens ahead)")
        if options["window"] + lookahead > MAX_WINDOW:
            raise ConfigError(f"window={options['window']} + lookahead={lookahead}: at most {MAX_WINDOW} tokens "
                             "(what the runtime hook keeps per row)")
        previous_dim = options.get("previous_dim", 0)
        if isinstance(previous_dim, bool) or not isinstance(previous_dim, int) or previous_dim < 0:
            raise ConfigError(f"previous_dim={previous_dim!r}: expected an int >= 0 (0: no previous-token MoE inputs)")
        if options.get("loss", "distillation") not in LOSSES:
            raise ConfigError(f"loss={options['loss']!r}: expected one of {list(LOSSES)}")
        for name in ("group_limit", "attention_lookahead", "skip"):
            if not isinstance(options.get(name, False), bool):
                raise ConfigError(f"{name}={options[name]!r}: expected true or false")
        return options

    @classmethod
    def fit_options(cls, options: dict[str, Any], trace: Trace) -> dict[str, Any]:
        """``checked_options`` plus what training reads off the trace: the vocabulary size and
        (``group_limit``) the router's group limit (``features.group_limit``)."""
        options = cls.checked_options(options)
        options["vocab_size"] = max(int(trace.token_ids.max()) + 1, 1)
        options["expert_groups"] = group_limit(trace) if options.get("group_limit") else None
        return options

    def logit_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``scores_from_logits`` with the loss trained with and the group limit learned from the
        training trace, if any."""
        return scores_from_logits(logits, self.top_k, self.options.get("expert_groups"),
                                  self.options.get("loss", "distillation"))

    def macs_per_token(self) -> int:
        return mlp_macs(self.net)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    @classmethod
    def _from_tensors(cls, signature, options, training, tensors):
        net = cls.build_net(len(signature.moe_layers), signature.num_experts, options)
        net.load_state_dict(tensors)
        return cls(signature, net, options, training)
