"""Shared fixtures of the test suite."""

from __future__ import annotations

import pytest
import torch

import moe_infer
import tiny_models


@pytest.fixture(scope="session", autouse=True)
def converted_cache(tmp_path_factory):
    """`moe_infer.load` of a plain directory converts into $MOE_INFER_CACHE: keep that out of ~/.cache."""
    import os

    previous = os.environ.get("MOE_INFER_CACHE")
    os.environ["MOE_INFER_CACHE"] = str(tmp_path_factory.mktemp("moe_infer_cache"))
    yield
    if previous is None:
        os.environ.pop("MOE_INFER_CACHE", None)
    else:
        os.environ["MOE_INFER_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model(name, seed=0, dtype=torch.float32)`: a `tiny_models.build` model, built once per session
    and shared between tests. Tests must leave it as they found it: wrap it only through
    `tiny_models.wrapped` (which unwraps), and never change its weights (build a fresh one for that)."""
    cache: dict[tuple, torch.nn.Module] = {}

    def get(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        key = (name, seed, dtype)
        if key not in cache:
            cache[key] = tiny_models.build(name, seed, dtype)
        model = cache[key]
        assert not moe_infer.is_wrapped(model), f"a test left the shared {name} model wrapped"
        return model

    return get


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread: tiny models spend their time in per-op overhead,
    and on a shared 2-core machine a second thread mostly waits (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
