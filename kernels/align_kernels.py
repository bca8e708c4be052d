"""Triton kernels of the token alignment (`align.py` launches them; nothing else lives here).

Shape legend: S = T*K (token, k) slots, E experts, E_PAD = next power of two >= E + 1 (one spare
bin for ids outside [0, E)), C = CHUNK slots per program, BM = BLOCK_M rows per GEMM block.

Three launches, no host synchronisation: per-chunk expert histograms, one program that turns them
into row offsets, and a scatter that writes every slot to its row; one launch when S <= C (decode).
A slot's row is stable: slots of one expert keep their original order, and expert segments are
padded to a multiple of BM.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_histogram_kernel(
    expert_ids_ptr, chunk_counts_ptr,
    num_slots, num_experts,
    CHUNK: tl.constexpr, E_PAD: tl.constexpr,
):
    """Grid (cdiv(S, C),): program p counts the slots of chunk p per expert.

    expert_ids [S] int32/int64; chunk_counts [num_chunks, E_PAD] int32 (bins >= E hold the skipped ids).
    """
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    in_range = offs < num_slots
    ids = tl.load(expert_ids_ptr + offs, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    bins = tl.where(valid, ids, num_experts).to(tl.int32)
    counts = tl.histogram(bins, E_PAD)
    # padding lanes past the last slot landed in bin E too; only bins < E are ever read
    tl.store(chunk_counts_ptr + pid * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit
def expert_offsets_kernel(
    chunk_counts_ptr, expert_counts_ptr, padded_bounds_ptr,
    num_chunks, num_experts,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK_TILE: tl.constexpr,
):
    """Grid (1,): turns chunk counts into the first row of each (chunk, expert) run, in place.

    chunk_counts [num_chunks, E_PAD] int32 -> padded_start[e] + slots of e in earlier chunks;
    expert_counts [E] int32 (slots per expert); padded_bounds [2, E_PAD] int32: padded start and
    end row of each expert's segment (segments are multiples of BLOCK_M; empty experts get none).
    """
    experts = tl.arange(0, E_PAD)
    is_expert = experts < num_experts
    carry = tl.zeros((E_PAD,), dtype=tl.int32)
    # pass 1: slots of each expert in earlier chunks (exclusive prefix over chunks)
    for c0 in range(0, num_chunks, CHUNK_TILE):
        rows = c0 + tl.arange(0, CHUNK_TILE)
        ptrs = chunk_counts_ptr + rows[:, None] * E_PAD + experts[None, :]
        row_ok = (rows < num_chunks)[:, None]
        tile = tl.load(ptrs, mask=row_ok, other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=row_ok)
        carry += tl.sum(tile, axis=0)
    counts = tl.where(is_expert, carry, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    tl.store(expert_counts_ptr + experts, counts, mask=is_expert)
    tl.store(padded_bounds_ptr + experts, padded_start)
    tl.store(padded_bounds_ptr + E_PAD + experts, padded_end)
    # pass 2 reads what other threads of this program stored in pass 1
    tl.debug_barrier()
    # pass 2: add each expert's segment start
    for c0 in range(0, num_chunks, CHUNK_TILE):
        rows = c0 + tl.arange(0, CHUNK_TILE)
        ptrs = chunk_counts_ptr + rows[:, None] * E_PAD + experts[None, :]
        row_ok = (rows < num_chunks)[:, None]
        tile = tl.load(ptrs, mask=row_ok, other=0)
        tl.store(ptrs, tile + padded_start[None, :], mask=row_ok)


@triton.jit
def scatter_rows_kernel(
    expert_ids_ptr, chunk_counts_ptr, expert_counts_ptr, padded_bounds_ptr,
    sorted_slot_ids_ptr, block_expert_ids_ptr,
    num_slots, num_experts, num_chunks, max_blocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_TILE: tl.constexpr,
):
    """Grid (max(num_chunks, E, cdiv(max_blocks, BLOCK_TILE)),): program p
    - writes the slots of chunk p to their rows: sorted_slot_ids[row] = slot (int32 [max_blocks*BM]);
    - fills the padding rows of expert p with the sentinel S;
    - writes block_expert_ids (int32 [max_blocks]) of blocks p*BLOCK_TILE.. : the expert owning the
      block, or -1 past the last used block (those blocks are skipped by the GEMMs).
    """
    pid = tl.program_id(0)
    # each block uses its own names: Triton types a name once per function
    if pid < num_chunks:
        lane = tl.arange(0, CHUNK)
        offs = pid * CHUNK + lane
        in_range = offs < num_slots
        ids = tl.load(expert_ids_ptr + offs, mask=in_range, other=-1)
        valid = in_range & (ids >= 0) & (ids < num_experts)
        slot_experts = tl.where(valid, ids, num_experts).to(tl.int32)
        # rank of a slot among the earlier slots of the same expert in this chunk (stable order)
        same_before = (slot_experts[:, None] == slot_experts[None, :]) & (lane[None, :] < lane[:, None])
        rank = tl.sum(same_before.to(tl.int32), axis=1)
        run_start = tl.load(chunk_counts_ptr + pid * E_PAD + slot_experts, mask=valid, other=0)
        tl.store(sorted_slot_ids_ptr + run_start + rank, offs.to(tl.int32), mask=valid)
    if pid < num_experts:
        start = tl.load(padded_bounds_ptr + pid)
        end = tl.load(padded_bounds_ptr + E_PAD + pid)
        count = tl.load(expert_counts_ptr + pid)
        pad_rows = start + count + tl.arange(0, BLOCK_M)
        sentinel = tl.full((BLOCK_M,), 0, tl.int32) + num_slots
        tl.store(sorted_slot_ids_ptr + pad_rows, sentinel, mask=pad_rows < end)
    if pid * BLOCK_TILE < max_blocks:
        experts = tl.arange(0, E_PAD)
        is_expert = experts < num_experts
        ends = tl.load(padded_bounds_ptr + E_PAD + experts, mask=is_expert, other=0)
        _store_block_owners(block_expert_ids_ptr, pid * BLOCK_TILE + tl.arange(0, BLOCK_TILE),
                            tl.where(is_expert, ends, 0), is_expert, max_blocks, BLOCK_M)


@triton.jit
def _store_block_owners(block_expert_ids_ptr, blocks, ends, is_expert, max_blocks, BLOCK_M: tl.constexpr):
    """block_expert_ids[blocks] = expert owning each block, -1 past the last used block.
    ends [E_PAD]: end row of each expert's padded segment (0 where not is_expert)."""
    block_start = (blocks * BLOCK_M)[:, None]
    # the owner of a block is the number of segments that end at or before its first row
    owner = tl.sum(((ends[None, :] <= block_start) & is_expert[None, :]).to(tl.int32), axis=1)
    owner = tl.where(blocks * BLOCK_M < tl.max(ends, axis=0), owner, -1)
    tl.store(block_expert_ids_ptr + blocks, owner, mask=blocks < max_blocks)


@triton.jit
def align_one_chunk_kernel(
    expert_ids_ptr, expert_counts_ptr, padded_bounds_ptr, sorted_slot_ids_ptr, block_expert_ids_ptr,
    num_slots, num_experts, max_blocks,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_TILE: tl.constexpr,
    ROW_TILE: tl.constexpr,
):
    """Grid (1,): the whole alignment in one launch when S <= CHUNK (decode). Same outputs as the
    three kernels above: sorted_slot_ids, block_expert_ids, expert_counts; padded_bounds is scratch."""
    lane = tl.arange(0, CHUNK)
    in_range = lane < num_slots
    ids = tl.load(expert_ids_ptr + lane, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < num_experts)
    slot_experts = tl.where(valid, ids, num_experts).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    is_expert = experts < num_experts
    counts = tl.where(is_expert, tl.histogram(slot_experts, E_PAD), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    tl.store(expert_counts_ptr + experts, counts, mask=is_expert)
    tl.store(padded_bounds_ptr + experts, padded_end - padded)
    for r0 in range(0, max_blocks * BLOCK_M, ROW_TILE):  # every row starts as padding
        rows = r0 + tl.arange(0, ROW_TILE)
        tl.store(sorted_slot_ids_ptr + rows, tl.full((ROW_TILE,), 0, tl.int32) + num_slots,
                 mask=rows < max_blocks * BLOCK_M)
    for b0 in range(0, max_blocks, BLOCK_TILE):
        _store_block_owners(block_expert_ids_ptr, b0 + tl.arange(0, BLOCK_TILE), tl.where(is_expert, padded_end, 0),
                            is_expert, max_blocks, BLOCK_M)
    # the segment starts just stored are read back per slot, and slot rows overwrite padding rows
    tl.debug_barrier()
    same_before = (slot_experts[:, None] == slot_experts[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(same_before.to(tl.int32), axis=1)
    run_start = tl.load(padded_bounds_ptr + slot_experts, mask=valid, other=0)
    tl.store(sorted_slot_ids_ptr + run_start + rank, lane.to(tl.int32), mask=valid)
