"""The int8 path's GEMM on Hopper, warp-specialised: written in Gluon, Triton's lower-level language, because
Triton 3.6 does not warp-specialise a `tl.dot` loop on sm_90 (bench/RESULTS.md, "The int8 GEMM").

Same contract as kontext_kernels/int8_gemm.py:

    out[m, n] = (sum_k data[m, k] * weight[n, k]) * scale[m] * weight_scale[n] + bias[n]

The schedule is the "ping-pong" one of Hopper's fastest 8-bit GEMMs. Each persistent program (one per SM) holds
three partitions:
- a loader warp, which only issues TMA copies of the data and weight tiles into a ring of shared-memory stages;
- two consumer warpgroups, which take the program's output tiles in turn. One runs its wgmma main loop while the
  other scales, converts and stores its finished tile, so the tensor cores do not wait out epilogues.
The loader fills the ring in tile order, and the consumers take turns at it through a pair of "turn" barriers:
one starts waiting on its tile's stages only when the other has seen its own last stage arrive. Without the
turns the second consumer would wait on stages more than one lap of the ring ahead, where an mbarrier's phase
parity cannot tell this lap's arrival from an earlier one (on an H200 that read unloaded stages and faulted).

A paired launch (`launch_pair`) takes two products of the same N and K in one tile list, for the double block's
text stream, too small to fill the GPU alone (on by default in kontext_kernels/int8_gemm.py, PAIR_STREAMS).
`SCHEDULES["cooperative"]` has both consumers work on every 128x256 tile at once (64 rows each) against one weight
stage, for less L2 traffic per multiply-add: slower than ping-pong at most of FLUX's shapes, faster at some, by
card (`PLAN_CANDIDATES`; `TUNE_PLANS` picks among them per shape).
"""

from __future__ import annotations

import functools
import statistics
from typing import NamedTuple

import torch

from .gluon_hopper import (TensorDescriptor, fence_async_shared, gl, gluon, gluon_available,  # noqa: F401
                           gluon_ready, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from .runtime import cdiv, launches, multiprocessors, row_bucket


@gluon.jit
def _tile_coordinates(tile, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    # As kontext_kernels/tiles.py: GROUP_M row blocks walk down one column band, so the weight tiles they share
    # are still in L2 when the group's next member asks for them.
    blocks_m = (M + BLOCK_M - 1) // BLOCK_M
    blocks_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * blocks_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = gl.minimum(blocks_m - first_m, GROUP_M)
    in_group = tile % per_group
    return first_m + in_group % group_rows, in_group // group_rows


@gluon.jit
def _load_tile(data_desc, weight_desc, data_ring, weight_ring, ready, free, pid_m, pid_n, k_tiles, filled):
    """Issue one output tile's K steps into the ring; returns the count of ring slots filled so far."""
    BLOCK_M: gl.constexpr = data_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = data_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = weight_desc.block_type.shape[0]
    STAGES: gl.constexpr = data_ring.type.shape[0]
    for ki in range(k_tiles):
        stage = filled % STAGES
        # A stage's "free" barrier starts as if its previous phase had completed: the first pass waits on nothing.
        mbarrier.wait(free.index(stage), ((filled // STAGES) & 1) ^ 1)
        arrived = ready.index(stage)
        mbarrier.expect(arrived, data_desc.block_type.nbytes + weight_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(data_desc, [pid_m * BLOCK_M, ki * BLOCK_K], arrived, data_ring.index(stage))
        tma.async_copy_global_to_shared(weight_desc, [pid_n * BLOCK_N, ki * BLOCK_K], arrived,
                                        weight_ring.index(stage))
        filled += 1
    return filled


@gluon.jit
def _loader(data_desc, weight_desc, data_desc2, weight_desc2, data_ring, weight_ring, ready, free, M, M2, N, K,
            GROUP_M: gl.constexpr, PAIRED: gl.constexpr):
    BLOCK_M: gl.constexpr = data_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = data_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = weight_desc.block_type.shape[0]
    first_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    tiles = first_tiles
    if PAIRED:
        tiles += gl.cdiv(M2, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    filled = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        if PAIRED:
            # The second product's tiles follow the first's in one list, so its tiles fill the first's last round.
            if tile < first_tiles:
                pid_m, pid_n = _tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
                filled = _load_tile(data_desc, weight_desc, data_ring, weight_ring, ready, free, pid_m, pid_n,
                                    k_tiles, filled)
            else:
                pid_m, pid_n = _tile_coordinates(tile - first_tiles, M2, N, BLOCK_M, BLOCK_N, GROUP_M)
                filled = _load_tile(data_desc2, weight_desc2, data_ring, weight_ring, ready, free, pid_m, pid_n,
                                    k_tiles, filled)
        else:
            pid_m, pid_n = _tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            filled = _load_tile(data_desc, weight_desc, data_ring, weight_ring, ready, free, pid_m, pid_n, k_tiles,
                                filled)


@gluon.jit
def _epilogue(acc, first_row, first_column, product, out_buffer, loaded, loaded_phase, N, HAS_BIAS: gl.constexpr,
              RESIDUAL: gl.constexpr, BATCHED: gl.constexpr):
    """Scale, convert and store one consumer's finished part of a tile of `product`, from (first_row, first_column)
    on, with the gated residual where asked, through TMA."""
    out_desc, scale_ptr, weight_scale_ptr, bias_ptr, residual_desc, gate_ptr, rows_per_batch, gate_stride, M = product
    ROWS: gl.constexpr = out_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = out_desc.block_type.shape[1]
    layout: gl.constexpr = acc.type.layout
    rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
    columns_layout: gl.constexpr = gl.SliceLayout(0, layout)
    offs_m = first_row + gl.arange(0, ROWS, layout=rows_layout)
    offs_n = first_column + gl.arange(0, BLOCK_N, layout=columns_layout)
    row_scale = gl.load(scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    column_scale = gl.load(weight_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(gl.float32) * gl.expand_dims(row_scale, 1) * gl.expand_dims(column_scale, 0)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
        out = out + gl.expand_dims(bias, 0)
    # This consumer's previous store must have left the buffer before it is written again.
    tma.store_wait(pendings=0)
    if RESIDUAL:
        # residual + gate * out, the block's gated add, instead of a pass over the output after it. The residual
        # tile comes through TMA into the output buffer (pointer loads spilled registers); a tile's rows span at
        # most two batches (the launcher's condition), whose gate rows are loaded.
        mbarrier.expect(loaded, residual_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(residual_desc, [first_row, first_column], loaded, out_buffer)
        first_batch = first_row // rows_per_batch
        first_gate = gl.load(gate_ptr + first_batch * gate_stride + offs_n, mask=offs_n < N, other=0.0)
        mbarrier.wait(loaded, loaded_phase)
        residual = out_buffer.load(layout).to(gl.float32)  # each thread reads the elements it writes below
        gated = residual + gl.expand_dims(first_gate.to(gl.float32), 0) * out
        if BATCHED:
            # The second batch's rows, with its own gate row: one gate row live at a time (two spilled).
            last_batch = (gl.minimum(first_row + ROWS, M) - 1) // rows_per_batch
            last_gate = gl.load(gate_ptr + last_batch * gate_stride + offs_n, mask=offs_n < N, other=0.0)
            in_last = gl.expand_dims(offs_m // rows_per_batch == last_batch, 1)
            gated = gl.where(in_last, residual + gl.expand_dims(last_gate.to(gl.float32), 0) * out, gated)
        out = gated
    out_buffer.store(out.to(out_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [first_row, first_column], out_buffer)


@gluon.jit
def _main_loop(data_ring, weight_ring, ready, free, taken, k_tiles, part, acc):
    """One tile's K steps from the ring into `acc`, from ring slot `taken` on; the consumer's rows of each data stage
    from row `part` x acc's rows. Each stage goes back to the loader once its wgmma has read it."""
    ROWS: gl.constexpr = acc.type.shape[0]
    STAGES: gl.constexpr = data_ring.type.shape[0]
    for ki in range(k_tiles):
        slot = taken + ki
        stage = slot % STAGES
        mbarrier.wait(ready.index(stage), (slot // STAGES) & 1)
        acc = warpgroup_mma(data_ring.index(stage).slice(part * ROWS, ROWS),
                            weight_ring.index(stage).permute((1, 0)), acc, use_acc=ki > 0, is_async=True)
        # One wgmma in flight: the previous one has read its stage, which goes back to the loader.
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(free.index((slot + STAGES - 1) % STAGES), pred=ki > 0)
    return acc


@gluon.jit
def _finish_tile(acc, tile, first_tiles, part, first, second, out_buffer, loaded, phase, N,
                 HAS_BIAS: gl.constexpr, RESIDUAL: gl.constexpr, BATCHED: gl.constexpr, GROUP_M: gl.constexpr,
                 PAIRED: gl.constexpr, TILE_M: gl.constexpr):
    # The epilogue of the product the tile belongs to (with PAIRED, the second's tiles follow the first's).
    ROWS: gl.constexpr = acc.type.shape[0]
    BLOCK_N: gl.constexpr = acc.type.shape[1]
    if PAIRED:
        if tile < first_tiles:
            pid_m, pid_n = _tile_coordinates(tile, first[8], N, TILE_M, BLOCK_N, GROUP_M)
            _epilogue(acc, pid_m * TILE_M + part * ROWS, pid_n * BLOCK_N, first, out_buffer, loaded, phase, N,
                      HAS_BIAS, RESIDUAL, BATCHED)
        else:
            pid_m, pid_n = _tile_coordinates(tile - first_tiles, second[8], N, TILE_M, BLOCK_N, GROUP_M)
            _epilogue(acc, pid_m * TILE_M + part * ROWS, pid_n * BLOCK_N, second, out_buffer, loaded, phase, N,
                      HAS_BIAS, RESIDUAL, BATCHED)
    else:
        pid_m, pid_n = _tile_coordinates(tile, first[8], N, TILE_M, BLOCK_N, GROUP_M)
        _epilogue(acc, pid_m * TILE_M + part * ROWS, pid_n * BLOCK_N, first, out_buffer, loaded, phase, N, HAS_BIAS,
                  RESIDUAL, BATCHED)


@gluon.jit
def _consumer(data_ring, weight_ring, ready, free, turns, loaded, out_buffers, first, second, N, K,
              HAS_BIAS: gl.constexpr, RESIDUAL: gl.constexpr, BATCHED: gl.constexpr, GROUP_M: gl.constexpr,
              PAIRED: gl.constexpr, COOPERATIVE: gl.constexpr, WHICH: gl.constexpr, WARPS: gl.constexpr):
    # `first` and `second`: each product's (out_desc, scale_ptr, weight_scale_ptr, bias_ptr, residual_desc,
    # gate_ptr, rows_per_batch, gate_stride, M); the second only read when PAIRED.
    # Ping-pong: the two consumers take the program's tiles in turn, each a whole tile. COOPERATIVE: both work on
    # every tile at once, each its half of the rows, against the same weight stage.
    TILE_M: gl.constexpr = data_ring.type.shape[1]
    ROWS: gl.constexpr = first[0].block_type.shape[0]  # this consumer's rows of a tile
    BLOCK_N: gl.constexpr = first[0].block_type.shape[1]
    BLOCK_K: gl.constexpr = data_ring.type.shape[2]
    # 8-bit wgmma: m16 x n x k32 per warp, n at most 224 for integers; the tile's columns in 128-wide pieces.
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                     instr_shape=[16, 128, 32])
    out_buffer = out_buffers.index(WHICH)
    loaded_here = loaded.index(WHICH)

    first_tiles = gl.cdiv(first[8], TILE_M) * gl.cdiv(N, BLOCK_N)
    tiles = first_tiles
    if PAIRED:
        tiles += gl.cdiv(second[8], TILE_M) * gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    mine = 0  # the program's tiles are numbered in order
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        taken = mine * k_tiles  # ring slots used by the program's earlier tiles
        if COOPERATIVE:
            acc = _main_loop(data_ring, weight_ring, ready, free, taken, k_tiles, WHICH,
                             gl.zeros((ROWS, BLOCK_N), gl.int32, layout))
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(free.index((taken + k_tiles - 1) % data_ring.type.shape[0]))
            _finish_tile(acc, tile, first_tiles, WHICH, first, second, out_buffer, loaded_here, mine & 1, N,
                         HAS_BIAS, RESIDUAL, BATCHED, GROUP_M, PAIRED, TILE_M)
        elif mine % 2 == WHICH:
            # My turn: the other consumer has seen all its stages arrive (the first consumer's first wait is on
            # the barrier's initial, completed phase).
            mbarrier.wait(turns.index(WHICH), ((mine // 2) & 1) ^ (1 - WHICH))
            acc = _main_loop(data_ring, weight_ring, ready, free, taken, k_tiles, 0,
                             gl.zeros((ROWS, BLOCK_N), gl.int32, layout))
            mbarrier.arrive(turns.index(1 - WHICH))  # its main loop may start while this one's last MMA drains
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(free.index((taken + k_tiles - 1) % data_ring.type.shape[0]))
            _finish_tile(acc, tile, first_tiles, 0, first, second, out_buffer, loaded_here, (mine // 2) & 1, N,
                         HAS_BIAS, RESIDUAL, BATCHED, GROUP_M, PAIRED, TILE_M)
        mine += 1
    tma.store_wait(pendings=0)


@gluon.jit
def _int8_linear_pingpong_kernel(data_desc, weight_desc, out_desc, scale_ptr, weight_scale_ptr, bias_ptr,
                                 residual_desc, gate_ptr, rows_per_batch, gate_stride, M,
                                 data_desc2, weight_desc2, out_desc2, scale_ptr2, weight_scale_ptr2, bias_ptr2,
                                 residual_desc2, gate_ptr2, rows_per_batch2, gate_stride2, M2, N, K,
                                 HAS_BIAS: gl.constexpr, RESIDUAL: gl.constexpr, BATCHED: gl.constexpr,
                                 GROUP_M: gl.constexpr, STAGES: gl.constexpr, PAIRED: gl.constexpr,
                                 COOPERATIVE: gl.constexpr, LOADER_REGISTERS: gl.constexpr,
                                 CONSUMER_REGISTERS: gl.constexpr):
    # With PAIRED, two products of the same N and K (the double block's text and image streams, each with its own
    # weights) share one launch; the second's arguments end in 2. Without it they are not read. COOPERATIVE: the
    # schedule of `_consumer`'s comment.
    WARPS: gl.constexpr = gl.num_warps()
    data_ring = gl.allocate_shared_memory(data_desc.dtype, [STAGES] + data_desc.block_type.shape, data_desc.layout)
    weight_ring = gl.allocate_shared_memory(weight_desc.dtype, [STAGES] + weight_desc.block_type.shape,
                                            weight_desc.layout)
    out_buffers = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    loaded = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # each consumer's residual
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(free.index(stage), count=2 if COOPERATIVE else 1)  # both consumers read each cooperative stage
    for consumer in gl.static_range(2):
        mbarrier.init(turns.index(consumer), count=1)
        mbarrier.init(loaded.index(consumer), count=1)

    first = (out_desc, scale_ptr, weight_scale_ptr, bias_ptr, residual_desc, gate_ptr, rows_per_batch, gate_stride, M)
    second = (out_desc2, scale_ptr2, weight_scale_ptr2, bias_ptr2, residual_desc2, gate_ptr2, rows_per_batch2,
              gate_stride2, M2)
    FIRST: gl.constexpr = 0
    SECOND: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (data_ring, weight_ring, ready, free, turns, loaded, out_buffers, first, second, N, K,
                     HAS_BIAS, RESIDUAL, BATCHED, GROUP_M, PAIRED, COOPERATIVE, FIRST, WARPS)),
        (_consumer, (data_ring, weight_ring, ready, free, turns, loaded, out_buffers, first, second, N, K,
                     HAS_BIAS, RESIDUAL, BATCHED, GROUP_M, PAIRED, COOPERATIVE, SECOND, WARPS)),
        (_loader, (data_desc, weight_desc, data_desc2, weight_desc2, data_ring, weight_ring, ready, free, M, M2, N, K,
                   GROUP_M, PAIRED)),
    ], [WARPS, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])


# One consumer warpgroup per 128x128 output tile: 128 int32 accumulators a thread. 128-byte K tiles fill the
# 128-byte swizzle. Stages: 4 x 32 KB plus two 32 KB output buffers, 192 KB (5 stages fit too, 224 KB of the SM's
# 227: on an H200 at FLUX's shapes 4 were faster on five of six, bench/RESULTS.md).
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
STAGES = 4


class Schedule(NamedTuple):
    """How the two consumers share the output tiles: `columns` of a tile, the `rows` each consumer stores of it,
    the ring's depth, and whether both consumers work on every tile (`cooperative`) or take turns (ping-pong)."""

    columns: int
    rows: int
    stages: int
    cooperative: bool


# "cooperative": 128x256 tiles, each consumer 64 rows of every tile against the same 256-row weight stage. A
# K step then reads 48 KB from L2 for 8.4M multiply-adds, a quarter less than two 128x128 tiles (64 KB), but the
# consumers' epilogues no longer hide under each other's main loop. 3 stages x 48 KB + two 32 KB output halves
# = 208 KB. Timed on an H200 (bench/RESULTS.md, 2026-12-07, third session): with GROUP_M 8, 3-16% slower than
# ping-pong at FLUX's six shapes, and the fast step 2 ms slower with it for every plain product; the default stays
# ping-pong.
# Its gated-residual epilogue spills (a consumer holds 64x256 products and residuals): plain products are its trial.
SCHEDULES = {"pingpong": Schedule(BLOCK_N, BLOCK_M, STAGES, False), "cooperative": Schedule(256, 64, 3, True)}
SCHEDULE = "pingpong"
GROUP_M = 8


class Plan(NamedTuple):
    """A launch's schedule (a SCHEDULES name), GROUP_M, and ring depth (None: the schedule's own)."""

    schedule: str
    group_m: int
    stages: int | None = None


# The plans a plain product may take. Each sums a tile's int32 products in the same order and runs the same
# epilogue, so all give the same bits (tests/kernels/test_int8_gemm_hopper.py); they differ only in the order tiles are
# taken, how the consumers share them and how far the loader runs ahead. Which is fastest depends on the shape and
# the card (bench/RESULTS.md, 2026-12-07, third to fifth sessions): linear1 on an H200 favoured cooperative GROUP_M
# 16 (0.763 against ping-pong's 0.858 ms), on an H100 cooperative GROUP_M 32 (0.758 against 0.814 in the tuning),
# which there also won at qkv and the MLP's up-projection; on an H200 ping-pong with a 5-stage ring was 4% faster
# at qkv (0.320 against 0.333 ms), on an H100 not.
PLAN_CANDIDATES: tuple[Plan, ...] = (Plan("pingpong", 8), Plan("pingpong", 8, 5), Plan("cooperative", 16),
                                     Plan("cooperative", 32))
# Whether a plain product whose caller names no plan takes the candidate that ran fastest for its shape on this
# card, timed at the shape's first launch outside CUDA graph capture and kept for the process (`tunings`).
# The fast step on an H100: 173.6 and 175.5 ms tuned against 178.5 untuned, equal bit for bit (bench/RESULTS.md,
# 2026-12-07, fifth session).
TUNE_PLANS = True
# Each candidate's time is the median of TUNING_LAUNCHES launches, the candidates taking turns launch by launch
# after TUNING_WARMUP turns untimed: clock and power drift then fall on all alike. (Best-of-rounds timing, each
# candidate's launches back to back, once chose ping-pong for linear1 on an H100 where the cooperative plan is 8%
# faster: bench/RESULTS.md, 2026-12-07, fifth session.) Up to about 60 ms once per shape at FLUX's sizes.
TUNING_WARMUP, TUNING_LAUNCHES = 3, 15


class Tuning(NamedTuple):
    """One shape's tuning: the plan taken, and every candidate's median milliseconds a launch."""

    plan: Plan
    medians: dict[Plan, float]


# (device index, N, K, row bucket, products in the launch, bias, output dtype) -> its Tuning.
_tunings: dict[tuple, Tuning] = {}


def tunings() -> dict[tuple, Tuning]:
    """The shapes tuned so far in this process, keyed as `_tuning_key` makes them."""
    return dict(_tunings)


# Registers: 3 warpgroups (the loader's warp rounds up to one) x 128 threads share 64K; 168 a thread on
# average lets each consumer have 232 and the loader's group 40.
_MAXNREG, _CONSUMER_REGISTERS, _LOADER_REGISTERS = 168, 232, 40


def ready_for(data: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the warp-specialised kernel takes this product: a Hopper GPU, Gluon, 2-byte outputs, and the
    16-byte alignments TMA needs (rows of at least one K tile, N a multiple of 8)."""
    return (gluon_ready(data.device)
            and out_dtype in (torch.bfloat16, torch.float16) and data.dim() == 2 and data.shape[1] >= BLOCK_K
            and data.stride(1) == 1 and weight.stride(1) == 1 and data.stride(0) % 16 == 0
            and weight.stride(0) % 16 == 0 and data.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and weight.shape[0] % 8 == 0)


def gated_residual_fits(M: int, N: int, residual: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether the epilogue can add residual [M, N] + gate [B, N] * product: residual contiguous and 16-byte
    aligned (TMA), the gate's columns unit-strided, and each output tile's rows within two batches."""
    return (residual.shape == (M, N) and residual.is_contiguous() and residual.data_ptr() % 16 == 0
            and gate.dim() == 2 and gate.shape[1] == N and gate.stride(1) == 1 and M % gate.shape[0] == 0
            and (gate.shape[0] == 1 or M // gate.shape[0] >= BLOCK_M))


@functools.cache
def _shared_layouts(out_dtype: torch.dtype, schedule: Schedule):
    element = gl.bfloat16 if out_dtype == torch.bfloat16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8),
            gl.NVMMASharedLayout.get_default_for([schedule.columns, BLOCK_K], gl.int8),
            gl.NVMMASharedLayout.get_default_for([schedule.rows, schedule.columns], element))


class Product(NamedTuple):
    """One int8 GEMM's operands, as `launch` takes them: data int8 [M, K], scale float32 [M], weight int8 [N, K],
    weight_scale float32 [N], bias [N] or None; with `residual` (contiguous [M, N]) and `gate` ([B, N], unit column
    stride; rows m of batch m // (M / B)), residual + gate * the product."""

    data: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor | None = None
    gate: torch.Tensor | None = None


def pair_fits(first: Product, second: Product) -> bool:
    """Whether two products can share one launch: the same N and K, and the same epilogue (bias or not, gated
    residual or not), of one batch where the residual is gated."""
    def form(product: Product):
        gate_rows = 0 if product.gate is None else product.gate.shape[0]
        return (product.weight.shape, product.bias is None, product.residual is None, gate_rows > 1)
    # Two gate rows live in each of the paired epilogue's two branches spill registers (offline sm_90 build): a
    # batch of several keeps its two launches.
    several_batches = first.gate is not None and first.gate.shape[0] > 1
    return form(first) == form(second) and not several_batches


def _kernel_arguments(product: Product, out: torch.Tensor, schedule: Schedule) -> list:
    """One product's arguments of the kernel, from `data_desc` to `M`."""
    data, scale, weight, weight_scale, bias, residual, gate = product
    M, N = out.shape
    fused = residual is not None
    if fused and not gated_residual_fits(M, N, residual, gate):
        raise ValueError(f"gated residual: residual {tuple(residual.shape)} (contiguous [M, N] wanted) and gate "
                         f"{tuple(gate.shape)} ([B, N] wanted, B dividing M = {M}, one batch or >= {BLOCK_M} "
                         f"rows each)")
    data_layout, weight_layout, out_layout = _shared_layouts(out.dtype, schedule)
    out_block = [schedule.rows, schedule.columns]
    out_desc = TensorDescriptor.from_tensor(out, out_block, out_layout)
    return [TensorDescriptor.from_tensor(data, [BLOCK_M, BLOCK_K], data_layout),
            TensorDescriptor.from_tensor(weight, [schedule.columns, BLOCK_K], weight_layout),
            out_desc, scale, weight_scale, out if bias is None else bias,
            # Unfused, the output's own descriptor and tensor stand in, unread: no second descriptor a launch.
            TensorDescriptor.from_tensor(residual, out_block, out_layout) if fused else out_desc,
            gate if fused else out, M // gate.shape[0] if fused else 1, gate.stride(0) if fused else 0, M]


def _group_and_schedule(gated_residual: bool, group_m: int | None, schedule_name: str | None) -> tuple[int, Schedule]:
    """GROUP_M and the schedule of a launch from what was asked (None: the defaults); a gated residual always takes
    ping-pong's epilogue (the cooperative one spills, SCHEDULES' comment)."""
    schedule = SCHEDULES[schedule_name or SCHEDULE]
    if schedule.cooperative and gated_residual:
        schedule = SCHEDULES["pingpong"]
    return GROUP_M if group_m is None else group_m, schedule


def _tuning_key(products: list[Product], out_dtype: torch.dtype) -> tuple:
    first = products[0]
    rows = sum(product.data.shape[0] for product in products)
    return (first.data.device.index, *first.weight.shape, row_bucket(rows), len(products), first.bias is not None,
            out_dtype)


def _launch_times(runs: list, turns: int) -> list[list[float]]:
    """Milliseconds of each launch of every run over `turns` turns, the runs taking turns launch by launch (the
    order rotated each turn), on the current stream."""
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(turns)]
              for _ in runs]
    for turn in range(turns):
        for offset in range(len(runs)):
            index = (turn + offset) % len(runs)
            start, end = events[index][turn]
            start.record()
            runs[index]()
            end.record()
    torch.cuda.current_stream().synchronize()
    return [[start.elapsed_time(end) for start, end in run_events] for run_events in events]


def _tuned_plan(products: list[Product], outs: list[torch.Tensor]) -> Plan | None:
    """The fastest of PLAN_CANDIDATES for these products' shape on this card, timed on the products themselves at
    the shape's first launch (a plain product only writes its outputs, so running it again changes nothing).
    During CUDA graph capture nothing can be timed: an untimed shape takes the defaults there (None)."""
    key = _tuning_key(products, outs[0].dtype)
    tuning = _tunings.get(key)
    if tuning is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        runs = [functools.partial(_run, products, outs, SCHEDULES[plan.schedule], plan.group_m, plan.stages)
                for plan in PLAN_CANDIDATES]
        with torch.cuda.device(outs[0].device):  # the events on the products' card, whichever is current
            for run in runs:  # builds each candidate before any is timed
                run()
            _launch_times(runs, TUNING_WARMUP)
            times = _launch_times(runs, TUNING_LAUNCHES)
        medians = {candidate: statistics.median(run_times) for candidate, run_times in zip(PLAN_CANDIDATES, times)}
        tuning = _tunings[key] = Tuning(min(medians, key=medians.__getitem__), medians)
    return tuning.plan


def _run(products: list[Product], outs: list[torch.Tensor], schedule: Schedule, group_m: int,
         stages: int | None) -> None:
    first = products[0]
    N, K = first.weight.shape[0], first.data.shape[1]
    arguments = [_kernel_arguments(product, out, schedule) for product, out in zip(products, outs)]
    tiles = sum(cdiv(out.shape[0], BLOCK_M) for out in outs) * cdiv(N, schedule.columns)
    _int8_linear_pingpong_kernel[(min(multiprocessors(first.data.device), tiles),)](
        *arguments[0], *arguments[-1], N, K,
        HAS_BIAS=first.bias is not None, RESIDUAL=first.residual is not None,
        BATCHED=first.gate is not None and first.gate.shape[0] > 1, GROUP_M=group_m,
        STAGES=stages or schedule.stages, PAIRED=len(products) == 2, COOPERATIVE=schedule.cooperative,
        LOADER_REGISTERS=_LOADER_REGISTERS, CONSUMER_REGISTERS=_CONSUMER_REGISTERS, num_warps=4, maxnreg=_MAXNREG)


def _launch(products: list[Product], out_dtype: torch.dtype, stages: int | None, group_m: int | None,
            schedule_name: str | None) -> list[torch.Tensor]:
    first = products[0]
    N = first.weight.shape[0]
    outs = [torch.empty((product.data.shape[0], N), dtype=out_dtype, device=first.data.device)
            for product in products]
    gated_residual = first.residual is not None
    # A caller's stages, GROUP_M or schedule is a plan of its own (a ring deeper than the cooperative one's 3
    # stages would not fit its shared memory).
    if TUNE_PLANS and stages is None and group_m is None and schedule_name is None and not gated_residual:
        plan = _tuned_plan(products, outs)
        if plan is not None:
            schedule_name, group_m, stages = plan
    group_m, schedule = _group_and_schedule(gated_residual, group_m, schedule_name)
    _run(products, outs, schedule, group_m, stages)
    launches["int8_linear_pingpong"] += 1  # the product's launch; the tuning's timed runs are not counted
    return outs


def launch(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype, stages: int | None = None,
           group_m: int | None = None, residual: torch.Tensor | None = None,
           gate: torch.Tensor | None = None, schedule: str | None = None) -> torch.Tensor:
    """The product of `Product`'s operands (residual + gate * it with `residual` and `gate`), in out_dtype."""
    return _launch([Product(data, scale, weight, weight_scale, bias, residual, gate)], out_dtype, stages, group_m,
                   schedule)[0]


def launch_pair(first: Product, second: Product, out_dtype: torch.dtype, stages: int | None = None,
                group_m: int | None = None, schedule: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two products in one launch, their tiles in one list (`pair_fits` must hold; each as `launch`'s): a product
    too small to fill the GPU, as the double block's 512 text tokens, runs in the other's last round of tiles
    instead of a round of its own."""
    if not pair_fits(first, second):
        raise ValueError("launch_pair: the two products differ in N, K or epilogue (bias, gated residual), or have "
                         "a gated residual over several batches; launch each on its own")
    out_first, out_second = _launch([first, second], out_dtype, stages, group_m, schedule)
    return out_first, out_second


def build_offline(out_dtype: torch.dtype = torch.bfloat16, has_bias: bool = True, stages: int | None = None,
                  residual: bool = False, batched: bool = False, paired: bool = False, schedule: str = SCHEDULE):
    """The kernel compiled for sm_90 without a GPU (Triton ships ptxas): for the tests and for reading its SASS.
    The signature is the one a launch at FLUX's shapes gets (16-divisible sizes and pointers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    plan = SCHEDULES[schedule]
    data_layout, weight_layout, out_layout = _shared_layouts(out_dtype, plan)
    element = "bf16" if out_dtype == torch.bfloat16 else "fp16"
    out_block = f"{element}[{plan.rows}, {plan.columns}]"
    signature = {}
    for suffix in ("", "2"):
        signature |= {f"data_desc{suffix}": f"tensordesc<i8[{BLOCK_M}, {BLOCK_K}],{data_layout}>",
                      f"weight_desc{suffix}": f"tensordesc<i8[{plan.columns}, {BLOCK_K}],{weight_layout}>",
                      f"out_desc{suffix}": f"tensordesc<{out_block},{out_layout}>",
                      f"scale_ptr{suffix}": "*fp32", f"weight_scale_ptr{suffix}": "*fp32",
                      f"bias_ptr{suffix}": f"*{element}",
                      f"residual_desc{suffix}": f"tensordesc<{out_block},{out_layout}>",
                      f"gate_ptr{suffix}": f"*{element}", f"rows_per_batch{suffix}": "i32",
                      f"gate_stride{suffix}": "i32", f"M{suffix}": "i32"}
    signature |= {"N": "i32", "K": "i32"}
    constants = dict(HAS_BIAS=has_bias, RESIDUAL=residual, BATCHED=batched, GROUP_M=GROUP_M,
                     STAGES=stages or plan.stages, PAIRED=paired, COOPERATIVE=plan.cooperative,
                     LOADER_REGISTERS=_LOADER_REGISTERS, CONSUMER_REGISTERS=_CONSUMER_REGISTERS)
    signature |= {name: "constexpr" for name in constants}
    names = list(signature)
    attrs = {(names.index(f"{name}{suffix}"),): [["tt.divisibility", 16]]
             for name in ("scale_ptr", "weight_scale_ptr", "bias_ptr", "gate_ptr", "gate_stride")
             for suffix in ("", "2")}
    attrs |= {(names.index(name),): [["tt.divisibility", 16]] for name in ("N", "K")}
    source = GluonASTSource(fn=_int8_linear_pingpong_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=_MAXNREG))
