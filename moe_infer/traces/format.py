"""The ``moe_infer.trace/1`` format's names and the checks on what enters a `Trace`.

The file layout itself is documented in `trace.py`. This module holds what reading, writing and
importing share: the format name, each tensor's file dtype (required or optional), the metadata a
file must carry, casting arrays to the file dtypes without losing values (`_to_file_dtype`), and
the checks on a file's header and metadata before its tensors are read. It does not build,
validate or save a `Trace` (`trace.py` does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_infer.errors import ConfigError

FORMAT = "moe_infer.trace/1"
UNKNOWN_TOKEN = -1

_REQUIRED_TENSOR_DTYPES = {
    "expert_ids": torch.int32,  # [N, L, K]
    "expert_weights": torch.float32,  # [N, L, K]
    "seq_ids": torch.int32,  # [N]
    "positions": torch.int32,  # [N]
    "token_ids": torch.int32,  # [N]
}
_OPTIONAL_TENSOR_DTYPES = {
    "router_logits": torch.float16,  # [N, L, E]
    "features": torch.float16,  # [N, F]
}
_TENSOR_DTYPES = {**_REQUIRED_TENSOR_DTYPES, **_OPTIONAL_TENSOR_DTYPES}
_REQUIRED_METADATA = ("format", "model", "family", "num_experts", "top_k", "moe_layers", "source")
_INT32 = torch.iinfo(torch.int32)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_file_dtype(name: str, array: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``array`` as a CPU tensor of the file dtype of tensor ``name``, refusing lossy casts."""
    if isinstance(array, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}"
        )
    target = _TENSOR_DTYPES[name]
    if tensor.dtype == target:
        return tensor.contiguous()
    if target.is_floating_point:
        if not tensor.dtype.is_floating_point:
            raise ConfigError(
                f"{name}: expected floating-point values (stored as {_dtype_name(target)}), "
                f"got {_dtype_name(tensor.dtype)}"
            )
        cast = tensor.to(target)
        overflowed = torch.isinf(cast) & torch.isfinite(tensor)
        if overflowed.any():
            raise ConfigError(
                f"{name}: values up to {float(tensor[overflowed].abs().max())} overflow "
                f"{_dtype_name(target)} (max {torch.finfo(target).max})"
            )
        return cast
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ConfigError(
            f"{name}: expected integer values (stored as int32), got {_dtype_name(tensor.dtype)}"
        )
    if tensor.numel() and (int(tensor.min()) < _INT32.min or int(tensor.max()) > _INT32.max):
        raise ConfigError(
            f"{name}: values in [{int(tensor.min())}, {int(tensor.max())}] do not fit in int32"
        )
    return tensor.to(torch.int32)


def _check_file_header(path: Path, metadata: dict[str, str], names: set[str]) -> None:
    if metadata.get("format") != FORMAT:
        raise ConfigError(
            f"{path}: format is {metadata.get('format')!r}, expected {FORMAT!r}; "
            "not a moe_infer trace"
        )
    missing_metadata = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing_metadata:
        raise ConfigError(f"{path}: metadata lacks {missing_metadata}")
    missing_tensors = [name for name in _REQUIRED_TENSOR_DTYPES if name not in names]
    if missing_tensors:
        raise ConfigError(
            f"{path}: missing tensor(s) {missing_tensors}; a {FORMAT} file holds "
            f"{list(_REQUIRED_TENSOR_DTYPES)} and optionally {list(_OPTIONAL_TENSOR_DTYPES)}"
        )
    unknown_tensors = sorted(names - _TENSOR_DTYPES.keys())
    if unknown_tensors:
        raise ConfigError(f"{path}: unknown tensor(s) {unknown_tensors} are not part of {FORMAT}")


def _parse_metadata(path: Path, metadata: dict[str, str], key: str, parse):
    try:
        return parse(metadata[key])
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise ConfigError(
            f"{path}: metadata {key}={metadata[key]!r} cannot be parsed ({error})"
        ) from error
