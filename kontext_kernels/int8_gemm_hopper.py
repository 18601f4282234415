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
"""

from __future__ import annotations

import functools

import torch

from .gluon_hopper import (TensorDescriptor, fence_async_shared, gl, gluon, gluon_available,  # noqa: F401
                           gluon_ready, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from .runtime import cdiv, launches, multiprocessors


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
def _loader(data_desc, weight_desc, data_ring, weight_ring, ready, free, M, N, K, GROUP_M: gl.constexpr):
    BLOCK_M: gl.constexpr = data_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = data_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = weight_desc.block_type.shape[0]
    STAGES: gl.constexpr = data_ring.type.shape[0]
    tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    filled = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        for ki in range(k_tiles):
            stage = filled % STAGES
            # A stage's "free" barrier starts as if its previous phase had completed: the first pass waits
            # on nothing.
            mbarrier.wait(free.index(stage), ((filled // STAGES) & 1) ^ 1)
            arrived = ready.index(stage)
            mbarrier.expect(arrived, data_desc.block_type.nbytes + weight_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(data_desc, [pid_m * BLOCK_M, ki * BLOCK_K], arrived,
                                            data_ring.index(stage))
            tma.async_copy_global_to_shared(weight_desc, [pid_n * BLOCK_N, ki * BLOCK_K], arrived,
                                            weight_ring.index(stage))
            filled += 1


@gluon.jit
def _consumer(data_ring, weight_ring, ready, free, turns, loaded, out_desc, out_buffers, scale_ptr, weight_scale_ptr,
              bias_ptr, residual_desc, gate_ptr, rows_per_batch, gate_stride, M, N, K, HAS_BIAS: gl.constexpr,
              RESIDUAL: gl.constexpr, BATCHED: gl.constexpr, GROUP_M: gl.constexpr, WHICH: gl.constexpr,
              WARPS: gl.constexpr):
    BLOCK_M: gl.constexpr = out_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = out_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = data_ring.type.shape[2]
    STAGES: gl.constexpr = data_ring.type.shape[0]
    # 8-bit wgmma: m16 x n x k32 per warp, n at most 224 for integers; the tile's columns in 128-wide pieces.
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                     instr_shape=[16, 128, 32])
    rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
    columns_layout: gl.constexpr = gl.SliceLayout(0, layout)
    out_buffer = out_buffers.index(WHICH)

    tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    mine = 0  # the program's tiles are numbered in order; this consumer takes every other one
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        if mine % 2 == WHICH:
            pid_m, pid_n = _tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            taken = mine * k_tiles  # ring slots used by the program's earlier tiles
            # My turn: the other consumer has seen all its stages arrive (the first consumer's first wait is on
            # the barrier's initial, completed phase).
            mbarrier.wait(turns.index(WHICH), ((mine // 2) & 1) ^ (1 - WHICH))
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, layout)
            for ki in range(k_tiles):
                slot = taken + ki
                stage = slot % STAGES
                mbarrier.wait(ready.index(stage), (slot // STAGES) & 1)
                acc = warpgroup_mma(data_ring.index(stage), weight_ring.index(stage).permute((1, 0)), acc,
                                    use_acc=ki > 0, is_async=True)
                # One wgmma in flight: the previous one has read its stage, which goes back to the loader.
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(free.index((slot + STAGES - 1) % STAGES), pred=ki > 0)
            mbarrier.arrive(turns.index(1 - WHICH))  # its main loop may start while this one's last MMA drains
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(free.index((taken + k_tiles - 1) % STAGES))

            offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_layout)
            offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=columns_layout)
            row_scale = gl.load(scale_ptr + offs_m, mask=offs_m < M, other=0.0)
            column_scale = gl.load(weight_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
            out = acc.to(gl.float32) * gl.expand_dims(row_scale, 1) * gl.expand_dims(column_scale, 0)
            if HAS_BIAS:
                bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
                out = out + gl.expand_dims(bias, 0)
            # This consumer's previous store must have left the buffer before it is written again.
            tma.store_wait(pendings=0)
            if RESIDUAL:
                # residual + gate * out, the block's gated add, instead of a pass over the output after it. The
                # residual tile comes through TMA into the output buffer (pointer loads spilled registers); a
                # tile's rows span at most two batches (the launcher's condition), whose gate rows are loaded.
                mbarrier.expect(loaded.index(WHICH), residual_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(residual_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N],
                                                loaded.index(WHICH), out_buffer)
                first_batch = (pid_m * BLOCK_M) // rows_per_batch
                first_gate = gl.load(gate_ptr + first_batch * gate_stride + offs_n, mask=offs_n < N, other=0.0)
                mbarrier.wait(loaded.index(WHICH), (mine // 2) & 1)
                residual = out_buffer.load(layout).to(gl.float32)  # each thread reads the elements it writes below
                gated = residual + gl.expand_dims(first_gate.to(gl.float32), 0) * out
                if BATCHED:
                    # The second batch's rows, with its own gate row: one gate row live at a time (two spilled).
                    last_batch = (gl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // rows_per_batch
                    last_gate = gl.load(gate_ptr + last_batch * gate_stride + offs_n, mask=offs_n < N, other=0.0)
                    in_last = gl.expand_dims(offs_m // rows_per_batch == last_batch, 1)
                    gated = gl.where(in_last, residual + gl.expand_dims(last_gate.to(gl.float32), 0) * out, gated)
                out = gated
            out_buffer.store(out.to(out_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], out_buffer)
        mine += 1
    tma.store_wait(pendings=0)


@gluon.jit
def _int8_linear_pingpong_kernel(data_desc, weight_desc, out_desc, scale_ptr, weight_scale_ptr, bias_ptr,
                                 residual_desc, gate_ptr, rows_per_batch, gate_stride, M, N, K,
                                 HAS_BIAS: gl.constexpr, RESIDUAL: gl.constexpr, BATCHED: gl.constexpr,
                                 GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                                 LOADER_REGISTERS: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr):
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
        mbarrier.init(free.index(stage), count=1)
    for consumer in gl.static_range(2):
        mbarrier.init(turns.index(consumer), count=1)
        mbarrier.init(loaded.index(consumer), count=1)

    FIRST: gl.constexpr = 0
    SECOND: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (data_ring, weight_ring, ready, free, turns, loaded, out_desc, out_buffers, scale_ptr,
                     weight_scale_ptr, bias_ptr, residual_desc, gate_ptr, rows_per_batch, gate_stride, M, N, K,
                     HAS_BIAS, RESIDUAL, BATCHED, GROUP_M, FIRST, WARPS)),
        (_consumer, (data_ring, weight_ring, ready, free, turns, loaded, out_desc, out_buffers, scale_ptr,
                     weight_scale_ptr, bias_ptr, residual_desc, gate_ptr, rows_per_batch, gate_stride, M, N, K,
                     HAS_BIAS, RESIDUAL, BATCHED, GROUP_M, SECOND, WARPS)),
        (_loader, (data_desc, weight_desc, data_ring, weight_ring, ready, free, M, N, K, GROUP_M)),
    ], [WARPS, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])


# One consumer warpgroup per 128x128 output tile: 128 int32 accumulators a thread. 128-byte K tiles fill the
# 128-byte swizzle. Stages: 4 x 32 KB plus two 32 KB output buffers, 192 KB (5 stages fit too, 224 KB of the SM's
# 227: on an H200 at FLUX's shapes 4 were faster on five of six, bench/RESULTS.md).
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
STAGES = 4
GROUP_M = 8
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
def _shared_layouts(out_dtype: torch.dtype):
    element = gl.bfloat16 if out_dtype == torch.bfloat16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8),
            gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], element))


def launch(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype, stages: int = STAGES,
           group_m: int = GROUP_M, residual: torch.Tensor | None = None,
           gate: torch.Tensor | None = None) -> torch.Tensor:
    """data int8 [M, K], scale float32 [M], weight int8 [N, K], weight_scale float32 [N], bias [N] or None.
    With `residual` (contiguous [M, N]) and `gate` ([B, N], unit column stride; rows m of batch m // (M / B)):
    residual + gate * the product, in one pass."""
    M, K = data.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=data.device)
    fused = residual is not None
    if fused and not gated_residual_fits(M, N, residual, gate):
        raise ValueError(f"gated residual: residual {tuple(residual.shape)} (contiguous [M, N] wanted) and gate "
                         f"{tuple(gate.shape)} ([B, N] wanted, B dividing M = {M}, one batch or >= {BLOCK_M} "
                         f"rows each)")
    data_layout, weight_layout, out_layout = _shared_layouts(out_dtype)
    tiles = cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    out_desc = TensorDescriptor.from_tensor(out, [BLOCK_M, BLOCK_N], out_layout)
    _int8_linear_pingpong_kernel[(min(multiprocessors(data.device), tiles),)](
        TensorDescriptor.from_tensor(data, [BLOCK_M, BLOCK_K], data_layout),
        TensorDescriptor.from_tensor(weight, [BLOCK_N, BLOCK_K], weight_layout),
        out_desc, scale, weight_scale, out if bias is None else bias,
        # Unfused, the output's own descriptor and tensor stand in, unread: no second descriptor a launch.
        TensorDescriptor.from_tensor(residual, [BLOCK_M, BLOCK_N], out_layout) if fused else out_desc,
        gate if fused else out,
        M // gate.shape[0] if fused else 1, gate.stride(0) if fused else 0, M, N, K,
        HAS_BIAS=bias is not None, RESIDUAL=fused, BATCHED=fused and gate.shape[0] > 1, GROUP_M=group_m,
        STAGES=stages, LOADER_REGISTERS=_LOADER_REGISTERS,
        CONSUMER_REGISTERS=_CONSUMER_REGISTERS, num_warps=4, maxnreg=_MAXNREG)
    launches["int8_linear_pingpong"] += 1
    return out


def build_offline(out_dtype: torch.dtype = torch.bfloat16, has_bias: bool = True, stages: int = STAGES,
                  residual: bool = False, batched: bool = False):
    """The kernel compiled for sm_90 without a GPU (Triton ships ptxas): for the tests and for reading its SASS.
    The signature is the one a launch at FLUX's shapes gets (16-divisible sizes and pointers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    data_layout, weight_layout, out_layout = _shared_layouts(out_dtype)
    element = "bf16" if out_dtype == torch.bfloat16 else "fp16"
    signature = {"data_desc": f"tensordesc<i8[{BLOCK_M}, {BLOCK_K}],{data_layout}>",
                 "weight_desc": f"tensordesc<i8[{BLOCK_N}, {BLOCK_K}],{weight_layout}>",
                 "out_desc": f"tensordesc<{element}[{BLOCK_M}, {BLOCK_N}],{out_layout}>",
                 "scale_ptr": "*fp32", "weight_scale_ptr": "*fp32", "bias_ptr": f"*{element}",
                 "residual_desc": f"tensordesc<{element}[{BLOCK_M}, {BLOCK_N}],{out_layout}>",
                 "gate_ptr": f"*{element}", "rows_per_batch": "i32",
                 "gate_stride": "i32", "M": "i32", "N": "i32", "K": "i32"}
    constants = dict(HAS_BIAS=has_bias, RESIDUAL=residual, BATCHED=batched, GROUP_M=GROUP_M, STAGES=stages,
                     LOADER_REGISTERS=_LOADER_REGISTERS,
                     CONSUMER_REGISTERS=_CONSUMER_REGISTERS)
    signature |= {name: "constexpr" for name in constants}
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]]
             for name in ("scale_ptr", "weight_scale_ptr", "bias_ptr", "gate_ptr", "gate_stride", "N", "K")}
    source = GluonASTSource(fn=_int8_linear_pingpong_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=_MAXNREG))
