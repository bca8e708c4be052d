"""Progress bars of predictor training, shown only where a caller asks for them.

``training_progress(description)`` turns them on for the code inside the block (the CLI's
``predictor train`` and the benchmarks do); library calls stay silent. ``bar(total, unit, step)``
is what the training loop and the feature pass use: a tqdm bar with a total (so an ETA) on
stderr, or a disabled one.
"""

from __future__ import annotations

import contextlib
import contextvars

_DESCRIPTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("moe_infer_training_progress",
                                                                         default=None)


@contextlib.contextmanager
def training_progress(description: str):
    """Within the block, predictor training shows tqdm bars labelled ``description``."""
    token = _DESCRIPTION.set(description)
    try:
        yield
    finally:
        _DESCRIPTION.reset(token)


def bar(total: int, unit: str, step: str):
    """A tqdm bar of ``total`` ``unit``s for the training step named ``step`` (disabled unless
    ``training_progress`` is on)."""
    from tqdm.auto import tqdm

    description = _DESCRIPTION.get()
    return tqdm(total=total, unit=unit, desc=f"{description}: {step}" if description else step,
                disable=description is None, leave=False)
