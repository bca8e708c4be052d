"""Atomic writes of the safetensors + JSON-metadata files moe_infer produces (traces, predictors,
placement plans): a temporary file in the destination's folder, fsync, then a rename, so a reader
never sees a half-written file and an interrupted write leaves the old file (or none) in place.
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
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
