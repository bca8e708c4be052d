"""The slot-pool cache (issue 15): the fused kernels run on the pool with expert ids remapped to
slot ids, the kernel stats() reports is the one that ran, a converted checkpoint's experts are read
once per use, and memory is what the budgets say. The CUDA-only parts (page-locked slabs, copy
streams, the GPU tier) are at the end and skip without a GPU; the pool's indexing and remapping
run here on CPU tensors."""

from __future__ import annotations

import threading

import pytest
import torch

import moe_infer
import tiny_models
from moe_infer import kernels
from moe_infer.cache.pool import SlotLayout, SlotPool, pinned_bytes, slot_ids
from moe_infer.experts.convert import convert
from moe_infer.experts.math import ExpertTensors

pytestmark = pytest.mark.usefixtures("single_thread")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5)}
needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs Triton (its CPU interpreter runs here)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")




def random_expert(generator, hidden, inter, *, transposed=False, bias=False, interleaved=False) -> ExpertTensors:
    w13 = torch.randn(2 * inter, hidden, generator=generator)
    w2 = torch.randn(hidden, inter, generator=generator)
    if transposed:  # GPT-OSS keeps [H, 2I]: the canonical view is a transpose
        w13 = w13.t().contiguous().t()
    b13, b2 = (torch.randn(2 * inter, generator=generator), torch.randn(hidden, generator=generator)) if bias \
        else (None, None)
    return ExpertTensors(w13, w2, b13, b2, interleaved=interleaved)


@pytest.mark.parametrize("transposed, bias", [(False, False), (True, True)])  # plain; GPT-OSS-like strides, biases
def test_pool_slots_hold_experts_and_the_stacked_view_indexes_them(transposed, bias):
    """Experts written into arbitrary slots read back bit-exact through both a slot's view and the
    stacked [S, ...] view, with the template's strides; the slab is exactly slots x slot bytes."""
    g = torch.Generator().manual_seed(0)
    experts = [random_expert(g, 16, 12, transposed=transposed, bias=bias) for _ in range(4)]
    layout = SlotLayout.compact(experts[0])
    pool = SlotPool("cpu", "cpu", {3: layout}, budget_bytes=3 * layout.nbytes + 5)
    assert pool.num_slots == 3 and pool.nbytes == 3 * pool.slot_bytes <= 3 * layout.nbytes + 5
    placed = {}
    for e in (2, 0, 3):
        slot, wait = pool.take()
        assert wait is None
        view = pool.view(3, slot)
        for name in ("w13", "w2", "b13", "b2"):
            if getattr(view, name) is not None:
                assert getattr(view, name).stride() == getattr(experts[e], name).stride()
                getattr(view, name).copy_(getattr(experts[e], name))
        placed[e] = slot
    assert pool.free_slots() == 0
    stacked = pool.stacked(3)
    for e, slot in placed.items():
        assert torch.equal(stacked.w13[slot], experts[e].w13) and torch.equal(stacked.w2[slot], experts[e].w2)
        assert torch.equal(pool.view(3, slot).w13, experts[e].w13)
        if bias:
            assert torch.equal(stacked.b13[slot], experts[e].b13) and torch.equal(stacked.b2[slot], experts[e].b2)
    pool.give(placed[0])
    with pytest.raises(AssertionError, match="given back twice"):
        pool.give(placed[0])


def test_slot_ids_remap_experts_and_skip_what_is_not_in_the_pool():
    slot_of = torch.tensor([4, -1, 0, 2], dtype=torch.int32)  # expert 1 is not in the pool
    ids = torch.tensor([[0, 1], [3, 2], [-1, 4]])  # -1 and 4 (= E): no expert
    assert slot_ids(slot_of, ids).tolist() == [[4, -1], [2, 0], [-1, -1]]


def test_the_pool_computes_the_layer_the_experts_compute():
    """reference_moe over the stacked pool with slot ids equals reference_moe over the experts
    themselves with expert ids: the remap and the strides are right (the same check the fused
    kernels run on the pool, in torch)."""
    g = torch.Generator().manual_seed(1)
    experts = [random_expert(g, 32, 24) for _ in range(6)]
    layout = SlotLayout.compact(experts[0])
    pool = SlotPool("cpu", "cpu", {0: layout}, budget_bytes=8 * layout.nbytes)
    slot_of = torch.full((6,), -1, dtype=torch.int32)
    for e in (5, 1, 3, 0, 2, 4):
        slot, _ = pool.take()
        pool.view(0, slot).w13.copy_(experts[e].w13)
        pool.view(0, slot).w2.copy_(experts[e].w2)
        slot_of[e] = slot
    hidden = torch.randn(9, 32, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=g)
    stacked = pool.stacked(0)
    got = kernels.reference_moe(hidden, stacked.w13, stacked.w2, slot_ids(slot_of, ids), weights)
    expected = kernels.reference_moe(hidden, torch.stack([x.w13 for x in experts]),
                                     torch.stack([x.w2 for x in experts]), ids, weights)
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


@needs_triton
@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])  # transposed, interleaved, biases; shared experts
def test_fused_pool_on_other_layouts(tiny_model, family):
    model = tiny_model(family)
    ids = tiny_models.token_ids(5, 1, 5)
    with torch.no_grad():
        reference = model(ids).logits
        with tiny_models.wrapped(model, kernel="triton", cpu_memory=6 * tiny_models.expert_bytes(model),
                                 cpu_compute="never", loader="ring"):
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
            stats = moe_infer.executor(model).stats()
    assert stats["kernel"] == "triton" and stats["kernel_calls"]["torch"] == 0


@needs_triton
def test_a_budgeted_model_runs_the_fused_kernels_on_the_pool_and_says_so(tiny_model):
    """kernel="triton" with a cache: every layer call is one fused launch pair over the pool
    (stats' kernel is the kernel that ran: before the pool the cache computed per-expert torch
    matmuls while stats() said "triton"); the outputs match the unlimited torch run."""
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(0, 1, 6)
    with torch.no_grad():
        reference = model(ids).logits
        budget = 5 * tiny_models.expert_bytes(model)
        with tiny_models.wrapped(model, kernel="triton", cpu_memory=budget, cpu_compute="never"):
            ex = moe_infer.executor(model)
            for _ in range(2):
                torch.testing.assert_close(model(ids).logits, reference, **TOLERANCE[torch.float32])
            stats = ex.stats()
        with tiny_models.wrapped(model, kernel="torch", cpu_memory=budget):
            model(ids)
            torch_stats = moe_infer.executor(model).stats()
    calls = 2 * len(ex.layers)
    assert stats["kernel"] == "triton" and stats["kernel_calls"] == {"torch": 0, "triton": calls}
    assert all(layer.stats.kernel_calls == {"triton": 2} for layer in ex.layers)
    assert stats["host_reads"] == calls  # one read of the experts a layer call uses, nothing per expert
    assert torch_stats["kernel"] == "torch" and torch_stats["kernel_calls"]["triton"] == 0


@needs_triton
def test_a_fully_resident_layer_reads_nothing_back(tiny_model):
    """Room for every expert: once warm, a layer call is a fused launch with nothing read back to the
    host (no synchronisation); hits are still counted, from the counts left on the device."""
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(6, 1, 8)
    with torch.no_grad():
        reference = model(ids).logits
        budget = 16 * tiny_models.expert_bytes(model)  # 2 layers x 8 experts
        with tiny_models.wrapped(model, kernel="triton", cpu_memory=budget, cpu_compute="never"):
            ex = moe_infer.executor(model)
            ex.cache.prefetch(0, list(range(8)))
            ex.cache.prefetch(1, list(range(8)))
            model(ids)  # cold: misses read back
            ex.reset_stats()
            for _ in range(2):
                torch.testing.assert_close(model(ids).logits, reference, **TOLERANCE[torch.float32])
            stats = ex.stats()
            used = sum(layer.stats.expert_loads for layer in ex.layers)  # experts used, per layer call
    assert stats["host_reads"] == 0 and stats["kernel_calls"]["triton"] == 2 * len(ex.layers)
    assert stats["tiers"]["cpu"]["hits"] == used > 0 and stats["tiers"]["cpu"]["misses"] == 0


@needs_triton
def test_fused_pool_with_overflow_to_the_backing(tiny_model):
    """A budget of 1 expert: a call's other experts run from the backing beside the fused launch
    over the one slot; the sum is the layer's output."""
    model = tiny_model("mixtral")
    ids = tiny_models.token_ids(1, 1, 5)
    with torch.no_grad():
        reference = model(ids).logits
        budget = tiny_models.expert_bytes(model)
        with tiny_models.wrapped(model, kernel="triton", cpu_memory=budget, cpu_compute="never"):
            torch.testing.assert_close(model(ids).logits, reference, **TOLERANCE[torch.float32])
            stats = moe_infer.executor(model).stats()
    assert stats["cpu_computed_experts"] > 0 and stats["kernel_calls"]["triton"] > 0
    assert stats["tiers"]["cpu"]["peak_bytes"] <= stats["tiers"]["cpu"]["budget_bytes"]


def test_stats_report_where_memory_went(tiny_model):
    model = tiny_model("mixtral")
    nbytes = tiny_models.expert_bytes(model)
    with torch.no_grad(), tiny_models.wrapped(model, cpu_memory=3 * nbytes + 7):
        model(tiny_models.token_ids(2, 1, 4))
        stats = moe_infer.executor(model).stats()
    memory, tier = stats["memory"], stats["tiers"]["cpu"]
    assert memory["cpu_pool_bytes"] == tier["pool_bytes"] == 3 * tier["slot_bytes"] <= 3 * nbytes + 7
    assert memory["staging_bytes"] == 0 and memory["pinned_bytes"] == pinned_bytes()
    assert memory["peak_rss_bytes"] >= memory["rss_bytes"] > 0


# -- one read per expert and forward: the held-out check of issue 15 ----------------------------
@pytest.fixture(scope="module")
def converted_tiny_mixtral(tmp_path_factory):
    from moe_infer import assets

    out = tmp_path_factory.mktemp("tiny-mixtral") / "converted"
    convert(assets.path("tiny-mixtral"), out)
    return out


def heldout_prompts(count: int, length: int) -> list[torch.Tensor]:
    from moe_infer.traces.corpus import is_heldout, stdlib_files

    _, files = stdlib_files()
    texts = [path.read_bytes() for rel, path in files if is_heldout(rel)]
    texts = [t for t in texts if len(t) >= length][:count]
    assert len(texts) == count, "the stdlib has too few held-out files"
    return [torch.tensor([list(t[:length])]) for t in texts]


@pytest.mark.parametrize("budget_share", [None, 0.25])  # no budget (StoreExperts), a quarter of the experts
def test_each_forward_reads_each_expert_it_uses_once(converted_tiny_mixtral, budget_share):
    """Bytes read from disk per forward <= 1.05 x the bytes of the distinct experts that forward
    used, and logits equal to the in-memory model's. Before: 2.00x without a budget (each expert
    read once per projection)."""
    from moe_infer.models import load_model

    memory_model, _ = load_model("tiny-mixtral", device="cpu", dtype="float32")
    probe = moe_infer.load(converted_tiny_mixtral)
    ex = moe_infer.executor(probe)
    nbytes = ex.layers[0].expert_source.expert_nbytes()
    store = ex.layers[0].expert_source.store
    all_experts = sum(layer.num_experts for layer in ex.layers)
    if budget_share is not None:
        ex.close()
        probe = moe_infer.load(converted_tiny_mixtral, cpu_memory=int(budget_share * all_experts * nbytes))
        ex = moe_infer.executor(probe)
        store = ex.layers[0].expert_source.store
        assert ex.cache is not None
    try:
        for prompt in heldout_prompts(3, 48):
            with torch.no_grad():
                expected = memory_model(prompt).logits
                ex.reset_stats()
                before = store.bytes_read
                got = probe(prompt).logits
            used = sum(layer["experts_used"] for layer in ex.stats()["layers"].values())
            read = store.bytes_read - before
            assert torch.equal(got, expected)
            assert 0 < read <= 1.05 * used * nbytes, (read, used * nbytes)
    finally:
        ex.close()


def test_the_cost_model_times_the_fetch_path_the_cache_takes(converted_tiny_mixtral):
    """`fetch_once` is one miss's path (a store read into a staging buffer, then the copy): the
    cost model times it instead of a copy from pinned memory (on CPU here, on CUDA at start-up)."""
    from moe_infer.cache.cpu_compute import CostModel

    model = moe_infer.load(converted_tiny_mixtral, cpu_memory="1MiB")
    ex = moe_infer.executor(model)
    try:
        cache, store = ex.cache, ex.layers[0].expert_source.store
        before = store.bytes_read
        first = cache.layer_order[0]
        cost = CostModel.measure(cache.templates[first], cache.backing.activation(first), cache.device, repeats=3,
                                 fetch=cache.fetch_once)
        assert store.bytes_read - before == 4 * store.stored_nbytes(first)  # warm-up + 3 timed fetches
        assert cost.copy_bytes_per_s > 0 and cost.cpu_per_row_s >= 0
        assert cache.memory()["staging_bytes"] > 0  # the loader's staging ring was what it used
    finally:
        ex.close()


# -- CUDA: the GPU tier, page-locked memory, copy streams -----------------------------------------
@needs_cuda
def test_default_gpu_config_with_cpu_compute_auto(tiny_model):
    """gpu_memory alone, cpu_compute="auto" (the default): the fused kernels on the pool, misses on
    the link or the CPU as the measured cost model says; outputs close to the GPU's own."""
    model = tiny_models.build("mixtral", 0).cuda()
    ids = tiny_models.token_ids(7, 2, 12).cuda()
    with torch.no_grad():
        reference = model(ids).logits
        nbytes = tiny_models.expert_bytes(model)
        before = pinned_bytes()
        with tiny_models.wrapped(model, gpu_memory=3 * nbytes):
            for _ in range(2):
                torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
            stats = moe_infer.executor(model).stats()
            all_experts = sum(l.num_experts for l in moe_infer.executor(model).layers) * nbytes
            # no cpu_memory: the backing is page-locked exactly (one registered slab, no rounding)
            assert pinned_bytes() - before <= all_experts + 64 * 2 * len(moe_infer.executor(model).layers) \
                + stats["memory"]["staging_bytes"]
        assert pinned_bytes() == before  # unwrap unregistered it
    assert stats["kernel"] == "triton" and stats["kernel_calls"]["triton"] > 0
    assert stats["tiers"]["gpu"]["peak_bytes"] <= 3 * nbytes


@needs_cuda
def test_pinned_memory_stays_within_cpu_memory(tiny_model):
    """gpu_memory + cpu_memory on an in-memory model: the backing stays pageable; pinned memory is
    the host tier's slab plus the staging buffers (at most CopyEngine.STAGING_BUFFERS slots)."""
    from moe_infer.cache.loader import CopyEngine

    model = tiny_models.build("mixtral", 0).cuda()
    ids = tiny_models.token_ids(8, 1, 10).cuda()
    nbytes = tiny_models.expert_bytes(model)
    before = pinned_bytes()
    fields = dict(gpu_memory=2 * nbytes, cpu_memory=5 * nbytes, cpu_compute="never")
    with torch.no_grad(), tiny_models.wrapped(model, **fields):
        model(ids)
        stats = moe_infer.executor(model).stats()
        pinned = pinned_bytes() - before
    slot = stats["tiers"]["gpu"]["slot_bytes"]
    assert pinned <= 5 * nbytes + CopyEngine.STAGING_BUFFERS * slot
    assert stats["tiers"]["cpu"]["pool_bytes"] <= 5 * nbytes


@needs_cuda
@pytest.mark.parametrize("fields", [dict(loader="ring", cpu_compute="never"), dict(cpu_compute="never")])
def test_store_backed_model_on_cuda(converted_tiny_mixtral, fields):
    """A converted checkpoint on the GPU tier: disk reads land in pinned staging buffers and go to
    the pool by one async copy each; the ring loader streams whole layers."""
    unlimited = moe_infer.load(converted_tiny_mixtral, device="cuda")
    ids = heldout_prompts(1, 32)[0].cuda()
    with torch.no_grad():
        reference = unlimited(ids).logits
    nbytes = moe_infer.executor(unlimited).layers[0].expert_source.expert_nbytes()
    moe_infer.executor(unlimited).close()
    model = moe_infer.load(converted_tiny_mixtral, device="cuda", gpu_memory=16 * nbytes, **fields)
    ex = moe_infer.executor(model)
    try:
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
        stats = ex.stats()
    finally:
        ex.close()
    assert stats["tiers"]["gpu"]["peak_bytes"] <= 16 * nbytes and stats["kernel"] == "triton"
    assert stats["memory"]["staging_bytes"] > 0
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-infer")]


@needs_cuda
def test_host_slab_is_registered_exactly():
    from moe_infer.cache.pool import HostSlab

    before = pinned_bytes()
    slab = HostSlab(3 * 2**20 + 5, pin=True)
    assert pinned_bytes() - before == 3 * 2**20 + 5 and slab.tensor.is_pinned()
    slab.close()
    assert pinned_bytes() == before

