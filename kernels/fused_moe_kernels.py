"""Triton kernels of the fused MoE layer (`fused_moe.py` launches them; nothing else lives here).

Shape legend: T tokens, K top-k, S = T*K slots, E experts, H hidden, I intermediate,
R = max_blocks * BLOCK_M rows of the aligned layout (`align.py`), BM/BN/BK block sizes.

1. `gate_up_kernel`: act[R, I] = activation(x[token(r)] @ w_gate[e].T + b_gate, x @ w_up[e].T + b_up),
   rows gathered from the input through the aligned slot ids (no permuted copy of the input).
2. `down_kernel`: slot_out[S, H] = weight[slot] * (act[r] @ w2[e].T + b2), written at the row's slot.
3. `sum_topk_kernel`: out[T, H] = sum over k of slot_out[t*K + k] for the valid k, in order k = 0..K-1.
Every product accumulates in fp32; the K contributions are summed in a fixed order (no atomics),
so results are deterministic.

Both GEMMs multiply by their weight through `_dot_weight`, in one of three formats (constexpr WEIGHTS; the
layouts are those of `moe_infer.experts.quant`):
- FLOAT_WEIGHTS: the weight in hidden's dtype;
- INT8_WEIGHTS (w8a16): int8 values cast to the compute dtype (exact: |q| <= 127), and the per-row
  scale multiplied into the fp32 accumulator after the K loop (it is constant along K);
- INT4_WEIGHTS (w4a16): two values per byte (even k in the low nibble), dequantized in the tile as
  (q - zero) * scale in fp32 with the scale and zero point of each value's group of G along K, then
  cast to the compute dtype, which is what `quant.dequantize(w, dtype)` gives the reference.
  Every group size G works with every BLOCK_K >= 32 (a K tile is split into even and odd halves of
  BLOCK_K / 2 >= 16, the smallest dot): when G is a multiple of BLOCK_K (GROUP_PER_TILE) a K tile
  lies in one group and one scale and zero point per column are loaded; otherwise every value pair
  looks up its own group (a tile may span groups, or end in the short last group).
"""

from __future__ import annotations

import triton
import triton.language as tl

# activation codes (constexpr ACTIVATION); fused_moe.ACTIVATIONS maps names to them
SILU, GPT_OSS, GELU, GELU_TANH, RELU = 0, 1, 2, 3, 4
# weight formats (constexpr WEIGHTS); fused_moe.WEIGHT_FORMATS maps quantization schemes to them
FLOAT_WEIGHTS, INT8_WEIGHTS, INT4_WEIGHTS = 0, 1, 2


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
def _dot_weight(acc, x, w_cols, s_cols, z_cols, k0, k_size, col_ok, stride_wk, stride_sg, stride_zg, group_size,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHTS: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """acc [BM, BN] fp32 + x [BM, BK] @ W[k0 : k0 + BK, cols], W read in its format (module docstring).

    w_cols [BN]: pointers to each output column's weight row (its k = 0 value or byte); s_cols,
    z_cols [BN]: its int4 scale and zero point of group 0 (unused otherwise), groups stride_sg /
    stride_zg apart. int8 products come back unscaled (`_scale_rows` applies the row scale).
    int4 loads the packed bytes as one [BK/2, BN] tile, contiguous along K like the other formats,
    and multiplies the low nibbles with x's even columns and the high nibbles with its odd ones
    (a value pair shares its group since G is even): no shuffle of the weight tile."""
    if WEIGHTS == 2:
        pairs = tl.arange(0, BLOCK_K // 2)
        # K is even, so a pair is in or out; compared as byte index, the mask stays constant over the
        # runs Triton vectorises (and turns into asynchronous copies) like the other formats' loads
        byte_index = k0 // 2 + pairs
        mask = (byte_index < k_size // 2)[:, None] & col_ok[None, :]
        packed = tl.load(w_cols[None, :] + byte_index[:, None] * stride_wk, mask=mask, other=0).to(tl.int32)
        if GROUP_PER_TILE:  # the whole tile is in group k0 // G
            group = k0 // group_size
            scale = tl.load(s_cols + group * stride_sg, mask=col_ok, other=0.0)[None, :]
            zero = tl.load(z_cols + group * stride_zg, mask=col_ok, other=0).to(tl.int32)[None, :]
        else:  # a tile may span groups, or end in the short last one
            groups = ((k0 + 2 * pairs) // group_size)[:, None]
            scale = tl.load(s_cols[None, :] + groups * stride_sg, mask=mask, other=0.0)
            zero = tl.load(z_cols[None, :] + groups * stride_zg, mask=mask, other=0).to(tl.int32)
        # dequantized as quant.dequantize does: (q - zero) * scale in fp32, then the compute dtype
        w_even = (((packed & 0xF) - zero).to(tl.float32) * scale).to(x.dtype)
        w_odd = (((packed >> 4) - zero).to(tl.float32) * scale).to(x.dtype)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        acc = tl.dot(x_even, w_even, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_odd, w_odd, acc, input_precision=DOT_PRECISION)
    else:
        ks = tl.arange(0, BLOCK_K)
        mask = ((k0 + ks) < k_size)[:, None] & col_ok[None, :]
        w = tl.load(w_cols[None, :] + (k0 + ks)[:, None] * stride_wk, mask=mask, other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)  # int8: exact in fp16 / bf16
    return acc


@triton.jit
def _scale_rows(acc, s_ptrs, col_ok, WEIGHTS: tl.constexpr):
    """acc [BM, BN] times the int8 weight's per-row scale of each output column (s_ptrs [BN]); as is otherwise."""
    if WEIGHTS == 1:
        acc = acc * tl.load(s_ptrs, mask=col_ok, other=0.0)[None, :]
    return acc


@triton.jit
def gate_up_kernel(
    # pointers
    hidden_ptr, w_gate_ptr, w_up_ptr, s_gate_ptr, s_up_ptr, z_gate_ptr, z_up_ptr, b_gate_ptr, b_up_ptr,
    sorted_slot_ids_ptr, block_expert_ids_ptr, act_ptr,
    # sizes
    num_slots, hidden_size, intermediate_size, top_k, num_blocks_m, group_size,
    # strides
    stride_ht, stride_hh, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_ze, stride_zn,
    stride_zg, stride_be, stride_bn, stride_ar, stride_an,
    # activation parameters (GPT_OSS)
    alpha, limit,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, WEIGHTS: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr,
):
    """Grid (max_blocks * cdiv(I, BN),): one program owns rows [BM*b, BM*(b+1)) of one expert and
    intermediate columns [BN*n, BN*(n+1)), and computes both the gate and the up tile from one load of x.

    hidden [T, H]; w_gate, w_up: [E, I, H] views of w13 (any strides; int8 [E, I, H] or uint8
    [E, I, H/2] when quantized); s_gate, s_up: their scales, float32 [E, I] (int8) or [E, I, NG]
    (int4); z_gate, z_up: int4 zero points uint8 [E, I, NG]; b_gate, b_up [E, I];
    sorted_slot_ids int32 [R]; block_expert_ids int32 [max_blocks]; act [R, I] in hidden's dtype.
    Unused pointers (scales of float weights, biases without HAS_BIAS) may point anywhere.
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
    w_cols = expert * stride_we + cols.to(tl.int64) * stride_wn  # [BN] offsets of each column's weight row
    s_offs = expert * stride_se + cols.to(tl.int64) * stride_sn
    z_offs = expert * stride_ze + cols.to(tl.int64) * stride_zn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = (k0 + ks) < hidden_size
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc_gate = _dot_weight(acc_gate, x, w_gate_ptr + w_cols, s_gate_ptr + s_offs, z_gate_ptr + z_offs, k0,
                               hidden_size, col_ok, stride_wk, stride_sg, stride_zg, group_size,
                               BLOCK_M, BLOCK_K, WEIGHTS, GROUP_PER_TILE, DOT_PRECISION)
        acc_up = _dot_weight(acc_up, x, w_up_ptr + w_cols, s_up_ptr + s_offs, z_up_ptr + z_offs, k0,
                             hidden_size, col_ok, stride_wk, stride_sg, stride_zg, group_size,
                             BLOCK_M, BLOCK_K, WEIGHTS, GROUP_PER_TILE, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_hh

    acc_gate = _scale_rows(acc_gate, s_gate_ptr + s_offs, col_ok, WEIGHTS)
    acc_up = _scale_rows(acc_up, s_up_ptr + s_offs, col_ok, WEIGHTS)
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
    act_ptr, w2_ptr, s2_ptr, z2_ptr, b2_ptr, expert_weights_ptr, sorted_slot_ids_ptr, block_expert_ids_ptr,
    slot_out_ptr,
    # sizes
    num_slots, hidden_size, intermediate_size, num_blocks_m, group_size,
    # strides
    stride_ar, stride_ak, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sg, stride_ze, stride_zn,
    stride_zg, stride_be, stride_bn, stride_os, stride_on,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, WEIGHTS: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
):
    """Grid (max_blocks * cdiv(H, BN),): one program owns rows [BM*b, BM*(b+1)) of one expert and
    hidden columns [BN*n, BN*(n+1)); each valid row is scaled by its routing weight and stored at its slot.

    act [R, I]; w2 [E, H, I] (any strides; int8 [E, H, I] or uint8 [E, H, I/2] when quantized);
    s2 float32 [E, H] (int8) or [E, H, NG] (int4); z2 uint8 [E, H, NG] (int4); b2 [E, H];
    expert_weights [S] (any float dtype); slot_out [S, H] (promoted dtype of hidden and expert_weights).
    """
    expert, rows, slots, cols = _program_tile(block_expert_ids_ptr, sorted_slot_ids_ptr, num_blocks_m,
                                              hidden_size, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    row_ok = slots < num_slots
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_ak
    w_cols = w2_ptr + expert * stride_we + cols.to(tl.int64) * stride_wn  # [BN]: each column's weight row
    s_ptrs = s2_ptr + expert * stride_se + cols.to(tl.int64) * stride_sn
    z_ptrs = z2_ptr + expert * stride_ze + cols.to(tl.int64) * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, intermediate_size, BLOCK_K):
        a = tl.load(a_ptrs, mask=((k0 + ks) < intermediate_size)[None, :], other=0.0)
        acc = _dot_weight(acc, a, w_cols, s_ptrs, z_ptrs, k0, intermediate_size, col_ok, stride_wk, stride_sg,
                          stride_zg, group_size, BLOCK_M, BLOCK_K, WEIGHTS, GROUP_PER_TILE, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak

    acc = _scale_rows(acc, s_ptrs, col_ok, WEIGHTS)
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
