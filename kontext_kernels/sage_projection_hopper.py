"""The QKV projection's int8 GEMM writing sage8's operands itself, on Hopper (frozen statistics).

With frozen statistics (kontext_kernels/sage_qkv.py) sage8's operands of a token depend on nothing but that token's
q, k and v and the statistics recorded earlier: q's int8 scale is its own row's, k's is its 128-token tile's, V's is
per channel from the recording. One output tile of the projection's GEMM (kontext_kernels/int8_gemm_hopper.py) is
128 tokens of one head's q, k or v: everything the operands of those tokens need. So here the GEMM's consumers round
their tile to the activations' dtype (what the projection would have stored), put it in shared memory, and work it
there in 32-token chunks as the frozen pass's kernels do: q and k RMS-normalised and rotated, then int8 (k centred on
the recorded mean, its tile's amax as scale, keys in the Hopper attention kernel's order); v over its recorded
per-channel range to e4m3, transposed. The projection is never written to or read back from memory: that pass
(7 ms of a fast step on an H100) goes, and so do the GEMM's 16-bit stores of q, k and v.

A single block's linear1 produces q, k, v and the MLP's input in one GEMM: its tiles past the q/k/v columns are
stored as the plain kernel stores them.

The operands match `sage_qkv.frozen_sage_operands` of the plainly computed projection up to the order of the norm's
sums (tests/test_sage_projection_hopper.py).
"""

from __future__ import annotations

import torch

from . import sage_attention as sa
from .gluon_hopper import TensorDescriptor, fence_async_shared, gl, gluon, gluon_ready, mbarrier, tma
from .int8_gemm_hopper import (BLOCK_K, BLOCK_M, BLOCK_N, GROUP_M, STAGES, _CONSUMER_REGISTERS, _LOADER_REGISTERS,
                               _MAXNREG, _loader, _shared_layouts, _tile_coordinates, accumulate_tile,
                               accumulator_layout, scaled_tile)
from .qk_norm_rope import RMS_EPS
from .runtime import cdiv, launches, multiprocessors

HEAD_DIM = BLOCK_N  # one output tile's columns are one head
CHUNK = 32  # tokens worked at once in the epilogue: 32 float32 values a thread


@gluon.constexpr_function
def _pairs_layout(warps):
    # A thread holds 8 neighbouring channels (4 RoPE pairs) of 4 tokens; 16 lanes share a token's 128 channels.
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16], warps_per_cta=[warps, 1],
                            order=[1, 0])


@gluon.constexpr_function
def _tokens_layout(warps):
    # A thread holds 16 neighbouring tokens of one channel: v is stored transposed, tokens contiguous.
    return gl.BlockedLayout(size_per_thread=[16, 1], threads_per_warp=[2, 16], warps_per_cta=[1, warps],
                            order=[0, 1])


@gluon.jit
def _int8_grid(values, inverse):
    # As e4m3.int8_grid: clamp, then round to an integer (ties to even) by adding and removing 1.5 * 2**23.
    scaled = gl.minimum(gl.maximum(values * inverse, -127.0), 127.0)
    return (scaled + 12582912.0) - 12582912.0


@gluon.jit
def _split_pairs(x):
    """[CHUNK, D] -> its even and odd channels, [CHUNK, D / 2] each (values a thread already holds)."""
    return gl.split(gl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@gluon.jit
def _rows_of(first, CHUNK_: gl.constexpr, layout: gl.constexpr):
    return first + gl.arange(0, CHUNK_, layout=gl.SliceLayout(1, layout))


@gluon.jit
def _rotated_chunk(tile_buffer, chunk, first_token, batch, norm_ptr, cos_ptr, sin_ptr, stride_cos_b, stride_cos_l,
                   stride_sin_b, stride_sin_l, eps, CHUNK_: gl.constexpr, layout: gl.constexpr):
    """Tokens chunk*CHUNK.. of the tile's q or k, RMS-normalised and rotated as qk_norm_rope.normed_head_pairs
    does, rounded to the activations' dtype: (even, odd) float32 [CHUNK, 64]."""
    D: gl.constexpr = tile_buffer.shape[1]  # one head's channels
    x = tile_buffer.slice(chunk * CHUNK_, CHUNK_).load(layout).to(gl.float32)
    tokens = _rows_of(first_token + chunk * CHUNK_, CHUNK_, layout)
    channels = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    # The tables per channel (each pair's value twice), so that they split into the pairs' layout as x does.
    pair = gl.expand_dims(channels // 2, 0)
    cos = gl.load(cos_ptr + batch * stride_cos_b + gl.expand_dims(tokens, 1).to(gl.int64) * stride_cos_l + pair)
    sin = gl.load(sin_ptr + batch * stride_sin_b + gl.expand_dims(tokens, 1).to(gl.int64) * stride_sin_l + pair)
    scale = gl.load(norm_ptr + gl.expand_dims(tokens * 0, 1) + gl.expand_dims(channels, 0)).to(gl.float32)
    even, odd = _split_pairs(x)
    cos, _ = _split_pairs(cos)
    sin, _ = _split_pairs(sin)
    scale_even, scale_odd = _split_pairs(scale)
    rstd = gl.rsqrt(gl.sum(even * even + odd * odd, axis=1) / D + eps)
    even = even * gl.expand_dims(rstd, 1) * scale_even
    odd = odd * gl.expand_dims(rstd, 1) * scale_odd
    element: gl.constexpr = tile_buffer.dtype
    rotated_even = (cos * even - sin * odd).to(element).to(gl.float32)
    rotated_odd = (sin * even + cos * odd).to(element).to(gl.float32)
    return rotated_even, rotated_odd


@gluon.jit
def _joined(even, odd, layout: gl.constexpr):
    return gl.convert_layout(gl.reshape(gl.join(even, odd), [even.shape[0], 2 * even.shape[1]]), layout)


@gluon.jit
def _q_operands(tile_buffer, first_token, batch, row_base, q8_ptr, q8_scale_ptr, norm_ptr, cos_ptr, sin_ptr,
                stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps, factor, BLOCK_M_: gl.constexpr,
                CHUNK_: gl.constexpr, layout: gl.constexpr):
    D: gl.constexpr = tile_buffer.shape[1]  # one head's channels
    # Per-token int8 rows, their scales carrying softmax's 1/sqrt(D) and log2(e) (as sage_attention's).
    channels = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    for chunk in gl.static_range(BLOCK_M_ // CHUNK_):
        even, odd = _rotated_chunk(tile_buffer, chunk, first_token, batch, norm_ptr, cos_ptr, sin_ptr,
                                   stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps, CHUNK_, layout)
        amax = gl.maximum(gl.max(gl.maximum(gl.abs(even), gl.abs(odd)), axis=1), 1e-30)
        inverse = gl.expand_dims(gl.div_rn(gl.full_like(amax, 127.0), amax), 1)
        values = _joined(_int8_grid(even, inverse), _int8_grid(odd, inverse), layout).to(gl.int8)
        rows = _rows_of(row_base + chunk * CHUNK_, CHUNK_, layout).to(gl.int64)
        gl.store(q8_ptr + gl.expand_dims(rows, 1) * D + gl.expand_dims(channels, 0), values)
        scale = gl.convert_layout(gl.div_rn(amax, gl.full_like(amax, 127.0)) * factor, gl.SliceLayout(1, layout))
        gl.store(q8_scale_ptr + rows, scale)


@gluon.jit
def _k_operands(tile_buffer, first_token, batch, row_base, head_row, k8_ptr, k8_scale_ptr, k_mean_ptr, norm_ptr,
                cos_ptr, sin_ptr, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps, PERMUTE: gl.constexpr,
                BLOCK_M_: gl.constexpr, CHUNK_: gl.constexpr, layout: gl.constexpr):
    D: gl.constexpr = tile_buffer.shape[1]  # one head's channels
    # The tile is one k scale's 128 tokens: its amax over every chunk comes first. The rotated k goes back into
    # the buffer (each thread rewrites what it read), so the second pass only centres and rounds it.
    channels = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    tokens = gl.arange(0, CHUNK_, layout=gl.SliceLayout(1, layout))
    mean = gl.load(k_mean_ptr + head_row * D + gl.expand_dims(tokens * 0, 1) + gl.expand_dims(channels, 0))
    mean_even, mean_odd = _split_pairs(mean)
    amax = 1e-30
    for chunk in gl.static_range(BLOCK_M_ // CHUNK_):
        even, odd = _rotated_chunk(tile_buffer, chunk, first_token, batch, norm_ptr, cos_ptr, sin_ptr,
                                   stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps, CHUNK_, layout)
        centred = gl.maximum(gl.abs(even - mean_even), gl.abs(odd - mean_odd))
        amax = gl.maximum(amax, gl.max(gl.max(centred, axis=1), axis=0))
        tile_buffer.slice(chunk * CHUNK_, CHUNK_).store(_joined(even, odd, layout).to(tile_buffer.dtype))
    inverse = gl.div_rn(127.0, amax)
    for chunk in gl.static_range(BLOCK_M_ // CHUNK_):
        even, odd = _split_pairs(tile_buffer.slice(chunk * CHUNK_, CHUNK_).load(layout).to(gl.float32))
        values = _joined(_int8_grid(even - mean_even, inverse), _int8_grid(odd - mean_odd, inverse),
                         layout).to(gl.int8)
        local = chunk * CHUNK_ + gl.arange(0, CHUNK_, layout=gl.SliceLayout(1, layout))
        if PERMUTE:  # the Hopper attention kernel's key order (sage_attention.key_positions)
            local = (local & 0x71) | ((local & 0x2) << 2) | ((local & 0xC) >> 1)
        rows = (row_base + local).to(gl.int64)
        gl.store(k8_ptr + gl.expand_dims(rows, 1) * D + gl.expand_dims(channels, 0), values)
    gl.store(k8_scale_ptr, gl.div_rn(amax, 127.0))


@gluon.jit
def _v_operands(tile_buffer, row_base, head_row, padded_length, v8t_ptr, v_amax_ptr, BLOCK_M_: gl.constexpr,
                CHUNK_: gl.constexpr, WARPS: gl.constexpr):
    D: gl.constexpr = tile_buffer.shape[1]  # one head's channels
    # v over its recorded per-channel range (one IEEE division per channel, as sage_attention's V kernel), to
    # e4m3 with saturation, stored transposed: [B, H, D, L_pad].
    layout: gl.constexpr = _tokens_layout(WARPS)
    channels = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    amax = gl.load(v_amax_ptr + head_row * D + channels)
    inverse = gl.expand_dims(gl.div_rn(gl.full_like(amax, 448.0), amax), 0)
    columns = gl.expand_dims((head_row * D + channels).to(gl.int64) * padded_length, 0)
    for chunk in gl.static_range(BLOCK_M_ // CHUNK_):
        v = tile_buffer.slice(chunk * CHUNK_, CHUNK_).load(layout).to(gl.float32)
        values = gl.minimum(gl.maximum(v * inverse, -448.0), 448.0).to(gl.float8e4nv)
        rows = _rows_of(row_base + chunk * CHUNK_, CHUNK_, layout).to(gl.int64)
        gl.store(v8t_ptr + columns + gl.expand_dims(rows, 1), values)


@gluon.jit
def _sage_consumer(data_ring, weight_ring, ready, free, turns, out_desc, out_buffers, scale_ptr, weight_scale_ptr,
                   bias_ptr, M, N, K, sage_tiles, stream_length, offset, num_heads, padded_length,
                   q8_ptr, q8_scale_ptr, k8_ptr, k8_scale_ptr, v8t_ptr, q_norm_ptr, k_norm_ptr, k_mean_ptr,
                   v_amax_ptr, cos_ptr, sin_ptr, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps, factor,
                   HAS_BIAS: gl.constexpr, PERMUTE: gl.constexpr, GROUP_M: gl.constexpr, CHUNK_: gl.constexpr,
                   WHICH: gl.constexpr, WARPS: gl.constexpr):
    BLOCK_M_: gl.constexpr = out_desc.block_type.shape[0]
    BLOCK_N_: gl.constexpr = out_desc.block_type.shape[1]
    BLOCK_K_: gl.constexpr = data_ring.type.shape[2]
    layout: gl.constexpr = accumulator_layout(WARPS)
    pairs_layout: gl.constexpr = _pairs_layout(WARPS)
    out_buffer = out_buffers.index(WHICH)
    tiles = gl.cdiv(M, BLOCK_M_) * gl.cdiv(N, BLOCK_N_)
    k_tiles = gl.cdiv(K, BLOCK_K_)
    mine = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        if mine % 2 == WHICH:
            pid_m, pid_n = _tile_coordinates(tile, M, N, BLOCK_M_, BLOCK_N_, GROUP_M)
            acc = accumulate_tile(data_ring, weight_ring, ready, free, turns, mine, k_tiles, WHICH, BLOCK_N_,
                                  layout)
            out = scaled_tile(acc, pid_m, pid_n, scale_ptr, weight_scale_ptr, bias_ptr, M, N, HAS_BIAS, BLOCK_M_,
                              BLOCK_N_, layout)
            tma.store_wait(pendings=0)  # the buffer's previous TMA store has left it
            out_buffer.store(out.to(out_desc.dtype))
            if pid_n < sage_tiles:
                # 128 tokens of one batch (the stream's length is whole tiles) and one head's q, k or v.
                first_row = pid_m * BLOCK_M_
                batch = first_row // stream_length
                first_token = first_row - batch * stream_length
                part = pid_n // num_heads
                head_row = batch * num_heads + pid_n - part * num_heads
                row_base = head_row.to(gl.int64) * padded_length + offset + first_token
                if part == 0:
                    _q_operands(out_buffer, first_token, batch, row_base, q8_ptr, q8_scale_ptr, q_norm_ptr, cos_ptr,
                                sin_ptr, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps, factor,
                                BLOCK_M_, CHUNK_, pairs_layout)
                elif part == 1:
                    tile_of_keys = head_row * (padded_length // BLOCK_M_) + (offset + first_token) // BLOCK_M_
                    k_scale_ptr = k8_scale_ptr + tile_of_keys
                    _k_operands(out_buffer, first_token, batch, row_base, head_row, k8_ptr, k_scale_ptr, k_mean_ptr,
                                k_norm_ptr, cos_ptr, sin_ptr, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l,
                                eps, PERMUTE, BLOCK_M_, CHUNK_, pairs_layout)
                else:
                    _v_operands(out_buffer, row_base, head_row, padded_length, v8t_ptr, v_amax_ptr, BLOCK_M_, CHUNK_,
                                WARPS)
            else:
                fence_async_shared()
                tma.async_copy_shared_to_global(out_desc, [pid_m * BLOCK_M_, pid_n * BLOCK_N_], out_buffer)
        mine += 1
    tma.store_wait(pendings=0)


@gluon.jit
def _sage_projection_kernel(data_desc, weight_desc, out_desc, scale_ptr, weight_scale_ptr, bias_ptr, M, N, K,
                            sage_tiles, stream_length, offset, num_heads, padded_length, q8_ptr, q8_scale_ptr,
                            k8_ptr, k8_scale_ptr, v8t_ptr, q_norm_ptr, k_norm_ptr, k_mean_ptr, v_amax_ptr, cos_ptr,
                            sin_ptr, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps, factor,
                            HAS_BIAS: gl.constexpr, PERMUTE: gl.constexpr, GROUP_M: gl.constexpr,
                            CHUNK_: gl.constexpr, STAGES: gl.constexpr, LOADER_REGISTERS: gl.constexpr,
                            CONSUMER_REGISTERS: gl.constexpr):
    WARPS: gl.constexpr = gl.num_warps()
    data_ring = gl.allocate_shared_memory(data_desc.dtype, [STAGES] + data_desc.block_type.shape, data_desc.layout)
    weight_ring = gl.allocate_shared_memory(weight_desc.dtype, [STAGES] + weight_desc.block_type.shape,
                                            weight_desc.layout)
    out_buffers = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for stage in gl.static_range(STAGES):
        mbarrier.init(ready.index(stage), count=1)
        mbarrier.init(free.index(stage), count=1)
    for consumer in gl.static_range(2):
        mbarrier.init(turns.index(consumer), count=1)

    # Each consumer's arguments written out: a tuple built first loses its constexprs on the way in (Triton 3.6).
    FIRST: gl.constexpr = 0
    SECOND: gl.constexpr = 1
    gl.warp_specialize([
        (_sage_consumer, (data_ring, weight_ring, ready, free, turns, out_desc, out_buffers, scale_ptr,
                          weight_scale_ptr, bias_ptr, M, N, K, sage_tiles, stream_length, offset, num_heads, padded_length, q8_ptr,
                          q8_scale_ptr, k8_ptr, k8_scale_ptr, v8t_ptr, q_norm_ptr, k_norm_ptr, k_mean_ptr,
                          v_amax_ptr, cos_ptr, sin_ptr, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps,
                          factor, HAS_BIAS, PERMUTE, GROUP_M, CHUNK_, FIRST, WARPS)),
        (_sage_consumer, (data_ring, weight_ring, ready, free, turns, out_desc, out_buffers, scale_ptr,
                          weight_scale_ptr, bias_ptr, M, N, K, sage_tiles, stream_length, offset, num_heads, padded_length, q8_ptr,
                          q8_scale_ptr, k8_ptr, k8_scale_ptr, v8t_ptr, q_norm_ptr, k_norm_ptr, k_mean_ptr,
                          v_amax_ptr, cos_ptr, sin_ptr, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l, eps,
                          factor, HAS_BIAS, PERMUTE, GROUP_M, CHUNK_, SECOND, WARPS)),
        (_loader, (data_desc, weight_desc, data_ring, weight_ring, ready, free, M, N, K, GROUP_M)),
    ], [WARPS, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])


def takes(data: torch.Tensor, weight: torch.Tensor, num_heads: int, stream_length: int, offset: int) -> bool:
    """Whether the projection's GEMM can write sage8's operands of this stream itself: a Hopper GPU with Gluon, heads
    of 128 channels (one output tile), the stream and its place in the joint sequence whole 128-token tiles (one k
    scale's tokens are one output tile's), and the TMA alignments of int8_gemm_hopper."""
    from .int8_gemm_hopper import ready_for

    return (weight.shape[0] >= 3 * num_heads * HEAD_DIM and data.shape[0] % stream_length == 0
            and stream_length % BLOCK_M == 0 and offset % BLOCK_M == 0 and ready_for(data, weight, torch.bfloat16)
            and gluon_ready(data.device))


def project_to_operands(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, operands: sa.Operands, statistics, query_scale: torch.Tensor,
                        key_scale: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                        stream_length: int, offset: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The projection data [M, K] (int8, M = B * stream_length) x weight [N, K]: sage8's operands of its q, k, v
    columns (the first 3 * H * 128) written into `operands` (sage8's buffers of the joint sequence, this stream's
    tokens from `offset` on) with frozen `statistics` (sage_qkv.FrozenStatistics); the product [M, N] returned,
    its columns past q, k, v as the plain GEMM stores them (those before are not written). cos and sin: this
    stream's RoPE tables [B or 1, 1, stream_length, 64] float32. `takes` must hold."""
    M, K = data.shape
    N = weight.shape[0]
    batch = M // stream_length
    out = torch.empty((M, N), dtype=out_dtype, device=data.device)
    data_layout, weight_layout, out_layout = _shared_layouts(out_dtype)
    tiles = cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    cos, sin = cos.expand(batch, 1, stream_length, HEAD_DIM // 2), sin.expand(batch, 1, stream_length, HEAD_DIM // 2)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    padded_length = operands.q8.shape[2]
    _sage_projection_kernel[(min(multiprocessors(data.device), tiles),)](
        TensorDescriptor.from_tensor(data, [BLOCK_M, BLOCK_K], data_layout),
        TensorDescriptor.from_tensor(weight, [BLOCK_N, BLOCK_K], weight_layout),
        TensorDescriptor.from_tensor(out, [BLOCK_M, BLOCK_N], out_layout),
        scale, weight_scale, out if bias is None else bias, M, N, K,
        3 * num_heads, stream_length, offset, num_heads, padded_length,
        operands.q8, operands.q_scale, operands.k8, operands.k_scale, operands.v8t, query_scale, key_scale,
        statistics.k_mean, statistics.v_amax, cos, sin, cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        RMS_EPS, HEAD_DIM ** -0.5 * sa.LOG2E,
        HAS_BIAS=bias is not None, PERMUTE=operands.keys_permuted, GROUP_M=GROUP_M, CHUNK_=CHUNK, STAGES=STAGES,
        LOADER_REGISTERS=_LOADER_REGISTERS, CONSUMER_REGISTERS=_CONSUMER_REGISTERS, num_warps=4, maxnreg=_MAXNREG)
    launches["sage_projection"] += 1
    return out


def build_offline(has_bias: bool = True, permute_keys: bool = True):
    """The kernel compiled for sm_90 without a GPU (Triton ships ptxas), with the signature a launch at FLUX's
    shapes gets: for the tests and for reading its SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    data_layout, weight_layout, out_layout = _shared_layouts(torch.bfloat16)
    signature = {"data_desc": f"tensordesc<i8[{BLOCK_M}, {BLOCK_K}],{data_layout}>",
                 "weight_desc": f"tensordesc<i8[{BLOCK_N}, {BLOCK_K}],{weight_layout}>",
                 "out_desc": f"tensordesc<bf16[{BLOCK_M}, {BLOCK_N}],{out_layout}>",
                 "scale_ptr": "*fp32", "weight_scale_ptr": "*fp32", "bias_ptr": "*bf16", "M": "i32", "N": "i32",
                 "K": "i32", "sage_tiles": "i32", "stream_length": "i32", "offset": "i32", "num_heads": "i32",
                 "padded_length": "i32", "q8_ptr": "*i8", "q8_scale_ptr": "*fp32", "k8_ptr": "*i8",
                 "k8_scale_ptr": "*fp32", "v8t_ptr": "*fp8e4nv", "q_norm_ptr": "*bf16", "k_norm_ptr": "*bf16",
                 "k_mean_ptr": "*fp32", "v_amax_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                 "stride_cos_b": "i32", "stride_cos_l": "i32", "stride_sin_b": "i32", "stride_sin_l": "i32",
                 "eps": "fp32", "factor": "fp32"}
    constants = dict(HAS_BIAS=has_bias, PERMUTE=permute_keys, GROUP_M=GROUP_M, CHUNK_=CHUNK, STAGES=STAGES,
                     LOADER_REGISTERS=_LOADER_REGISTERS, CONSUMER_REGISTERS=_CONSUMER_REGISTERS)
    signature |= {name: "constexpr" for name in constants}
    names = list(signature)
    divisible = [name for name in signature if name.endswith("_ptr")] + ["N", "K", "stream_length", "offset",
                                                                         "padded_length", "stride_cos_l",
                                                                         "stride_sin_l"]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = GluonASTSource(fn=_sage_projection_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=_MAXNREG))
