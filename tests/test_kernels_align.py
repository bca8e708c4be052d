"""Invariants of the token alignment (`kernels.align_block_size`), apart from the GEMM math.
Runs the Triton kernels in the CPU interpreter when there is no GPU (tests/conftest.py)."""

import pytest
import torch

from moe_infer.kernels import align_block_size
from moe_infer.kernels.align import CHUNK, max_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_alignment(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    alignment = align_block_size(expert_ids.to(DEVICE), num_experts, block_m)
    flat = expert_ids.reshape(-1)
    num_slots = flat.numel()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)
    sorted_slots = alignment.sorted_slot_ids.cpu()
    block_experts = alignment.block_expert_ids.cpu()
    assert block_experts.shape == (max_blocks(num_slots, num_experts, block_m),)
    assert sorted_slots.shape == (block_experts.numel() * block_m,)
    assert alignment.expert_counts.cpu().tolist() == counts.tolist()

    used = int(sum(-(-int(c) // block_m) for c in counts))  # blocks an expert needs, none for an empty one
    assert (block_experts[used:] == -1).all()
    row = 0
    for expert in range(num_experts):
        blocks = -(-int(counts[expert]) // block_m)
        assert (block_experts[row // block_m: row // block_m + blocks] == expert).all()
        segment = sorted_slots[row: row + blocks * block_m]
        slots = segment[: counts[expert]]
        # stable: the expert's slots in their original order, then sentinel padding
        assert slots.tolist() == torch.nonzero(flat == expert).flatten().tolist()
        assert (segment[counts[expert]:] == num_slots).all()
        row += blocks * block_m


CASES = [  # (T, K, E, block_m)
    (1, 1, 1, 16),     # one slot, one expert
    (1, 2, 8, 16),     # decode: most experts empty
    (5, 3, 4, 16),     # odd sizes
    (64, 2, 3, 16),    # S = CHUNK: the largest one-launch alignment
    (70, 3, 5, 16),    # S = 210 > CHUNK: three launches; runs of one expert span chunks
    (300, 2, 7, 64),   # several blocks per expert, several chunks
    (9, 8, 8, 32),     # K = E
    (4, 2, 256, 16),   # E = 256 > S
]


@pytest.mark.parametrize("T, K, E, block_m", CASES)
def test_alignment_invariants(T, K, E, block_m):
    g = torch.Generator().manual_seed(T * 7 + E)
    ids = torch.randint(0, E, (T, K), generator=g)
    check_alignment(ids, E, block_m)


@pytest.mark.parametrize("T", [CHUNK + 9, 9], ids=["three-launch path", "one-launch path (S <= CHUNK)"])
def test_ids_outside_range_get_no_row(T):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 6, (T, 2), generator=g)
    ids[0, 0], ids[3, 1], ids[7] = -1, 6, -5
    ids[T // 2, 1] = 2**40  # int64 beyond int32: skipped, not wrapped around
    check_alignment(ids, 6, 16)


def test_no_valid_id_uses_no_block():
    ids = torch.full((3, 2), -1, dtype=torch.int32)
    alignment = align_block_size(ids.to(DEVICE), 4, 16)
    assert (alignment.block_expert_ids.cpu() == -1).all()
    assert alignment.expert_counts.cpu().tolist() == [0, 0, 0, 0]


def test_bad_arguments():
    ids = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="power of two, got 24"):
        align_block_size(ids, 4, 24)
    with pytest.raises(TypeError, match="int32 or int64, got torch.float32"):
        align_block_size(ids.float(), 4, 16)
