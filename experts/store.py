"""The expert store of a converted checkpoint (DESIGN section 5): one-read expert fetches and
their checksums, and the adapter that makes it an expert source for `MoELayer`.

Owns: reading the byte layout of the per-layer expert files (`e{E}.w13`, `e{E}.w2`, optional
`e{E}.b13`, `e{E}.b2`, and `e{E}.w13_scale`, `e{E}.w2_scale` when FP8 is kept), `verify` of a whole
directory. The `moe_infer.checkpoint/1` manifest (its schema and every check on it, and where an
expert's tensors lie in its range) is `manifest.py`; its names are importable from here too.

Quantized experts (`convert --quantize int8|int4`, the layout of `experts/quant.py`): an expert's
range holds `e{E}.w13.qweight`, `e{E}.w13.scales`, [`e{E}.w13.zeros`], `e{E}.w2.qweight`,
`e{E}.w2.scales`, [`e{E}.w2.zeros`], then the optional biases, in that order, with the dtypes and
shapes of `quant.part_specs` (int8: int8 [N, K] and float32 [N]; int4: uint8 [N, K/2] low nibble
first, float32 [N, NG] and uint8 [N, NG]; zeros for int4 only). The manifest's `quantization` is
`{"method": "int8", "compute_dtype": D}` or `{"method": "int4", "group_size": G, "compute_dtype": D}`,
and its `dtype` is D, the floating dtype of biases and activations. `read` returns `ExpertTensors`
whose w13 / w2 are `QuantizedWeight` views into the read buffer (nothing is dequantized).
Does not own: writing checkpoints (`moe_infer.experts.convert`) or caching (`moe_infer.cache`).

Shape legend: E experts, H hidden, I intermediate (per expert).

How an expert is read: its tensors form one contiguous byte range of its layer file, fetched with
one positional read (`os.preadv`) into one buffer (pinned when asked and CUDA is present); the
returned tensors are views into that buffer. No memory map: touching mapped pages would count
the whole file in the process's RSS (see `tensorfile`); with positional reads RSS holds the
buffers the caller keeps, and nothing else.

Checksums (the manifest's contract): every expert entry has `sha256` (of its byte range) and,
since the per-read check, `xxh3_64` (16 hex digits; the same bytes); every `dense` entry has
`sha256` and `xxh3_64` of the whole file. `verify` checks every sha256. `read` checks an expert
against `xxh3_64` the first time it reads it (`checksums="every"`: every time; `"off"`: never), and
`dense_tensors` checks each dense file as it streams it. A manifest without `xxh3_64` (written
before it existed) is still checked, with its sha256: slower (about 1 GB/s instead of 10), never
skipped. A mismatch is a `CheckpointError` naming the file and the expert; the bytes are not used.
"""

from __future__ import annotations

import hashlib
import os
import threading

import torch

from .fp8 import dequantize
# DENSE_FILE, FORMAT, FP8_METHOD and MANIFEST are not used here: the converter, the loaders and
# user code import them from this module, their home before manifest.py
from .manifest import (DENSE_FILE, FORMAT, FP8_METHOD, MANIFEST, OFFLOAD_SOURCE, ExpertEntry,  # noqa: F401
                       ExpertLayout, _dense_entries, _entries, _expert_layout, _require, dtype_name, load_manifest,
                       parse_dtype, quant_scheme, resolve_inside)
from .math import Activation, ExpertTensors, as_activation, projection_tensors
from .quant import PART_ROLES, QuantizedWeight, QuantScheme
from .skeleton import build_from_config, check_against_manifest
from .tensorfile import (FAST_HASH, CheckpointError, TensorFile, as_tensor, empty_buffer, fast_digest, fast_hasher,
                         pread_into, read_header)
from moe_infer.errors import ConfigError

# when `read` checks an expert's bytes against the manifest: the first time each expert is read
# (default), on every read, or never (the caller vouches for the files, e.g. right after `verify`)
CHECKSUM_MODES = ("first", "every", "off")


class ExpertStore:
    """Read-only access to the experts of a converted checkpoint directory.

    `read(layer_idx, expert)` returns CPU `ExpertTensors` (views into one buffer filled by one
    read); thread-safe (positional reads on shared descriptors).
    """

    def __init__(self, root: str, manifest: dict, entries: dict[tuple[int, int], ExpertEntry],
                 layouts: dict[int, ExpertLayout], checksums: str = "first"):
        if checksums not in CHECKSUM_MODES:
            raise ConfigError(f"checksums={checksums!r}; allowed: {', '.join(map(repr, CHECKSUM_MODES))}")
        self.root = root
        self.checksums = checksums
        self._checked: set[tuple[int, int]] = set()  # experts whose bytes matched their checksum once
        self.manifest = manifest
        self._entries = entries
        self._layouts = layouts
        self.moe_layers: list[int] = list(manifest["moe_layers"])
        self.num_experts: int = manifest["num_experts"]
        self.top_k: int = manifest["top_k"]
        self.family: str = manifest["family"]
        self.dtype = parse_dtype(manifest["dtype"])
        quant = manifest.get("quantization")
        self.quant_scheme: QuantScheme | None = quant_scheme(manifest)  # int8 / int4 experts (--quantize)
        self.fp8_block: tuple[int, int] | None = (tuple(quant["block_size"]) if quant and self.quant_scheme is None
                                                  else None)
        self.compute_dtype = parse_dtype(quant["compute_dtype"]) if quant else self.dtype
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.reads = 0  # positional reads of expert bytes, by any caller (cache, CPU worker, StoreExperts)
        self.bytes_read = 0  # and their bytes: what "no second read" is checked against
        self._kept_projections: dict = {}  # (layer, expert, projection) -> read with the other one (checksum)

    @classmethod
    def open(cls, root: str | os.PathLike, checksums: str = "first") -> "ExpertStore":
        """Validate the manifest and every layer file's header against it. No expert bytes are read
        here: `read` checks each expert's checksum when it reads it (`checksums`, one of
        CHECKSUM_MODES), `verify` checks them all."""
        root = os.fspath(root)
        manifest = load_manifest(root)
        entries = _entries(manifest, root)
        headers: dict[str, tuple[dict, int]] = {}
        layouts: dict[int, ExpertLayout] = {}
        for (layer, expert), entry in sorted(entries.items()):
            if entry.file not in headers:
                tensors, _, size = read_header(resolve_inside(root, entry.file, f"{root}: layer {layer}"))
                headers[entry.file] = (tensors, size)
            layout = _expert_layout(root, entry, *headers[entry.file], manifest)
            if layer not in layouts:
                layouts[layer] = layout
            else:
                _require(layouts[layer].parts == layout.parts,
                         f"{root}: expert (layer {layer}, expert {expert}) is laid out differently from expert 0 "
                         f"of its layer")
        if manifest["source"].get("kind") != OFFLOAD_SOURCE:  # an offload directory holds experts only
            _dense_entries(manifest, root)
        return cls(root, manifest, entries, layouts, checksums)

    # -- geometry
    def layout(self, layer_idx: int) -> ExpertLayout:
        if layer_idx not in self._layouts:
            raise KeyError(f"layer {layer_idx} is not an MoE layer of {self.root}; MoE layers are {self.moe_layers}")
        return self._layouts[layer_idx]

    def expert_nbytes(self, layer_idx: int) -> int:
        """Bytes of one expert as `read` returns it (dequantized when the checkpoint keeps FP8)."""
        layout = self.layout(layer_idx)
        if self.fp8_block is None:  # float, or int8 / int4 (read as stored)
            return layout.nbytes
        itemsize = self.compute_dtype.itemsize
        return sum(torch.Size(shape).numel() * (itemsize if kind in ("w13", "w2") else dtype.itemsize)
                   for kind, dtype, shape, _ in layout.parts if not kind.endswith("_scale"))

    def stored_nbytes(self, layer_idx: int) -> int:
        """Bytes of one expert on disk (what one read moves)."""
        return self.layout(layer_idx).nbytes

    def entry(self, layer_idx: int, expert: int) -> ExpertEntry:
        key = (layer_idx, expert)
        if key not in self._entries:
            raise KeyError(f"no expert (layer {layer_idx}, expert {expert}) in {self.root}: MoE layers "
                           f"{self.moe_layers}, experts 0..{self.num_experts - 1}")
        return self._entries[key]

    # -- reads
    def _fd(self, relative: str) -> int:
        with self._lock:
            if relative not in self._fds:
                self._fds[relative] = os.open(resolve_inside(self.root, relative, self.root), os.O_RDONLY)
            return self._fds[relative]

    def read_raw(self, layer_idx: int, expert: int, *, out: torch.Tensor | None = None,
                 pin: bool = False, drop_page_cache: bool = False) -> torch.Tensor:
        """The expert's stored bytes (uint8 [nbytes]), read with one positional read into `out`
        (a 1-D uint8 CPU tensor of at least `stored_nbytes` bytes) or a new buffer. With
        `drop_page_cache`, the kernel is told afterwards that the file range is not needed again
        (the caller keeps its own copy: the page cache must not hold a second one)."""
        entry = self.entry(layer_idx, expert)
        if out is None:
            buffer = empty_buffer(entry.nbytes, pin)
        else:
            if out.dtype != torch.uint8 or out.ndim != 1 or out.device.type != "cpu" or out.numel() < entry.nbytes \
                    or not out.is_contiguous():
                raise ConfigError(f"read: out must be a contiguous 1-D uint8 CPU tensor of at least {entry.nbytes} "
                                 f"bytes, got {out.dtype} {tuple(out.shape)} on {out.device}")
            buffer = out[:entry.nbytes]
        self._pread(entry, buffer, 0, drop_page_cache)
        key = (layer_idx, expert)
        if self._needs_check(key):
            self._check(entry, buffer)
            with self._lock:
                self._checked.add(key)
        return buffer

    def _needs_check(self, key: tuple[int, int]) -> bool:
        return self.checksums == "every" or (self.checksums == "first" and key not in self._checked)

    def _pread(self, entry: ExpertEntry, buffer: torch.Tensor, start: int, drop_page_cache: bool) -> None:
        """Every read of expert bytes goes through here: bytes `start..start + len(buffer)` of the
        expert's range, counted."""
        fd = self._fd(entry.file)
        pread_into(fd, buffer, entry.offset + start, os.path.join(self.root, entry.file))
        with self._lock:
            self.reads += 1
            self.bytes_read += buffer.numel()
        if drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, entry.offset + start, buffer.numel(), os.POSIX_FADV_DONTNEED)

    def read_projection(self, layer_idx: int, expert: int, projection: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One projection of an expert: "w13" -> (w13 [2I, H], b13 or None), "w2" -> (w2 [H, I], b2 or
        None), dequantized when the checkpoint keeps FP8. Reads only that projection's bytes, so the
        two projections of an expert together read its range once (what a source that cannot keep
        an expert between the two matmuls of a layer call needs). When the expert's checksum is
        still to be checked, the whole range is read and checked instead, and the other
        projection's bytes are kept until it is asked for (once), so nothing is read twice."""
        if projection not in ("w13", "w2"):
            raise ConfigError(f"read_projection: projection {projection!r} is not 'w13' or 'w2'")
        key = (layer_idx, expert)
        with self._lock:
            kept = self._kept_projections.pop((*key, projection), None)
        if kept is not None:
            return kept
        entry = self.entry(layer_idx, expert)
        layout = self.layout(layer_idx).parts
        if self._needs_check(key):
            raw = self.read_raw(layer_idx, expert)
            parts = {kind: as_tensor(raw[off:off + torch.Size(shape).numel() * dtype.itemsize], dtype, shape)
                     for kind, dtype, shape, off in layout}
            other = "w2" if projection == "w13" else "w13"
            with self._lock:
                self._kept_projections[(*key, other)] = self._projection(layer_idx, parts, other)
            return self._projection(layer_idx, parts, projection)
        wanted = {projection, "b" + projection[1:], projection + "_scale"}
        parts = {}
        for kind, dtype, shape, off in layout:
            if kind in wanted or kind.startswith(projection + "."):  # int8 / int4: w13.qweight, w13.scales, ...
                raw = empty_buffer(torch.Size(shape).numel() * dtype.itemsize)
                self._pread(entry, raw, off, False)
                parts[kind] = as_tensor(raw, dtype, shape)
        return self._projection(layer_idx, parts, projection)

    def _projection(self, layer_idx: int, parts: dict, projection: str) -> tuple:
        """(weight, bias or None) of one projection from its tensors by kind: a `QuantizedWeight` of
        views for int8 / int4 experts, dequantized for kept FP8, else the stored tensor."""
        if self.quant_scheme is not None:
            layout = self.layout(layer_idx)
            in_features = layout.hidden_size if projection == "w13" else layout.intermediate_size
            weight = QuantizedWeight(self.quant_scheme, *(parts.get(f"{projection}.{role}") for role in PART_ROLES),
                                     in_features)
            return weight, parts.get("b" + projection[1:])
        weight = parts[projection]
        if self.fp8_block is not None:
            weight = dequantize(weight, parts[projection + "_scale"], self.fp8_block, self.compute_dtype)
        return weight, parts.get("b" + projection[1:])

    def _check(self, entry: ExpertEntry, buffer: torch.Tensor) -> None:
        data = memoryview(buffer.numpy())
        fast = fast_digest(data) if entry.xxh3_64 is not None else None
        if fast is not None:
            ok, algorithm = fast == entry.xxh3_64, FAST_HASH
        else:
            ok, algorithm = hashlib.sha256(data).hexdigest() == entry.sha256, "sha256"
        if not ok:
            raise CheckpointError(f"{os.path.join(self.root, entry.file)}: expert (layer {entry.layer}, expert "
                                  f"{entry.expert}), bytes {entry.offset}..{entry.offset + entry.nbytes}: {algorithm} "
                                  f"mismatch (the file is corrupt or changed after conversion; convert again)")

    def dense_tensors(self):
        """Every dense tensor as (name, CPU tensor), file by file. Each file is hashed as it streams
        (no second read) and checked against the manifest once its last tensor is read: use the
        tensors only after the loop ends without a `CheckpointError` (unless checksums="off")."""
        for item in _dense_entries(self.manifest, self.root):
            path = resolve_inside(self.root, item["file"], f"{self.root}: dense file")
            fast = fast_hasher() if item.get(FAST_HASH) is not None else None
            digest = fast if fast is not None else hashlib.sha256()
            with TensorFile(path) as tensors:
                _require(tensors.size == item["nbytes"], f"{path}: {tensors.size} bytes, the manifest says "
                                                         f"{item['nbytes']} (truncated or changed; convert again)")
                yield from tensors.read_all([digest] if self.checksums != "off" else [])
            if self.checksums != "off":
                want = item[FAST_HASH] if fast is not None else item["sha256"]
                _require(digest.hexdigest() == want, f"{path}: {FAST_HASH if fast is not None else 'sha256'} "
                                                     f"mismatch (the file is corrupt or changed after conversion; "
                                                     f"convert again)")

    def tensors_from_bytes(self, layer_idx: int, raw: torch.Tensor) -> ExpertTensors:
        """ExpertTensors viewing an expert's stored bytes (dequantized copies when FP8 is kept)."""
        parts = {kind: as_tensor(raw[off:off + torch.Size(shape).numel() * dtype.itemsize], dtype, shape)
                 for kind, dtype, shape, off in self.layout(layer_idx).parts}
        if self.quant_scheme is not None:
            (w13, b13), (w2, b2) = (self._projection(layer_idx, parts, name) for name in ("w13", "w2"))
            return ExpertTensors(w13, w2, b13, b2)
        w13, w2 = parts["w13"], parts["w2"]
        if self.fp8_block is not None:
            w13 = dequantize(w13, parts["w13_scale"], self.fp8_block, self.compute_dtype)
            w2 = dequantize(w2, parts["w2_scale"], self.fp8_block, self.compute_dtype)
        return ExpertTensors(w13, w2, parts.get("b13"), parts.get("b2"))

    def read(self, layer_idx: int, expert: int, *, out: torch.Tensor | None = None, pin: bool = False) -> ExpertTensors:
        """Expert `expert` of decoder layer `layer_idx`: w13 [2I, H], w2 [H, I] (+ biases), canonical
        layout, CPU; views into `out` (see `read_raw`) or into a new buffer, pinned if `pin` and CUDA
        is available."""
        return self.tensors_from_bytes(layer_idx, self.read_raw(layer_idx, expert, out=out, pin=pin))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ExpertStore({self.root!r}, family={self.family}, moe_layers={len(self.moe_layers)}, "
                f"experts={self.num_experts}, dtype={dtype_name(self.dtype)})")


class StoreExperts:
    """Expert source (see `moe_infer.experts.math.moe_forward`) over one layer of an `ExpertStore`:
    every call reads the expert from disk (no cache; the tiered cache of `moe_infer.cache` adds one).
    On a CUDA `device` the read goes to pinned memory and is copied to the device; `dtype` casts
    the weights after the read (None: as stored, or the compute dtype of an FP8 store)."""

    def __init__(self, store: ExpertStore, layer_idx: int, activation: str | Activation,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        layout = store.layout(layer_idx)
        self.store = store
        self.layer_idx = layer_idx
        self.activation = as_activation(activation)
        self.num_experts = store.num_experts
        self.hidden_size = layout.hidden_size
        self.intermediate_size = layout.intermediate_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else store.compute_dtype

    def __call__(self, expert_idx: int) -> ExpertTensors:
        on_cuda = self.device.type == "cuda"
        tensors = self.store.read(self.layer_idx, expert_idx, pin=on_cuda)
        move = lambda t: None if t is None else t.to(self.device, self.dtype, non_blocking=on_cuda)  # noqa: E731
        if isinstance(tensors.w13, QuantizedWeight):  # int8 / int4: moved as stored, biases cast
            if self.device.type == "cpu" and (tensors.b13 is None or tensors.b13.dtype == self.dtype):
                return tensors
            place = lambda t: t.to(self.device, non_blocking=on_cuda)  # noqa: E731
            return ExpertTensors(tensors.w13.map(place), tensors.w2.map(place), move(tensors.b13), move(tensors.b2))
        if self.device.type == "cpu" and tensors.w13.dtype == self.dtype:
            return tensors
        return ExpertTensors(move(tensors.w13), move(tensors.w2), move(tensors.b13), move(tensors.b2))

    def is_resident(self, expert_idx: int) -> bool:
        """Never: every call reads the expert from disk (`moe_forward` then holds one at a time)."""
        return False

    def projection(self, expert_idx: int, projection: str) -> ExpertTensors:
        """One projection ("w13" or "w2") of an expert, reading only its bytes (the other fields
        None): `moe_forward` reads each projection of a non-resident expert when it computes it, so
        a layer call reads each expert's bytes once, not once per projection."""
        on_cuda = self.device.type == "cuda"
        weight, bias = self.store.read_projection(self.layer_idx, expert_idx, projection)
        if isinstance(weight, QuantizedWeight):  # int8 / int4: moved as stored, the bias cast
            if self.device.type != "cpu" or (bias is not None and bias.dtype != self.dtype):
                weight = weight.map(lambda t: t.to(self.device, non_blocking=on_cuda))
                bias = None if bias is None else bias.to(self.device, self.dtype, non_blocking=on_cuda)
        elif self.device.type != "cpu" or weight.dtype != self.dtype:
            move = lambda t: None if t is None else t.to(self.device, self.dtype, non_blocking=on_cuda)  # noqa: E731
            weight, bias = move(weight), move(bias)
        return projection_tensors(projection, weight, bias)

    def expert_nbytes(self) -> int:
        """Bytes of one expert as this source returns it (int8 / int4 experts: as stored)."""
        if self.store.quant_scheme is not None:
            return self.store.expert_nbytes(self.layer_idx)
        return self.store.expert_nbytes(self.layer_idx) * self.dtype.itemsize // self.store.compute_dtype.itemsize

    def __repr__(self) -> str:
        return f"StoreExperts(layer={self.layer_idx}, experts={self.num_experts}, store={self.store.root!r})"


def _sha256_file_range(fd: int, offset: int, nbytes: int, chunk: int = 64 << 20) -> str:
    digest = hashlib.sha256()
    buffer = empty_buffer(min(chunk, nbytes))
    done = 0
    while done < nbytes:
        n = min(chunk, nbytes - done)
        pread_into(fd, buffer[:n], offset + done)
        digest.update(memoryview(buffer[:n].numpy()))
        done += n
    return digest.hexdigest()


def verify(root: str | os.PathLike, progress=None) -> dict:
    """Check a converted checkpoint completely: the manifest, every file header, every expert's
    shapes, dtypes and sha256, the dense files' checksums, and that config.json builds the model
    the manifest describes (`moe_infer.experts.skeleton.check_against_manifest`). Raises `CheckpointError` on the first
    problem; returns a summary dict."""
    root = os.fspath(root)
    store = ExpertStore.open(root)
    checked_bytes = 0
    try:
        for (layer, expert), entry in sorted(store._entries.items()):
            fd = store._fd(entry.file)
            if _sha256_file_range(fd, entry.offset, entry.nbytes) != entry.sha256:
                raise CheckpointError(f"{root}: expert (layer {layer}, expert {expert}) in {entry.file}: sha256 "
                                      f"mismatch (the file is corrupt; convert again)")
            checked_bytes += entry.nbytes
            if progress is not None:
                progress(entry.nbytes)
        for item in _dense_entries(store.manifest, root):
            path = resolve_inside(root, item.get("file"), f"{root}: dense file")
            read_header(path)
            size = os.path.getsize(path)
            _require(size == item.get("nbytes"), f"{root}: {item['file']} has {size} bytes, the manifest says "
                                                 f"{item.get('nbytes')}")
            fd = os.open(path, os.O_RDONLY)
            try:
                ok = _sha256_file_range(fd, 0, size) == item.get("sha256")
            finally:
                os.close(fd)
            _require(ok, f"{root}: {item['file']}: sha256 mismatch (the file is corrupt; convert again)")
            checked_bytes += size
        _, _, blocks = build_from_config(root)
        check_against_manifest(root, store, blocks)
    finally:
        store.close()
    return {"experts": len(store._entries), "moe_layers": len(store.moe_layers), "bytes": checked_bytes}
