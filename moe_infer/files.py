"""Atomic writes of the safetensors + JSON-metadata files moe_infer produces (traces, predictors,
placement plans): a temporary file in the destination's folder, fsync, then a rename, so a reader
never sees a half-written file and an interrupted write leaves the old file (or none) in place.
The file gets the mode `open()` would give it (0644 under the usual umask 022): safetensors'
`save_file` creates its file 0600, readable by its owner only.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str]) -> None:
    """Write `tensors` with string `metadata` to `path` atomically."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, 0o666 & ~_umask())
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (`os.umask` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
