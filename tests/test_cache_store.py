"""The expert cache over a real converted checkpoint (the disk tier): `moe_infer.load(converted_dir,
cpu_memory=...)` computes what the unlimited load computes, under a hard CPU budget."""

from __future__ import annotations

import threading

import pytest
import torch

import moe_infer
import tiny_models
from moe_infer.cache.backing import StoreBacking
from moe_infer.cache.tiered import Tier
from moe_infer.experts.convert import convert

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random Mixtral and a tiny GPT-OSS (biases, interleaved gate/up), saved and converted."""
    dirs = {}
    for family in ("mixtral", "gpt_oss"):
        root = tmp_path_factory.mktemp(family)
        tiny_models.build(family, 0).save_pretrained(root / "hf")
        convert(root / "hf", root / "converted")
        dirs[family] = root / "converted"
    return dirs


@pytest.mark.parametrize("family, slots, fields", [
    ("mixtral", 1, dict(cache_policy="lru")),  # one expert of room
    ("mixtral", 3, dict(cache_policy="lfu", cpu_compute="always")),
    ("mixtral", 5, dict(loader="ring")),
    ("gpt_oss", 2, dict(cache_policy="expertflow")),
])
def test_converted_checkpoint_under_a_cpu_budget(converted, monkeypatch, family, slots, fields):
    seen = []
    real = Tier.charge

    def checked(self, entry):
        real(self, entry)
        seen.append((self.used_bytes, self.budget_bytes))

    monkeypatch.setattr(Tier, "charge", checked)
    ids = tiny_models.token_ids(0, 2, 10)
    unlimited = moe_infer.load(converted[family])
    with torch.no_grad():
        reference = unlimited(ids).logits
    nbytes = moe_infer.executor(unlimited).layers[0].expert_source.expert_nbytes()
    model = moe_infer.load(converted[family], cpu_memory=slots * nbytes, **fields)
    ex = moe_infer.executor(model)
    try:
        assert isinstance(ex.cache.backing, StoreBacking)
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model(ids).logits, reference)
        stats = ex.stats()
    finally:
        ex.close()
    assert stats["tiers"]["cpu"]["peak_bytes"] <= slots * nbytes
    assert all(used <= budget for used, budget in seen)
    disk = stats["tiers"]["disk"]
    # every byte read either filled the CPU tier or served an expert computed straight from the
    # store, and each of those reads its bytes once (a projection at a time: no more than one
    # projection is held beside the budget)
    assert disk["bytes_read"] == stats["tiers"]["cpu"]["bytes_moved"] + stats["cpu_computed_experts"] * nbytes
    if fields.get("cpu_compute") != "always":
        assert seen and stats["tiers"]["cpu"]["bytes_moved"] > 0
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-infer")]
