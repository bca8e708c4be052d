"""Weight-only quantization of routed experts: the schemes, the packed layout, and the torch ground truth.

This module is the one place that defines how a quantized weight is laid out in memory and on disk
(the converted checkpoint stores exactly these tensors, the cache moves them, the fused kernels and
the CPU path read them). Everything else converts to or from it; nothing else packs or unpacks bits.

Shape legend: N output features (rows), K input features (the reduction dimension), G group size,
NG = ceil(K / G) groups per row. Leading dimensions (for example E experts stacked for the fused
kernels) may precede every tensor below.

Schemes (`QuantScheme`):
- ``int8``: symmetric, one scale per output row. ``qweight`` int8 [N, K] in [-127, 127], ``scales``
  float32 [N]; ``w[n, k] = qweight[n, k] * scales[n]``. No zero points.
- ``int4``: asymmetric, group-wise along K (default G = 128). ``qweight`` uint8 [N, K / 2]: byte j of a
  row holds k = 2j in its low nibble and k = 2j + 1 in its high nibble (values 0..15); ``scales``
  float32 [N, NG]; ``zeros`` uint8 [N, NG] (integer zero points 0..15, one byte each, not packed);
  ``w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``. Group j covers k in
  [j G, min((j + 1) G, K)): when G does not divide K the last group is shorter (and a row shorter than
  G is one group). K must be even.

Quantizing (`quantize`): round to nearest. For int4 the range of each group always includes 0 (so an
exact zero stays exact) and, with ``clip_search`` (the default), is shrunk by the factor among
`CLIP_RATIOS` that gives the group's smallest squared reconstruction error (outliers otherwise stretch
the step of every other weight of the group). int8 uses the row's absolute maximum.

Why our own round-to-nearest + clipping search, not torchao or hqq: both pack for their own kernels
(torchao's tinygemm tiles, hqq's bit-planes) rather than a layout the store can range-read per
expert and the Triton kernels read as is, so we would repack anyway; torchao's int4 weight-only
quantizer is itself round-to-nearest min/max per group (what the search starts from), and hqq's
half-quadratic optimizer, the part that beats it, costs minutes per Mixtral layer on a CPU. On the
CPU our layout is repacked in memory into torch's own tinygemm format (`quant_matmul.py`).

The ground truth of every quantized matmul is `dequantize` followed by the float matmul
(`quantized_linear`); fast paths (fused Triton kernels, torch's CPU weight-only kernels) are tested
against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from moe_infer.errors import ConfigError

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
INT8_MAX = 127
INT4_MAX = 15


@dataclass(frozen=True)
class QuantScheme:
    """Which quantization: `name` is "int8" or "int4"; `group_size` applies to int4 only."""

    name: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ConfigError(f"quantization scheme {self.name!r}: allowed are {', '.join(map(repr, SCHEMES))}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2 \
                or self.group_size % 2:
            raise ConfigError(f"quantization group_size={self.group_size!r}: expected an even int >= 2 "
                             f"(default {DEFAULT_GROUP_SIZE})")

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    def as_json(self) -> dict:
        return {"method": self.name} if self.name == "int8" else {"method": self.name, "group_size": self.group_size}


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [..., N, K] in one of the layouts of the module docstring (views, no copies made here)."""

    scheme: QuantScheme
    qweight: Tensor  # int8 [..., N, K] or uint8 [..., N, K/2]
    scales: Tensor  # float32 [..., N] (int8) or [..., N, NG] (int4)
    zeros: Tensor | None  # None (int8) or uint8 [..., N, NG] (int4)
    in_features: int  # K
    # derived forms a matmul kernel prepared from these tensors (see `quant_matmul`), kept with the weight
    # so that they are built once; never stored, never compared
    prepared: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]

    @property
    def shape(self) -> torch.Size:
        """The shape of the weight it stands for, [..., N, K]."""
        return torch.Size((*self.qweight.shape[:-1], self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def parts(self) -> dict[str, Tensor]:
        """The tensors that hold it, by role ("qweight", "scales", "zeros"), in storage order."""
        parts = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            parts["zeros"] = self.zeros
        return parts

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def map(self, fn) -> "QuantizedWeight":
        """The same weight with `fn` applied to each of its tensors (e.g. `.to(device)`, indexing an expert)."""
        return QuantizedWeight(self.scheme, fn(self.qweight), fn(self.scales),
                               None if self.zeros is None else fn(self.zeros), self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self, dtype)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


PART_ROLES = ("qweight", "scales", "zeros")  # storage order of a weight's tensors (zeros: int4 only)


def part_specs(scheme: QuantScheme, out_features: int, in_features: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of each tensor of a quantized weight [N, K], by role, in storage order (what
    the converter writes and the store checks)."""
    if scheme.name == "int8":
        return {"qweight": (torch.int8, (out_features, in_features)), "scales": (torch.float32, (out_features,))}
    groups = num_groups(in_features, scheme.group_size)
    return {"qweight": (torch.uint8, (out_features, in_features // 2)),
            "scales": (torch.float32, (out_features, groups)), "zeros": (torch.uint8, (out_features, groups))}


def pack_int4(values: Tensor) -> Tensor:
    """uint8 [..., K] with values 0..15 (K even) -> uint8 [..., K/2]: even k in the low nibble."""
    if values.shape[-1] % 2:
        raise ConfigError(f"pack_int4: the last dimension must be even, got {tuple(values.shape)}")
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., K/2] -> uint8 [..., K] (the inverse of `pack_int4`)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _group_view(x: Tensor, in_features: int, group_size: int) -> Tensor:
    """[..., N, K] -> [..., N, NG, G], the last group zero-padded to G (padding is never read back)."""
    pad = num_groups(in_features, group_size) * group_size - in_features
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group_size)


def _expand_groups(per_group: Tensor, in_features: int, group_size: int) -> Tensor:
    """[..., N, NG] -> [..., N, K]: each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=-1)[..., :in_features]


def quantize(weight: Tensor, scheme: QuantScheme | str, *, clip_search: bool = True) -> QuantizedWeight:
    """Quantize a floating weight [..., N, K] (see the module docstring). Computes in float32 on the
    weight's device; the result lives there too."""
    scheme = QuantScheme(scheme) if isinstance(scheme, str) else scheme
    if not weight.is_floating_point() or weight.ndim < 2:
        raise ConfigError(f"quantize: expected a floating weight [..., N, K], got {weight.dtype} {tuple(weight.shape)}")
    w = weight.float()
    k = w.shape[-1]
    if scheme.name == "int8":
        scales = w.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX  # [..., N]
        q = torch.round(w / scales[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return QuantizedWeight(scheme, q, scales, None, k)
    if k % 2:
        raise ConfigError(f"quantize: int4 packs two values per byte and needs an even K; got {tuple(weight.shape)}")
    g = scheme.group_size
    groups = _group_view(w, k, g)  # [..., N, NG, G]
    valid = _group_view(torch.ones_like(w[..., :1, :]), k, g).bool()  # [..., 1, NG, G]: False on padding
    lo = groups.masked_fill(~valid, float("inf")).amin(dim=-1).clamp_max(0.0)  # [..., N, NG]
    hi = groups.masked_fill(~valid, float("-inf")).amax(dim=-1).clamp_min(0.0)
    best_err = best_scales = best_zeros = None
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        scales, zeros = _int4_params(lo * ratio, hi * ratio)
        q = torch.round(groups / scales[..., None] + zeros[..., None]).clamp_(0, INT4_MAX)
        err = (((q - zeros[..., None]) * scales[..., None] - groups) ** 2 * valid).sum(dim=-1)  # [..., N, NG]
        if best_err is None:
            best_err, best_scales, best_zeros = err, scales, zeros
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scales = torch.where(better, scales, best_scales)
            best_zeros = torch.where(better, zeros, best_zeros)
    q = torch.round(groups / best_scales[..., None] + best_zeros[..., None]).clamp_(0, INT4_MAX)
    q = q.reshape(*w.shape[:-1], -1)[..., :k].to(torch.uint8)
    return QuantizedWeight(scheme, pack_int4(q), best_scales, best_zeros.to(torch.uint8), k)


def _int4_params(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point of the ranges [lo, hi] (lo <= 0 <= hi); float32 both."""
    scales = ((hi - lo) / INT4_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    zeros = torch.round(-lo / scales).clamp_(0, INT4_MAX)
    return scales, zeros


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The floating weight [..., N, K] a `QuantizedWeight` stands for (computed in float32, then cast)."""
    if weight.scheme.name == "int8":
        return (weight.qweight.float() * weight.scales[..., None]).to(dtype)
    k, g = weight.in_features, weight.scheme.group_size
    q = unpack_int4(weight.qweight)[..., :k].float()
    zeros = _expand_groups(weight.zeros.float(), k, g)
    scales = _expand_groups(weight.scales, k, g)
    return ((q - zeros) * scales).to(dtype)


def quantized_linear(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """x [T, K] @ W.T -> [T, N] in x's dtype: the ground truth of every quantized matmul."""
    return F.linear(x, dequantize(weight, x.dtype))
