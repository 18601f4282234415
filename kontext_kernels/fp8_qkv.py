"""Quantization around fp8 attention: q, k, v to e4m3 with per-tensor scales, fp8 O back.

`quantize_qkv` fills a small float32 work buffer on the GPU (no host sync) with each tensor's amax
and every scale cuDNN's fp8 attention graph reads (slots below), and writes contiguous [B, H, L, D]
e4m3 copies of q, k, v whatever their strides. `dequantize_output` turns the graph's fp8 O back
into bf16/fp16 with O's descale. `joint_qkv_norm_rope_fp8` makes q8, k8, v8 and the scales straight
from the blocks' qkv projections, in the QK-norm + RoPE kernel's pass (kontext_kernels/qk_norm_rope.py). Each
has a plain PyTorch `*_reference` of the same contract.

Numerics: scale = 448 / amax per tensor. The softmax numerator P in [0, 1] is stored in fp8 with a
fixed scale of 256. O is a convex combination of v's rows, so |O| <= amax(v); its range gets 17/16
of that to cover P's own rounding (at most 1/16 relative).

From the projections, q and k need no amax pass: RMSNorm leaves a row of D values whose squares sum
to at most D, so |x_i| <= sqrt(D) before the norm's weight w, and RoPE rotates pairs without changing
their length, so |q| <= sqrt(D) * max|w_q| (likewise k), the static range their scales cover. e4m3 is
floating point: a range a few times wider than the values costs only the tiny values' precision (those
below 2**-6 of the scale's unit). v has no such bound: it keeps its amax, taken in that same pass.
"""

from __future__ import annotations

import math

import torch

from . import qk_norm_rope
from .e4m3 import E4M3_MAX, to_e4m3
from .runtime import (cdiv, enabled_for, import_triton, interpreting, launches, multiprocessors, next_power_of_2,
                      reduction_combines)

triton, tl = import_triton()

P_SCALE = 256.0
O_MARGIN = 17.0 / 16.0

# Slots of the float32 work buffer, 16 bytes apart (cuDNN takes device scalars by address).
AMAX_Q, AMAX_K, AMAX_V = 0, 4, 8
DESCALE_Q, DESCALE_K, DESCALE_V = 12, 16, 20
SCALE_S, DESCALE_S, SCALE_O, DESCALE_O = 24, 28, 32, 36
AMAX_S_OUT, AMAX_O_OUT = 40, 44  # written by cuDNN
WORK_FLOATS = 48

_STREAMS = ((AMAX_Q, DESCALE_Q), (AMAX_K, DESCALE_K), (AMAX_V, DESCALE_V))


# tl.reduce with Triton's own combines (runtime.reduction_combines says why).
_max, _ = reduction_combines()


def _new_work(device: torch.device) -> torch.Tensor:
    return torch.zeros(WORK_FLOATS, dtype=torch.float32, device=device)


def quantize_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v [B, H, L, D] (any strides) -> (q8, k8, v8, work): contiguous e4m3 copies and the scales."""
    work = _new_work(q.device)
    quantized = []
    for x, (amax_slot, descale_slot) in zip((q, k, v), _STREAMS):
        amax = torch.linalg.vector_norm(x, ord=math.inf, dtype=torch.float32).clamp_min(1e-30)
        work[amax_slot] = amax
        work[descale_slot] = amax / E4M3_MAX
        scaled = (x.float() * (amax.new_tensor(E4M3_MAX) / amax)).clamp(-E4M3_MAX, E4M3_MAX)  # a true division
        quantized.append(scaled.to(torch.float8_e4m3fn).contiguous())
    o_range = work[AMAX_V] * O_MARGIN
    work[SCALE_O] = E4M3_MAX / o_range
    work[DESCALE_O] = o_range / E4M3_MAX
    work[SCALE_S] = P_SCALE
    work[DESCALE_S] = 1.0 / P_SCALE
    return (*quantized, work)


def dequantize_output_reference(o8: torch.Tensor, work: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 O (any dense layout) -> `dtype`, same strides, times O's descale."""
    out = torch.empty_strided(o8.shape, o8.stride(), dtype=dtype, device=o8.device)
    return out.copy_(o8.float() * work[DESCALE_O])


def _qk_bounds(streams) -> torch.Tensor:
    """[max|w_q|, max|w_k|] over every stream's norm weights, float32 (times sqrt(D): the q, k ranges); never
    zero (all-zero weights make all-zero q or k, which any scale keeps finite)."""
    weights = torch.cat([scale for _, scale, _ in streams] + [scale for _, _, scale in streams])
    return torch.linalg.vector_norm(weights.view(2, -1), ord=math.inf, dim=1, dtype=torch.float32).clamp_min(1e-30)


def joint_qkv_norm_rope_fp8_reference(streams, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """Streams of (qkv [B, L_i, 3*H*D], q_scale, k_scale) -> (q8, k8, v8, work) over the joint sequence, as
    `quantize_qkv` returns them, q and k at the static scales of their norms' bounds (module docstring)."""
    # q and k in float32 throughout, as the kernel computes them before its one rounding, to e4m3.
    q, k, _ = qk_norm_rope.joint_qkv_norm_rope_reference(
        [tuple(tensor.float() for tensor in stream) for stream in streams], cos, sin, num_heads)
    v = torch.cat([qkv.unflatten(-1, (3, num_heads, -1))[:, :, 2].transpose(1, 2) for qkv, _, _ in streams], dim=2)
    work = _new_work(q.device)
    root_d = torch.tensor(math.sqrt(q.shape[-1]), dtype=torch.float32, device=q.device)
    quantized = []
    for x, bound, descale_slot in zip((q, k), _qk_bounds(streams) * root_d, (DESCALE_Q, DESCALE_K)):
        work[descale_slot] = bound / E4M3_MAX
        scaled = (x.float() * (bound.new_tensor(E4M3_MAX) / bound)).clamp(-E4M3_MAX, E4M3_MAX)
        quantized.append(scaled.to(torch.float8_e4m3fn))
    *_, v8, v_work = quantize_qkv_reference(v, v, v)
    for slot in (AMAX_V, DESCALE_V, SCALE_S, DESCALE_S, SCALE_O, DESCALE_O):
        work[slot] = v_work[slot]
    return (*quantized, v8, work)


def joint_qkv_norm_rope_fp8(streams, cos: torch.Tensor, sin: torch.Tensor, num_heads: int):
    """Same contract as `joint_qkv_norm_rope_fp8_reference`: the QK-norm + RoPE kernel writes q8 and k8 and
    takes v's amax, then one cast pass quantizes v; the reference where the kernels cannot run."""
    first = streams[0][0]
    head_dim = first.shape[-1] // (3 * num_heads)
    if not (enabled_for(first) and head_dim % 2 == 0 and all(qkv.numel() > 0 for qkv, _, _ in streams)):
        return joint_qkv_norm_rope_fp8_reference(streams, cos, sin, num_heads)
    batch, total = first.shape[0], sum(qkv.shape[1] for qkv, _, _ in streams)
    qk8 = torch.empty((2, batch, num_heads, total, head_dim), dtype=torch.float8_e4m3fn, device=first.device)
    v = torch.empty((batch, num_heads, total, head_dim), dtype=first.dtype, device=first.device)
    work = _new_work(first.device)
    bounds = _qk_bounds(streams)
    for (qkv, q_scale, k_scale), offset, cos_part, sin_part in qk_norm_rope.stream_parts(streams, cos, sin):
        qk_norm_rope.launch_stream(qkv, q_scale, k_scale, cos_part, sin_part, num_heads, qk8, v, offset,
                             fp8=(bounds, work, AMAX_V, DESCALE_Q, DESCALE_K))
    v8 = torch.empty(v.shape, dtype=torch.float8_e4m3fn, device=v.device)
    _launch_quantize(v, v8, work, AMAX_V, DESCALE_V)
    launches["joint_qkv_norm_rope_fp8"] += 1
    return qk8[0], qk8[1], v8, work


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Same contract as `quantize_qkv_reference`; the Triton kernels where they can run."""
    if enabled_for(q) and q.dim() == 4 and min(q.numel(), k.numel(), v.numel()) > 0:
        return _quantize_qkv_triton(q, k, v)
    return quantize_qkv_reference(q, k, v)


def dequantize_output(o8: torch.Tensor, work: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Same contract as `dequantize_output_reference`; the Triton kernel where it can run."""
    # One flat pass over storage: o8 must cover its storage densely, as the graph's output does.
    if enabled_for(o8) and o8.numel() > 0 and o8.untyped_storage().nbytes() == o8.numel():
        return _dequantize_output_triton(o8, work, dtype)
    return dequantize_output_reference(o8, work, dtype)


@triton.jit
def _tile(x_ptr, rows, n_rows, heads, length, stride_b, stride_h, stride_l, stride_d, head_dim,
          BLOCK_D: tl.constexpr):
    """A [rows, BLOCK_D] float32 tile of a strided [B, H, L, D] tensor (rows = flat b, h, l), and its mask."""
    cols = tl.arange(0, BLOCK_D)
    bh = rows // length
    offsets = (bh // heads) * stride_b + (bh % heads) * stride_h + (rows % length) * stride_l
    mask = (rows < n_rows)[:, None] & (cols < head_dim)[None, :]
    x = tl.load(x_ptr + offsets[:, None] + cols[None, :] * stride_d, mask=mask, other=0.0)
    return x.to(tl.float32), mask


@triton.jit
def _amax_kernel(x_ptr, work_ptr, amax_slot, n_rows, heads, length, stride_b, stride_h, stride_l, stride_d,
                 head_dim, TILES_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid-stride over row tiles: one atomic per program, not one per tile. (The tile count is a
    # constexpr: fixed per shape, and Triton's interpreter cannot loop to a runtime bound.)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    first = tl.program_id(0).to(tl.int64)
    for i in tl.range(0, TILES_PER_PROGRAM):
        rows = (first + i * tl.num_programs(0)) * BLOCK_R + tl.arange(0, BLOCK_R)
        x, mask = _tile(x_ptr, rows, n_rows, heads, length, stride_b, stride_h, stride_l, stride_d, head_dim,
                        BLOCK_D)
        acc = tl.maximum(acc, tl.abs(x))
    tl.atomic_max(work_ptr + amax_slot, tl.reduce(tl.reduce(acc, 1, _max), 0, _max),
                 sem="relaxed")  # read after the kernel ends: no barrier before the atomic


@triton.jit
def _quantize_kernel(x_ptr, y_ptr, work_ptr, amax_slot, descale_slot, n_rows, heads, length,
                     stride_b, stride_h, stride_l, stride_d, head_dim,
                     scale_s_slot, descale_s_slot, scale_o_slot, descale_o_slot,
                     E4M3: tl.constexpr, P_SCALE_: tl.constexpr, O_MARGIN_: tl.constexpr,
                     IS_V: tl.constexpr, EXACT_ROUNDING: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    amax = tl.maximum(tl.load(work_ptr + amax_slot), 1e-30)
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    x, mask = _tile(x_ptr, rows, n_rows, heads, length, stride_b, stride_h, stride_l, stride_d, head_dim, BLOCK_D)
    cols = tl.arange(0, BLOCK_D)
    tl.store(y_ptr + rows[:, None] * head_dim + cols[None, :], to_e4m3(x, tl.math.div_rn(E4M3, amax), EXACT_ROUNDING),
             mask=mask)
    if pid == 0:
        tl.store(work_ptr + descale_slot, tl.math.div_rn(amax, E4M3))
        if IS_V:
            o_range = amax * O_MARGIN_
            tl.store(work_ptr + scale_o_slot, E4M3 / o_range)
            tl.store(work_ptr + descale_o_slot, o_range / E4M3)
            tl.store(work_ptr + scale_s_slot, P_SCALE_)
            tl.store(work_ptr + descale_s_slot, 1.0 / P_SCALE_)


@triton.jit
def _dequantize_kernel(o_ptr, out_ptr, work_ptr, descale_slot, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    o = tl.load(o_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (o * tl.load(work_ptr + descale_slot)).to(out_ptr.dtype.element_ty), mask=mask)


# Tiles of 16 rows of D, 4 warps, at most 8 amax programs per SM: measured best on an H100 at
# [1, 24, 8704, 128] (per tensor: amax 24 us, cast 26 us; 32- to 128-row tiles, 8 warps or more
# amax programs were slower).
_BLOCK_ROWS = 16
_WARPS = 4
_AMAX_PROGRAMS_PER_SM = 8
_DEQUANT_BLOCK = 4096


def _programs_for_amax(device: torch.device) -> int:
    if interpreting():  # CPU tensors in tests
        return 4
    return _AMAX_PROGRAMS_PER_SM * multiprocessors(device)


def _quantize_qkv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    work = _new_work(q.device)
    # Every amax first: v's quantize program also writes the scales cuDNN reads, all from finished amaxes.
    for x, (amax_slot, _) in zip((q, k, v), _STREAMS):
        batch, heads, length, head_dim = x.shape
        n_rows = batch * heads * length
        grid = cdiv(n_rows, _BLOCK_ROWS)
        programs = min(grid, _programs_for_amax(x.device))
        _amax_kernel[(programs,)](x, work, amax_slot, n_rows, heads, length, *x.stride(), head_dim,
                                  TILES_PER_PROGRAM=cdiv(grid, programs), BLOCK_R=_BLOCK_ROWS,
                                  BLOCK_D=next_power_of_2(head_dim), num_warps=_WARPS)
    quantized = []
    for x, (amax_slot, descale_slot) in zip((q, k, v), _STREAMS):
        y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        _launch_quantize(x, y, work, amax_slot, descale_slot)
        quantized.append(y)
    launches["quantize_qkv"] += 1
    return (*quantized, work)


def _launch_quantize(x: torch.Tensor, y: torch.Tensor, work: torch.Tensor, amax_slot: int, descale_slot: int) -> None:
    """x [B, H, L, D] (any strides) -> contiguous e4m3 y at the scale of work's finished amax slot; v's
    launch (amax_slot AMAX_V) also writes the scales of the softmax and of O."""
    batch, heads, length, head_dim = x.shape
    n_rows = batch * heads * length
    _quantize_kernel[(cdiv(n_rows, _BLOCK_ROWS),)](
        x, y, work, amax_slot, descale_slot, n_rows, heads, length, *x.stride(), head_dim,
        SCALE_S, DESCALE_S, SCALE_O, DESCALE_O, E4M3=E4M3_MAX, P_SCALE_=P_SCALE, O_MARGIN_=O_MARGIN,
        IS_V=amax_slot == AMAX_V, EXACT_ROUNDING=interpreting(), BLOCK_R=_BLOCK_ROWS,
        BLOCK_D=next_power_of_2(head_dim), num_warps=_WARPS)


def _dequantize_output_triton(o8: torch.Tensor, work: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty_strided(o8.shape, o8.stride(), dtype=dtype, device=o8.device)
    n = o8.numel()
    _dequantize_kernel[(cdiv(n, _DEQUANT_BLOCK),)](o8, out, work, DESCALE_O, n, BLOCK=_DEQUANT_BLOCK,
                                                          num_warps=8)
    launches["dequantize_output"] += 1
    return out
