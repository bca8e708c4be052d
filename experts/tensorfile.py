"""safetensors files read and written with plain positional I/O (`os.preadv`), never memory-mapped.

Owns the safetensors header (parse and validate, build), reading one tensor or a row range of one
tensor into a fresh or given buffer, and writing a file tensor by tensor in a fixed order.

Why not `safetensors.safe_open`: it memory-maps the file, and every page a reader touches then
counts in the process's resident set (RSS) until the mapping goes away, so converting or serving
a 90 GB checkpoint would look like (and, under memory pressure, behave like) holding much of it.
`preadv` copies the bytes into a buffer we own: RSS grows by that buffer only, and the kernel's
page cache (which is not RSS, and is reclaimable) does the rest.

Format: 8-byte little-endian header length N, N bytes of JSON `{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}` (padded with spaces to a multiple
of 8), then the data; tensors cover the data area exactly, without gaps or overlaps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass

import torch
from moe_infer.errors import CheckpointError

try:
    import xxhash  # a declared dependency; without it, reads are checked with the sha256 every manifest has
except ImportError:  # pragma: no cover - exercised by the tests through `fast_hasher` returning None
    xxhash = None

# the per-read checksum of the converted layout: xxh3_64 hashes about 10x faster than sha256 on the
# machines measured (bench/results/checksums.md), so checking an expert costs a fraction of its read
FAST_HASH = "xxh3_64"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def read_header(path: str) -> tuple[dict[str, TensorSpec], dict[str, str], int]:
    """(tensors by name, metadata, file size) of a safetensors file, after checking that the header
    is well formed and that every tensor lies inside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {header_len} "
                                      f"bytes in a file of {size})")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorSpec] = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r} "
                                  f"(dtypes allowed: {', '.join(DTYPES)})") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != _nbytes(dtype, shape):
            raise CheckpointError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit its "
                                  f"dtype {info['dtype']} and shape {list(shape)}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the "
                                  f"file has {size} bytes")
        tensors[name] = TensorSpec(name, dtype, shape, data_start + begin, data_start + end)
    return tensors, metadata, size


def pread_into(fd: int, buffer: torch.Tensor, offset: int, path: str = "") -> None:
    """Fill the 1-D uint8 CPU tensor `buffer` with the file's bytes from `offset` (one positional
    read; loops only when the kernel returns less than asked)."""
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: truncated: wanted bytes {offset}..{offset + len(view)}, the file ends "
                                  f"at {offset + done}")
        done += n


def fast_hasher():
    """A new streaming xxh3_64 hasher, or None when the xxhash module is missing."""
    return xxhash.xxh3_64() if xxhash is not None else None


def fast_digest(data) -> str | None:
    """The xxh3_64 hex digest of a bytes-like object, or None when the xxhash module is missing."""
    return xxhash.xxh3_64_hexdigest(data) if xxhash is not None else None


def as_tensor(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """View (no copy) of a uint8 buffer as dtype/shape; a copy only if the buffer is misaligned."""
    if buffer.storage_offset() % dtype.itemsize:
        buffer = buffer.clone()
    return buffer.view(dtype).view(shape)


def empty_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A 1-D uint8 CPU buffer; page-locked (pinned) when asked and CUDA is present."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=bool(pin and torch.cuda.is_available()))


class TensorFile:
    """One safetensors file open for positional reads of single tensors or row ranges."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.metadata, self.size = read_header(path)
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> TensorSpec:
        return self.tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (or its rows [start, stop) along dim 0), read into a new CPU tensor."""
        spec = self.tensors[name]
        shape, start = spec.shape, spec.start
        if rows is not None:
            row_bytes = _nbytes(spec.dtype, shape[1:])
            if not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise IndexError(f"{self.path}: rows {rows} outside tensor {name!r} of shape {list(shape)}")
            shape, start = (rows[1] - rows[0], *shape[1:]), start + rows[0] * row_bytes
        buffer = empty_buffer(_nbytes(spec.dtype, shape))
        pread_into(self._fd, buffer, start, self.path)
        return as_tensor(buffer, spec.dtype, shape)

    def read_all(self, digests=()):
        """Every tensor as (name, tensor), in file order, each read once; every byte of the file
        (header, tensors, any padding) passes through each of `digests` (hashlib-style objects) on
        the way, so they end up holding the whole file's hash."""
        position = 0

        def skip_to(end: int) -> None:
            if end > position:
                gap = empty_buffer(end - position)
                pread_into(self._fd, gap, position, self.path)
                for digest in digests:
                    digest.update(memoryview(gap.numpy()))

        for spec in sorted(self.tensors.values(), key=lambda s: s.start):
            skip_to(spec.start)
            buffer = empty_buffer(spec.nbytes)
            pread_into(self._fd, buffer, spec.start, self.path)
            for digest in digests:
                digest.update(memoryview(buffer.numpy()))
            position = max(position, spec.end)
            yield spec.name, as_tensor(buffer, spec.dtype, spec.shape)
        skip_to(self.size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included) for tensors laid out in the given order, and each
    tensor's absolute byte offset in the file."""
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    relative = {}
    for name, dtype, shape in specs:
        nbytes = _nbytes(dtype, tuple(shape))
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative[name] = offset
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: data_start + off for name, off in relative.items()}


class TensorWriter:
    """Writes a safetensors file whose layout is fixed up front; tensors then arrive one at a time,
    in that order, so at most one tensor is in memory. A tensor may also arrive as consecutive row
    blocks (`write` called several times with the same name), e.g. gate rows then up rows."""

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self._specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        header, self.offsets = build_header(self._specs, metadata)
        self._next = 0
        self._rows_done = 0
        self.sha256 = hashlib.sha256(header)  # of the whole file, as it is written
        self.fast = fast_hasher()  # the same, with FAST_HASH (None without xxhash)
        if self.fast is not None:
            self.fast.update(header)
        self._file = open(path, "wb")
        self._file.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> memoryview:
        """Append `tensor`, the next tensor of the layout or its next rows; returns the bytes written
        (for hashing)."""
        expected_name, dtype, shape = self._specs[self._next]
        rows = tensor.shape[0] if tensor.ndim else 1
        if (name != expected_name or tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:]
                or self._rows_done + rows > (shape[0] if shape else 1)):
            raise AssertionError(f"{self.path}: writing {name} {tensor.dtype} {tuple(tensor.shape)} after "
                                 f"{self._rows_done} rows; layout expects {expected_name} {dtype} {shape}")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._file.write(data)
        self.sha256.update(data)
        if self.fast is not None:
            self.fast.update(data)
        self._rows_done += rows
        if self._rows_done == (shape[0] if shape else 1):
            self._next += 1
            self._rows_done = 0
        return data

    def close(self) -> None:
        """Flush to disk; every tensor of the layout must have been written."""
        if self._next != len(self._specs):
            raise AssertionError(f"{self.path}: closed after {self._next} of {len(self._specs)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
