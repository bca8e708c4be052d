"""The tiered expert cache at runtime, on CPU tiers: outputs equal the unlimited run under every
budget, policy, loader and cpu_compute setting; budgets hold on every insertion; background errors
surface in the forward that needs the weights; nothing hangs; shutdown joins every thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import moe_infer
import tiny_models
from moe_infer.cache.backing import ModuleBacking
from moe_infer.cache.cpu_compute import CostModel, split_misses
from moe_infer.cache.loader import DEMAND, PREDICTED, RING, LoadQueue
from moe_infer.cache.tiered import ExpertCache, Tier
from moe_infer.traces.trace import Trace

pytestmark = pytest.mark.usefixtures("single_thread")


def cache_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("moe-infer")]


@pytest.fixture
def charges(monkeypatch):
    """Every insertion into any tier: (tier name, used bytes after it, budget)."""
    seen: list[tuple[str, int, int]] = []
    real = Tier.charge

    def checked(self, entry):
        real(self, entry)
        seen.append((self.name, self.used_bytes, self.budget_bytes))

    monkeypatch.setattr(Tier, "charge", checked)
    return seen


SETTINGS = [
    # (family, slots, policy, loader, cpu_compute)
    ("mixtral", 1, "lru", "on-demand", "never"),  # a single expert of room
    ("mixtral", 3, "lfu", "on-demand", "auto"),
    ("mixtral", 3, "static", "on-demand", "never"),
    ("mixtral", 5, "expertflow", "on-demand", "never"),
    ("mixtral", 2, "lru", "on-demand", "always"),  # misses run from the backing, uncached
    ("mixtral", 4, "lru", "ring", "never"),  # half of one layer per section
    ("mixtral", 8, "lru", "ring", "never"),  # one whole layer per section (2 layers of 4 experts)
    ("deepseek_v3", 3, "lru", "on-demand", "never"),  # shared experts, a dense first layer
    ("gpt_oss", 2, "lru", "ring", "never"),  # biases, interleaved gate/up
    ("qwen2_moe_sparse_step", 1, "expertflow", "on-demand", "always"),
]


@pytest.mark.parametrize("family, slots, policy, loader, cpu_compute", SETTINGS)
def test_outputs_equal_the_unlimited_run_and_budgets_hold(tiny_model, charges, family, slots, policy, loader,
                                                           cpu_compute):
    model = tiny_model(family)
    ids = tiny_models.token_ids(0, 2, 12)
    with torch.no_grad():
        reference, reference_one = model(ids).logits, model(ids[:, :1]).logits
        budget = slots * tiny_models.expert_bytes(model)
        with tiny_models.wrapped(model, cpu_memory=budget, cache_policy=policy, loader=loader,
                                 cpu_compute=cpu_compute):
            ex = moe_infer.executor(model)
            for _ in range(2):  # the second call meets a warm cache (hits, ring prefetches)
                assert torch.equal(model(ids).logits, reference)
            assert torch.equal(model(ids[:, :1]).logits, reference_one)
            stats = ex.stats()
            acquired = sum(layer.stats.expert_loads for layer in ex.layers)
    tier = stats["tiers"]["cpu"]
    assert tier["peak_bytes"] <= budget and tier["budget_bytes"] == budget
    assert all(used <= cap for _, used, cap in charges)
    acquisitions = tier["hits"] + tier["misses"]  # one per expert used per layer call
    assert acquisitions == acquired
    if cpu_compute == "always":
        assert stats["cpu_computed_experts"] > 0 and tier["bytes_moved"] <= stats["cpu_computed_experts"] * budget
    else:
        assert len(charges) > 0
        if slots >= ex.layers[0].num_experts:  # a whole call always fits: nothing overflows to the backing
            assert stats["cpu_computed_experts"] == 0
    assert not cache_threads()  # unwrap joined the loader


def test_ring_streams_the_next_layers_while_one_computes():
    """Shipped tiny-mixtral (6 MoE layers of 8 experts) with room for 2 layers: the ring has two
    whole-layer sections; once warm, the next layer is loaded while the current one computes."""
    from moe_infer.models import load_model

    model, _ = load_model("tiny-mixtral", device="cpu", dtype="float32")
    ids = torch.tensor([list(b"def main(args):\n    return sorted(args, key=len)\n")])
    with torch.no_grad():
        reference = model(ids).logits
        nbytes = tiny_models.expert_bytes(model)
        with tiny_models.wrapped(model, cpu_memory=16 * nbytes, loader="ring"):
            ex = moe_infer.executor(model)
            assert ex.cache.ring_sections == 2
            for _ in range(3):
                assert torch.equal(model(ids).logits, reference)
            stats = ex.stats()
    assert stats["prefetch"]["issued"] > 0 and stats["prefetch"]["used"] > 0
    assert stats["tiers"]["cpu"]["peak_bytes"] <= 16 * nbytes


def test_generate_under_a_budget_gives_the_same_tokens(tiny_model):
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(1, 1, 6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    expected = model.generate(ids, **kwargs)
    with tiny_models.wrapped(model, cpu_memory=4 * tiny_models.expert_bytes(model), cache_policy="lfu"):
        assert torch.equal(model.generate(ids, **kwargs), expected)
        stats = moe_infer.executor(model).stats()
    assert stats["tiers"]["cpu"]["hits"] > 0 and stats["tiers"]["cpu"]["misses"] > 0


def test_budget_smaller_than_one_expert_is_refused_and_changes_nothing(tiny_model):
    model = tiny_model("mixtral")
    blocks = list(model.modules())
    with pytest.raises(ValueError, match="smaller than one expert"):
        moe_infer.wrap(model, cpu_memory=100)
    assert list(model.modules()) == blocks and not moe_infer.is_wrapped(model)
    with tiny_models.wrapped(model, cpu_memory="1MiB"):
        ex = moe_infer.executor(model)
        cache = ex.cache
        with pytest.raises(ValueError, match="smaller than one expert"):
            moe_infer.wrap(model, cpu_memory=100)
        assert ex.cache is cache and not cache.closed  # the refused reconfiguration kept the cache


# -- backing sources that fail or stall, to test the loader thread ------------------------------
class FailingBacking(ModuleBacking):
    """The model's own weights, except that reading `bad` keys raises OSError (a disk error)."""

    def __init__(self, sources, bad):
        super().__init__(sources)
        self.bad = set(bad)

    def read(self, layer_idx, expert):
        if (layer_idx, expert) in self.bad:
            raise OSError(f"simulated read error at expert {expert} of layer {layer_idx}")
        return super().read(layer_idx, expert)


class GatedBacking(ModuleBacking):
    """Reads of `gated` keys wait until `gate` is set (a slow disk)."""

    def __init__(self, sources, gated):
        super().__init__(sources)
        self.gated = set(gated)
        self.gate = threading.Event()
        self.reads: list[tuple[int, int]] = []

    def read(self, layer_idx, expert):
        self.reads.append((layer_idx, expert))
        if (layer_idx, expert) in self.gated:
            assert self.gate.wait(10), "test gate never opened"
        return super().read(layer_idx, expert)


def install(model, backing_cls, *args, slots=2, policy="lru", load_timeout=10.0, **kwargs) -> ExpertCache:
    """Wrap `model` and put a cache over `backing_cls` behind it (the executor's own is closed)."""
    moe_infer.wrap(model)
    ex = moe_infer.executor(model)
    sources = {layer.layer_idx: layer.expert_source for layer in ex.layers}
    backing = backing_cls(sources, *args)
    ex.cache = ExpertCache(backing, ex.moe_layer_indices, device="cpu",
                           budget_bytes=slots * ex.layers[0].expert_source.expert_nbytes(), policy=policy,
                           load_timeout=load_timeout, **kwargs)
    return ex.cache


def run_with_deadline(fn, seconds: float = 20.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001
            result["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"call did not return within {seconds} s"
    return result


def test_a_failed_background_load_surfaces_in_the_forward_that_needs_it(tiny_model):
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(2, 2, 10)
    with torch.no_grad():
        reference = model(ids).logits
        first = tiny_models.build("mixtral", 0).model.layers[0]  # only to name the layer index
        try:
            cache = install(model, FailingBacking, {(0, 1)}, slots=8)
            cache.prefetch(0, [1, 2])  # the prefetch of expert 1 fails in the loader thread
            result = run_with_deadline(lambda: model(ids).logits)
            err = result.get("error")
            assert isinstance(err, RuntimeError), result
            assert "loading expert 1 of layer 0 failed: OSError: simulated read error" in str(err)
            cache.backing.bad.clear()  # the disk recovers: the next call loads it again
            result = run_with_deadline(lambda: model(ids).logits)
            assert torch.equal(result["value"], reference)
        finally:
            moe_infer.unwrap(model)
    del first
    assert not cache_threads()


def test_a_load_that_never_finishes_times_out_and_shutdown_still_joins(tiny_model):
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(3, 1, 8)
    try:
        cache = install(model, GatedBacking, {(0, e) for e in range(8)}, slots=8, load_timeout=0.3)
        with torch.no_grad():
            result = run_with_deadline(lambda: model(ids).logits)
        assert isinstance(result.get("error"), TimeoutError), result
        assert "was not loaded within 0.3 s" in str(result["error"])
    finally:
        cache.backing.gate.set()
        moe_infer.unwrap(model)
    assert cache.closed and not cache_threads()


def test_prefetch_priorities_and_stale_predictions(tiny_model):
    model = tiny_model("mixtral")
    try:
        cache = install(model, GatedBacking, {(0, 0)}, slots=4)
        cache.prefetch(0, [0])  # the loader picks it up and blocks in the read
        deadline = threading.Event()
        for _ in range(200):
            if cache.backing.reads:
                break
            deadline.wait(0.01)
        assert cache.backing.reads == [(0, 0)]
        cache.prefetch(1, [1, 2], scores=[0.2, 0.9])
        cache.prefetch(1, [2, 3])  # a newer prediction for layer 1: expert 1 is stale
        with cache.cond:
            assert cache.queue.pending((1, 1)) is None and cache.prefetch_counts["cancelled"] == 1
            assert cache.queue.pending((1, 2)).priority == PREDICTED
            cache._request((1, 3), DEMAND)  # needed now: re-queued ahead of the prediction
            assert cache.queue.pending((1, 3)).priority == DEMAND
            order = []
            while (job := cache.queue.pop()) is not None:
                order.append(job.key)
        assert order == [(1, 3), (1, 2)]
    finally:
        cache.backing.gate.set()
        moe_infer.unwrap(model)
    assert not cache_threads()


def test_load_queue_orders_by_priority_then_arrival_and_cancels():
    queue = LoadQueue(threading.Condition())
    with queue.cond:
        queue.push((0, 1), RING)
        queue.push((0, 2), PREDICTED)
        queue.push((0, 3), DEMAND)
        queue.push((0, 4), PREDICTED)
        queue.push((0, 1), DEMAND)  # upgraded
        assert [j.key for j in queue.cancel(lambda j: j.key == (0, 4))] == [(0, 4)]
        assert [queue.pop().key for _ in range(3)] == [(0, 3), (0, 1), (0, 2)]
        assert queue.pop() is None and len(queue) == 0


def test_expertflow_runtime_correction(tiny_model):
    """Wrong predictions cost loads but never correctness: the experts really needed are loaded on
    demand, and the mispredicted ones lose their protection once the layer has run, so they are
    evicted (counted as wasted) instead of holding their slots."""
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(4, 1, 6)
    with torch.no_grad():
        reference = model(ids).logits
        with tiny_models.wrapped(model):
            model(ids)
            ex = moe_infer.executor(model)
            first = ex.layers[0]
            used = {e for e, c in enumerate(ex.stats()["layers"][first.layer_idx]["expert_counts"]) if c}
        wrong = [e for e in range(first.num_experts) if e not in used]
        assert wrong, "the test needs an expert layer 0 does not use"
        with tiny_models.wrapped(model, cpu_memory=4 * tiny_models.expert_bytes(model), cache_policy="expertflow"):
            ex = moe_infer.executor(model)
            ex.cache.prefetch(first.layer_idx, wrong[:2], scores=[0.9, 0.8])
            for _ in range(3):
                assert torch.equal(model(ids).logits, reference)
            stats = ex.stats()
            resident = set(ex.cache.resident())
    assert stats["prefetch"]["used"] == 0
    assert stats["prefetch"]["issued"] + stats["prefetch"]["cancelled"] == len(wrong[:2])
    assert stats["prefetch"]["wasted"] == stats["prefetch"]["issued"]  # all evicted unused
    assert not {(first.layer_idx, e) for e in wrong[:2]} & resident


def test_static_policy_keeps_its_hot_set(tiny_model):
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(5, 2, 10)
    with torch.no_grad():
        reference = model(ids).logits
        with tiny_models.wrapped(model, cpu_memory=3 * tiny_models.expert_bytes(model), cache_policy="static"):
            cache = moe_infer.executor(model).cache
            layers = moe_infer.executor(model).moe_layer_indices
            hot = cache.pin_popular({layers[0]: [0, 9, 0, 1, 0, 0, 0, 0], layers[1]: [5, 0, 0, 0, 0, 0, 0, 0]})
            assert hot == [(layers[0], 1), (layers[1], 0)]  # 2 hot + one slot for the rest
            for _ in range(2):
                assert torch.equal(model(ids).logits, reference)
                assert set(hot) <= set(cache.resident())


def test_routing_override_replays_the_trace(tiny_model):
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(6, 1, 16)
    rng = np.random.default_rng(0)
    trace_ids = np.stack([[rng.choice(8, 2, replace=False) for _ in range(2)] for _ in range(16)])
    trace = Trace.from_arrays(expert_ids=trace_ids, expert_weights=np.full(trace_ids.shape, 0.5, np.float32),
                              seq_ids=np.zeros(16, np.int32), positions=np.arange(16), token_ids=ids[0].numpy(),
                              num_experts=8, moe_layers=[0, 1])
    with torch.no_grad(), tiny_models.wrapped(model, routing_override=trace, cpu_memory=2 * tiny_models.expert_bytes(model)):
        model(ids)
        stats = moe_infer.executor(model).stats()
    for column, layer in enumerate(stats["layers"].values()):
        expected = np.bincount(trace_ids[:, column].reshape(-1), minlength=8).tolist()
        assert layer["expert_counts"] == expected


def test_split_misses_keeps_both_lanes_busy():
    cost = CostModel(copy_bytes_per_s=1e9, cpu_fixed_s=0.001, cpu_per_row_s=0.001)  # fetch: 10 ms
    fetch, cpu = split_misses({0: 1, 1: 1, 2: 1, 3: 50}, 10_000_000, cost)
    # the 50-row expert (51 ms on the CPU) is fetched; the CPU runs what fits beside the link
    assert 3 in fetch and cpu and set(fetch) | set(cpu) == {0, 1, 2, 3}
    fetch, cpu = split_misses({0: 1}, 10_000_000, CostModel(1e12, 0.001, 0.0))  # a fast link fetches
    assert (fetch, cpu) == ([0], [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (copy streams, pinned memory)")
def test_gpu_tier_with_pinned_host_tier(tiny_model):
    model = tiny_models.build("mixtral", 0).cuda()
    ids = tiny_models.token_ids(7, 2, 12).cuda()
    with torch.no_grad():
        reference = model(ids).logits
        nbytes = tiny_models.expert_bytes(model)
        # room for one layer's 8 experts on the GPU (nothing overflows to the CPU: exact), 12 pinned on the host
        with tiny_models.wrapped(model, gpu_memory=8 * nbytes, cpu_memory=12 * nbytes, cpu_compute="never"):
            for _ in range(2):
                assert torch.equal(model(ids).logits, reference)
            stats = moe_infer.executor(model).stats()
        assert 0 < stats["tiers"]["gpu"]["peak_bytes"] <= 8 * nbytes
        assert 0 < stats["tiers"]["cpu"]["peak_bytes"] <= 12 * nbytes and stats["tiers"]["cpu"]["hits"] > 0
        with tiny_models.wrapped(model, gpu_memory=2 * nbytes, cpu_compute="always"):
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "cuda"  # moved back by unwrap
