"""sage8's attention kernel on Hopper, warp-specialised (Gluon).

It computes what `sage_attention.attend_reference` computes (int8 Q·Kᵀ, folded scores, P·V in e4m3 into a fresh
accumulator per key block; sage_attention.py's docstring), on the operands `sage_attention.quantize_operands`
writes with the keys in this kernel's order (`sage_attention.key_tokens`). The Triton-language kernel there runs
every warp through the same instruction stream, and Triton 3.6 does not warp-specialise it on sm_90
(bench/RESULTS.md, "the attention kernel's score conversion"). Here one program takes 128 queries of one head, in
three partitions:
- a loader warp: the two 64-query halves of Q once, then each key block's K and Vᵀ tiles through TMA into a ring
  of stages;
- two consumer warpgroups, a 64-query half each, with 240 registers a thread. Each issues block j's Q·Kᵀ with
  block j-1's P·V still running, waits on both, and runs block j's softmax; the other consumer's MMAs run during
  it. P goes to P·V's register operand without moving: the keys' order puts each thread's scores where that
  operand wants them.
Both consumers read every key block, so a stage goes back to the loader when both have released it.

What was tried and measured slower on an H200 (bench/RESULTS.md, 2026-12-04): the consumers taking turns to issue
their MMAs (FlashAttention-3's ping-pong); block j+1's Q·Kᵀ and block j-1's P·V running during block j's softmax,
with 64-key blocks so that the accumulators fit and P through shared memory (ptxas serialises every wgmma when a
register operand of one is in flight across the softmax); block j+1's Q·Kᵀ alone during the softmax, with P·V
after it in two 64-channel parts; P's row sums as a wgmma of P and ones (18% slower on an H100, 2026-12-05).
Built and tested, off because on an H100 they are within 1% of the default (2026-12-05 evening: 1.165-1.189 ms
against 1.176-1.190, the step unchanged at 183.5-183.9 ms): FlashAttention-3's schedule, block j-1's P·V under
block j's softmax with P through shared memory (`PV_DURING_SOFTMAX`, a 4-stage ring), and the consumers taking
turns through named barriers (`CONSUMERS_TAKE_TURNS`) in either schedule. Turns changing nothing means the two
consumers were not waiting on each other's MMAs: the softmax's instruction issue bounds the loop. Also slower, on
an H100 (2026-12-06, fifth session; the code at 914bb0d): the whole key blocks in a loop of their own, which lets
ptxas interleave the exp2s with the row sums and P's packing rather than issue the last 37 back to back (11% slower:
one consumer's exp2 run meeting the other's ALU work seems to be what the loop lives on); and one exp2 in four or two
on the FMA pipes by a cubic, FlashAttention-4's offload (9.5% and 14% slower on an H100, 2026-12-06 (fourth
session); the code at cc3b99d).
"""

from __future__ import annotations

import functools

import torch

from .gluon_hopper import (TensorDescriptor, fence_async_shared, gl, gluon, gluon_available, gluon_ready,  # noqa: F401
                           mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from .runtime import cdiv, launches

QUERY_ROWS = 64  # per consumer warpgroup: one 64-row wgmma
BLOCK_M = 2 * QUERY_ROWS
BLOCK_N = 128  # keys per block: sage8's k scales are per 128 keys (sage_attention.K_ROWS_FP8)
STAGES = 3  # block j-1's V is still read while block j's K arrives: two stages in use, one loading
# With PV_DURING_SOFTMAX block j-1's stage is held through block j's softmax: one more stage keeps a load ahead (an
# H100: 1.19 ms at 4 stages, 1.34 at 3, 1.89 at 2; bench/RESULTS.md 2026-12-05 (afternoon session)).
STAGES_PV_DURING_SOFTMAX = 4
# P's row sums on the tensor cores: P times a tile of ones (n = 8, wgmma's narrowest; shared memory and register
# tensors are powers of two, so the ones cannot widen P·V's own n to channels + 8), issued after P·V. It takes the
# softmax's 64 additions a thread per block off the issue slots, and sums P as P·V multiplies it (e4m3), so the
# output's weights add up to one (sage_attention.attend_reference(rounded_row_sums=True)). Off until timed on a
# GPU (bench/RESULTS.md, 2026-12-05 (morning)).
ROW_SUMS_ON_TENSOR_CORES = False
ONES_ROWS = 8
# FlashAttention-3's in-warpgroup overlap with P through shared memory: block j-1's P·V runs during block j's softmax
# (the consumer's own MMAs under its softmax, not only the other consumer's), and block j+1's Q·Kᵀ is issued before
# block j's P·V so that the scores can be waited on alone. P goes to a shared tile because a register operand in flight
# across the softmax makes ptxas serialise the kernel's wgmmas (bench/RESULTS.md, 2026-12-04). Within 1% of the
# default on an H100 (module docstring). Off.
PV_DURING_SOFTMAX = False
# The consumers take turns issuing their MMAs (FlashAttention-3's ping-pong), through hardware named barriers
# (bar.sync / bar.arrive; the 2026-12-04 turns were mbarriers, whose waits poll), in either schedule: left alone, the
# two consumers might run in step (they share every stage), their softmaxes and their MMAs coinciding. Timed on an
# H100 it changes nothing in either schedule (module docstring), so that is not what bounds the loop. Off.
CONSUMERS_TAKE_TURNS = False
# Named barriers of the turns: Triton's warp specialisation takes the lowest ids for its partitions.
_TURN_BARRIERS = (8, 9)
# 3 warpgroups (the loader's warp rounds up to one) x 128 threads share 64K registers: 168 a thread on average
# gives each consumer 240 and the loader's group 24.
_MAXNREG, _CONSUMER_REGISTERS, _LOADER_REGISTERS = 168, 240, 24


@gluon.jit
def _loader(q_desc, k_desc, v_desc, ones_desc, q_halves, k_ring, v_ring, ones, q_ready, kv_ready, kv_free, length_k,
            padded_q, padded_k, ROW_SUM_MMA: gl.constexpr, ABLATE: gl.constexpr):
    BLOCK_KEYS: gl.constexpr = k_desc.block_type.shape[0]
    CHANNELS: gl.constexpr = k_desc.block_type.shape[1]
    ROWS: gl.constexpr = q_desc.block_type.shape[0]
    STAGES: gl.constexpr = k_ring.type.shape[0]
    bh = gl.program_id(1)
    q_row = bh * padded_q + gl.program_id(0) * (2 * ROWS)
    if ROW_SUM_MMA:
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes + ones_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(ones_desc, [0, 0], q_ready, ones)
    else:
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_ready, q_halves.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + ROWS, 0], q_ready, q_halves.index(1))
    for block in range(gl.cdiv(length_k, BLOCK_KEYS)):
        stage = block % STAGES
        mbarrier.wait(kv_free.index(stage), ((block // STAGES) & 1) ^ 1)
        arrived = kv_ready.index(stage)
        if (ABLATE & 1) != 0 and block >= STAGES:
            mbarrier.arrive(arrived)
        else:
            mbarrier.expect(arrived, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [bh * padded_k + block * BLOCK_KEYS, 0], arrived,
                                            k_ring.index(stage))
            tma.async_copy_global_to_shared(v_desc, [bh * CHANNELS, block * BLOCK_KEYS], arrived, v_ring.index(stage))


TREE_ROWS = True
# A row's max and sum over the 32 values a thread holds of it: Triton's reduction combines them one after another,
# a chain of 16 VIMNMX3 / 32 FADD whose latency the consumer's warp waits out every block. Folding column c onto
# c + width/2 (the same thread's registers) four times first makes a tree of depth 4, with as many instructions.
# On an H100 the kernel went 1.163 -> 1.121-1.129 ms at the edit shape (bench/RESULTS.md, 2026-12-06 (fourth session)).


@gluon.jit
def _fold_halves(x, IS_MAX: gl.constexpr):
    rows: gl.constexpr = x.type.shape[0]
    half: gl.constexpr = x.type.shape[1] // 2
    upper, lower = gl.split(gl.permute(gl.reshape(x, [rows, 2, half]), [0, 2, 1]))
    if IS_MAX:
        return gl.maximum(upper, lower)
    else:
        return upper + lower


@gluon.jit
def _row_total(x, IS_MAX: gl.constexpr, TREE: gl.constexpr, rows_layout: gl.constexpr):
    if TREE:
        x = _fold_halves(_fold_halves(_fold_halves(_fold_halves(x, IS_MAX), IS_MAX), IS_MAX), IS_MAX)
    if IS_MAX:
        return gl.convert_layout(gl.max(x, axis=1), rows_layout)
    else:
        return gl.convert_layout(gl.sum(x, axis=1), rows_layout)


@gluon.jit
def _softmax(dots, q_factor, k_scale_ptr, block, row_max, length_k, BLOCK_KEYS: gl.constexpr,
             layout: gl.constexpr, TREE_ROWS: gl.constexpr):
    """One key block's P (float32, x 2**8) and new running row max, as attend_reference makes them: folded scores
    in whole blocks, converted and masked ones in a last, partial block."""
    start_n = block * BLOCK_KEYS
    factor = q_factor * gl.load(k_scale_ptr + block)
    if start_n + BLOCK_KEYS <= length_k:
        # sage_attention.SCORES_FOLDED: the int32 dot plus 1.5 * 2**23's bits is 1.5 * 2**23 + dot as a float32,
        # the bias taken off in the exponent's FFMA, the scale cut to 22 bits so that the bias times it is exact.
        factor = (factor.to(gl.int32, bitcast=True) & -4).to(gl.float32, bitcast=True)
        biased = (dots + 0x4B400000).to(gl.float32, bitcast=True)
        new_max = gl.maximum(row_max, _row_total(dots, True, TREE_ROWS, gl.SliceLayout(1, layout)).to(gl.float32)
                             * factor)
        bias = 12582912.0 * factor
        shift = bias + (new_max - 8.0)  # 8.0: sage_attention.P_EXPONENT
        new_max = (shift - bias) + 8.0  # the max the exponent really subtracts (Fast2Sum)
        p = gl.exp2(gl.fma(biased, gl.expand_dims(factor, 1), -gl.expand_dims(shift, 1)))
    else:
        # Column c holds the scores of the tile's token key_tokens(c) (sage_attention.key_tokens).
        columns = gl.arange(0, BLOCK_KEYS, layout=gl.SliceLayout(0, layout))
        tokens = start_n + ((columns & 0x71) | ((columns & 0x6) << 1) | ((columns & 0x8) >> 2))
        scores = gl.where(gl.expand_dims(tokens < length_k, 0), dots.to(gl.float32), float("-inf"))
        new_max = gl.maximum(row_max, gl.max(scores, axis=1) * factor)
        p = gl.exp2(scores * gl.expand_dims(factor, 1) - gl.expand_dims(new_max - 8.0, 1))
    return p, new_max


@gluon.jit
def _as_pv_operand(p, p_layout: gl.constexpr):
    """P [64, 128] as Q·Kᵀ's accumulator holds it -> e4m3 in P·V's register-operand layout, its columns in token
    order. Column c of P is the key stored at row c of the block's K tile, token key_tokens(c) (sage_attention.py);
    the register operand's column key_tokens(c) is where that value already sits, so the reordering moves no
    data."""
    rows: gl.constexpr = p.type.shape[0]
    # c's bits (i3 i2 i1 i0 q1 q0 e) -> key_tokens(c)'s (i3 i2 i1 q1 q0 i0 e)
    bits = gl.reshape(p, [rows, 2, 2, 2, 2, 2, 2, 2])
    in_token_order = gl.reshape(gl.permute(bits, [0, 1, 2, 3, 5, 6, 4, 7]), [rows, 128])
    in_place = gl.convert_layout(in_token_order, p_layout)
    # Four consecutive values of a thread (a 32-bit operand register) to e4m3 in two packing conversions, as Triton's
    # own conversion does, without its unpacking into bytes and repacking (~100 byte permutes a block).
    return gl.inline_asm_elementwise(
        "{ .reg .b16 low, high; cvt.rn.satfinite.e4m3x2.f32 low, $2, $1; cvt.rn.satfinite.e4m3x2.f32 high, $4, $3; "
        "mov.b32 $0, {low, high}; }", "=r,r,r,r,r", [in_place], dtype=gl.float8e4nv, is_pure=True, pack=4)


@gluon.jit
def _row_sums(p8, ones, ROWS: gl.constexpr, layout: gl.constexpr, rows_layout: gl.constexpr):
    """P's row sums as P·V multiplies P (e4m3), from P times ones, after this block's P·V: each of the 8 columns
    holds them, so a row's max is any of its values.

    The wgmma waits for itself and for P·V before the softmax goes on. Left in flight (P's registers or P through
    shared memory) or issued before P·V, ptxas serialises every wgmma of the kernel (C7512, "insufficient register
    resources"; offline sm_90 builds, bench/RESULTS.md 2026-12-05 (morning))."""
    a = gl.convert_layout(p8, gl.DotOperandLayout(operand_index=0, parent=layout, k_width=4))
    COLUMNS: gl.constexpr = ones.type.shape[0]
    sums = warpgroup_mma(a, ones.permute((1, 0)), gl.zeros([ROWS, COLUMNS], gl.float32, layout), use_acc=False,
                         is_async=False)
    return gl.convert_layout(gl.max(sums, axis=1), rows_layout)


@gluon.jit
def _blocks_in_turn(q, k_ring, v_ring, ones, kv_ready, kv_free, q_factor, k_scale_ptr, length_k, s_layout: gl.constexpr,
                    o_layout: gl.constexpr, sums_layout: gl.constexpr, ROW_SUM_MMA: gl.constexpr, WHICH: gl.constexpr,
                    TURNS: gl.constexpr, ABLATE: gl.constexpr, TREE_ROWS: gl.constexpr):
    """Every key block: its scores issued with the previous block's P·V still running, both waited on together, its
    softmax, its P·V issued; the other consumer's MMAs run during this one's softmax. The running output (before
    the last division by the row sums) and the row sums.

    With TURNS a consumer's turn spans block j's P·V and block j+1's Q·Kᵀ (issued back to back across the loop's
    back edge), so that one consumer's MMAs run while the other's softmax does, rather than both at once."""
    ROWS: gl.constexpr = q.type.shape[0]
    CHANNELS: gl.constexpr = q.type.shape[1]
    BLOCK_KEYS: gl.constexpr = k_ring.type.shape[1]
    STAGES: gl.constexpr = k_ring.type.shape[0]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    blocks = gl.cdiv(length_k, BLOCK_KEYS)

    # P is made and handed to its MMA in one iteration: carried over the loop's back edge, an 8-bit register tensor
    # is taken apart into bytes (~100 byte permutes a block).
    mbarrier.wait(kv_ready.index(0), 0)
    dots = warpgroup_mma(q, k_ring.index(0).permute((1, 0)), gl.zeros([ROWS, BLOCK_KEYS], gl.int32, s_layout),
                         use_acc=False, is_async=True)
    dots = warpgroup_mma_wait(num_outstanding=0, deps=(dots, ))
    row_max = gl.full([ROWS], float("-inf"), gl.float32, rows_layout)
    p, row_max = _softmax(dots, q_factor, k_scale_ptr, 0, row_max, length_k, BLOCK_KEYS, s_layout,
                          TREE_ROWS)
    alpha = gl.zeros([ROWS], gl.float32, rows_layout)  # the first block's rescale of an empty sum
    out = gl.zeros([ROWS, CHANNELS], gl.float32, o_layout)
    p8 = _as_pv_operand(p, p_layout)
    if TURNS:
        # Each consumer awaits a turn before every P·V and passes it after the next Q·Kᵀ; the second consumer's
        # first pass and the first consumer's pass after its last P·V keep the barriers balanced at exit.
        if WHICH == 1:
            _pass_turn(WHICH)
        _await_turn(WHICH)
    products = warpgroup_mma(p8, v_ring.index(0).permute((1, 0)),
                             gl.zeros([ROWS, CHANNELS], gl.float32, o_layout), use_acc=False, is_async=True)
    if ROW_SUM_MMA:
        row_sum = _row_sums(p8, ones, ROWS, sums_layout, rows_layout)
    else:
        row_sum = _row_total(p, False, TREE_ROWS, rows_layout)

    for block in range(1, blocks):
        stage = block % STAGES
        previous = (block + STAGES - 1) % STAGES
        mbarrier.wait(kv_ready.index(stage), (block // STAGES) & 1)
        dots = warpgroup_mma(q, k_ring.index(stage).permute((1, 0)), dots, use_acc=False, is_async=True)
        if TURNS:
            _pass_turn(WHICH)
        dots, products = warpgroup_mma_wait(num_outstanding=0, deps=(dots, products))
        mbarrier.arrive(kv_free.index(previous))
        # The previous block's P·V joins the running sum under that block's rescale (attend_reference's order).
        out = out * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + products
        if ABLATE & 2:
            p = dots.to(gl.float32, bitcast=True)
            new_max = row_max
        else:
            p, new_max = _softmax(dots, q_factor, k_scale_ptr, block, row_max, length_k, BLOCK_KEYS, s_layout,
                                  TREE_ROWS)
        alpha = gl.exp2(row_max - new_max)
        if not ROW_SUM_MMA:
            row_sum = row_sum * alpha + _row_total(p, False, TREE_ROWS, rows_layout)
        row_max = new_max
        p8 = _as_pv_operand(p, p_layout)
        if TURNS:
            _await_turn(WHICH)
        products = warpgroup_mma(p8, v_ring.index(stage).permute((1, 0)), products, use_acc=False, is_async=True)
        if ROW_SUM_MMA:
            row_sum = row_sum * alpha + _row_sums(p8, ones, ROWS, sums_layout, rows_layout)

    if TURNS:
        if WHICH == 0:
            _pass_turn(WHICH)
    products = warpgroup_mma_wait(num_outstanding=0, deps=(products, ))
    mbarrier.arrive(kv_free.index((blocks + STAGES - 1) % STAGES))
    out = out * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + products
    return out, row_sum


@gluon.jit
def _p_to_tile(p, p_tile, o_layout: gl.constexpr):
    """P in e4m3 into the shared tile P·V reads, in token order, visible to the wgmma of the whole warpgroup."""
    p_tile.store(_as_pv_operand(p, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _named_barrier(instruction: gl.constexpr):
    """One named-barrier instruction for the consumer warpgroup's 128 threads (a value a thread, so it runs once
    each); both consumers take part, 256 threads a barrier."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    gl.inline_asm_elementwise(instruction + " mov.b32 $0, $1;", "=r,r", [gl.full([128], 0, gl.int32, layout)],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _await_turn(WHICH: gl.constexpr):
    if WHICH == 0:
        _named_barrier("bar.sync 8, 256;")
    else:
        _named_barrier("bar.sync 9, 256;")


@gluon.jit
def _pass_turn(WHICH: gl.constexpr):
    if WHICH == 0:
        _named_barrier("bar.arrive 9, 256;")
    else:
        _named_barrier("bar.arrive 8, 256;")


@gluon.jit
def _blocks_pv_during_softmax(q, k_ring, v_ring, p_tile, kv_ready, kv_free, q_factor, k_scale_ptr, length_k,
                              s_layout: gl.constexpr, o_layout: gl.constexpr, WHICH: gl.constexpr,
                              TURNS: gl.constexpr):
    """PV_DURING_SOFTMAX: block j's Q·Kᵀ issued, block j-1's P·V issued after it (P from the shared tile), the
    scores waited on alone, block j's softmax with that P·V in flight; then the P·V waited on and added, and block
    j's P put in the tile. Returns what _blocks_in_turn returns."""
    ROWS: gl.constexpr = q.type.shape[0]
    CHANNELS: gl.constexpr = q.type.shape[1]
    BLOCK_KEYS: gl.constexpr = k_ring.type.shape[1]
    STAGES: gl.constexpr = k_ring.type.shape[0]
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    blocks = gl.cdiv(length_k, BLOCK_KEYS)

    mbarrier.wait(kv_ready.index(0), 0)
    dots = warpgroup_mma(q, k_ring.index(0).permute((1, 0)), gl.zeros([ROWS, BLOCK_KEYS], gl.int32, s_layout),
                         use_acc=False, is_async=True)
    dots = warpgroup_mma_wait(num_outstanding=0, deps=(dots, ))
    row_max = gl.full([ROWS], float("-inf"), gl.float32, rows_layout)
    p, row_max = _softmax(dots, q_factor, k_scale_ptr, 0, row_max, length_k, BLOCK_KEYS, s_layout, False)
    row_sum = gl.sum(p, axis=1)
    alpha = gl.zeros([ROWS], gl.float32, rows_layout)  # the first block's rescale of an empty sum
    out = gl.zeros([ROWS, CHANNELS], gl.float32, o_layout)
    products = gl.zeros([ROWS, CHANNELS], gl.float32, o_layout)
    _p_to_tile(p, p_tile, o_layout)
    if TURNS:
        if WHICH == 1:
            _pass_turn(WHICH)  # the first consumer's first turn is free

    for block in range(1, blocks):
        stage = block % STAGES
        previous = (block + STAGES - 1) % STAGES
        mbarrier.wait(kv_ready.index(stage), (block // STAGES) & 1)
        if TURNS:
            _await_turn(WHICH)
        dots = warpgroup_mma(q, k_ring.index(stage).permute((1, 0)), dots, use_acc=False, is_async=True)
        products = warpgroup_mma(p_tile, v_ring.index(previous).permute((1, 0)), products, use_acc=False,
                                 is_async=True)
        if TURNS:
            _pass_turn(WHICH)
        dots = warpgroup_mma_wait(num_outstanding=1, deps=(dots, ))
        p, new_max = _softmax(dots, q_factor, k_scale_ptr, block, row_max, length_k, BLOCK_KEYS, s_layout, False)
        new_alpha = gl.exp2(row_max - new_max)
        row_sum = row_sum * new_alpha + gl.sum(p, axis=1)
        row_max = new_max
        products = warpgroup_mma_wait(num_outstanding=0, deps=(products, ))
        mbarrier.arrive(kv_free.index(previous))
        # The previous block's P·V joins the running sum under that block's rescale (attend_reference's order).
        out = out * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + products
        alpha = new_alpha
        _p_to_tile(p, p_tile, o_layout)

    if TURNS:
        if WHICH == 0:
            _await_turn(WHICH)  # the second consumer's last pass, so that no arrival is left on a barrier
    last = (blocks + STAGES - 1) % STAGES
    products = warpgroup_mma(p_tile, v_ring.index(last).permute((1, 0)), products, use_acc=False, is_async=True)
    products = warpgroup_mma_wait(num_outstanding=0, deps=(products, ))
    mbarrier.arrive(kv_free.index(last))
    out = out * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + products
    return out, row_sum


@gluon.jit
def _consumer(q_halves, k_ring, v_ring, ones, p_tiles, q_ready, kv_ready, kv_free, q_scale_ptr, k_scale_ptr,
              v_scale_ptr, out_ptr, heads, length_q, length_k, padded_q, padded_k, stride_ob, stride_oh, stride_ol,
              HEAD_DIM: gl.constexpr, WHICH: gl.constexpr, ROW_SUM_MMA: gl.constexpr, PV_UNDER: gl.constexpr,
              TURNS: gl.constexpr, ABLATE: gl.constexpr, TREE_ROWS: gl.constexpr):
    ROWS: gl.constexpr = q_halves.type.shape[1]
    CHANNELS: gl.constexpr = q_halves.type.shape[2]
    BLOCK_KEYS: gl.constexpr = k_ring.type.shape[1]
    # 8-bit wgmma, m16 x n x k32 per warp: n = the keys for Q·Kᵀ, the channels for P·V.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_KEYS, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, CHANNELS, 32])
    # P times ones: its 8 columns each hold the row sums. P's operand layout for it is P·V's (the same registers).
    SUM_COLUMNS: gl.constexpr = ones.type.shape[0]
    sums_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, SUM_COLUMNS, 32])
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    bh = gl.program_id(1)
    start_m = gl.program_id(0) * (2 * ROWS) + WHICH * ROWS
    q_factor = gl.load(q_scale_ptr + bh * padded_q + start_m + gl.arange(0, ROWS, layout=rows_layout))
    k_scale_ptr += bh * (padded_k // BLOCK_KEYS)
    q = q_halves.index(WHICH)
    mbarrier.wait(q_ready, 0)
    if PV_UNDER:
        out, row_sum = _blocks_pv_during_softmax(q, k_ring, v_ring, p_tiles.index(WHICH), kv_ready, kv_free, q_factor,
                                                 k_scale_ptr, length_k, s_layout, o_layout, WHICH, TURNS)
    else:
        out, row_sum = _blocks_in_turn(q, k_ring, v_ring, ones, kv_ready, kv_free, q_factor, k_scale_ptr, length_k,
                                       s_layout, o_layout, sums_layout, ROW_SUM_MMA, WHICH, TURNS, ABLATE,
                                       TREE_ROWS)

    columns = gl.arange(0, CHANNELS, layout=gl.SliceLayout(0, o_layout))
    offs_m = start_m + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    v_scale = gl.load(v_scale_ptr + bh * CHANNELS + columns)
    inverse = gl.div_rn(gl.full([ROWS], 1.0, gl.float32, gl.SliceLayout(1, o_layout)),
                        gl.convert_layout(row_sum, gl.SliceLayout(1, o_layout)))
    out = out * gl.expand_dims(inverse, 1) * gl.expand_dims(v_scale, 0)
    base = out_ptr + (bh // heads).to(gl.int64) * stride_ob + (bh % heads).to(gl.int64) * stride_oh
    inside = gl.expand_dims(offs_m < length_q, 1) & gl.expand_dims(columns < HEAD_DIM, 0)
    gl.store(base + gl.expand_dims(offs_m.to(gl.int64) * stride_ol, 1) + gl.expand_dims(columns, 0),
             out.to(out_ptr.dtype.element_ty), mask=inside)


@gluon.jit
def _attention_kernel(q_desc, k_desc, v_desc, ones_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, out_ptr, heads,
                      length_q, length_k, padded_q, padded_k, stride_ob, stride_oh, stride_ol, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr, LOADER_REGISTERS: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr,
                      ROW_SUM_MMA: gl.constexpr, PV_UNDER: gl.constexpr, TURNS: gl.constexpr,
                      ABLATE: gl.constexpr, TREE_ROWS: gl.constexpr):
    q_halves = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    ones = gl.allocate_shared_memory(ones_desc.dtype, ones_desc.block_type.shape, ones_desc.layout)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    # P's tile per consumer for PV_DURING_SOFTMAX (one row of it otherwise: unused)
    P_TILE_ROWS: gl.constexpr = q_desc.block_type.shape[0] if PV_UNDER else 8
    p_tiles = gl.allocate_shared_memory(gl.float8e4nv, [2, P_TILE_ROWS, k_desc.block_type.shape[0]],
                                        gl.NVMMASharedLayout.get_default_for([P_TILE_ROWS, k_desc.block_type.shape[0]],
                                                                             gl.float8e4nv))
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(stage), count=1)
        mbarrier.init(kv_free.index(stage), count=2)  # both consumers release every stage
    FIRST: gl.constexpr = 0
    SECOND: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (q_halves, k_ring, v_ring, ones, p_tiles, q_ready, kv_ready, kv_free, q_scale_ptr, k_scale_ptr,
                     v_scale_ptr, out_ptr, heads, length_q, length_k, padded_q, padded_k, stride_ob, stride_oh,
                     stride_ol, HEAD_DIM, FIRST, ROW_SUM_MMA, PV_UNDER, TURNS, ABLATE, TREE_ROWS)),
        (_consumer, (q_halves, k_ring, v_ring, ones, p_tiles, q_ready, kv_ready, kv_free, q_scale_ptr, k_scale_ptr,
                     v_scale_ptr, out_ptr, heads, length_q, length_k, padded_q, padded_k, stride_ob, stride_oh,
                     stride_ol, HEAD_DIM, SECOND, ROW_SUM_MMA, PV_UNDER, TURNS, ABLATE, TREE_ROWS)),
        (_loader, (q_desc, k_desc, v_desc, ones_desc, q_halves, k_ring, v_ring, ones, q_ready, kv_ready, kv_free,
                   length_k, padded_q, padded_k, ROW_SUM_MMA, ABLATE)),
    ], [4, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])


def takes(device: torch.device, fp8_pv: bool, q_rows: int, k_rows: int, channels: int) -> bool:
    """Whether this kernel takes sage8's attention of such operands: a Hopper GPU, Gluon, e4m3 P·V with a k scale
    per 128 keys and a q scale per token (the defaults), and 64 or 128 channels."""
    return (gluon_ready(device) and fp8_pv and q_rows == 1 and k_rows == BLOCK_N and channels in (64, 128))


def ready_for(operands) -> bool:
    """Whether this kernel takes these quantized operands: as `takes` says, their keys in its order."""
    o = operands
    return (o.keys_permuted and takes(o.q8.device, o.v8t.dtype == torch.float8_e4m3fn, o.q_rows, o.k_rows,
                                      o.q8.shape[3]))


def _ones_layout():
    return gl.NVMMASharedLayout.get_default_for([ONES_ROWS, BLOCK_N], gl.float8e4nv)


def _layouts(channels: int):
    return (gl.NVMMASharedLayout.get_default_for([QUERY_ROWS, channels], gl.int8),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, channels], gl.int8),
            gl.NVMMASharedLayout.get_default_for([channels, BLOCK_N], gl.float8e4nv))


@functools.cache
def _ones_descriptor(device: torch.device):
    """The TMA descriptor of the e4m3 ones tile the loader copies for the row sums: one per device, made once (the
    tile is kept for the process: CUDA graphs read it)."""
    ones = torch.ones((ONES_ROWS, BLOCK_N), device=device).to(torch.float8_e4m3fn)
    return TensorDescriptor.from_tensor(ones, [ONES_ROWS, BLOCK_N], _ones_layout())


def launch(operands, out: torch.Tensor, stages: int | None = None, row_sums_on_tensor_cores: bool | None = None,
           pv_during_softmax: bool | None = None, turns: bool | None = None, tree_rows: bool | None = None,
           diagnostic_ablation: int = 0) -> None:
    """The attention of quantized `operands` (sage_attention.Operands) into `out` [B, Lq, H, D]; P's row sums on
    the tensor cores or not, P·V during the softmax or not, the consumers taking turns or not, the row max and sum
    as trees or chains (`tree_rows`; the default schedule only) (None: the module's switches; stages None: the
    ring depth for the schedule). `diagnostic_ablation`, for timing what a part costs (the output is then wrong):
    bit 1 stops the loader after the ring's first fill, bit 2 replaces the softmax by a bitcast of the scores."""
    pv_under = PV_DURING_SOFTMAX if pv_during_softmax is None else pv_during_softmax
    stages = stages or (STAGES_PV_DURING_SOFTMAX if pv_under else STAGES)
    turns = CONSUMERS_TAKE_TURNS if turns is None else turns
    row_sum_mma = ROW_SUMS_ON_TENSOR_CORES if row_sums_on_tensor_cores is None else row_sums_on_tensor_cores
    o = operands
    batch, heads, padded_q, channels = o.q8.shape
    padded_k = o.k8.shape[2]
    q_layout, k_layout, v_layout = _layouts(channels)
    _attention_kernel[(cdiv(o.length_q, BLOCK_M), batch * heads)](
        TensorDescriptor.from_tensor(o.q8.view(-1, channels), [QUERY_ROWS, channels], q_layout),
        TensorDescriptor.from_tensor(o.k8.view(-1, channels), [BLOCK_N, channels], k_layout),
        TensorDescriptor.from_tensor(o.v8t.view(-1, padded_k), [channels, BLOCK_N], v_layout),
        _ones_descriptor(o.v8t.device),
        o.q_scale, o.k_scale, o.v_scale, out, heads, o.length_q, o.length_k, padded_q, padded_k, out.stride(0),
        out.stride(2), out.stride(1), HEAD_DIM=o.head_dim, STAGES=stages, LOADER_REGISTERS=_LOADER_REGISTERS,
        CONSUMER_REGISTERS=_CONSUMER_REGISTERS,
        ROW_SUM_MMA=row_sum_mma and not pv_under, PV_UNDER=pv_under, TURNS=turns, ABLATE=diagnostic_ablation,
        TREE_ROWS=TREE_ROWS if tree_rows is None else tree_rows, num_warps=4, maxnreg=_MAXNREG)
    launches["sage_attention_hopper"] += 1


def build_offline(channels: int = 128, stages: int = STAGES, out_dtype: torch.dtype = torch.bfloat16,
                  row_sums_on_tensor_cores: bool = ROW_SUMS_ON_TENSOR_CORES,
                  pv_during_softmax: bool = PV_DURING_SOFTMAX, turns: bool = CONSUMERS_TAKE_TURNS,
                  tree_rows: bool = TREE_ROWS):
    """The kernel compiled for sm_90 without a GPU, for the tests and for reading its SASS; the signature a launch
    at FLUX's edit shape gets (16-divisible sizes and strides)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    q_layout, k_layout, v_layout = _layouts(channels)
    signature = {"q_desc": f"tensordesc<i8[{QUERY_ROWS}, {channels}],{q_layout}>",
                 "k_desc": f"tensordesc<i8[{BLOCK_N}, {channels}],{k_layout}>",
                 "v_desc": f"tensordesc<fp8e4nv[{channels}, {BLOCK_N}],{v_layout}>",
                 "ones_desc": f"tensordesc<fp8e4nv[{ONES_ROWS}, {BLOCK_N}],{_ones_layout()}>",
                 "q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
                 "out_ptr": "*bf16" if out_dtype == torch.bfloat16 else "*fp16"}
    signature |= {name: "i32" for name in ("heads", "length_q", "length_k", "padded_q", "padded_k", "stride_ob",
                                           "stride_oh", "stride_ol")}
    constants = dict(HEAD_DIM=channels, STAGES=stages, LOADER_REGISTERS=_LOADER_REGISTERS,
                     CONSUMER_REGISTERS=_CONSUMER_REGISTERS,
                     ROW_SUM_MMA=row_sums_on_tensor_cores and not pv_during_softmax, PV_UNDER=pv_during_softmax,
                     TURNS=turns, ABLATE=0, TREE_ROWS=tree_rows)
    signature |= {name: "constexpr" for name in constants}
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]]
             for name in ("q_scale_ptr", "k_scale_ptr", "v_scale_ptr", "out_ptr", "length_q", "length_k", "padded_q",
                          "padded_k", "stride_ob", "stride_oh", "stride_ol")}
    source = GluonASTSource(fn=_attention_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=_MAXNREG))
