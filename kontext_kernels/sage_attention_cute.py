"""sage8's attention kernel on Hopper in CuTe DSL, with FlashAttention-3's in-warpgroup overlap.

It computes what `sage_attention_hopper` (Gluon) computes, on the same operands (`sage_attention.quantize_operands`
with the keys in `key_tokens` order), with one change of schedule that Gluon cannot express: block j-1's P·V runs
on the tensor cores during block j's softmax, with P·V's register operand in flight. From Gluon, ptxas serialises
every wgmma of the kernel when a register operand is in flight across the softmax (bench/RESULTS.md, 2026-12-04);
built from CuTe DSL the same overlap compiles unserialised (2026-12-06, fifth session). Per consumer and key block:

    issue S_j = Q·K_jᵀ (int8)            issue O'_{j-1} = P_{j-1}·V_{j-1} (e4m3, a fresh accumulator)
    wait for S_j; softmax of S_j          (P·V still running)
    wait for O'_{j-1}; O = O·alpha_{j-1} + O'_{j-1}; release stage j-1; P_j to e4m3 in P·V's operand registers

The partitions are the Gluon kernel's: one warp loads Q's two 64-query halves once and each key block's K and Vᵀ
through TMA into a ring of stages; two consumer warpgroups take a half each with 240 registers a thread.

The softmax is `sage_attention.attend_reference`'s: folded scores in whole blocks (the int32 dot biased into a
float32 by its bits, the bias taken off in the exponent's FFMA), converted and masked scores in a partial last
block, P scaled by 2**8 (P_EXPONENT), P·V per block into a fresh accumulator added under the block's rescale.
A row's sum comes from P·V itself (ROW_SUMS_IN_PV: the reference's rounded_row_sums), or with that off is kept per
thread and summed over the row's four threads once, at the end (then its output is the Gluon kernel's).

Measured on an H100 (bench/RESULTS.md, 2026-12-06 (sixth session) and 2026-12-07): with the softmax's own sums, the
Gluon kernel's output (bit-identical at small shapes) at the Gluon kernel's speed (1.161-1.168 against 1.172-1.199
ms at the edit shape); with the row sums from P·V, 1.147 ms. The overlap is not what bounds the loop; the softmax's
issue is. In the fast step it is no faster than the Gluon kernel (175.7 against 175.4 ms), so the Gluon kernel stays
the default (`sage_attention.HOPPER_KERNEL`).

Building needs `nvidia-cutlass-dsl` (the `hopper` extra); compiling needs no GPU (`compiled`, `export`).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.utils.hopper_helpers as hopper
from cutlass import Float32, Int32, const_expr, cute, pipeline
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.utils import LayoutEnum

from .sage_attention import P_EXPONENT, key_tokens

QUERY_ROWS = 64  # per consumer warpgroup: one 64-row wgmma
BLOCK_M = 2 * QUERY_ROWS
BLOCK_N = 128  # keys per block: sage8's k scales are per 128 keys
STAGES = 3
SCORE_BIAS_BITS = 0x4B400000  # 1.5 * 2**23 as float32 bits: int + these bits = 1.5 * 2**23 + int as a float32
SCORE_BIAS = 12582912.0
# P's row sums from the tensor cores: each stage's Vᵀ tile has 8 rows of ones after its channels, P·V runs with
# n = channels + 8, and the 8 extra output columns hold the sums of P as P·V multiplies it (e4m3; the reference's
# rounded_row_sums), rescaled with the output. It takes the softmax's 64 additions a block per thread (13% of the
# loop's instructions) for 6% more P·V work. Gluon could not build it (its tensors are powers of two: n = 136 is
# not); the Gluon kernel's separate P-times-ones wgmma was 18% slower. On an H100 (bench/RESULTS.md, 2026-12-07):
# 1.147 against 1.161 ms at the edit shape, error against float64 0.382% against 0.414%. On; False keeps the
# softmax's own sums. (Tried and removed, slower on the same run: row max and sum as trees, 1.231 ms; the consumers
# taking turns through named barriers, 1.187; P·V adding into the running output, FlashAttention-3's way, with a
# lazy rescale: 5x the error on the model's q, k, v, and its row sums drift at long key lengths.)
ROW_SUMS_IN_PV = True
ONES_ROWS = 8
_CONSUMER_REGISTERS, _LOADER_REGISTERS = 240, 24
_THREADS = 3 * 128


def _row_value(i: int, half: int) -> int:
    """The accumulator value holding a thread's i-th value of row half `half`: the values go (column pair, row
    half, 8-column group)."""
    return (i // 2) * 4 + 2 * half + i % 2


def _smem_layout(dtype, rows: int, columns: int, stages: int):
    """A staged shared tile, its columns contiguous (K-major for the wgmma), swizzled as wide as they allow."""
    atom = warpgroup.make_smem_layout_atom(hopper.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, columns), dtype)
    return cute.tile_to_shape(atom, (rows, columns, stages), order=(0, 1, 2))


def _ptx(result, instruction: str, constraints: str, args, loc=None, ip=None):
    """One PTX instruction on scalars: `result` the DSL type (Int32 / Float32), args (value, its DSL type)."""
    ir_type = T.i32() if result is Int32 else T.f32()
    return result(llvm.inline_asm(ir_type, [kind(value).ir_value(loc=loc, ip=ip) for value, kind in args], instruction,
                                  constraints, has_side_effects=False, is_align_stack=False,
                                  asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def _e4m3x4(a: Float32, b: Float32, c: Float32, d: Float32, *, loc=None, ip=None) -> Int32:
    """Four float32 to e4m3, packed in one register in order (a the lowest byte)."""
    return _ptx(Int32, "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
                "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }", "=r,f,f,f,f",
                [(x, Float32) for x in (a, b, c, d)], loc, ip)


@dsl_user_op
def _fmax(a: Float32, b: Float32, *, loc=None, ip=None) -> Float32:
    return _ptx(Float32, "max.f32 $0, $1, $2;", "=f,f,f", [(a, Float32), (b, Float32)], loc, ip)


@dsl_user_op
def _imax(a: Int32, b: Int32, *, loc=None, ip=None) -> Int32:
    return _ptx(Int32, "max.s32 $0, $1, $2;", "=r,r,r", [(a, Int32), (b, Int32)], loc, ip)


@dsl_user_op
def _ex2(x: Float32, *, loc=None, ip=None) -> Float32:
    return _ptx(Float32, "ex2.approx.ftz.f32 $0, $1;", "=f,f", [(x, Float32)], loc, ip)


@dsl_user_op
def _fma(a: Float32, b: Float32, c: Float32, *, loc=None, ip=None) -> Float32:
    return _ptx(Float32, "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f", [(a, Float32), (b, Float32), (c, Float32)],
                loc, ip)


@dsl_user_op
def _bits_to_float(x: Int32, *, loc=None, ip=None) -> Float32:
    return _ptx(Float32, "mov.b32 $0, $1;", "=f,r", [(x, Int32)], loc, ip)


@dsl_user_op
def _float_to_bits(x: Float32, *, loc=None, ip=None) -> Int32:
    return _ptx(Int32, "mov.b32 $0, $1;", "=r,f", [(x, Float32)], loc, ip)


class Sage8Hopper:
    """The kernel for one head dimension and output dtype. Call (under `cute.compile`) with
    q8 (Lq_pad, D, B*H) int8, k8 (Lk_pad, D, B*H) int8 (keys permuted), v8t (D, Lk_pad, B*H) e4m3,
    q_scale (Lq_pad, B*H), k_scale (Lk_pad / 128, B*H), v_scale (D, B*H) float32, out (Lq, D, H, B),
    length_q, length_k and the stream."""

    def __init__(self, channels: int = 128, out_dtype=cutlass.BFloat16, stages: int = STAGES,
                 row_sums_in_pv: bool = ROW_SUMS_IN_PV):
        assert channels in (64, 128)
        self.channels = channels
        self.out_dtype = out_dtype
        self.stages = stages
        self.row_sums_in_pv = row_sums_in_pv
        self.pv_columns = channels + (ONES_ROWS if row_sums_in_pv else 0)  # P·V's n

    @cute.jit
    def __call__(self, q8: cute.Tensor, k8: cute.Tensor, v8t: cute.Tensor, q_scale: cute.Tensor,
                 k_scale: cute.Tensor, v_scale: cute.Tensor, out: cute.Tensor, length_q: Int32, length_k: Int32,
                 stream: cuda.CUstream):
        D = self.channels
        sq_layout = _smem_layout(cutlass.Int8, QUERY_ROWS, D, 2)
        sk_layout = _smem_layout(cutlass.Int8, BLOCK_N, D, self.stages)
        # Vᵀ's stages, with the ones' rows after the channels where P·V makes the row sums.
        sv_layout = _smem_layout(cutlass.Float8E4M3FN, self.pv_columns, BLOCK_N, self.stages)
        sv_tma_layout = _smem_layout(cutlass.Float8E4M3FN, D, BLOCK_N, self.stages)
        load = cpasync.CopyBulkTensorTileG2SOp()
        tma_q, q_tma = cpasync.make_tiled_tma_atom(load, q8, cute.select(sq_layout, mode=[0, 1]), (QUERY_ROWS, D))
        tma_k, k_tma = cpasync.make_tiled_tma_atom(load, k8, cute.select(sk_layout, mode=[0, 1]), (BLOCK_N, D))
        tma_v, v_tma = cpasync.make_tiled_tma_atom(load, v8t, cute.select(sv_tma_layout, mode=[0, 1]), (D, BLOCK_N))
        mma_qk = hopper.make_trivial_tiled_mma(cutlass.Int8, cutlass.Int8, warpgroup.OperandMajorMode.K,
                                               warpgroup.OperandMajorMode.K, Int32, (1, 1, 1), (QUERY_ROWS, BLOCK_N))
        mma_pv = hopper.make_trivial_tiled_mma(cutlass.Float8E4M3FN, cutlass.Float8E4M3FN,
                                               warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K, Float32,
                                               (1, 1, 1), (QUERY_ROWS, self.pv_columns),
                                               a_source=warpgroup.OperandSource.RMEM)
        stages = self.stages

        @cute.struct
        class Storage:
            q_bars: cute.struct.MemRange[cutlass.Int64, 2]
            kv_bars: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sq: cute.struct.Align[cute.struct.MemRange[cutlass.Int8, cute.cosize(sq_layout)], 1024]
            sk: cute.struct.Align[cute.struct.MemRange[cutlass.Int8, cute.cosize(sk_layout)], 1024]
            sv: cute.struct.Align[cute.struct.MemRange[cutlass.Float8E4M3FN, cute.cosize(sv_layout)], 1024]

        self.kernel(tma_q, tma_k, tma_v, q_tma, k_tma, v_tma, q_scale, k_scale, v_scale, out, length_q, length_k,
                    sq_layout, sk_layout, sv_layout, mma_qk, mma_pv, Storage).launch(
            grid=(cute.ceil_div(length_q, BLOCK_M), cute.size(q8.shape[2]), 1), block=(_THREADS, 1, 1),
            stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, tma_q: cute.CopyAtom, tma_k: cute.CopyAtom, tma_v: cute.CopyAtom, q_tma: cute.Tensor,
               k_tma: cute.Tensor, v_tma: cute.Tensor, q_scale: cute.Tensor, k_scale: cute.Tensor,
               v_scale: cute.Tensor, out: cute.Tensor, length_q: Int32, length_k: Int32,
               sq_layout: cute.ComposedLayout, sk_layout: cute.ComposedLayout, sv_layout: cute.ComposedLayout,
               mma_qk: cute.TiledMma, mma_pv: cute.TiledMma, Storage: cutlass.Constexpr):
        D = self.channels
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        m_block, bh, _ = cute.arch.block_idx()
        if warp == 0:
            for atom in (tma_q, tma_k, tma_v):
                cpasync.prefetch_descriptor(atom)

        storage = cutlass.utils.SmemAllocator().allocate(Storage)
        one_thread = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
        consumer_warps = pipeline.CooperativeGroup(pipeline.Agent.Thread, 8)
        q_pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.q_bars.data_ptr(), num_stages=1, producer_group=one_thread,
            consumer_group=consumer_warps, tx_count=2 * QUERY_ROWS * D, defer_sync=True)
        kv_pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.kv_bars.data_ptr(), num_stages=self.stages, producer_group=one_thread,
            consumer_group=consumer_warps, tx_count=2 * BLOCK_N * D, defer_sync=True)
        sq = storage.sq.get_tensor(sq_layout.outer, swizzle=sq_layout.inner)
        sk = storage.sk.get_tensor(sk_layout.outer, swizzle=sk_layout.inner)
        sv = storage.sv.get_tensor(sv_layout.outer, swizzle=sv_layout.inner)
        blocks = cute.ceil_div(length_k, BLOCK_N)
        if const_expr(self.row_sums_in_pv):
            self.write_ones(sv, tidx)
            cute.arch.fence_view_async_shared()  # the ones, written by threads, read by the wgmma (async proxy)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        if warp < 4:
            cute.arch.setmaxregister_decrease(_LOADER_REGISTERS)
            if warp == 0:
                self.load(tma_q, tma_k, tma_v, q_tma, k_tma, v_tma, sq, sk, sv, q_pipe, kv_pipe, m_block, bh,
                          blocks)
        else:
            cute.arch.setmaxregister_increase(_CONSUMER_REGISTERS)
            which = warp // 4 - 1
            self.consume(sq, sk, sv, q_pipe, kv_pipe, mma_qk, mma_pv, q_scale, k_scale, v_scale, out, length_q,
                         length_k, blocks, m_block, bh, which, tidx % 128)

    @cute.jit
    def load(self, tma_q, tma_k, tma_v, q_tma, k_tma, v_tma, sq, sk, sv, q_pipe, kv_pipe, m_block, bh, blocks):
        D = self.channels
        q_tiles = cute.local_tile(q_tma[None, None, bh], (QUERY_ROWS, D), (None, 0))
        k_tiles = cute.local_tile(k_tma[None, None, bh], (BLOCK_N, D), (None, 0))
        v_tiles = cute.local_tile(v_tma[None, None, bh], (D, BLOCK_N), (0, None))
        sq_part, q_part = cpasync.tma_partition(tma_q, 0, cute.make_layout(1), cute.group_modes(sq, 0, 2),
                                                cute.group_modes(q_tiles, 0, 2))
        sk_part, k_part = cpasync.tma_partition(tma_k, 0, cute.make_layout(1), cute.group_modes(sk, 0, 2),
                                                cute.group_modes(k_tiles, 0, 2))
        if const_expr(self.row_sums_in_pv):
            # TMA fills each stage's channel rows; the ones' rows after them stay as written_ones left them.
            sv = cute.make_tensor(sv.iterator, cute.composition(sv.layout, cute.make_layout(
                (D, BLOCK_N, self.stages), stride=(1, self.pv_columns, self.pv_columns * BLOCK_N))))
        sv_part, v_part = cpasync.tma_partition(tma_v, 0, cute.make_layout(1), cute.group_modes(sv, 0, 2),
                                                cute.group_modes(v_tiles, 0, 2))
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        q_pipe.producer_acquire(q_state)
        for half in cutlass.range_constexpr(2):
            cute.copy(tma_q, q_part[None, 2 * m_block + half], sq_part[None, half],
                      tma_bar_ptr=q_pipe.producer_get_barrier(q_state))
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        for block in cutlass.range(blocks, unroll=1):
            kv_pipe.producer_acquire(state)
            arrived = kv_pipe.producer_get_barrier(state)
            cute.copy(tma_k, k_part[None, block], sk_part[None, state.index], tma_bar_ptr=arrived)
            cute.copy(tma_v, v_part[None, block], sv_part[None, state.index], tma_bar_ptr=arrived)
            state.advance()

    @cute.jit
    def consume(self, sq, sk, sv, q_pipe, kv_pipe, mma_qk: cute.TiledMma, mma_pv: cute.TiledMma, q_scale, k_scale,
                v_scale, out, length_q, length_k, blocks, m_block, bh, which, tid):
        thr_qk = mma_qk.get_slice(tid)
        thr_pv = mma_pv.get_slice(tid)
        q_frag = thr_qk.make_fragment_A(thr_qk.partition_A(sq[None, None, which]))
        k_frag = thr_qk.make_fragment_B(thr_qk.partition_B(sk))
        v_frag = thr_pv.make_fragment_B(thr_pv.partition_B(sv))
        p_frag = thr_pv.make_fragment_A(thr_pv.partition_shape_A((QUERY_ROWS, BLOCK_N)))
        dots = cute.make_rmem_tensor(thr_qk.partition_shape_C((QUERY_ROWS, BLOCK_N)), Int32)
        products = cute.make_rmem_tensor(thr_pv.partition_shape_C((QUERY_ROWS, self.pv_columns)), Float32)
        total = cute.make_rmem_tensor(thr_pv.partition_shape_C((QUERY_ROWS, self.pv_columns)), Float32)
        total.fill(0.0)
        # Each thread holds two rows (g and g + 8 of its warp's 16): their coordinates from an identity tile.
        s_coords = thr_qk.partition_C(cute.make_identity_tensor((QUERY_ROWS, BLOCK_N)))
        o_coords = thr_pv.partition_C(cute.make_identity_tensor((QUERY_ROWS, self.pv_columns)))
        start_m = m_block * BLOCK_M + which * QUERY_ROWS
        q_factor = cute.make_rmem_tensor((2,), Float32)
        row_max = cute.make_rmem_tensor((2,), Float32)
        row_sum = cute.make_rmem_tensor((2,), Float32)
        alpha = cute.make_rmem_tensor((2,), Float32)
        for half in cutlass.range_constexpr(2):
            q_factor[half] = q_scale[start_m + s_coords[2 * half][0], bh]
            row_max[half] = -Float32.inf
            row_sum[half] = 0.0
            alpha[half] = 0.0  # the first block's rescale of an empty sum

        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        q_pipe.consumer_wait(q_state)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        kv_pipe.consumer_wait(state)
        self.issue(mma_qk, dots, q_frag, k_frag[None, None, None, state.index])
        warpgroup.wait_group(0)
        self.softmax(dots, s_coords, q_factor, k_scale, bh, 0, row_max, row_sum, alpha, length_k)
        self.to_operand(dots, p_frag)
        previous = state.clone()
        state.advance()
        for block in cutlass.range(1, blocks, unroll=1):
            kv_pipe.consumer_wait(state)
            self.issue(mma_qk, dots, q_frag, k_frag[None, None, None, state.index])
            self.issue(mma_pv, products, p_frag, v_frag[None, None, None, previous.index])
            warpgroup.wait_group(1)
            old_alpha = cute.make_rmem_tensor((2,), Float32)
            for half in cutlass.range_constexpr(2):
                old_alpha[half] = alpha[half]
            self.softmax(dots, s_coords, q_factor, k_scale, bh, block, row_max, row_sum, alpha, length_k)
            warpgroup.wait_group(0)
            kv_pipe.consumer_release(previous)
            self.accumulate(total, products, old_alpha)
            self.to_operand(dots, p_frag)
            previous = state.clone()
            state.advance()
        self.issue(mma_pv, products, p_frag, v_frag[None, None, None, previous.index])
        warpgroup.wait_group(0)
        kv_pipe.consumer_release(previous)
        self.accumulate(total, products, alpha)
        self.store(total, row_sum, o_coords, v_scale, out, start_m, length_q, bh)

    @cute.jit
    def issue(self, mma: cute.TiledMma, acc: cute.Tensor, a: cute.Tensor, b: cute.Tensor):
        """acc = A·B over the whole k extent, issued and committed as one wgmma group (not waited on)."""
        warpgroup.fence()
        atom = cute.make_mma_atom(mma.op)
        atom.set(warpgroup.Field.ACCUMULATE, False)
        for k in cutlass.range_constexpr(cute.size(a.shape[2])):
            cute.gemm(atom, acc, a[None, None, k], b[None, None, k], acc)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def softmax(self, dots: cute.Tensor, s_coords: cute.Tensor, q_factor: cute.Tensor, k_scale: cute.Tensor, bh,
                block, row_max: cute.Tensor, row_sum: cute.Tensor, alpha: cute.Tensor, length_k):
        """Block `block`'s P (float32 x 2**8) written over its int32 scores; the running max, this thread's part of
        the row sums and the rescale alpha (of the sums so far) updated."""
        values = cute.size(dots)
        per_row = values // 2
        p = cute.recast_tensor(dots, Float32)
        k_factor = k_scale[block, bh]
        start_n = block * BLOCK_N
        if start_n + BLOCK_N <= length_k:
            for half in cutlass.range_constexpr(2):
                factor = q_factor[half] * k_factor
                factor = _bits_to_float(_float_to_bits(factor) & -4)  # 22 bits: the bias times it is exact
                top = dots[_row_value(0, half)]
                for i in cutlass.range_constexpr(1, per_row):
                    top = _imax(top, dots[_row_value(i, half)])
                top = _imax(top, cute.arch.shuffle_sync_bfly(top, offset=1))
                top = _imax(top, cute.arch.shuffle_sync_bfly(top, offset=2))
                new_max = _fmax(row_max[half], Float32(top) * factor)
                bias = SCORE_BIAS * factor
                shift = bias + (new_max - P_EXPONENT)
                new_max = (shift - bias) + P_EXPONENT  # the max the exponent really subtracts (Fast2Sum)
                total = Float32(0.0)
                for i in cutlass.range_constexpr(per_row):
                    j = _row_value(i, half)
                    p[j] = _ex2(_fma(_bits_to_float(dots[j] + SCORE_BIAS_BITS), factor, -shift))
                    if const_expr(not self.row_sums_in_pv):
                        total += p[j]
                self.advance_row(half, new_max, total, row_max, row_sum, alpha)
        else:
            for half in cutlass.range_constexpr(2):
                factor = q_factor[half] * k_factor
                top = -Float32.inf
                for i in cutlass.range_constexpr(per_row):
                    j = _row_value(i, half)
                    token = start_n + key_tokens(s_coords[j][1])  # column c holds the tile's token key_tokens(c)
                    score = Float32(dots[j])
                    if token >= length_k:
                        score = -Float32.inf
                    p[j] = score
                    top = _fmax(top, score)
                top = _fmax(top, cute.arch.shuffle_sync_bfly(top, offset=1))
                top = _fmax(top, cute.arch.shuffle_sync_bfly(top, offset=2))
                new_max = _fmax(row_max[half], top * factor)
                total = Float32(0.0)
                for i in cutlass.range_constexpr(per_row):
                    j = _row_value(i, half)
                    p[j] = _ex2(p[j] * factor - (new_max - P_EXPONENT))
                    if const_expr(not self.row_sums_in_pv):
                        total += p[j]
                self.advance_row(half, new_max, total, row_max, row_sum, alpha)

    @cute.jit
    def advance_row(self, half, new_max, total, row_max, row_sum, alpha):
        """The row's running state after a block: alpha rescales what was summed under the old max (the row sum here
        only where P·V does not make it)."""
        alpha[half] = _ex2(row_max[half] - new_max)
        if const_expr(not self.row_sums_in_pv):
            row_sum[half] = row_sum[half] * alpha[half] + total
        row_max[half] = new_max

    @cute.jit
    def to_operand(self, dots: cute.Tensor, p_frag: cute.Tensor):
        """P (float32 over the scores) to e4m3 in P·V's register operand. Accumulator value (e, h, i) -- column
        8i + 2t + e of row half h -- goes to operand value (j = e + 2 (i % 2), h, i // 2 % 2, i // 4): the
        operand's k index of the keys' order (sage_attention.key_tokens), so no value moves between threads."""
        p = cute.recast_tensor(dots, Float32)
        packed = cute.recast_tensor(p_frag, Int32)
        for r in cutlass.range_constexpr(cute.size(packed)):
            # operand register r holds (j 0..3, h = r % 2, kh = r // 2 % 2, kb = r // 4)
            h, kh, kb = r % 2, (r // 2) % 2, r // 4
            group = 2 * (2 * kb + kh)  # its bytes come from 8-column groups `group` and `group` + 1, pair by pair
            v = [_row_value(2 * group + j, h) for j in range(4)]
            packed[r] = _e4m3x4(p[v[0]], p[v[1]], p[v[2]], p[v[3]])

    @cute.jit
    def accumulate(self, total: cute.Tensor, products: cute.Tensor, alpha: cute.Tensor):
        for i in cutlass.range_constexpr(cute.size(total)):
            total[i] = total[i] * alpha[(i // 2) % 2] + products[i]

    @cute.jit
    def write_ones(self, sv: cute.Tensor, tidx):
        """e4m3 ones (0x38) in the rows after the channels of every stage of Vᵀ, by all the CTA's threads, once:
        the loader's copies never touch them."""
        ones = ONES_ROWS * BLOCK_N * self.stages
        bytes_view = cute.recast_tensor(sv, cutlass.Uint8)
        for k in cutlass.range_constexpr((ones + _THREADS - 1) // _THREADS):
            e = tidx + k * _THREADS
            if e < ones:
                bytes_view[self.channels + (e // BLOCK_N) % ONES_ROWS, e % BLOCK_N, e // (ONES_ROWS * BLOCK_N)] = \
                    cutlass.Uint8(0x38)

    @cute.jit
    def store(self, total, row_sum, o_coords, v_scale, out, start_m, length_q, bh):
        heads = cute.size(out.shape[2])
        batch, head = bh // heads, bh % heads
        inverse = cute.make_rmem_tensor((2,), Float32)
        for half in cutlass.range_constexpr(2):
            if const_expr(self.row_sums_in_pv):
                # value (e 0, row half, 8-column group channels / 8): the first ones column, a whole row's sum
                inverse[half] = 1.0 / total[2 * half + self.channels // 2]
            else:
                s = row_sum[half]
                s += cute.arch.shuffle_sync_bfly(s, offset=1)
                s += cute.arch.shuffle_sync_bfly(s, offset=2)
                inverse[half] = 1.0 / s
        for i in cutlass.range_constexpr(self.channels // 2):  # the channels' values (not the ones' columns)
            row, column = o_coords[i]
            if start_m + row < length_q:
                value = total[i] * inverse[(i // 2) % 2] * v_scale[column, bh]
                out[start_m + row, column, head, batch] = value.to(self.out_dtype)


def _placeholders(channels: int, out_dtype):
    """Compile-time stand-ins for the call's tensors (Sage8Hopper): token counts and strides symbolic, the padded
    token counts multiples of 128 and the 8-bit tiles 16-byte aligned as TMA needs."""
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    def any_int(divisibility=1):
        return cute.sym_int(divisibility=divisibility)

    padded_q, padded_k, heads_batch = any_int(BLOCK_M), any_int(BLOCK_N), any_int()
    tiles = [make_fake_tensor(cutlass.Int8, (padded_q, channels, heads_batch), (channels, 1, any_int(16)),
                              assumed_align=16),
             make_fake_tensor(cutlass.Int8, (padded_k, channels, heads_batch), (channels, 1, any_int(16)),
                              assumed_align=16),
             make_fake_tensor(cutlass.Float8E4M3FN, (channels, padded_k, heads_batch), (any_int(16), 1, any_int(16)),
                              assumed_align=16)]
    scales = [make_fake_tensor(Float32, (padded_q, heads_batch), (1, any_int()), assumed_align=4),
              make_fake_tensor(Float32, (any_int(), heads_batch), (1, any_int()), assumed_align=4),
              make_fake_tensor(Float32, (channels, heads_batch), (1, any_int()), assumed_align=4)]
    out = make_fake_tensor(out_dtype, (any_int(), channels, any_int(), any_int()), (any_int(), 1, any_int(), any_int()),
                           assumed_align=4)
    return (*tiles, *scales, out, Int32(1), Int32(1), make_fake_stream(use_tvm_ffi_env_stream=True))


_COMPILED = {}


def compiled(channels: int = 128, out_dtype=cutlass.BFloat16, **variant):
    """The kernel compiled for this machine's GPU (or CUTE_DSL_ARCH, e.g. sm_90a, without one), called with torch
    tensors through TVM-FFI on its environment stream (cute_runtime.launch sets it to PyTorch's); compiled once a
    process. `variant`: Sage8Hopper's stages, row_sums_in_pv (None: the module's)."""
    variant = {name: value for name, value in variant.items() if value is not None}
    key = (channels, out_dtype, tuple(sorted(variant.items())))
    if key not in _COMPILED:
        _COMPILED[key] = cute.compile(Sage8Hopper(channels, out_dtype, **variant),
                                      *_placeholders(channels, out_dtype), options="--enable-tvm-ffi")
    return _COMPILED[key]


def export(path: str, channels: int = 128, out_dtype=cutlass.BFloat16, **variant) -> None:
    """The kernel as an object file (with CUTE_DSL_ARCH=sm_90a, on any machine), its TVM-FFI function named
    sage8_attention: linked against the DSL's runtime library and TVM-FFI's, it runs where the DSL's compiler is
    not installed (cute_runtime.py)."""
    compiled(channels, out_dtype, **variant).export_to_c(path, function_name="sage8_attention")
