"""Trace files written in parts: bounded memory for traces of any length.

Owns accumulating token records and saving every ``chunk_tokens`` of them as a part trace
(`PartWriter`), joining the parts into one ``.safetensors`` file tensor by tensor, part by part
(`merge_trace_parts`: the header is written first, then each tensor's bytes, so at most one tensor
of one part is in memory; written under a temporary name, synced, renamed), and re-reading the
result (`check_written`). What the profiler streams into; it does not record routing itself.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from moe_infer.errors import ConfigError
from moe_infer.experts.tensorfile import DTYPES as SAFETENSORS_DTYPES, build_header
from moe_infer.traces.trace import Trace

# The finished trace is re-read with Trace.load (every invariant checked) up to this size; a
# larger one gets the header check only, so validation does not undo the bounded memory.
FULL_CHECK_BYTES = 1 << 30
# Tensor order of the merged file (required first, then optional; absent ones skipped).
TRACE_TENSORS = ("expert_ids", "expert_weights", "seq_ids", "positions", "token_ids",
                 "router_logits", "features")


class PartWriter:
    """Accumulates token records and writes every ``chunk_tokens`` of them as a part trace."""

    def __init__(self, directory: Path, chunk_tokens: int, trace_fields: dict[str, Any]):
        self.directory = directory
        self.chunk_tokens = chunk_tokens
        self.trace_fields = trace_fields
        self.pending: list[dict[str, Tensor]] = []
        self.pending_tokens = 0
        self.parts: list[Path] = []

    def add(self, records: dict[str, Tensor]) -> None:
        self.pending.append(records)
        self.pending_tokens += len(records["seq_ids"])
        while self.pending_tokens >= self.chunk_tokens:
            joined = self._join()
            self._write({name: tensor[:self.chunk_tokens] for name, tensor in joined.items()})
            rest = {name: tensor[self.chunk_tokens:] for name, tensor in joined.items()}
            self.pending, self.pending_tokens = [rest], len(rest["seq_ids"])

    def finish(self) -> list[Path]:
        if self.pending_tokens:
            self._write(self._join())
        self.pending, self.pending_tokens = [], 0
        return self.parts

    def _join(self) -> dict[str, Tensor]:
        return {name: torch.cat([records[name] for records in self.pending]) for name in self.pending[0]}

    def _write(self, records: dict[str, Tensor]) -> None:
        path = self.directory / f"part-{len(self.parts):06d}.safetensors"
        Trace.from_arrays(**records, **self.trace_fields).save(path)
        self.parts.append(path)


def merge_trace_parts(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> int:
    """Join part traces (same metadata and tensors, seq ids already global) into one trace file.

    The safetensors header is written here, then each tensor's bytes part by part, so at most one
    tensor of one part is in memory. Written to a temporary name, synced, renamed. Returns N.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this host is big-endian")
    parts = [Path(part) for part in parts]
    if not parts:
        raise ConfigError("merge_trace_parts needs at least one part")
    out = Path(out)
    shapes: dict[str, list[list[int]]] = {}
    dtypes: dict[str, str] = {}
    metadata = None
    for part in parts:
        with safe_open(part, framework="pt") as file:
            if metadata is None:
                metadata = file.metadata()
            elif file.metadata() != metadata:
                raise ConfigError(f"{part}: metadata differs from {parts[0]}")
            if set(file.keys()) != set(shapes or file.keys()):
                raise ConfigError(f"{part}: tensors {sorted(file.keys())} differ from {sorted(shapes)}")
            for name in file.keys():
                tensor_slice = file.get_slice(name)
                shapes.setdefault(name, []).append(list(tensor_slice.get_shape()))
                dtypes.setdefault(name, tensor_slice.get_dtype())
    names = [name for name in TRACE_TENSORS if name in shapes]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ConfigError(f"{parts[0]}: unknown tensors {unknown}")

    specs = []
    for name in names:
        part_shapes = shapes[name]
        if any(shape[1:] != part_shapes[0][1:] for shape in part_shapes):
            raise ConfigError(f"tensor {name}: part shapes {part_shapes} differ past the first axis")
        if dtypes[name] not in SAFETENSORS_DTYPES:
            raise ConfigError(f"unexpected tensor dtype {dtypes[name]} in a trace part")
        rows = sum(shape[0] for shape in part_shapes)
        specs.append((name, SAFETENSORS_DTYPES[dtypes[name]], (rows, *part_shapes[0][1:])))
    # sorted: safetensors returns metadata in hash order, and equal traces should be equal bytes
    header, offsets = build_header(specs, dict(sorted((metadata or {}).items())))
    name, dtype, shape = specs[-1]
    expected = offsets[name] + math.prod(shape) * dtype.itemsize

    temporary = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(header)
            for name in names:
                for part in parts:
                    with safe_open(part, framework="pt") as part_file:
                        tensor = part_file.get_tensor(name).contiguous()
                    file.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            written = file.tell()
            file.flush()
            os.fsync(file.fileno())
        assert written == expected, (written, expected)
        os.replace(temporary, out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return specs[names.index("expert_ids")][2][0]


def check_written(path: Path, tokens: int) -> None:
    """Re-read the finished file: Trace.load when it is small enough, the header otherwise."""
    if path.stat().st_size <= FULL_CHECK_BYTES:
        trace = Trace.load(path)
        assert trace.num_tokens == tokens, (trace.num_tokens, tokens)
        return
    with safe_open(path, framework="pt") as file:
        shape = file.get_slice("expert_ids").get_shape()
        assert shape[0] == tokens, (shape, tokens)
