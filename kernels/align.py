"""Token alignment for the grouped GEMM: the (token, k) slots sorted by expert, each expert's segment
padded to the GEMM's BLOCK_M, and the expert of every block, computed on the device without a
host synchronisation (sizes are upper bounds known from the shapes alone).

Shape legend: T tokens, K top-k, S = T*K slots, E experts, BM = block_m.
Slot s is token s // K, choice s % K. Ids outside [0, E) belong to no expert and get no row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import align_kernels as kernels
from moe_infer.errors import ConfigError

CHUNK = 128  # slots per program of the histogram and scatter kernels
CHUNK_TILE = 32  # chunk rows per step of the offsets kernel
ROW_TILE = 1024  # rows per step when the one-launch path fills padding
BLOCK_TILE_ELEMENTS = 8192  # blocks x experts compared per program when writing block owners


@dataclass(frozen=True)
class Alignment:
    """Where every slot goes in the grouped GEMM.

    sorted_slot_ids int32 [max_blocks * BM]: the slot of each row; padding rows hold S.
    block_expert_ids int32 [max_blocks]: expert of each block of BM rows, -1 for unused blocks.
    expert_counts int32 [E]: slots routed to each expert.
    """

    sorted_slot_ids: Tensor
    block_expert_ids: Tensor
    expert_counts: Tensor
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert_ids.shape[0]


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the blocks used: every non-empty expert wastes less than one block."""
    return -(-num_slots // block_m) + min(num_slots, num_experts)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def align_block_size(expert_ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    """expert_ids [T, K] (int32/int64, any device Triton runs on) -> `Alignment` for blocks of block_m rows."""
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"align_block_size: expert_ids must be int32 or int64, got {expert_ids.dtype}")
    if block_m <= 0 or block_m & (block_m - 1):
        raise ConfigError(f"align_block_size: block_m must be a power of two, got {block_m}")
    if not 0 < num_experts <= 4096:
        raise ConfigError(f"align_block_size: num_experts must be in 1..4096, got {num_experts}")
    flat_ids = expert_ids.reshape(-1)  # [S], a copy only if expert_ids was not contiguous
    num_slots = flat_ids.numel()
    device = flat_ids.device
    e_pad = _next_pow2(num_experts + 1)
    num_chunks = max(-(-num_slots // CHUNK), 1)
    blocks = max(max_blocks(num_slots, num_experts, block_m), 1)
    block_tile = BLOCK_TILE_ELEMENTS // e_pad  # a power of two: e_pad <= 8192 since E <= 4096

    expert_counts = torch.empty((num_experts,), dtype=torch.int32, device=device)
    padded_bounds = torch.empty((2, e_pad), dtype=torch.int32, device=device)
    sorted_slot_ids = torch.empty((blocks * block_m,), dtype=torch.int32, device=device)
    block_expert_ids = torch.empty((blocks,), dtype=torch.int32, device=device)

    if num_chunks == 1:  # decode: one launch instead of three
        kernels.align_one_chunk_kernel[(1,)](
            flat_ids, expert_counts, padded_bounds, sorted_slot_ids, block_expert_ids,
            num_slots, num_experts, blocks,
            BLOCK_M=block_m, CHUNK=CHUNK, E_PAD=e_pad, BLOCK_TILE=block_tile, ROW_TILE=ROW_TILE,
        )
    else:
        chunk_counts = torch.empty((num_chunks, e_pad), dtype=torch.int32, device=device)
        kernels.chunk_histogram_kernel[(num_chunks,)](
            flat_ids, chunk_counts,
            num_slots, num_experts,
            CHUNK=CHUNK, E_PAD=e_pad,
        )
        kernels.expert_offsets_kernel[(1,)](
            chunk_counts, expert_counts, padded_bounds,
            num_chunks, num_experts,
            BLOCK_M=block_m, E_PAD=e_pad, CHUNK_TILE=CHUNK_TILE,
        )
        kernels.scatter_rows_kernel[(max(num_chunks, num_experts, -(-blocks // block_tile)),)](
            flat_ids, chunk_counts, expert_counts, padded_bounds,
            sorted_slot_ids, block_expert_ids,
            num_slots, num_experts, num_chunks, blocks,
            BLOCK_M=block_m, CHUNK=CHUNK, E_PAD=e_pad, BLOCK_TILE=block_tile,
        )
    return Alignment(sorted_slot_ids, block_expert_ids, expert_counts, block_m)
