"""The sharded expert layout: one rank's slice of every expert, the same for every sharding factor.

Owns cutting a rank's intermediate slice out of an expert source (in place for a model's own
experts module), the views every sharding factor reads, gathering the full weights back exactly
(`release`, unwrap), and the expert source over fully gathered weights (data parallel). With W
ranks, rank p keeps gate rows, up rows and down columns [p*I/W, (p+1)*I/W) of every expert.

Shape legend: E experts, H hidden, I intermediate, S = I / W, W ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moe_infer.distributed.group import collective
from moe_infer.errors import ConfigError
from moe_infer.experts.layout import ModuleExperts
from moe_infer.experts.math import Activation, ExpertTensors


class ExpertShard:
    """One rank's slice of every expert of one layer (the layout shared by every r).

    The slice lives in `module`, an experts module whose `gate_up_proj` and `down_proj` hold
    intermediate slice `rank` in the module's own layout (transposed or not, gate and up
    concatenated or interleaved): for a model's in-memory experts it is the model's own experts
    module, whose full parameters are replaced by the slice (and freed) when the shard is cut; for
    other expert sources (a converted checkpoint's store) a holder module in the plain layout.
    Biases are small and stay whole (replicated). Views of the slice are taken on every use, so
    `.to()` / `.half()` of the model after wrapping are followed.
    """

    def __init__(self, module: nn.Module, *, transposed: bool, interleaved: bool, has_bias: bool,
                 intermediate_size: int, world_size: int, activation: Activation, in_place: bool,
                 source: Any):
        self.module = module
        self.transposed, self.interleaved, self.has_bias = transposed, interleaved, has_bias
        self.intermediate_size = intermediate_size  # I, the full width
        self.slice_width = intermediate_size // world_size  # S
        self.activation = activation
        self.in_place = in_place  # the model's experts module holds the slice (gather it back to unwrap)
        self.source = source  # the expert source over the full weights, from before the cut

    @classmethod
    def from_source(cls, source: Any, rank: int, world_size: int) -> "ExpertShard":
        """Cut slice `rank` out of an expert source (`source(e) -> ExpertTensors`); a `ModuleExperts`
        over real tensors is cut in place: its module keeps only the slice afterwards."""
        i_size = source.intermediate_size
        if i_size % world_size:
            raise ConfigError(
                f"MoEConfig.parallel: the experts' intermediate size {i_size} is not divisible by the world size "
                f"{world_size}; use a number of ranks that divides {i_size}"
            )
        s = i_size // world_size
        lo = rank * s
        if isinstance(source, ModuleExperts) and not source.module.gate_up_proj.is_meta:
            m = source.module
            shard = cls(m, transposed=source.transposed, interleaved=source.interleaved, has_bias=source.has_bias,
                        intermediate_size=i_size, world_size=world_size, activation=source.activation,
                        in_place=True, source=source)
            gu_dim, down_dim = shard._dims()
            gate_up = m.gate_up_proj.data
            if shard.interleaved:  # gate and up of intermediate row i are rows 2i, 2i + 1
                cut = gate_up.narrow(gu_dim, 2 * lo, 2 * s)
            else:
                cut = torch.cat((gate_up.narrow(gu_dim, lo, s), gate_up.narrow(gu_dim, i_size + lo, s)), gu_dim)
            down = m.down_proj.data.narrow(down_dim, lo, s)
            # fresh storage of the slice's size: the full tensors are freed once nothing else holds them
            m.gate_up_proj = nn.Parameter(cut.contiguous().clone(), requires_grad=m.gate_up_proj.requires_grad)
            m.down_proj = nn.Parameter(down.contiguous().clone(), requires_grad=m.down_proj.requires_grad)
            return shard
        gate_up, down, b13, b2 = [], [], [], []
        for e in range(source.num_experts):
            t: ExpertTensors = source(e).canonical()
            gate_up.append(torch.cat((t.w13[lo:lo + s], t.w13[i_size + lo:i_size + lo + s])))
            down.append(t.w2[:, lo:lo + s])
            b13.append(t.b13)
            b2.append(t.b2)
        return cls.of_slices(torch.stack(gate_up), torch.stack(down), intermediate_size=i_size, world_size=world_size,
                             activation=source.activation, b13=None if b13[0] is None else torch.stack(b13),
                             b2=None if b2[0] is None else torch.stack(b2), source=source)

    @classmethod
    def of_slices(cls, gate_up: Tensor, down: Tensor, *, intermediate_size: int, world_size: int,
                  activation: Activation, b13: Tensor | None = None, b2: Tensor | None = None,
                  source: Any = None) -> "ExpertShard":
        """A shard over given slices in the plain layout: `gate_up` [E, 2S, H] (gate rows then up
        rows), `down` [E, H, S], whole biases `b13` [E, 2I] and `b2` [E, H]."""
        holder = nn.Module()
        holder.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        holder.down_proj = nn.Parameter(down, requires_grad=False)
        if b13 is not None:
            holder.gate_up_proj_bias = nn.Parameter(b13, requires_grad=False)
            holder.down_proj_bias = nn.Parameter(b2, requires_grad=False)
        return cls(holder, transposed=False, interleaved=False, has_bias=b13 is not None,
                   intermediate_size=intermediate_size, world_size=world_size, activation=activation,
                   in_place=False, source=source)

    def _dims(self) -> tuple[int, int]:
        """The dimension of gate_up_proj that holds 2I, and that of down_proj that holds I."""
        return (2, 1) if self.transposed else (1, 2)

    def gather_full(self, layer_idx: int) -> None:
        """Collective: put the full weights back into the module (all-gather of every rank's slice;
        exact: the slices are copied, not recomputed)."""
        m, world, s = self.module, dist.get_world_size(), self.slice_width
        gu_dim, down_dim = self._dims()
        full = []
        for param in (m.gate_up_proj, m.down_proj):
            local = param.data.contiguous()
            parts = [torch.empty_like(local) for _ in range(world)]
            collective("gathering the full expert weights", layer_idx, dist.all_gather, parts, local)
            full.append(parts)
        gate_up_parts, down_parts = full
        if self.interleaved:
            gate_up = torch.cat(gate_up_parts, gu_dim)
        else:
            gate_up = torch.cat([p.narrow(gu_dim, 0, s) for p in gate_up_parts]
                                + [p.narrow(gu_dim, s, s) for p in gate_up_parts], gu_dim)
        m.gate_up_proj = nn.Parameter(gate_up, requires_grad=m.gate_up_proj.requires_grad)
        m.down_proj = nn.Parameter(torch.cat(down_parts, down_dim), requires_grad=m.down_proj.requires_grad)

    @property
    def num_experts(self) -> int:
        return self.module.gate_up_proj.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.module.down_proj.shape[2 if self.transposed else 1]

    @property
    def dtype(self) -> torch.dtype:
        return self.module.gate_up_proj.dtype

    def views(self) -> tuple[Tensor, Tensor, Tensor]:
        """gate [E, S, H], up [E, S, H] and down transposed [E, S, H] of the slice (views)."""
        gate_up = self.module.gate_up_proj
        gate_up = gate_up.transpose(1, 2) if self.transposed else gate_up  # [E, 2S, H]
        if self.interleaved:
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        else:
            gate, up = gate_up[:, :self.slice_width], gate_up[:, self.slice_width:]
        down = self.module.down_proj
        return gate, up, (down if self.transposed else down.transpose(1, 2))

    def stacked(self, experts: Tensor | None = None) -> Tensor:
        """A new tensor [n, 3, S, H] of the slices of `experts` (all when None): what is sent."""
        parts = self.views()
        if experts is not None:
            parts = [p[experts] for p in parts]
        return torch.stack(parts, dim=1)

    @property
    def b13(self) -> Tensor | None:
        """[E, 2I] gate then up biases (whole)."""
        if not self.has_bias:
            return None
        b = self.module.gate_up_proj_bias
        return torch.cat((b[:, 0::2], b[:, 1::2]), 1) if self.interleaved else b

    @property
    def b2(self) -> Tensor | None:
        return self.module.down_proj_bias if self.has_bias else None

    def piece_forward(self, x: Tensor, expert: int, piece: tuple[Tensor, Tensor, Tensor], lo: int,
                      b13: Tensor | None, b2: Tensor | None) -> Tensor:
        """x [N, H] through intermediate range [lo, lo + P) of `expert`, whose weights are `piece`
        (gate, up, down transposed, each [P, H]): the partial output [N, H]; the down-projection
        bias is added by the piece at 0. `b13`, `b2`: `self.b13`, `self.b2`, read once per call."""
        i_size, width = self.intermediate_size, piece[0].shape[0]
        gate, up = F.linear(x, piece[0]), F.linear(x, piece[1])
        if b13 is not None:
            gate = gate + b13[expert, lo:lo + width]
            up = up + b13[expert, i_size + lo:i_size + lo + width]
        out = F.linear(self.activation(gate, up), piece[2].t())
        if b2 is not None and lo == 0:
            out = out + b2[expert]
        return out


class GatheredExperts:
    """Expert source over fully gathered weights [E, 3, I, H] (data parallel, r = 0)."""

    def __init__(self, full: Tensor, b13: Tensor | None, b2: Tensor | None):
        self.full, self.b13, self.b2 = full, b13, b2

    def __call__(self, e: int) -> ExpertTensors:
        w = self.full[e]
        b13 = None if self.b13 is None else self.b13[e]
        b2 = None if self.b2 is None else self.b2[e]
        return ExpertTensors(torch.cat((w[0], w[1])), w[2].t(), b13, b2)
