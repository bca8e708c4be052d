"""Old import path of `moe_infer.traces.profiler` (moved by issue 21), kept for one release: importing it gives
that module itself, so old imports and `monkeypatch` targets keep working."""

import sys

from moe_infer.traces import profiler as _moved

sys.modules[__name__] = _moved
