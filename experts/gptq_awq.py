"""GPTQ and AWQ int4 linear weights re-packed into the int4 layout of `experts/quant.py`, bit for bit
(never through a float weight: the 4-bit values, zero points and fp16 scales are moved, not recomputed).

Shape legend: a linear layer y = x W^T with W [N, K] (N out, K in features), G group size,
NG = ceil(K / G). Both formats store W transposed and pack eight 4-bit values per int32, value i
at bits 4i..4i+3:
- GPTQ (AutoGPTQ / optimum, `quant_method: "gptq"`): `qweight` int32 [K/8, N], packed along K (row r
  holds k = 8r + i); `qzeros` int32 [NG, N/8], packed along N (column c holds n = 8c + i);
  `scales` fp16 [NG, N]; `g_idx` int32 [K], the group of each k. w = scale * (q - zero) with zero
  = stored + 1 in the original format (`checkpoint_format: "gptq"`, the default) and zero = stored
  in `"gptq_v2"`.
- AWQ GEMM (AutoAWQ, `quant_method: "awq"`, `version: "gemm"`): `qweight` int32 [K, N/8] and `qzeros`
  int32 [NG, N/8], both packed along N in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (value i of
  column c is n = 8c + ORDER[i]); `scales` fp16 [NG, N]; w = scale * (q - zero).

Supported: 4 bits, groups of G along K in order (`g_idx[k] == k // G`; G = -1 is one group per row),
GPTQ symmetric or not, AWQ GEMM with zero points. Refused, in one line naming the variant:
act-order (`desc_act` with a g_idx that is not k // G), other bit widths, AWQ GEMV / Marlin /
ExLlama packings, AWQ without zero points, and a GPTQ v1 zero point that overflowed to 16.
Biases (`X.bias` beside `X.qweight`): on a routed expert's linear (a key under `.experts.`) an
all-zero bias, as older AutoGPTQ versions wrote for every linear, is dropped (exactly: it adds
nothing); any other expert bias is refused, naming the tensor, since the per-expert families
(Mixtral, Qwen-MoE, DeepSeek) have no expert biases to load it into. A bias of another linear
(attention) is a weight of the model and passes through to the dense weights as it is.
Does not own reading checkpoints (the converter) or the layout (`quant.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_infer.errors import NotSupported

from .quant import INT4_MAX, QuantizedWeight, QuantScheme, num_groups, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed position i holds column ORDER[i] of each group of eight
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class ImportFormat:
    """Which foreign int4 format a checkpoint's `quantization_config` describes."""

    method: str  # "gptq" or "awq"
    group_size: int  # -1: one group per row
    zero_offset: int  # added to the stored zero points (GPTQ v1: 1)

    @classmethod
    def from_config(cls, quantization_config: dict) -> "ImportFormat":
        """Refuse, naming it, any variant this importer does not re-pack exactly."""
        qc = quantization_config
        method = str(qc.get("quant_method", "")).lower()
        if method not in ("gptq", "awq"):
            raise NotSupported(f"quantization_config quant_method={qc.get('quant_method')!r}: only GPTQ and AWQ "
                               f"int4 experts can be imported")
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise NotSupported(f"{method.upper()} bits={bits}: only 4-bit checkpoints can be imported")
        group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if method == "gptq":
            fmt = str(qc.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise NotSupported(f"GPTQ checkpoint_format={fmt!r}: only 'gptq' and 'gptq_v2' packings can be imported")
            return cls("gptq", group_size, 1 if fmt == "gptq" else 0)
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise NotSupported(f"AWQ version={version!r}: only the GEMM packing can be imported (GEMV, Marlin and "
                               f"ExLlama pack differently)")
        if qc.get("zero_point", True) is False:
            raise NotSupported("AWQ zero_point=False: only AWQ with zero points can be imported")
        return cls("awq", group_size, 0)

    def scheme(self, in_features: int) -> QuantScheme:
        return QuantScheme("int4", in_features if self.group_size == -1 else self.group_size)


def _unpack_rows(packed: Tensor) -> Tensor:
    """int32 [R, C] -> int32 [R, C, 8]: value i of each word at bits 4i."""
    return (packed.to(torch.int32)[..., None] >> _SHIFTS) & 0xF


def _unpack_columns(packed: Tensor, order: tuple[int, ...]) -> Tensor:
    """int32 [R, C] packed along the columns -> int32 [R, 8C], value i of column c at 8c + order[i]."""
    values = _unpack_rows(packed)  # [R, C, 8], position i
    inverse = [order.index(j) for j in range(8)]
    return values[..., inverse].flatten(-2)


def import_linear(fmt: ImportFormat, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None = None,
                  *, name: str = "weight") -> QuantizedWeight:
    """One GPTQ / AWQ linear (the tensors of the module docstring) as a `QuantizedWeight` [N, K]."""
    n = scales.shape[1]
    if fmt.method == "gptq":
        k = qweight.shape[0] * 8
        q_kn = _unpack_rows(qweight.t()).flatten(-2).t()  # [K, N]
        zeros = _unpack_columns(qzeros, tuple(range(8)))  # [NG, N]
    else:
        k = qweight.shape[0]
        q_kn = _unpack_columns(qweight, AWQ_ORDER)  # [K, N]
        zeros = _unpack_columns(qzeros, AWQ_ORDER)
    scheme = fmt.scheme(k)
    ng = num_groups(k, scheme.group_size)
    if q_kn.shape[1] != n or tuple(scales.shape) != (ng, n) or tuple(zeros.shape) != (ng, n):
        raise NotSupported(f"{name}: {fmt.method.upper()} tensors qweight {list(qweight.shape)}, qzeros "
                           f"{list(qzeros.shape)}, scales {list(scales.shape)} do not form one 4-bit linear in groups "
                           f"of {scheme.group_size}")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // scheme.group_size):
        raise NotSupported(f"{name}: GPTQ act-order (desc_act: g_idx is not k // group_size) cannot be imported; "
                           f"quantize it again without desc_act")
    zeros = zeros + fmt.zero_offset
    if int(zeros.max()) > INT4_MAX:
        raise NotSupported(f"{name}: GPTQ v1 zero point {int(zeros.max())} (a zero point of 0 stored as -1 "
                           f"overflowed) has no 4-bit form; re-save it as checkpoint_format 'gptq_v2'")
    return QuantizedWeight(scheme, pack_int4(q_kn.t().to(torch.uint8).contiguous()),
                           scales.t().to(torch.float32).contiguous(), zeros.t().to(torch.uint8).contiguous(), k)


_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def import_format_of(root: str) -> ImportFormat | None:
    """The GPTQ / AWQ format of the checkpoint directory `root` (from config.json's
    `quantization_config`), None for any other checkpoint; unsupported variants are refused."""
    import json
    import os

    with open(os.path.join(root, "config.json")) as f:
        quant = json.load(f).get("quantization_config")
    if not isinstance(quant, dict) or str(quant.get("quant_method", "")).lower() not in ("gptq", "awq"):
        return None
    fmt = ImportFormat.from_config(quant)
    if fmt.group_size == -1:
        raise NotSupported(f"{root}: {fmt.method.upper()} group_size=-1 (one group per row) cannot be imported: the "
                           f"converted layout has one group size for every projection")
    return fmt


class ImportedSource:
    """A GPTQ / AWQ checkpoint seen as a float one by the converter's planner: each quantized linear
    `X.{qweight,qzeros,scales[,g_idx]}` appears as one key `X.weight` of shape [N, K] in the scales'
    dtype. `read` of it dequantizes (the dense weights: attention projections and the like);
    `read_quantized` re-packs it without dequantizing (the routed experts). Other keys pass through."""

    def __init__(self, source, fmt: ImportFormat):
        from .tensorfile import TensorSpec

        self.source, self.fmt = source, fmt
        self.root, self.files, self.key_file = source.root, source.files, dict(source.key_file)
        self.config_bytes = source.config_bytes
        keys = set(source.keys())
        quantized_parts = {k for k in keys if k.rsplit(".", 1)[-1] in _PARTS}
        # the float weights of the checkpoint (embeddings, norms, router): the dense projections are
        # dequantized to their dtype, so the model keeps one dtype (the scales' dtype if there are none)
        floats = sorted(k for k in keys - quantized_parts if source.spec(k).dtype.is_floating_point)
        float_dtype = source.spec(floats[0]).dtype if floats else None
        self._linears: dict[str, str] = {}  # virtual X.weight -> prefix X
        self._specs: dict[str, TensorSpec] = {}
        for key in sorted(keys):
            if not key.endswith(".qweight"):
                continue
            prefix = key.removesuffix(".qweight")
            missing = [p for p in _PARTS[1:3] if f"{prefix}.{p}" not in keys]
            if missing:
                raise NotSupported(f"{self.root}: {key} has no {', '.join(missing)}; not a {fmt.method.upper()} linear")
            packed = source.spec(key).shape
            n, k = (packed[1], packed[0] * 8) if fmt.method == "gptq" else (packed[1] * 8, packed[0])
            dtype = float_dtype or source.spec(f"{prefix}.scales").dtype
            virtual = f"{prefix}.weight"
            self._linears[virtual] = prefix
            self._specs[virtual] = TensorSpec(virtual, dtype, (n, k), 0, n * k * dtype.itemsize)
            self.key_file[virtual] = source.key_file[key]
            for part in _PARTS:
                self.key_file.pop(f"{prefix}.{part}", None)
            bias = f"{prefix}.bias"
            if bias in keys and ".experts." in prefix:
                self._drop_zero_bias(bias)

    def _drop_zero_bias(self, key: str) -> None:
        """A routed expert linear's bias: dropped when all zero, else refused (module docstring)."""
        values = self.source.read(key)
        if torch.count_nonzero(values):
            raise NotSupported(f"{self.root}: {key}: a nonzero bias on a routed expert's {self.fmt.method.upper()} "
                               f"linear cannot be imported (this family's experts have no biases to hold it)")
        self.key_file.pop(key)

    def keys(self) -> list[str]:
        return list(self.key_file)

    def spec(self, key: str):
        return self._specs[key] if key in self._specs else self.source.spec(key)

    def read_quantized(self, key: str) -> QuantizedWeight:
        prefix = self._linears[key]
        parts = [self.source.read(f"{prefix}.{p}") if f"{prefix}.{p}" in self.source.key_file else None
                 for p in _PARTS]
        return import_linear(self.fmt, *parts, name=f"{self.root}: {prefix}")

    def read(self, key: str, rows: tuple[int, int] | None = None):
        if key not in self._linears:
            return self.source.read(key, rows)
        weight = self.read_quantized(key).dequantize(self._specs[key].dtype)
        return weight if rows is None else weight[rows[0]:rows[1]]

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def total_bytes(self) -> int:
        return self.source.total_bytes()

    def close(self) -> None:
        self.source.close()
