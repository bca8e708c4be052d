"""Faults of the expert cache's threads (issue 17, "Threads"), on the slot-pool cache:
- interpreter exit with prefetches queued is clean (20 real interpreter exits, never rc 134);
- a hung read fails the forward that waits for it (after MoEConfig.load_timeout) and the next
  forward succeeds: the stuck loader thread is replaced, not waited on;
- two threads calling forward on one budgeted model with a predictor get exactly the outputs of
  single-threaded calls (forwards are serialised by the executor's lock: see `cache/tiered.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import moe_infer
import tiny_models
from moe_infer.cache.backing import ModuleBacking

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


def cache_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("moe-infer")]


def threads_left(before: set[threading.Thread]) -> list[threading.Thread]:
    """The cache threads started since `before` that are still alive (earlier tests may leave their own)."""
    return [t for t in cache_threads() if t not in before]


EXIT_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import moe_infer, tiny_models
    torch.set_num_threads(1)
    model = tiny_models.build("mixtral", 0)
    moe_infer.wrap(model)
    nbytes = moe_infer.executor(model).layers[0].expert_source.expert_nbytes()
    moe_infer.wrap(model, cpu_memory=3 * nbytes, cache_policy="lru")
    cache = moe_infer.executor(model).cache
    with torch.no_grad():
        model(tiny_models.token_ids({seed}, 1, 6))
    for round in range(50):  # a prefetch storm: far more than the loader can drain before exit
        for layer in moe_infer.executor(model).moe_layer_indices:
            cache.prefetch(layer, [(round + e) % 8 for e in range(8)])
    print("queued", len(cache.queue), flush=True)
    # no close, no unwrap: the interpreter exits with the loads queued
""")


def test_exit_with_queued_prefetches_is_clean():
    """20 interpreters exit with prefetches queued; none aborts (before: rc 134 in 4 of 5 runs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(seed: int) -> subprocess.CompletedProcess:
        script = EXIT_SCRIPT.format(tests=str(REPO / "tests"), seed=seed)
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(20)))
    for result in results:
        assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
        assert "queued" in result.stdout and "terminate called" not in result.stderr


class HangingBacking(ModuleBacking):
    """The model's own weights, except that the first read blocks until `release` is set (a disk or
    network file system that stops answering, once)."""

    def __init__(self, sources):
        super().__init__(sources)
        self.release = threading.Event()
        self.hung = threading.Event()
        self._first = threading.Lock()

    def read(self, layer_idx, expert):
        if self._first.acquire(blocking=False):  # never released: only the first read hangs
            self.hung.set()
            assert self.release.wait(60), "test never released the hung read"
        return super().read(layer_idx, expert)


def test_a_hung_read_fails_one_forward_and_the_next_succeeds(tiny_model):
    before = set(cache_threads())
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(3, 1, 8)
    with torch.no_grad():
        reference = model(ids).logits
    moe_infer.wrap(model)
    nbytes = moe_infer.executor(model).layers[0].expert_source.expert_nbytes()
    moe_infer.wrap(model, cpu_memory=16 * nbytes, load_timeout=0.5, cpu_compute="never")
    ex = moe_infer.executor(model)
    backing = HangingBacking(ex.cache.backing.sources)
    ex.cache.backing = backing
    try:
        with torch.no_grad():
            with pytest.raises(TimeoutError, match=r"within 0\.5 s \(MoEConfig\.load_timeout\)"):
                model(ids)
            assert backing.hung.is_set()
            # the read is still hung (never released yet): the next forward must not wait behind it
            torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)
        stats = ex.stats()
        assert stats["tiers"]["cpu"]["peak_bytes"] <= 16 * nbytes
    finally:
        backing.release.set()
        moe_infer.unwrap(model)
    assert not threads_left(before)


def test_load_timeout_is_a_config_field():
    assert moe_infer.MoEConfig(load_timeout=2).load_timeout == 2.0
    for bad in (0, -1, "soon", True):
        with pytest.raises(ValueError, match="load_timeout"):
            moe_infer.MoEConfig(load_timeout=bad)


def test_two_threads_forwarding_on_a_budgeted_model_with_a_predictor():
    """2 threads x 40 forwards on tiny-mixtral under a budget of 12 of its 48 experts, with its
    shipped ExpertFlow predictor prefetching: every output equals the single-threaded one (before:
    deadlocks until the timeout, AttributeError on a None expert, KeyError in the predictor)."""
    from moe_infer import assets
    from moe_infer.models import load_model

    model, _ = load_model("tiny-mixtral", device="cpu", dtype="float32")
    moe_infer.wrap(model)
    nbytes = moe_infer.executor(model).layers[0].expert_source.expert_nbytes()
    prompts = [torch.tensor([list(f"def f{i}(x):\n    return x * {i}\n".encode())[: 8 + i % 7]]) for i in range(80)]
    with torch.no_grad():
        expected = [model(p).logits for p in prompts]
    before = set(cache_threads())
    moe_infer.wrap(model, cpu_memory=12 * nbytes, predictor=str(assets.predictor_path("tiny-mixtral")),
                   cache_policy="expertflow")
    ex = moe_infer.executor(model)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(indices):
        try:
            for i in indices:
                with torch.no_grad():
                    results[i] = model(prompts[i]).logits
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(range(k, 80, 2),)) for k in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), "a forward deadlocked"
        assert not errors, errors
        stats = ex.stats()
    finally:
        moe_infer.unwrap(model)
    assert sorted(results) == list(range(80))
    for i in range(80):
        assert torch.equal(results[i], expected[i]), i
    assert stats["prefetch"]["issued"] > 0 and stats["tiers"]["cpu"]["peak_bytes"] <= 12 * nbytes
    assert not threads_left(before)
