"""The quantized-weight layout of `moe_infer.experts.quant`: packing, bounds, error, edge cases."""

import pytest
import torch

from moe_infer.experts.quant import (QuantScheme, dequantize, pack_int4, quantize, quantized_linear,
                                     unpack_int4)


def test_int4_packing_is_low_nibble_first_and_round_trips():
    values = torch.randint(0, 16, (3, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(values)
    assert packed.shape == (3, 5)
    assert torch.equal(packed[:, 0], values[:, 0] | (values[:, 1] << 4))
    assert torch.equal(unpack_int4(packed), values)


@pytest.mark.parametrize("in_features", [96, 128, 200])  # shorter than a group, one group, a short last group
def test_int4_error_and_ranges(in_features):
    w = torch.randn(2, 48, in_features, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize(w, QuantScheme("int4", 128))
    groups = -(-in_features // 128)
    assert q.qweight.shape == (2, 48, in_features // 2) and q.qweight.dtype == torch.uint8
    assert q.scales.shape == q.zeros.shape == (2, 48, groups)
    assert int(q.zeros.max()) <= 15
    # each weight is within half a step of its group's grid, or was clipped by the search
    error = (dequantize(q) - w).norm() / w.norm()
    assert 0.02 < error < 0.12
    assert error <= (dequantize(quantize(w, "int4", clip_search=False)) - w).norm() / w.norm() + 1e-6


def test_int8_is_symmetric_per_row():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    q = quantize(w, "int8")
    assert q.zeros is None and q.scales.shape == (32,) and q.qweight.dtype == torch.int8
    assert int(q.qweight.abs().max()) == 127
    assert (dequantize(q) - w).abs().max() <= q.scales.max() / 2 + 1e-6


def test_zero_and_constant_groups_are_exact():
    assert torch.equal(dequantize(quantize(torch.zeros(4, 128), "int4")), torch.zeros(4, 128))
    constant = torch.full((4, 128), 0.3)
    torch.testing.assert_close(dequantize(quantize(constant, "int4")), constant)


def test_quantized_linear_matches_the_dequantized_matmul():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    q = quantize(w, "int4")
    torch.testing.assert_close(quantized_linear(x, q), x @ dequantize(q).T)


def test_bad_schemes_are_refused():
    with pytest.raises(ValueError, match="int8"):
        QuantScheme("int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantScheme("int4", group_size=7)
    with pytest.raises(ValueError, match="even K"):
        quantize(torch.randn(4, 5), "int4")
