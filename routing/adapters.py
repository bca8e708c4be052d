"""Router adapters: one class per routing convention of the `transformers` MoE families.

Each adapter reproduces a family's router exactly (expert ids in the same order, weights in the
same dtype, same normalisation) from the router module's own parameters, read live so device or
dtype moves of the model are seen. The executor routes through an adapter rather than by calling
the router module, so the same code can route a *different* layer's hidden state (lookahead) or
be replaced (pre-gating, trace replay) without touching the model.

Shape legend: T tokens, H hidden, E experts, K top-k.

This module does not know where routers live in a model: `moe_infer.families` builds adapters
from the modules it finds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from moe_infer.errors import ConfigError


@dataclass
class Routing:
    """The routing decision for a batch of tokens."""

    expert_ids: Tensor  # [T, K] int64
    expert_weights: Tensor  # [T, K], dtype chosen by the family
    router_logits: Tensor | None = None  # [T, E], what the family's router returns as logits

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]


class RouterAdapter(ABC):
    """Base class. Subclasses implement `route`; `router_output` gives the tuple the family's
    router module returns, so its forward hooks (e.g. `output_router_logits`) can be fed."""

    name = "base"

    def __init__(self, router: nn.Module, num_experts: int, top_k: int):
        self.router = router
        self.num_experts = num_experts
        self.top_k = top_k

    @abstractmethod
    def route(self, hidden: Tensor) -> Routing:  # hidden [T, H]
        ...

    def router_output(self, routing: Routing) -> tuple:
        return routing.router_logits, routing.expert_weights, routing.expert_ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts={self.num_experts}, top_k={self.top_k})"


def _linear(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, fp32: bool = False) -> Tensor:
    if fp32:
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(hidden, weight, bias)


class SoftmaxTopK(RouterAdapter):
    """softmax over all experts (fp32) -> top-k -> optional renormalisation.

    Mixtral/MiniMax (always renormalised, fp32 weights), Qwen2/Qwen3/Qwen3-Next/OLMoE/FlexOlmo
    (renormalised if `norm_topk_prob`, weights cast to the logits dtype), Jamba (never), HunYuan
    (fp32 router, renormalised).
    """

    name = "softmax-topk"

    def __init__(self, router, num_experts, top_k, *, renormalize: bool, cast_to_logits_dtype: bool,
                 weight: Callable[[], Tensor], fp32_input_if_fp32_weight: bool = False):
        super().__init__(router, num_experts, top_k)
        self.renormalize = renormalize
        self.cast_to_logits_dtype = cast_to_logits_dtype
        self.weight = weight
        self.fp32_input_if_fp32_weight = fp32_input_if_fp32_weight

    def route(self, hidden: Tensor) -> Routing:
        weight = self.weight()
        if self.fp32_input_if_fp32_weight and weight.dtype == torch.float32:
            hidden = hidden.float()
        logits = F.linear(hidden, weight)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_weights, top_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.renormalize:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        if self.cast_to_logits_dtype:
            top_weights = top_weights.to(logits.dtype)
        return Routing(top_ids, top_weights, logits)


class TopKSoftmax(RouterAdapter):
    """top-k on the logits, then softmax over those k: GPT-OSS (router bias, softmax in the logits
    dtype) and GraniteMoE (fp32 logits, weights cast to the hidden dtype)."""

    name = "topk-softmax"

    def __init__(self, router, num_experts, top_k, *, weight: Callable[[], Tensor],
                 bias: Callable[[], Tensor | None] = lambda: None, fp32_logits: bool):
        super().__init__(router, num_experts, top_k)
        self.weight = weight
        self.bias = bias
        self.fp32_logits = fp32_logits

    def route(self, hidden: Tensor) -> Routing:
        logits = F.linear(hidden, self.weight(), self.bias())  # [T, E]
        if self.fp32_logits:
            logits = logits.float()
        top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1)
        top_weights = torch.softmax(top_logits, dim=-1, dtype=top_logits.dtype)
        if self.fp32_logits:
            top_weights = top_weights.type_as(hidden)
        return Routing(top_ids, top_weights, logits)


class DeepSeekV2Router(RouterAdapter):
    """DeepSeek-V2: fp32 softmax; `greedy` or `group_limited_greedy` (group score = max, keep
    `topk_group` groups); never renormalised; times `routed_scaling_factor`."""

    name = "deepseek-v2"

    def __init__(self, router, num_experts, top_k, *, weight, method: str, num_groups: int,
                 topk_group: int, scaling: float):
        super().__init__(router, num_experts, top_k)
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"DeepSeek-V2 topk_method={method!r}: supported are 'greedy', 'group_limited_greedy'")
        self.weight = weight
        self.method = method
        self.num_groups = num_groups
        self.topk_group = topk_group
        self.scaling = scaling

    def route(self, hidden: Tensor) -> Routing:
        logits = _linear(hidden, self.weight(), fp32=True)  # [T, E]
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.method == "group_limited_greedy":
            group_scores = scores.view(-1, self.num_groups, self.num_experts // self.num_groups).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(group_scores, self.topk_group, self.num_experts), 0.0)
        top_weights, top_ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return Routing(top_ids, top_weights * self.scaling, logits)


def _group_mask(group_scores: Tensor, topk_group: int, num_experts: int) -> Tensor:
    """[T, G] group scores -> [T, E] bool mask of the experts in the `topk_group` best groups."""
    num_groups = group_scores.shape[-1]
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return (
        group_mask.unsqueeze(-1).expand(-1, num_groups, num_experts // num_groups).reshape(-1, num_experts).bool()
    )


class SigmoidBiasRouter(RouterAdapter):
    """sigmoid scores; a correction bias used for *selection only*; optional grouped top-k (group
    score = sum of the top-2 scores of the group); weights are the unbiased scores, optionally
    renormalised (+eps), times a scaling factor.

    DeepSeek-V3 and the families that copy it (GLM4-MoE, dots1, EXAONE-MoE, DeepSeek-V3.2, ...):
    fp32 logits, groups, eps 1e-20. MiniMax-M2: logits in the weight dtype, sigmoid in fp32, bias
    on the block, always renormalised. LFM2-MoE: everything in the logits dtype, eps 1e-6.
    """

    name = "sigmoid-bias"

    def __init__(self, router, num_experts, top_k, *, weight, bias: Callable[[], Tensor | None],
                 logits_mode: str, num_groups: int = 1, topk_group: int = 1, grouped: bool,
                 renormalize: bool, norm_eps: float, scaling: float, sorted_topk: bool,
                 gather_as_logits_dtype: bool = False):
        super().__init__(router, num_experts, top_k)
        if logits_mode not in ("fp32", "weight_dtype_then_fp32", "native"):
            raise ConfigError(f"unknown logits_mode {logits_mode!r}")
        self.weight = weight
        self.bias = bias
        self.logits_mode = logits_mode
        self.num_groups = num_groups
        self.topk_group = topk_group
        self.grouped = grouped
        self.renormalize = renormalize
        self.norm_eps = norm_eps
        self.scaling = scaling
        self.sorted_topk = sorted_topk
        self.gather_as_logits_dtype = gather_as_logits_dtype

    def route(self, hidden: Tensor) -> Routing:
        weight = self.weight()
        if self.logits_mode == "fp32":
            logits = _linear(hidden, weight, fp32=True)
            scores = logits.sigmoid()
        elif self.logits_mode == "weight_dtype_then_fp32":
            logits = F.linear(hidden.to(weight.dtype), weight)
            scores = torch.sigmoid(logits.float())
        else:
            logits = F.linear(hidden, weight)
            scores = logits.sigmoid()
        bias = self.bias()
        if bias is None:
            top_weights, top_ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=self.sorted_topk)
        else:
            choice = scores + bias
            if self.grouped:
                group_scores = (
                    choice.view(-1, self.num_groups, self.num_experts // self.num_groups).topk(2, dim=-1)[0].sum(dim=-1)
                )
                choice = choice.masked_fill(
                    ~_group_mask(group_scores, self.topk_group, self.num_experts), float("-inf")
                )
            top_ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=self.sorted_topk)[1]
            top_weights = scores.gather(1, top_ids)
            if self.gather_as_logits_dtype:
                top_weights = top_weights.type_as(logits)
        if self.renormalize:
            top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + self.norm_eps)
        if self.scaling != 1.0:
            top_weights = top_weights * self.scaling
        return Routing(top_ids, top_weights, logits)


class BiasedSoftmaxRouter(RouterAdapter):
    """Ernie 4.5: fp32 softmax; selection on probabilities + correction bias; weights are the
    unbiased probabilities divided by clamp(sum, `norm_min`), cast to the hidden dtype."""

    name = "biased-softmax"

    def __init__(self, router, num_experts, top_k, *, weight, bias: Callable[[], Tensor], norm_min: float):
        super().__init__(router, num_experts, top_k)
        self.weight = weight
        self.bias = bias
        self.norm_min = norm_min

    def route(self, hidden: Tensor) -> Routing:
        logits = _linear(hidden, self.weight(), fp32=True)
        probs = F.softmax(logits, dim=1, dtype=torch.float32)
        top_ids = torch.topk(probs + self.bias(), self.top_k, dim=-1)[1]
        top_weights = torch.gather(probs, dim=-1, index=top_ids)
        top_weights = top_weights / torch.clamp(top_weights.sum(dim=-1, keepdim=True), min=self.norm_min)
        return Routing(top_ids, top_weights.to(hidden.dtype), logits)


class SparseMixerRouter(RouterAdapter):
    """PhiMoE's sparsemixer at inference: top-2 by argmax; each weight is a softmax over the
    logits masked to those within a relative `jitter_eps` band of the chosen one."""

    name = "sparsemixer"

    def __init__(self, router, num_experts, top_k, *, weight, bias, jitter_eps: float):
        if top_k != 2:
            raise ConfigError(f"PhiMoE sparsemixer routing is defined for top_k=2, got num_experts_per_tok={top_k}")
        super().__init__(router, num_experts, top_k)
        self.weight = weight
        self.bias = bias
        self.jitter_eps = jitter_eps

    def _pick(self, scores: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        threshold, chosen = candidates.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=threshold)
        outside = ((threshold - scores) / factor) > (2 * self.jitter_eps)
        gates = torch.softmax(candidates.masked_fill(outside, float("-inf")), dim=-1)
        return gates.gather(dim=-1, index=chosen), chosen

    def route(self, hidden: Tensor) -> Routing:
        scores = F.linear(hidden, self.weight(), self.bias())  # [T, E]
        weight_1, expert_1 = self._pick(scores, scores)
        weight_2, expert_2 = self._pick(scores, torch.scatter(scores, -1, expert_1, float("-inf")))
        return Routing(torch.cat((expert_1, expert_2), dim=-1), torch.cat((weight_1, weight_2), dim=-1), scores)


ADAPTERS: dict[str, type[RouterAdapter]] = {
    cls.name: cls
    for cls in (SoftmaxTopK, TopKSoftmax, DeepSeekV2Router, SigmoidBiasRouter, BiasedSoftmaxRouter, SparseMixerRouter)
}


def get_adapter_class(name: str) -> type[RouterAdapter]:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ConfigError(f"unknown router adapter {name!r}; valid names: {', '.join(sorted(ADAPTERS))}") from None
