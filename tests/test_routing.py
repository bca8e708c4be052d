"""Routing adapters (`moe_infer.routing.adapters`) against each family's own router module.

Exact comparison: the same expert ids in the same order, and the same weights in the same dtype, bit
for bit, because the executor sums each token's K expert outputs in id order and any difference
would change the model's outputs. Random hidden states of several scales; constructed ties (equal
router rows, equal bias entries, all-zero tokens) where top-k tie-breaking decides; and the safety
net: a router that `wrap` cannot reproduce is refused and the model left untouched.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral import modeling_mixtral

import moe_infer
from moe_infer.families import find_moe_blocks
from moe_infer.layer import MoELayer
from tiny_models import CASES, TINY_MODELS, build, token_ids

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_TOKENS = 257  # not a multiple of any block size
SEEDS = range(8)
SCALES = (0.25, 1.0, 4.0, 16.0)  # flat to peaked router distributions
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def moe_layers(model) -> list[MoELayer]:
    """An executor layer per MoE block, built beside the model (the model itself is not changed)."""
    return [MoELayer(found, getattr(model.config, "hidden_act", None)) for found in find_moe_blocks(model)]


def hidden_states(layer: MoELayer, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(NUM_TOKENS, layer.expert_source.hidden_size, generator=generator)
    return (hidden * SCALES[seed % len(SCALES)]).to(dtype)


def assert_same_routing(layer: MoELayer, hidden: torch.Tensor):
    """The adapter's routing equals the router module's output exactly; returns the router output."""
    with torch.no_grad():
        expected_logits, expected_weights, expected_ids = layer.family_router_output(hidden)
        routing = layer.route(hidden)
    assert torch.equal(routing.expert_ids, expected_ids), "expert ids (or their order) differ"
    assert routing.expert_weights.dtype == expected_weights.dtype
    assert torch.equal(routing.expert_weights, expected_weights), (
        f"weights differ by up to {(routing.expert_weights - expected_weights).abs().max().item():.3g}"
    )
    assert routing.router_logits.dtype == expected_logits.dtype
    assert torch.equal(routing.router_logits, expected_logits)
    return expected_logits, expected_weights, expected_ids


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPES.get)
@pytest.mark.parametrize("name", CASES)
def test_adapter_matches_family_router(tiny_model, name, dtype):
    model = tiny_model(name, 0, dtype)
    layers = moe_layers(model)
    assert [layer.layer_idx for layer in layers] == list(TINY_MODELS[name].moe_layers)
    for layer in layers:
        for seed in SEEDS:
            assert_same_routing(layer, hidden_states(layer, seed, dtype))


# ---------------------------------------------------------------------------------------------- ties


def _routing_tensors(layer: MoELayer) -> list[torch.Tensor]:
    """The router weight [E, H] and every bias over the experts the adapter reads (live tensors)."""
    tensors = [layer.adapter.weight()]
    bias = getattr(layer.adapter, "bias", None)
    if bias is not None and bias() is not None:
        tensors.append(bias())
    return tensors


@torch.no_grad()
def make_ties(layer: MoELayer) -> None:
    """Experts E/2.. copy experts 0..E/2-1 (so whole groups tie, in DeepSeek's grouped top-k too) and
    expert 1 copies expert 0: expert scores tie exactly, in every family's arithmetic."""
    num_experts = layer.num_experts
    half = num_experts // 2
    for tensor in _routing_tensors(layer):
        assert tensor.shape[-1] == num_experts or tensor.shape[0] == num_experts, tuple(tensor.shape)
        rows = tensor if tensor.shape[0] == num_experts else tensor.transpose(0, -1)  # experts first
        rows[1] = rows[0]
        rows[half:] = rows[:half].clone()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPES.get)
@pytest.mark.parametrize("name", CASES)
def test_adapter_matches_family_router_with_ties(name, dtype):
    model = build(name, 0, dtype)  # its weights are changed: not the shared model
    half = None
    for layer in moe_layers(model):
        make_ties(layer)
        half = layer.num_experts // 2
        for seed in SEEDS:
            hidden = hidden_states(layer, seed, dtype)
            hidden[::16] = 0  # every expert scores the same (up to its bias)
            hidden[1::16] = hidden[2::16]  # identical tokens
            logits, _, _ = assert_same_routing(layer, hidden)
            tied = [0, 1, half, half + 1]
            assert all(torch.equal(logits[:, tied[0]], logits[:, e]) for e in tied), "the ties were not built"


def test_deepseek_v3_grouped_topk_with_tied_groups():
    """Both groups identical and expert 1 == expert 0: the group choice and the expert choice are
    both decided by tie-breaking, and the selection still respects topk_group."""
    model = build("deepseek_v3", 3)
    for layer in moe_layers(model):
        make_ties(layer)
        config = model.config
        assert config.n_group == 2 and config.topk_group == 1 and config.routed_scaling_factor == 2.5
        assert layer.router.e_score_correction_bias.abs().min() > 0
        group_size = layer.num_experts // config.n_group
        for seed in SEEDS:
            hidden = hidden_states(layer, seed, torch.float32)
            hidden[::4] = 0
            _, weights, ids = assert_same_routing(layer, hidden)
            groups = ids // group_size
            assert (groups == groups[:, :1]).all(), "topk_group=1: a token's experts must share one group"
            torch.testing.assert_close(weights.sum(-1), torch.full((NUM_TOKENS,), 2.5), rtol=1e-6, atol=1e-6)


def test_deepseek_v2_group_limited_greedy_is_not_renormalised():
    model = build("deepseek_v2_group_limited", 4)
    for layer in moe_layers(model):
        router = layer.router
        assert router.topk_method == "group_limited_greedy" and router.num_group == 4 and router.topk_group == 2
        group_size = layer.num_experts // router.num_group
        for seed in SEEDS:
            logits, weights, ids = assert_same_routing(layer, hidden_states(layer, seed, torch.float32))
            assert all(len(set(row.tolist())) <= 2 for row in ids // group_size), "more than topk_group groups"
            expected = torch.softmax(logits, dim=-1).gather(1, ids) * float(router.routed_scaling_factor)
            torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)


def test_phimoe_sparsemixer_weights_are_not_a_distribution():
    model = build("phimoe", 5)
    for layer in moe_layers(model):
        assert layer.adapter.name == "sparsemixer" and layer.router.router_jitter_noise > 0
        for seed in SEEDS:
            _, weights, ids = assert_same_routing(layer, hidden_states(layer, seed, torch.float32))
            assert (ids[:, 0] != ids[:, 1]).all()
            assert not torch.allclose(weights.sum(-1), torch.ones(NUM_TOKENS))


# ------------------------------------------------------------------------------------- routing biases

BIASED = [name for name in CASES if name in {
    "gpt_oss", "ernie4_5_moe", "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe",
    "minimax_m2", "lfm2_moe",
}]


@pytest.mark.parametrize("name", BIASED)
def test_routing_bias_is_read_and_matters(name):
    """The randomised bias changes the selection of some tokens (so the comparisons above would see a
    dropped bias), and the adapter follows the live tensor when it changes."""
    model = build(name, 6)
    layer = moe_layers(model)[0]
    bias = _routing_tensors(layer)[1]
    assert bias.abs().min() > 0
    hidden = hidden_states(layer, 1, torch.float32)
    _, _, ids_with_bias = assert_same_routing(layer, hidden)
    with torch.no_grad():
        bias.zero_()
    _, _, ids_without_bias = assert_same_routing(layer, hidden)
    assert not torch.equal(ids_with_bias, ids_without_bias)


def test_lfm2_without_expert_bias_routes_on_scores():
    model = build("lfm2_moe_no_bias", 7)
    for layer in moe_layers(model):
        assert not layer.original.use_expert_bias and layer.adapter.bias() is None
        for seed in SEEDS:
            assert_same_routing(layer, hidden_states(layer, seed, torch.float32))


# ------------------------------------------------------------------------- the verification safety net


class _MixtralRouterVariant(modeling_mixtral.MixtralTopKRouter):
    """A router that `wrap` would take for Mixtral's (same class name, see `_renamed`) but that
    routes differently."""

    change = "none"

    def forward(self, hidden_states):
        logits, weights, ids = super().forward(hidden_states)
        if self.change == "not_renormalised":
            probs = torch.softmax(logits.float(), dim=-1)
            weights = probs.gather(1, ids)
        elif self.change == "other_experts":
            ids = (ids + 1) % self.num_experts
        elif self.change == "k_reversed":  # the same sum in exact arithmetic, not in floating point
            ids, weights = ids.flip(-1), weights.flip(-1)
        elif self.change == "weights_dtype":
            weights = weights.to(torch.bfloat16)
        return logits, weights, ids


def _renamed(change: str) -> type:
    return type("MixtralTopKRouter", (_MixtralRouterVariant,), {"change": change})


@pytest.mark.parametrize("change", ["not_renormalised", "other_experts", "k_reversed", "weights_dtype"])
def test_router_the_adapter_cannot_reproduce_is_refused(change):
    model = build("mixtral", 8)
    for found in find_moe_blocks(model):
        found.module.gate.__class__ = _renamed(change)
    ids = token_ids(14, 2, 9)
    modules_before = {name: id(module) for name, module in model.named_modules()}
    with torch.no_grad():
        logits_before = model(ids).logits
    with pytest.raises(moe_infer.UnsupportedModel, match="does not reproduce this router"):
        moe_infer.wrap(model)
    assert not moe_infer.is_wrapped(model)
    assert not any(isinstance(module, MoELayer) for module in model.modules())
    assert {name: id(module) for name, module in model.named_modules()} == modules_before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_before)


def test_faithful_router_subclass_is_accepted():
    """The control for the test above: the same subclass, routing unchanged, wraps and matches."""
    model = build("mixtral", 8)
    for found in find_moe_blocks(model):
        found.module.gate.__class__ = _renamed("none")
    ids = token_ids(14, 2, 9)
    with torch.no_grad():
        expected = model(ids).logits
        moe_infer.wrap(model)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
