"""The `moe_infer.checkpoint/1` manifest of a converted checkpoint: its schema and every check on it.

Owns the manifest's names (`FORMAT`, `MANIFEST`, `DENSE_FILE`, the tensors an expert may hold),
`load_manifest` (the parsed and schema-checked `moe_infer.json`), the checks on its expert and
dense entries (paths stay inside the checkpoint directory, checksums are hex digests, every
expert is listed once), and `ExpertLayout`: where an expert's tensors lie inside its byte range,
checked against the layer file's header (float, FP8 and int8 / int4 experts; the layouts are
described in `store.py`). Does not read expert bytes (`store.py` does) or write checkpoints
(`convert.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .fp8 import scale_shape
from .quant import DEFAULT_GROUP_SIZE, PART_ROLES, SCHEMES, QuantScheme, part_specs
from .tensorfile import DTYPES, FAST_HASH, CheckpointError
from moe_infer.errors import ConfigError

FORMAT = "moe_infer.checkpoint/1"
MANIFEST = "moe_infer.json"
DENSE_FILE = "dense.safetensors"
# manifest["source"]["kind"] of an in-memory model's experts (MoEConfig.offload_dir,
# moe_infer.experts.offload): no dense files, the model keeps its dense weights in memory
OFFLOAD_SOURCE = "offload"
# the tensors one expert may hold, in the order the converter writes them
EXPERT_TENSORS = ("w13", "w2", "b13", "b2", "w13_scale", "w2_scale")
# ... of an int8 / int4 expert (`--quantize`): each weight's tensors of `quant.part_specs` in PART_ROLES
# order (int8 has no zeros), then the biases
QUANTIZED_TENSORS = tuple(f"{name}.{role}" for name in ("w13", "w2") for role in PART_ROLES) + ("b13", "b2")
FP8_METHOD = "fp8_block"
_DTYPE_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    if name not in _DTYPE_BY_NAME:
        raise ConfigError(f"{what} {name!r} is not one of {', '.join(sorted(_DTYPE_BY_NAME))}")
    return _DTYPE_BY_NAME[name]


def resolve_inside(root: str, relative: object, what: str) -> str:
    """`root/relative`, refusing anything that is not a relative path staying inside `root`."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\\" in relative:
        raise CheckpointError(f"{what}: file {relative!r} must be a relative path inside the checkpoint directory")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, path]) != real_root or path == real_root:
        raise CheckpointError(f"{what}: file {relative!r} escapes the checkpoint directory {root}")
    return path


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    file: str  # relative, as in the manifest
    offset: int
    nbytes: int
    sha256: str
    xxh3_64: str | None = None  # absent in manifests written before the per-read checksum


def _is_hex(value: object, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and all(c in "0123456789abcdef" for c in value)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckpointError(message)


def load_manifest(root: str) -> dict:
    """The parsed and schema-checked `moe_infer.json` of a converted checkpoint directory."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{root}: no {MANIFEST}; not a converted moe_infer checkpoint "
                              f"(convert one with `moe-infer convert SRC DST`)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt manifest ({err})") from None
    _require(isinstance(manifest, dict) and manifest.get("format") == FORMAT,
             f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} is not {FORMAT!r}")
    for key, kind in (("num_experts", int), ("top_k", int), ("moe_layers", list), ("experts", list),
                      ("dtype", str), ("family", str), ("source", dict)):
        _require(isinstance(manifest.get(key), kind), f"{path}: field {key!r} missing or not a {kind.__name__}")
    parse_dtype(manifest["dtype"], f"{path}: dtype")
    num_experts = manifest["num_experts"]
    _require(num_experts > 0 and all(isinstance(l, int) and l >= 0 for l in manifest["moe_layers"]),
             f"{path}: num_experts must be positive and moe_layers non-negative integers")
    quant = manifest.get("quantization")
    if isinstance(quant, dict) and quant.get("method") in SCHEMES:
        try:
            QuantScheme(quant["method"], quant.get("group_size", DEFAULT_GROUP_SIZE))
        except ConfigError as err:
            raise CheckpointError(f"{path}: quantization {quant!r}: {err}") from None
        _require(quant["method"] == "int4" or "group_size" not in quant,
                 f"{path}: quantization {quant!r}: int8 is per row and takes no group_size")
        parse_dtype(quant.get("compute_dtype", ""), f"{path}: quantization.compute_dtype")
    elif quant is not None:
        _require(isinstance(quant, dict) and quant.get("method") == FP8_METHOD
                 and isinstance(quant.get("block_size"), list) and len(quant["block_size"]) == 2
                 and all(isinstance(b, int) and b > 0 for b in quant["block_size"]),
                 f"{path}: quantization {quant!r} is not {{'method': {FP8_METHOD!r}, 'block_size': [bm, bn], ...}}, "
                 f"{{'method': 'int8', ...}} or {{'method': 'int4', 'group_size': G, ...}}")
        parse_dtype(quant.get("compute_dtype", ""), f"{path}: quantization.compute_dtype")
    return manifest


def _entries(manifest: dict, root: str) -> dict[tuple[int, int], ExpertEntry]:
    layers = set(manifest["moe_layers"])
    entries: dict[tuple[int, int], ExpertEntry] = {}
    for raw in manifest["experts"]:
        try:
            entry = ExpertEntry(int(raw["layer"]), int(raw["expert"]), raw["file"], int(raw["offset"]),
                                int(raw["nbytes"]), str(raw["sha256"]), raw.get(FAST_HASH))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{root}: malformed expert entry {raw!r} (needs layer, expert, file, offset, "
                                  f"nbytes, sha256)") from None
        what = f"{root}: expert (layer {entry.layer}, expert {entry.expert})"
        _require(entry.layer in layers and 0 <= entry.expert < manifest["num_experts"],
                 f"{what} is outside moe_layers {sorted(layers)} x experts 0..{manifest['num_experts'] - 1}")
        _require((entry.layer, entry.expert) not in entries, f"{what} is listed twice")
        _require(entry.offset >= 0 and entry.nbytes > 0, f"{what}: offset {entry.offset} / nbytes {entry.nbytes} invalid")
        _require(_is_hex(entry.sha256, 64), f"{what}: sha256 {entry.sha256!r} is not 64 hex digits")
        _require(entry.xxh3_64 is None or _is_hex(entry.xxh3_64, 16),
                 f"{what}: {FAST_HASH} {entry.xxh3_64!r} is not 16 hex digits")
        resolve_inside(root, entry.file, what)
        entries[(entry.layer, entry.expert)] = entry
    missing = len(layers) * manifest["num_experts"] - len(entries)
    _require(missing == 0, f"{root}: the manifest lacks {missing} of the {len(layers)} x {manifest['num_experts']} experts")
    return entries


def _dense_entries(manifest: dict, root: str) -> list[dict]:
    """The manifest's `dense` list, checked: [{"file", "nbytes", "sha256", optional "xxh3_64"}]."""
    dense = manifest.get("dense")
    _require(isinstance(dense, list) and dense, f"{root}: the manifest lists no dense files")
    for item in dense:
        _require(isinstance(item, dict) and isinstance(item.get("nbytes"), int) and _is_hex(item.get("sha256"), 64)
                 and (item.get(FAST_HASH) is None or _is_hex(item[FAST_HASH], 16)),
                 f"{root}: malformed dense entry {item!r} (needs file, nbytes, sha256 and optionally {FAST_HASH})")
        resolve_inside(root, item.get("file"), f"{root}: dense file")
    return dense


@dataclass(frozen=True)
class ExpertLayout:
    """Where one expert's tensors lie inside its byte range (identical for every expert of a layer)."""

    parts: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # (kind, dtype, shape, offset in range)
    nbytes: int
    hidden_size: int
    intermediate_size: int

    def kinds(self) -> set[str]:
        return {kind for kind, *_ in self.parts}


def _expert_layout(root: str, entry: ExpertEntry, tensors: dict, file_size: int, manifest: dict) -> ExpertLayout:
    what = f"{root}: expert (layer {entry.layer}, expert {entry.expert}) in {entry.file}"
    _require(entry.offset + entry.nbytes <= file_size,
             f"{what}: bytes {entry.offset}..{entry.offset + entry.nbytes} lie past the end of the file "
             f"({file_size} bytes; truncated file or bad offset)")
    prefix = f"e{entry.expert}."
    mine = sorted((spec for name, spec in tensors.items() if name.startswith(prefix)), key=lambda s: s.start)
    kinds = [spec.name[len(prefix):] for spec in mine]
    position = entry.offset
    parts = []
    for kind, spec in zip(kinds, mine):
        _require(spec.start == position, f"{what}: tensor {spec.name} is not contiguous with the expert's other "
                                         f"tensors at offset {entry.offset} (starts at {spec.start}, expected {position})")
        parts.append((kind, spec.dtype, spec.shape, spec.start - entry.offset))
        position = spec.end
    _require(position - entry.offset == entry.nbytes,
             f"{what}: tensors span {position - entry.offset} bytes, the manifest says {entry.nbytes}")
    scheme = quant_scheme(manifest)
    if scheme is not None:
        return ExpertLayout(tuple(parts), entry.nbytes, *_check_quantized_parts(what, scheme, parts))
    _require(set(kinds) <= set(EXPERT_TENSORS) and "w13" in kinds and "w2" in kinds,
             f"{what}: tensors {kinds}; expected w13, w2 and optionally {', '.join(EXPERT_TENSORS[2:])}")
    shapes = {kind: shape for kind, _, shape, _ in parts}
    dtypes = {kind: dtype for kind, dtype, _, _ in parts}
    w13, w2 = shapes["w13"], shapes["w2"]
    _require(len(w13) == 2 and len(w2) == 2 and w13[0] == 2 * w2[1] and w13[1] == w2[0],
             f"{what}: shapes w13 {list(w13)}, w2 {list(w2)} are not [2I, H] and [H, I]")
    hidden, inter = w2[0], w2[1]
    expected = {"b13": (2 * inter,), "b2": (hidden,)}
    quant = manifest.get("quantization")
    if quant is not None:
        block = tuple(quant["block_size"])
        _require("w13_scale" in shapes and "w2_scale" in shapes, f"{what}: FP8 checkpoint without w13_scale/w2_scale")
        expected.update(w13_scale=scale_shape((2 * inter, hidden), block), w2_scale=scale_shape((hidden, inter), block))
    else:
        _require("w13_scale" not in shapes and "w2_scale" not in shapes, f"{what}: scales in an unquantized checkpoint")
    for kind, shape in shapes.items():
        if kind in expected:
            _require(tuple(shape) == tuple(expected[kind]), f"{what}: {kind} has shape {list(shape)}, expected "
                                                            f"{list(expected[kind])} for H={hidden}, I={inter}")
    weight_dtype = parse_dtype(manifest["dtype"])
    _require(dtypes["w13"] == weight_dtype and dtypes["w2"] == weight_dtype,
             f"{what}: weights are {dtype_name(dtypes['w13'])}/{dtype_name(dtypes['w2'])}, the manifest says "
             f"{manifest['dtype']}")
    return ExpertLayout(tuple(parts), entry.nbytes, hidden, inter)


def _check_quantized_parts(what: str, scheme: QuantScheme, parts) -> tuple[int, int]:
    """(H, I) of an int8 / int4 expert whose tensors are exactly `quantized_kinds` in that order, each
    with the dtype and shape `quant.part_specs` gives."""
    kinds = [kind for kind, *_ in parts]
    shapes = {kind: tuple(shape) for kind, _, shape, _ in parts}
    for name in ("w13", "w2"):
        shape = shapes.get(f"{name}.qweight", ())
        _require(len(shape) == 2, f"{what}: {scheme.name} expert without a 2-D {name}.qweight (tensors {kinds})")
    hidden, inter = shapes["w2.qweight"][0], shapes["w13.qweight"][0] // 2
    expected = {**{f"w13.{role}": spec for role, spec in part_specs(scheme, 2 * inter, hidden).items()},
                **{f"w2.{role}": spec for role, spec in part_specs(scheme, hidden, inter).items()}}
    with_bias = "b13" in kinds or "b2" in kinds
    order = [*expected, *(("b13", "b2") if with_bias else ())]
    _require(kinds == order, f"{what}: tensors {kinds}; a {scheme.name} expert holds {order} in that order")
    expected.update(b13=(None, (2 * inter,)), b2=(None, (hidden,)))
    for kind, dtype, shape, _ in parts:
        want_dtype, want_shape = expected[kind]
        _require(tuple(shape) == want_shape and want_dtype in (None, dtype),
                 f"{what}: {kind} is {dtype_name(dtype)} {list(shape)}, expected "
                 f"{dtype_name(want_dtype) + ' ' if want_dtype else ''}{list(want_shape)} for {scheme.name} "
                 f"(group {scheme.group_size}) with H={hidden}, I={inter}")
    return hidden, inter


def quant_scheme(manifest: dict) -> QuantScheme | None:
    """The int8 / int4 scheme of a checkpoint converted with `--quantize` (None: float or FP8 experts)."""
    quant = manifest.get("quantization")
    if quant is None or quant.get("method") not in SCHEMES:
        return None
    return QuantScheme(quant["method"], quant.get("group_size", DEFAULT_GROUP_SIZE))
