"""sage8's operands from the QK-norm + RoPE pass itself: q as int8 rows, K's column sums and V's amax, in the pass
that writes k and v.

Unfused, the QK-norm + RoPE kernel writes q, k, v in bf16 and sage8's quantization (kontext_kernels/sage_attention.py)
reads them back: a column-statistics pass over k and v, then one pass each for q, k and v. q's scales are per
token (`sage_attention.Q_ROWS` = 1), so q can go to int8 as it is made; K's sums over tokens and V's amax over
tokens can be gathered by atomics there too (the sums in float64, exact for bf16 values, so their order does not
matter). k and v still need those statistics of every token before they are quantized, so they are written in
bf16 as before and quantized by sage_attention's own kernels. The operands equal the unfused path's bit for bit
(tests/kernels/test_sage_qkv.py); bench/RESULTS.md says what the fusion is worth.

With frozen statistics (`frozen_sage_operands`) the pass makes all of sage8's operands itself, in one read of the
projection: K's mean and V's amax come from an earlier step of the same layer (`FrozenStatistics`, recorded by
`record_sage_operands`) instead of this call's tokens. Softmax is invariant to the mean taken off K, whatever it is
(sage_attention's docstring), so a stale mean changes only how well int8 covers the centred keys; V's per-channel
scale gets `V_MARGIN` of headroom against growth since the recording, and e4m3's saturating conversion bounds the
rest. k's one scale per 128 tokens is the tile's own amax: k's programs each hold one 128-token tile of a head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import sage_attention as sa
from .e4m3 import int8_grid, to_e4m3
from .qk_norm_rope import (RMS_EPS, head_tile, joint_qkv_norm_rope, normed_head_pairs, normed_qkv_tile, rope_tables,
                           store_pairs, stream_parts)
from .runtime import (cdiv, import_triton, interpreting, last_dim_contiguous, launches, next_power_of_2,
                      reduction_combines)

triton, tl = import_triton()

_max, _add = reduction_combines()

# Tokens per program and its warps. Heads vary fastest in the grid: the programs resident at once then add into
# every head's statistics instead of all into one head's 128 columns, whose atomics would queue on the same cache
# lines.
BLOCK_L = 64
WARPS = 8


@triton.jit
def _qkv_norm_rope_sage_kernel(
    qkv_ptr, q_scale_ptr, k_scale_ptr, cos_ptr, sin_ptr,
    q8_ptr, q8_scale_ptr, k_ptr, v_ptr, k_sum_ptr, v_amax_bits_ptr,
    offset, length, num_heads, head_dim, padded_length, eps, factor,
    stride_qkv_b, stride_qkv_l, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l,
    stride_kv_b, stride_kv_l, stride_kv_h,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, CHANNELS: tl.constexpr,
):
    # One program per (head, block of tokens, batch) of one stream, whose tokens start at `offset` of the joint
    # sequence.
    head = tl.program_id(0)
    block_l = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    bh = batch * num_heads + head

    tokens = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    token_inside = tokens < length
    dim_inside = dims < head_dim
    tile_inside = token_inside[:, None] & dim_inside[None, :]
    q, k, v = normed_qkv_tile(qkv_ptr, q_scale_ptr, k_scale_ptr, cos_ptr, sin_ptr, batch, head, tokens, length,
                              num_heads, head_dim, eps, stride_qkv_b, stride_qkv_l, stride_cos_b, stride_cos_l,
                              stride_sin_b, stride_sin_l, BLOCK_L, BLOCK_D)
    element = k_ptr.dtype.element_ty
    # Rounded to the activations' dtype first, as the unfused path stores them before quantizing.
    q = q.to(element).to(tl.float32)
    k = k.to(element)

    # q -> int8, one scale per token (sage_attention's _quantize_int8_kernel, Q_ROWS = 1).
    amax = tl.maximum(tl.reduce(tl.abs(q), 1, _max), 1e-30)
    inverse = tl.math.div_rn(tl.full([BLOCK_L], 127.0, tl.float32), amax)
    q8_rows = bh * padded_length + offset + tokens.to(tl.int64)
    tl.store(q8_ptr + q8_rows[:, None] * CHANNELS + dims[None, :], int8_grid(q, inverse[:, None]).to(tl.int8),
             mask=token_inside[:, None])
    tl.store(q8_scale_ptr + q8_rows, tl.math.div_rn(amax, tl.full([BLOCK_L], 127.0, tl.float32)) * factor,
             mask=token_inside)

    # k and v as the plain kernel writes them, [B, L, H, D] of the joint sequence; their statistics by atomics.
    kv = (batch * stride_kv_b + (offset + tokens[:, None]).to(tl.int64) * stride_kv_l + head * stride_kv_h
          + dims[None, :])
    tl.store(k_ptr + kv, k, mask=tile_inside)
    tl.store(v_ptr + kv, v, mask=tile_inside)
    # Relaxed: nothing else is ordered against these sums (the default acq_rel puts a GPU-wide memory barrier
    # before every atomic, which waited on the program's stores and made the pass 2x slower). V's amax goes in
    # as the int32 bits of a float >= 0, which order as the floats do: one atomic instead of Triton's signed-max
    # and unsigned-min pair for floats of either sign.
    tl.atomic_add(k_sum_ptr + bh * CHANNELS + dims, tl.reduce(k.to(tl.float64), 0, _add), mask=dim_inside,
                  sem="relaxed")
    v_amax = tl.reduce(tl.abs(v.to(tl.float32)), 0, _max)
    tl.atomic_max(v_amax_bits_ptr + bh * CHANNELS + dims, v_amax.to(tl.int32, bitcast=True), mask=dim_inside,
                  sem="relaxed")


def _stream_inputs(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                   sin: torch.Tensor, batch: int, head_dim: int):
    """Each non-empty stream as its kernel takes it: (qkv, q_scale, k_scale, cos, sin, offset, length), the
    tensors with their last dims contiguous and the batch-1 tables broadcast over the batch."""
    for (qkv, query_scale, key_scale), offset, cos_part, sin_part in stream_parts(streams, cos, sin):
        length = qkv.shape[1]
        if length == 0:
            continue
        yield (last_dim_contiguous(qkv), query_scale.contiguous(), key_scale.contiguous(),
               last_dim_contiguous(cos_part.expand(batch, 1, length, head_dim // 2)),
               last_dim_contiguous(sin_part.expand(batch, 1, length, head_dim // 2)), offset, length)


def runs_fused(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_heads: int) -> bool:
    """Whether the fused pass takes these streams: head dims whose pair count the kernel tiles (as the plain
    kernel's), and a padded channel count equal to the tile's (head dims of 32 and more)."""
    head_dim = streams[0][0].shape[-1] // (3 * num_heads)
    return head_dim % 2 == 0 and next_power_of_2(head_dim) == sa.padded_head_dim(head_dim)


def joint_sage_operands(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                        sin: torch.Tensor, num_heads: int, fp8_pv: bool, permute_keys: bool | None = None,
                        ) -> sa.Operands:
    """The streams' (qkv [B, L_i, 3*H*D], q_scale, k_scale) -> sage8's operands of their joint sequence, the same
    as `sage_attention.quantize_operands` of `qk_norm_rope.joint_qkv_norm_rope`'s q, k, v (per-token q scales,
    the default k scales). `runs_fused` must hold."""
    if not runs_fused(streams, num_heads):  # the kernel's tiles would write past the operands' channels
        raise ValueError(f"joint_sage_operands: head dim {streams[0][0].shape[-1] // (3 * num_heads)} is not one the "
                         "fused pass tiles (check runs_fused first; joint_qkv_norm_rope and quantize_operands take it)")
    first = streams[0][0]
    batch, device, dtype = first.shape[0], first.device, first.dtype
    head_dim = first.shape[-1] // (3 * num_heads)
    length = sum(qkv.shape[1] for qkv, _, _ in streams)
    channels, padded = sa.padded_head_dim(head_dim), sa.padded_tokens(length)
    k_rows = sa.default_k_rows(fp8_pv)
    if permute_keys is None:
        permute_keys = sa.hopper_kernel_takes(device, fp8_pv, sa.Q_ROWS, k_rows, head_dim)
    q8 = torch.empty((batch, num_heads, padded, channels), dtype=torch.int8, device=device)
    factor = head_dim ** -0.5 * sa.LOG2E
    # Padding rows, which no program writes: zeros, with the scale the unfused quantizer gives an all-zero row.
    q8[:, :, length:] = 0
    q_scale = torch.empty((batch, num_heads, padded), dtype=torch.float32, device=device)
    q_scale[:, :, length:] = (torch.tensor(1e-30) / 127.0) * torch.tensor(factor, dtype=torch.float32)
    kv = torch.empty((2, batch, length, num_heads, head_dim), dtype=dtype, device=device)
    k_sum = torch.zeros((batch, num_heads, channels), dtype=torch.float64, device=device)
    v_amax = torch.zeros((batch, num_heads, channels), dtype=torch.float32, device=device)
    for qkv, query_scale, key_scale, cos_part, sin_part, offset, stream_length in _stream_inputs(
            streams, cos, sin, batch, head_dim):
        _qkv_norm_rope_sage_kernel[(num_heads, cdiv(stream_length, BLOCK_L), batch)](
            qkv, query_scale, key_scale, cos_part, sin_part,
            q8, q_scale, kv[0], kv[1], k_sum, v_amax.view(torch.int32),
            offset, stream_length, num_heads, head_dim, padded, RMS_EPS, factor,
            qkv.stride(0), qkv.stride(1), cos_part.stride(0), cos_part.stride(2), sin_part.stride(0),
            sin_part.stride(2), kv.stride(1), kv.stride(2), kv.stride(3),
            BLOCK_L=BLOCK_L, BLOCK_D=next_power_of_2(head_dim), CHANNELS=channels, num_warps=WARPS,
        )
    launches["qkv_norm_rope_sage"] += 1
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, H, L, D] views of [B, L, H, D]
    return sa.quantize_from_statistics(q8, q_scale, k, v, k_sum, v_amax, length, fp8_pv, k_rows, permute_keys)


def joint_sage_attention(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                         sin: torch.Tensor, num_heads: int, fp8_pv: bool | None = None) -> torch.Tensor:
    """sage8 attention over the streams' joint sequence from their projections: [B, H, L, D], a view of a
    contiguous [B, L, H, D] buffer, equal to `sage_attention.sage_attention` of `qk_norm_rope.joint_qkv_norm_rope`'s
    q, k, v. Head dims the fused pass does not tile (`runs_fused`) take that unfused route, with the same result."""
    first = streams[0][0]
    if fp8_pv is None:
        fp8_pv = sa.fp8_tensor_cores(first.device)
    if not runs_fused(streams, num_heads):
        q, k, v = joint_qkv_norm_rope(streams, cos, sin, num_heads)
        return sa.sage_attention(q, k, v, fp8_pv=fp8_pv)
    return sa.attend(joint_sage_operands(streams, cos, sin, num_heads, fp8_pv), first.dtype)


# ----------------------------------------------------------------------------------------------
# Frozen statistics: every operand in the one pass
# ----------------------------------------------------------------------------------------------

# Headroom of V's frozen scale: v / (V_MARGIN * amax at the recording) stays inside e4m3's range while a channel's
# amax grows by up to this factor. It costs no precision (e4m3 is floating point) except for values under
# 2**-6 / 448 * V_MARGIN of the amax, which go subnormal.
V_MARGIN = 2.0
class FrozenStatistics(NamedTuple):
    """What the frozen pass quantizes with, [B, H, D_pad] float32 each, from the step that recorded them: K's mean
    over tokens; V's amax times V_MARGIN, and V's scale (amax / 448), which the operands hand to attention."""

    k_mean: torch.Tensor
    v_amax: torch.Tensor
    v_scale: torch.Tensor

    @staticmethod
    def of(k_sum: torch.Tensor, v_amax: torch.Tensor, length: int) -> "FrozenStatistics":
        """From column statistics (`sage_attention.column_statistics`) of `length` tokens; true divisions, as the
        unfused kernels' div_rn."""
        amax = (v_amax * V_MARGIN).clamp_min(1e-30)
        e4m3_max = torch.full_like(amax, sa.E4M3_MAX)  # a fill, not a host copy: it runs in CUDA graph capture
        return FrozenStatistics(sa.k_mean_from_sum(k_sum, length), amax, amax / e4m3_max)

    def copy_(self, other: "FrozenStatistics") -> None:
        for mine, theirs in zip(self, other):
            mine.copy_(theirs)

    def reference_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K's mean, V's amax) as `sage_attention.quantize_operands_reference(statistics=)` takes them."""
        return self.k_mean, self.v_amax


# The frozen pass is three kernels, one per operand, each reading only its own slice of the projection: a program
# holds one tile (not q, k and v at once), so more of them share an SM (146 against 158 us for one kernel doing all
# three, bench/RESULTS.md 2026-12-06). k's program holds its whole 128-token tile, whose amax is its scale, and reads
# it once. q and k are read as channel pairs, one 32-bit word a pair (`qk_norm_rope.normed_head_pairs`), so RoPE
# needs no split and join of the tile: 138 -> 123 us a call. Their norms' sums then add in another order than the
# unfused pass's, so a value can round to the neighbouring int8. One head a program: programs working 2 or 4 heads
# (the RoPE tables read once for them) took k from 52 to 74-77 us (RESULTS.md, 2026-12-06, second session).
FROZEN_Q = (32, 4)  # tokens a program, warps
FROZEN_K_WARPS = 4  # a program holds one 128-token tile
FROZEN_V = (32, 4)  # tokens a program, warps


@triton.jit
def _frozen_q_kernel(
    qkv_ptr, q_scale_ptr, cos_ptr, sin_ptr, q8_ptr, q8_scale_ptr,
    offset, length, num_heads, head_dim, padded_length, eps, factor,
    stride_qkv_b, stride_qkv_l, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (head, BLOCK_L tokens, batch); tokens past the stream's end up to its last 128-token
    # tile are padding, written as zero rows with the scale the unfused quantizer gives them. q is rounded to the
    # activations' dtype before it is quantized, as the unfused path stores it.
    head = tl.program_id(0)
    batch = tl.program_id(2).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cos, sin = rope_tables(cos_ptr, sin_ptr, batch, tokens, length, head_dim, stride_cos_b, stride_cos_l,
                           stride_sin_b, stride_sin_l, BLOCK_D)
    element = qkv_ptr.dtype.element_ty
    rows = (batch * num_heads + head) * padded_length + (offset + tokens).to(tl.int64)
    even, odd = normed_head_pairs(qkv_ptr, q_scale_ptr, cos, sin, batch, head * head_dim, tokens, length, head_dim,
                                  eps, stride_qkv_b, stride_qkv_l, BLOCK_D)
    even, odd = even.to(element).to(tl.float32), odd.to(element).to(tl.float32)
    amax = tl.maximum(tl.reduce(tl.maximum(tl.abs(even), tl.abs(odd)), 1, _max), 1e-30)
    inverse = tl.math.div_rn(tl.full([BLOCK_L], 127.0, tl.float32), amax)[:, None]
    store_pairs(q8_ptr, rows, int8_grid(even, inverse), int8_grid(odd, inverse), BLOCK_D)
    tl.store(q8_scale_ptr + rows, tl.math.div_rn(amax, tl.full([BLOCK_L], 127.0, tl.float32)) * factor)


@triton.jit
def _frozen_k_kernel(
    qkv_ptr, k_scale_ptr, cos_ptr, sin_ptr, k_mean_ptr, k8_ptr, k8_scale_ptr,
    offset, length, num_heads, head_dim, padded_length, eps,
    stride_qkv_b, stride_qkv_l, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l,
    PERMUTE: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (head, 128-token tile, batch): the head's tile centred on the frozen mean (padding
    # rows zero), scaled by its own amax.
    head = tl.program_id(0)
    batch = tl.program_id(2).to(tl.int64)
    pairs = tl.arange(0, BLOCK_D // 2)
    first = tl.program_id(1) * TILE
    local = tl.arange(0, TILE)
    tokens = first + local
    inside = (tokens < length)[:, None]
    cos, sin = rope_tables(cos_ptr, sin_ptr, batch, tokens, length, head_dim, stride_cos_b, stride_cos_l,
                           stride_sin_b, stride_sin_l, BLOCK_D)
    if PERMUTE:  # the Hopper kernel's key order
        local = sa.key_rows_in_tile(local)
    element = qkv_ptr.dtype.element_ty
    bh = batch * num_heads + head
    rows = bh * padded_length + offset + first + local
    column = (num_heads + head) * head_dim
    even, odd = normed_head_pairs(qkv_ptr, k_scale_ptr, cos, sin, batch, column, tokens, length, head_dim, eps,
                                  stride_qkv_b, stride_qkv_l, BLOCK_D)
    mean = k_mean_ptr + bh * BLOCK_D + 2 * pairs
    even = tl.where(inside, even.to(element).to(tl.float32) - tl.load(mean), 0.0)
    odd = tl.where(inside, odd.to(element).to(tl.float32) - tl.load(mean + 1), 0.0)
    amax = tl.maximum(tl.reduce(tl.reduce(tl.maximum(tl.abs(even), tl.abs(odd)), 1, _max), 0, _max), 1e-30)
    inverse = tl.math.div_rn(tl.full([], 127.0, tl.float32), amax)
    store_pairs(k8_ptr, rows, int8_grid(even, inverse), int8_grid(odd, inverse), BLOCK_D)
    tl.store(k8_scale_ptr + bh * (padded_length // TILE) + (offset + first) // TILE,
             tl.math.div_rn(amax, tl.full([], 127.0, tl.float32)))


@triton.jit
def _frozen_v_kernel(
    qkv_ptr, v_amax_ptr, v8t_ptr, offset, length, num_heads, head_dim, padded_length, stride_qkv_b, stride_qkv_l,
    EXACT_ROUNDING: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (head, BLOCK_L tokens, batch): v over its frozen per-channel scale to e4m3, transposed
    # ([B, H, D_pad, L_pad]).
    head = tl.program_id(0)
    batch = tl.program_id(2).to(tl.int64)
    bh = batch * num_heads + head
    dims = tl.arange(0, BLOCK_D)
    tokens = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    v = head_tile(qkv_ptr, batch, (2 * num_heads + head) * head_dim, tokens, length, head_dim, stride_qkv_b,
                  stride_qkv_l, BLOCK_D).to(tl.float32)
    # As sage_attention's V kernel: one IEEE division per channel, then a multiply per value.
    v_inverse = tl.math.div_rn(tl.full([BLOCK_D], 448.0, tl.float32), tl.load(v_amax_ptr + bh * BLOCK_D + dims))
    rows = (offset + tokens).to(tl.int64)
    tl.store(v8t_ptr + (bh * BLOCK_D + dims)[None, :].to(tl.int64) * padded_length + rows[:, None],
             to_e4m3(v, v_inverse[None, :], EXACT_ROUNDING))


def runs_frozen(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_heads: int, fp8_pv: bool) -> bool:
    """Whether the frozen pass takes these streams: those `runs_fused` takes, with one k scale per 128 tokens (e4m3
    P·V), every stream but the last a whole number of 128-token tiles (a tile's k scale is one program's), and
    16-bit projections, whose q and k the kernels read as 32-bit channel pairs."""
    return (runs_fused(streams, num_heads) and sa.default_k_rows(fp8_pv) == sa.TOKEN_TILE
            and all(qkv.element_size() == 2 for qkv, _, _ in streams)
            and all(qkv.shape[1] % sa.TOKEN_TILE == 0 for qkv, _, _ in streams[:-1]))


def _readable_as_pairs(qkv: torch.Tensor) -> torch.Tensor:
    """The projection itself where its channel pairs lie in aligned 32-bit words (always, for a layer's output);
    otherwise a compact copy of it."""
    if qkv.stride(0) % 2 == 0 and qkv.stride(1) % 2 == 0 and qkv.data_ptr() % 4 == 0:
        return qkv
    return qkv.clone(memory_format=torch.contiguous_format)


def record_sage_operands(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                         sin: torch.Tensor, num_heads: int, fp8_pv: bool, permute_keys: bool | None = None,
                         ) -> tuple[sa.Operands, FrozenStatistics]:
    """The unfused path's operands (QK-norm + RoPE, then sage8's quantization: the same bytes) and the
    statistics they were quantized with, for `frozen_sage_operands` to reuse."""
    q, k, v = joint_qkv_norm_rope(streams, cos, sin, num_heads)
    k_rows = sa.default_k_rows(fp8_pv)
    if permute_keys is None:
        permute_keys = sa.hopper_kernel_takes(q.device, fp8_pv, sa.Q_ROWS, k_rows, q.shape[3])
    k_sum, v_amax = sa.column_statistics(k, v)
    operands = sa.quantize_with_statistics(q, k, v, k_sum, v_amax, fp8_pv, sa.Q_ROWS, k_rows, permute_keys)
    return operands, FrozenStatistics.of(k_sum, v_amax, k.shape[2])


def frozen_sage_operands(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                         sin: torch.Tensor, num_heads: int, statistics: FrozenStatistics,
                         permute_keys: bool | None = None) -> sa.Operands:
    """sage8's operands (e4m3 P·V) of the streams' joint sequence in one pass, quantized with frozen `statistics`
    [B, H, D_pad]: what `sage_attention.quantize_operands_reference(fp8_pv=True,
    statistics=statistics.reference_statistics())` makes of `qk_norm_rope.joint_qkv_norm_rope`'s q, k, v.
    `runs_frozen(..., fp8_pv=True)` must hold."""
    if not runs_frozen(streams, num_heads, fp8_pv=True):  # a stream's tiles would write past its part of the operands
        raise ValueError("frozen_sage_operands: these streams' lengths or head dim are not the frozen pass's (check "
                         "runs_frozen first; record_sage_operands takes any)")
    first = streams[0][0]
    batch, device = first.shape[0], first.device
    head_dim = first.shape[-1] // (3 * num_heads)
    length = sum(qkv.shape[1] for qkv, _, _ in streams)
    channels, padded = sa.padded_head_dim(head_dim), sa.padded_tokens(length)
    if permute_keys is None:
        permute_keys = sa.hopper_kernel_takes(device, True, sa.Q_ROWS, sa.TOKEN_TILE, head_dim)
    expected = (batch, num_heads, channels)
    if any(tuple(tensor.shape) != expected for tensor in statistics):
        raise ValueError(f"frozen statistics of shape {tuple(statistics.k_mean.shape)} for operands {expected}: "
                         "record them again for this batch and model")
    q8 = torch.empty((batch, num_heads, padded, channels), dtype=torch.int8, device=device)
    q_scale = torch.empty((batch, num_heads, padded), dtype=torch.float32, device=device)
    k8 = torch.empty((batch, num_heads, padded, channels), dtype=torch.int8, device=device)
    k_scale = torch.empty((batch, num_heads, padded // sa.TOKEN_TILE), dtype=torch.float32, device=device)
    v8t = torch.empty((batch, num_heads, channels, padded), dtype=torch.float8_e4m3fn, device=device)
    factor = head_dim ** -0.5 * sa.LOG2E
    block_d = next_power_of_2(head_dim)
    (q_tokens, q_warps), (v_tokens, v_warps) = FROZEN_Q, FROZEN_V
    for qkv, query_scale, key_scale, cos_part, sin_part, offset, stream_length in _stream_inputs(
            streams, cos, sin, batch, head_dim):
        qkv = _readable_as_pairs(qkv)
        tiles = cdiv(stream_length, sa.TOKEN_TILE)
        tables = (cos_part.stride(0), cos_part.stride(2), sin_part.stride(0), sin_part.stride(2))
        _frozen_q_kernel[(num_heads, tiles * (sa.TOKEN_TILE // q_tokens), batch)](
            qkv, query_scale, cos_part, sin_part, q8, q_scale, offset, stream_length, num_heads, head_dim, padded,
            RMS_EPS, factor, qkv.stride(0), qkv.stride(1), *tables,
            BLOCK_L=q_tokens, BLOCK_D=block_d, num_warps=q_warps,
        )
        _frozen_k_kernel[(num_heads, tiles, batch)](
            qkv, key_scale, cos_part, sin_part, statistics.k_mean, k8, k_scale, offset, stream_length, num_heads,
            head_dim, padded, RMS_EPS, qkv.stride(0), qkv.stride(1), *tables,
            PERMUTE=permute_keys, TILE=sa.TOKEN_TILE, BLOCK_D=block_d, num_warps=FROZEN_K_WARPS,
        )
        _frozen_v_kernel[(num_heads, tiles * (sa.TOKEN_TILE // v_tokens), batch)](
            qkv, statistics.v_amax, v8t, offset, stream_length, num_heads, head_dim, padded, qkv.stride(0),
            qkv.stride(1), EXACT_ROUNDING=interpreting(), BLOCK_L=v_tokens, BLOCK_D=block_d, num_warps=v_warps,
        )
    launches["frozen_sage_qkv"] += 1
    return sa.Operands(q8, q_scale, k8, k_scale, v8t, statistics.v_scale, length, length, head_dim, sa.Q_ROWS,
                       sa.TOKEN_TILE, permute_keys)
