"""Triton kernels of the fused MoE layer (`fused_moe.py` launches them; nothing else lives here).

Shape legend: T tokens, K top-k, S = T*K slots, E experts, H hidden, I intermediate,
R = max_blocks * BLOCK_M rows of the aligned layout (`align.py`), BM/BN/BK block sizes.

1. `gate_up_kernel`: act[R, I] = activation(x[token(r)] @ w_gate[e].T + b_gate, x @ w_up[e].T + b_up),
   rows gathered from the input through the aligned slot ids (no permuted copy of the input).
2. `down_kernel`: slot_out[S, H] = weight[slot] * (act[r] @ w2[e].T + b2), written at the row's slot.
3. `sum_topk_kernel`: out[T, H] = sum over k of slot_out[t*K + k] for the valid k, in order k = 0..K-1.
Every product accumulates in fp32; the K contributions are summed in a fixed order (no atomics),
so results are deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation codes (constexpr ACTIVATION); fused_moe.ACTIVATIONS maps names to them
SILU, GPT_OSS, GELU, GELU_TANH, RELU = 0, 1, 2, 3, 4


@triton.jit
def _program_tile(block_expert_ids_ptr, sorted_slot_ids_ptr, num_blocks_m, num_cols,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (expert (int64, -1 for an unused block), rows [BM] (int64), their slots [BM],
    output columns [BN]). GROUP_M blocks sit side by side in program order so that programs that
    run together share the weight tiles they load (L2 reuse)."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(num_cols, BLOCK_N)
    first_m = pid // per_group * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    block_m = first_m + (pid % per_group) % group_size
    tile_n = (pid % per_group) // group_size
    expert = tl.load(block_expert_ids_ptr + block_m).to(tl.int64)
    rows = block_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slot_ids_ptr + rows)  # in bounds even for unused blocks
    return expert, rows, slots, tile_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _activation(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """act(gate) * up in fp32; GPT_OSS is GPT-OSS's clamped SwiGLU: (clamp(up, -limit, limit) + 1) *
    clamp(gate, max=limit) * sigmoid(alpha * clamp(gate, max=limit))."""
    if ACTIVATION == 0:
        out = gate * tl.sigmoid(gate) * up
    elif ACTIVATION == 1:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    elif ACTIVATION == 2:
        out = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0)) * up  # tanh(x) = 2 sigmoid(2x) - 1
    else:
        out = tl.maximum(gate, 0.0) * up
    return out


@triton.jit
def gate_up_kernel(
    # pointers
    hidden_ptr, w_gate_ptr, w_up_ptr, b_gate_ptr, b_up_ptr, sorted_slot_ids_ptr, block_expert_ids_ptr, act_ptr,
    # sizes
    num_slots, hidden_size, intermediate_size, top_k, num_blocks_m,
    # strides
    stride_ht, stride_hh, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ar, stride_an,
    # activation parameters (GPT_OSS)
    alpha, limit,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (max_blocks * cdiv(I, BN),): one program owns rows [BM*b, BM*(b+1)) of one expert and
    intermediate columns [BN*n, BN*(n+1)), and computes both the gate and the up tile from one load of x.

    hidden [T, H]; w_gate, w_up: [E, I, H] views of w13 (any strides); b_gate, b_up [E, I];
    sorted_slot_ids int32 [R]; block_expert_ids int32 [max_blocks]; act [R, I] in hidden's dtype.
    """
    expert, rows, slots, cols = _program_tile(block_expert_ids_ptr, sorted_slot_ids_ptr, num_blocks_m,
                                              intermediate_size, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    row_ok = slots < num_slots
    tokens = (slots // top_k).to(tl.int64)
    col_ok = cols < intermediate_size
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = hidden_ptr + tokens[:, None] * stride_ht + ks[None, :] * stride_hh
    w_offs = expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = (k0 + ks) < hidden_size
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0)
        w_up = tl.load(w_up_ptr + w_offs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_hh
        w_offs += BLOCK_K * stride_wk

    if HAS_BIAS:
        b_offs = expert * stride_be + cols * stride_bn
        acc_gate += tl.load(b_gate_ptr + b_offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b_up_ptr + b_offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    act = _activation(acc_gate, acc_up, alpha, limit, ACTIVATION)
    act_ptrs = act_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_an
    # padding rows are written too (never read back as results); only columns are bounded
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def down_kernel(
    # pointers
    act_ptr, w2_ptr, b2_ptr, expert_weights_ptr, sorted_slot_ids_ptr, block_expert_ids_ptr, slot_out_ptr,
    # sizes
    num_slots, hidden_size, intermediate_size, num_blocks_m,
    # strides
    stride_ar, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_os, stride_on,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (max_blocks * cdiv(H, BN),): one program owns rows [BM*b, BM*(b+1)) of one expert and
    hidden columns [BN*n, BN*(n+1)); each valid row is scaled by its routing weight and stored at its slot.

    act [R, I]; w2 [E, H, I] (any strides); b2 [E, H]; expert_weights [S] (any float dtype);
    slot_out [S, H] (promoted dtype of hidden and expert_weights).
    """
    expert, rows, slots, cols = _program_tile(block_expert_ids_ptr, sorted_slot_ids_ptr, num_blocks_m,
                                              hidden_size, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    row_ok = slots < num_slots
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_ak
    w_ptrs = w2_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, intermediate_size, BLOCK_K):
        k_ok = (k0 + ks) < intermediate_size
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(b2_ptr + expert * stride_be + cols * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # round to the expert's dtype before weighting, as the reference does
    y = acc.to(act_ptr.dtype.element_ty).to(tl.float32)
    routing_weight = tl.load(expert_weights_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)
    y = y * routing_weight[:, None]
    out_ptrs = slot_out_ptr + slots.to(tl.int64)[:, None] * stride_os + cols[None, :] * stride_on
    tl.store(out_ptrs, y.to(slot_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def sum_topk_kernel(
    # pointers
    slot_out_ptr, expert_ids_ptr, out_ptr,
    # sizes
    num_tokens, hidden_size, num_experts,
    # strides
    stride_os, stride_on, stride_ot, stride_oh,
    # constexprs
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)): out[t] = sum_k slot_out[t*K + k] over the k whose
    expert id is in [0, E), k in increasing order, accumulated in fp32.

    slot_out [S, H]; expert_ids [S] int32/int64; out [T, H] in hidden's dtype.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < num_tokens
    col_ok = cols < hidden_size
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slots = tokens.to(tl.int64) * TOP_K + k
        ids = tl.load(expert_ids_ptr + slots, mask=token_ok, other=-1)
        valid = token_ok & (ids >= 0) & (ids < num_experts)
        part = tl.load(slot_out_ptr + slots[:, None] * stride_os + cols[None, :] * stride_on,
                       mask=valid[:, None] & col_ok[None, :], other=0.0)
        acc += part.to(tl.float32)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_ot + cols[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])
