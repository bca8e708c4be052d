"""The reference MoE math (`experts.math`, `kernels.reference_moe`) against a dense oracle that
computes every expert for every token and then picks: a different algorithm, same answer."""

import pytest
import torch

from moe_infer.experts import Activation, ExpertTensors, expert_forward, group_by_expert
from moe_infer.kernels import reference_moe

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def dense_oracle(hidden, w13, w2, ids, weights, activation, b13=None, b2=None):
    """Every expert on every token in fp32, then the weighted pick of the routed ones."""
    h = hidden.float()
    gate_up = torch.einsum("th,eoh->teo", h, w13.float())  # [T, E, 2I]
    if b13 is not None:
        gate_up = gate_up + b13.float()
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.einsum("tei,ehi->teh", activation(gate, up), w2.float())  # [T, E, H]
    if b2 is not None:
        y = y + b2.float()
    num_experts = w13.shape[0]
    out = torch.zeros_like(h)
    for k in range(ids.shape[1]):
        valid = (ids[:, k] >= 0) & (ids[:, k] < num_experts)
        picked = y[torch.arange(len(ids)), ids[:, k].clamp(0, num_experts - 1)]
        out += torch.where(valid[:, None], picked * weights[:, k, None].float(), 0.0)
    return out


def make_case(T, E, K, H, I, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    b13 = torch.randn(E, 2 * I, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, H, generator=g).to(dtype) if bias else None
    return hidden, w13, w2, ids, weights, b13, b2


CASES = [  # (T, E, K, H, I)
    (1, 4, 2, 20, 12),    # decode: one token
    (7, 8, 2, 20, 12),    # odd sizes everywhere
    (33, 8, 1, 16, 8),    # K = 1
    (9, 4, 4, 16, 8),     # K = E: every expert for every token
    (3, 16, 2, 24, 10),   # E > T: most experts get no token
    (64, 1, 1, 8, 4),     # a single expert
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T, E, K, H, I", CASES)
def test_reference_matches_dense_oracle(T, E, K, H, I, dtype):
    hidden, w13, w2, ids, weights, _, _ = make_case(T, E, K, H, I, dtype, seed=T * 31 + E)
    silu = Activation("silu")
    got = reference_moe(hidden, w13, w2, ids, weights)
    assert got.dtype == dtype and got.shape == hidden.shape
    torch.testing.assert_close(got.float(), dense_oracle(hidden, w13, w2, ids, weights, silu), **TOLERANCES[dtype])


def test_ids_outside_range_are_skipped():
    hidden, w13, w2, ids, weights, _, _ = make_case(12, 6, 3, 16, 8, torch.float32, seed=1)
    ids[0, 0], ids[3, 1], ids[5, 2], ids[7] = -1, 6, 100, -1  # another rank's experts / no expert
    got = reference_moe(hidden, w13, w2, ids, weights)
    torch.testing.assert_close(got, dense_oracle(hidden, w13, w2, ids, weights, Activation("silu")))
    assert torch.count_nonzero(got[7]) == 0  # a token with no local expert gets nothing


def test_biases_and_gpt_oss_activation():
    act = Activation("gpt_oss", alpha=1.702, limit=7.0)
    hidden, w13, w2, ids, weights, b13, b2 = make_case(10, 4, 2, 16, 8, torch.float32, seed=2, bias=True)
    got = reference_moe(hidden, w13, w2, ids, weights, activation=act, b13=b13, b2=b2)
    torch.testing.assert_close(got, dense_oracle(hidden, w13, w2, ids, weights, act, b13, b2))


def test_gpt_oss_activation_clamps():
    act = Activation("gpt_oss", alpha=1.702, limit=7.0)
    gate = torch.tensor([100.0, -3.0])
    up = torch.tensor([100.0, -100.0])
    expected = (torch.tensor([7.0, -7.0]) + 1) * torch.tensor([7.0, -3.0]) * torch.sigmoid(
        torch.tensor([7.0, -3.0]) * 1.702)
    torch.testing.assert_close(act(gate, up), expected)


def test_interleaved_expert_equals_its_canonical_copy():
    g = torch.Generator().manual_seed(3)
    w13 = torch.randn(2 * 6, 10, generator=g)
    expert = ExpertTensors(w13, torch.randn(10, 6, generator=g), torch.randn(12, generator=g),
                           torch.randn(10, generator=g), interleaved=True)
    canonical = expert.canonical()
    assert not canonical.interleaved
    torch.testing.assert_close(canonical.w13[:6], w13[0::2])  # gate rows first
    x = torch.randn(5, 10, generator=g)
    act = Activation("gpt_oss")
    torch.testing.assert_close(expert_forward(x, expert, act), expert_forward(x, canonical, act))


def test_grouping_is_expert_major_and_stable():
    ids = torch.tensor([[2, 0], [0, 5], [2, 2], [-1, 1]])
    order, counts = group_by_expert(ids, num_experts=4)
    assert counts == [2, 1, 3, 0]
    assert order[:6].tolist() == [1, 2, 7, 0, 4, 5]  # slots of expert 0, 1, 2 in original order


def test_shape_errors_name_the_shapes():
    hidden, w13, w2, ids, weights, _, _ = make_case(4, 4, 2, 16, 8, torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"w13 \(4, 16, 16\)"):
        reference_moe(hidden, w13, w2[:, :, :4].contiguous().transpose(1, 2), ids, weights)
    with pytest.raises(ValueError, match="expert_weights"):
        reference_moe(hidden, w13, w2, ids, weights[:, :1])


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        Activation("swish2")


@pytest.mark.parametrize("resident", [True, False])
def test_non_resident_experts_are_held_one_at_a_time(resident):
    """A source whose experts are read per use (disk, backing tier) never has two of them alive at
    once inside `moe_forward`; resident experts are fetched once each. Same result either way."""
    import gc
    import weakref

    from moe_infer.experts import moe_forward

    hidden, w13, w2, ids, weights, _, _ = make_case(24, 6, 2, 16, 8, torch.float32, seed=5)
    alive, peak, calls = set(), [0], []

    class Source:
        def __call__(self, e):
            gc.collect()
            calls.append(e)
            gate_up, down = w13[e].clone(), w2[e].clone()
            alive.add(len(calls))
            weakref.finalize(gate_up, alive.discard, len(calls))  # the copy is gone once nothing holds it
            peak[0] = max(peak[0], len(alive))
            return ExpertTensors(gate_up, down)

        def is_resident(self, e):
            return resident

    out = moe_forward(hidden, ids, weights, Source(), 6, Activation("silu"))
    expected = reference_moe(hidden, w13, w2, ids, weights)
    assert torch.equal(out, expected)
    hit = len(set(ids.flatten().tolist()))
    if resident:
        assert len(calls) == hit
    else:
        assert len(calls) == 2 * hit and peak[0] == 1
