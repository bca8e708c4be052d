"""Which executor a wrapped model carries: the one attribute `wrap` sets on the model.

`moe_infer.api` sets and clears it (`wrap`, `unwrap`) and answers `executor(model)` and
`is_wrapped(model)` from it. It imports nothing from moe_infer, so the parts below the API that are
handed a model (the predictors' runtime) can find its executor without importing `moe_infer.api`,
which imports them.
"""

from __future__ import annotations

from typing import Any

_EXECUTOR_ATTR = "_moe_infer_executor"


def executor_of(model: Any):
    """The `ModelExecutor` behind a wrapped model, or None when it is not wrapped."""
    return getattr(model, _EXECUTOR_ATTR, None)


def set_executor(model: Any, executor) -> None:
    """Record `executor` on `model` (None: the model is unwrapped)."""
    if executor is None:
        object.__delattr__(model, _EXECUTOR_ATTR)
    else:
        object.__setattr__(model, _EXECUTOR_ATTR, executor)
