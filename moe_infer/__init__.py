"""moe_infer: Mixture-of-Experts inference for Hugging Face `transformers` models.

    import moe_infer
    model = moe_infer.wrap(hf_model)      # same outputs, MoE layers run by moe_infer
    moe_infer.executor(model).stats()     # tokens and expert activations per layer
    moe_infer.unwrap(model)               # the original blocks back, bit-exact
    moe_infer.generate_many(model, prompts, max_batch_size=8)   # expert-aware micro-batching
    moe_infer.placement.plan(trace, num_devices=4)              # experts on devices from a trace

Importing the package is cheap: the public names and subpackages (`moe_infer.predictors`,
`moe_infer.cache`, `moe_infer.assets`, ...) are imported on first use (a module `__getattr__`),
so the command line answers `--help` and argument errors without loading torch or transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "wrap": "moe_infer.api", "unwrap": "moe_infer.api", "load": "moe_infer.api", "executor": "moe_infer.api",
    "is_wrapped": "moe_infer.api",
    "generate_many": "moe_infer.serving.batching",
    "MoEConfig": "moe_infer.config",
    "UnsupportedModel": "moe_infer.families", "supported_families": "moe_infer.families",
    "Trace": "moe_infer.traces.trace",
}
# the public subpackages and modules (any other submodule is reachable as an attribute too)
_MODULES = ("api", "assets", "batching", "benchmarks", "cache", "config", "corpus", "errors", "executor", "experts",
            "families", "kernels", "models", "parallel", "placement", "predictors", "profiler", "routing", "serving",
            "trace", "trace_stats", "traces", "distributed")

__all__ = ["MoEConfig", "Trace", "UnsupportedModel", "executor", "generate_many", "is_wrapped", "load", "placement",
           "supported_families", "unwrap", "wrap"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _MODULES or (not name.startswith("_") and importlib.util.find_spec(f"moe_infer.{name}")):
        value = importlib.import_module(f"moe_infer.{name}")
    else:
        raise AttributeError(f"module 'moe_infer' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES) | set(_MODULES))


class _Package(types.ModuleType):
    """`moe_infer.executor` is the function: importing the submodule of the same name (which Python
    records as an attribute of its package) must not replace it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
