"""Reference expert math: one expert's gated MLP, and a whole MoE layer grouped by expert.

Shape legend: T tokens, H hidden, I intermediate (per expert), E experts, K top-k.

`moe_forward` is the torch ground truth of the executor and of `kernels.reference_moe`: it groups
the (token, k) pairs by expert, runs every hit expert once on its batch of rows, weights each row
by its routing weight and sums the K contributions of each token in the original order, in the
same arithmetic as `transformers`' default `grouped_mm` experts implementation. It never loops
over tokens in Python, only over the experts that were hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from moe_infer.errors import ConfigError

from .quant import QuantizedWeight
from .quant_matmul import quantized_matmul


@dataclass(frozen=True)
class ExpertTensors:
    """One expert's weights in the canonical orientation (rows = output features).

    `w13` [2I, H] holds the gate rows then the up rows, unless `interleaved` (GPT-OSS keeps gate
    and up alternating: rows 0, 2, 4, ... are gate). `w2` [H, I]. Biases optional.
    """

    w13: Tensor | QuantizedWeight  # [2I, H]
    w2: Tensor | QuantizedWeight  # [H, I]
    b13: Tensor | None = None  # [2I]
    b2: Tensor | None = None  # [H]
    interleaved: bool = False

    def canonical(self) -> "ExpertTensors":
        """Contiguous copy with gate rows first (what converted checkpoints and kernels store)."""
        if not self.interleaved:
            return ExpertTensors(self.w13.contiguous(), self.w2.contiguous(),
                                 None if self.b13 is None else self.b13.contiguous(),
                                 None if self.b2 is None else self.b2.contiguous())
        order = torch.cat((torch.arange(0, self.w13.shape[0], 2), torch.arange(1, self.w13.shape[0], 2)))
        order = order.to(self.w13.device)
        return ExpertTensors(self.w13[order].contiguous(), self.w2.contiguous(),
                             None if self.b13 is None else self.b13[order].contiguous(),
                             None if self.b2 is None else self.b2.contiguous())


@dataclass(frozen=True)
class Activation:
    """The gated activation act(gate) * up, by `transformers` activation name (`hidden_act`), or
    GPT-OSS's clamped SwiGLU: clamp(gate, max=limit) * sigmoid(alpha * gate) * (clamp(up, +-limit) + 1)."""

    name: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        from transformers.activations import ACT2FN

        if self.name != "gpt_oss" and self.name not in ACT2FN:
            raise ConfigError(
                f"unknown activation {self.name!r}; use 'gpt_oss' or a transformers activation name "
                f"such as {', '.join(sorted(k for k in ACT2FN if isinstance(k, str))[:12])}, ..."
            )

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.name == "gpt_oss":
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return _act_fn(self.name)(gate) * up


_ACT_CACHE: dict[str, Callable[[Tensor], Tensor]] = {}


def _act_fn(name: str) -> Callable[[Tensor], Tensor]:
    if name not in _ACT_CACHE:
        from transformers.activations import ACT2FN

        _ACT_CACHE[name] = ACT2FN[name]
    return _ACT_CACHE[name]


def as_activation(activation: str | Activation) -> Activation:
    return activation if isinstance(activation, Activation) else Activation(activation)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # The bias is added after the matmul, as `transformers`' experts do (grouped_mm takes no bias):
    # F.linear with a bias is one addmm that rounds once instead of twice, which moved GPT-OSS
    # logits by ~2e-7 in fp32 and ~6e-3 in bf16 (relative to the largest logit).
    # a QuantizedWeight (experts/quant.py) runs through torch's weight-only kernels where they apply
    out = F.linear(x, weight) if isinstance(weight, Tensor) else quantized_matmul(x, weight)
    return out if bias is None else out + bias


def expert_forward(x: Tensor, expert: ExpertTensors, activation: Activation) -> Tensor:
    """x [T, H] -> [T, H] through one gated expert MLP, in the dtype of x."""
    gate_up = _linear(x, expert.w13, expert.b13)  # [T, 2I]
    if expert.interleaved:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    return _linear(activation(gate, up), expert.w2, expert.b2)


def expert_counts(expert_ids: Tensor, num_experts: int) -> Tensor:
    """(token, k) pairs per expert, int64 [E] on expert_ids' device (no host sync; ids outside
    [0, E) are not counted)."""
    flat = expert_ids.reshape(-1)
    bins = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, bins.long(), torch.ones_like(bins, dtype=torch.int64))[:num_experts]


def group_by_expert(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, list[int]]:
    """Sort the T*K (token, k) slots by expert.

    Returns `order` [T*K] (slot indices, expert-major) and `counts` (a list of E ints):
    expert e owns order[sum(counts[:e]) : sum(counts[:e+1])]. Slots whose id is outside [0, E)
    (another rank's experts, or "no expert") sort to the end and belong to no expert.
    """
    flat_ids = expert_ids.reshape(-1)
    valid = (flat_ids >= 0) & (flat_ids < num_experts)
    sort_key = torch.where(valid, flat_ids, torch.full_like(flat_ids, num_experts))
    # Not stable, on purpose: the same call as `transformers`' grouped_mm experts, so rows of an
    # expert reach the matmul in the same order. On CPU with several threads a row's result depends
    # on its position in the gemm (full tile or tail), so a different order changed logits by ~1e-5.
    sorted_ids, order = torch.sort(sort_key)
    counts = torch.bincount(sorted_ids, minlength=num_experts + 1)[:num_experts]
    return order, counts.tolist()  # the one host sync: the loop below needs the sizes


ExpertSource = Callable[[int], ExpertTensors]


def projection_tensors(projection: str, weight: Tensor, bias: Tensor | None,
                       interleaved: bool = False) -> ExpertTensors:
    """An `ExpertTensors` holding one projection only ("w13": w13/b13, "w2": w2/b2; the rest None),
    what an expert source's `projection(e, name)` returns."""
    if projection == "w13":
        return ExpertTensors(weight, None, bias, None, interleaved=interleaved)
    return ExpertTensors(None, weight, None, bias, interleaved=interleaved)


def moe_forward(
    hidden: Tensor,
    expert_ids: Tensor,
    expert_weights: Tensor,
    expert: ExpertSource,
    num_experts: int,
    activation: Activation,
    *,
    grouping: tuple[Tensor, list[int]] | None = None,
) -> Tensor:
    """Weighted sum over each token's K experts: hidden [T, H], expert_ids/expert_weights [T, K]
    -> [T, H] in hidden's dtype. `expert(e)` gives expert e's tensors (resident or fetched).

    Staged like `transformers`' `grouped_mm` experts, so results are bit-identical to it on any
    number of CPU threads: the (token, k) rows are gathered expert-major into one buffer; each hit
    expert's gate/up matmul writes its slice; the activation runs ONCE over the whole buffer (a
    vectorised exp gives different bits in a loop's scalar tail, so applying it per expert moved
    logits by ~1e-7..1e-5 with two threads); then the down matmuls, the routing weights (in the
    promoted dtype of expert output and weights: fp32 when a family keeps fp32 weights) and the
    sum over K in that dtype. `grouping` reuses a `group_by_expert` result.

    Memory: an expert the source says is not resident (`expert.is_resident(e)` is False: read
    from disk or a backing tier for this call only) is fetched once per projection and dropped
    after each, so at most one such expert is materialised at a time; resident experts (cached
    or in the model) are fetched once. A source with `projection(e, "w13" | "w2")` gives a
    non-resident expert's projections one at a time, so its bytes are read once per call.
    """
    num_tokens, top_k = expert_ids.shape
    if hidden.ndim != 2 or hidden.shape[0] != num_tokens or expert_weights.shape != expert_ids.shape:
        raise ConfigError(
            f"moe_forward: expected hidden [T, H] and expert_ids/expert_weights [T, K] with the same T and K; "
            f"got hidden {tuple(hidden.shape)}, expert_ids {tuple(expert_ids.shape)}, "
            f"expert_weights {tuple(expert_weights.shape)}"
        )
    order, counts = grouping if grouping is not None else group_by_expert(expert_ids, num_experts)
    out_dtype = torch.promote_types(hidden.dtype, expert_weights.dtype)
    weighted = hidden.new_zeros((num_tokens * top_k, hidden.shape[-1]), dtype=out_dtype)  # [T*K, H]
    num_rows = sum(counts)  # slots with a valid expert id, expert-major in `order`
    if num_rows:
        slots = order[:num_rows]
        rows = hidden[slots // top_k]  # [S, H]
        hit = [(e, start, count) for e, start, count in _segments(counts) if count]
        is_resident = getattr(expert, "is_resident", None)
        projection = getattr(expert, "projection", None)

        def fetch(e: int, which: str) -> ExpertTensors:
            if projection is not None and is_resident is not None and not is_resident(e):
                return projection(e, which)
            return expert(e)

        kept: dict[int, ExpertTensors] = {}
        parts, interleaved = [], False
        for e, start, count in hit:
            tensors = fetch(e, "w13")
            interleaved = tensors.interleaved
            parts.append(_linear(rows[start : start + count], tensors.w13, tensors.b13))
            if is_resident is None or is_resident(e):
                kept[e] = tensors
            del tensors  # a non-resident expert's buffer goes before the next one is read
        gate_up = torch.cat(parts)  # [S, 2I]; per-expert matmuls concatenated (autograd refuses out=)
        del parts
        if interleaved:
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        else:
            gate, up = gate_up.chunk(2, dim=-1)
        act = activation(gate, up)  # [S, I], once over all rows
        parts = []
        for e, start, count in hit:
            tensors = kept.pop(e, None) or fetch(e, "w2")
            parts.append(_linear(act[start : start + count], tensors.w2, tensors.b2))
            del tensors
        down = torch.cat(parts)  # [S, H]
        weighted[slots] = down * expert_weights.reshape(-1)[slots, None]
    return weighted.view(num_tokens, top_k, hidden.shape[-1]).sum(dim=1).to(hidden.dtype)  # T may be 0


def _segments(counts: list[int]):
    """(expert, first row, row count) of each expert's segment in an expert-major buffer."""
    start = 0
    for expert_idx, count in enumerate(counts):
        yield expert_idx, start, count
        start += count
