"""Split the fused qkv projection into heads, RMS-normalise q and k, rotate them, in one pass.

Unfused this is a permute, two norms (each a float32 round trip), two RoPE passes and the copies
that make the attention inputs contiguous; the kernel reads qkv once and writes q, k, v once,
as [B, H, L, D] tensors for attention. The joint entry point lays them out [B, L, H, D] in memory:
attention then returns its output in that order too, so its [B, L, H*D] view for the projection
after it is free rather than a transposing copy (cuDNN runs both layouts at the same rate).
"""

from __future__ import annotations

import math

import torch

from .e4m3 import to_e4m3
from .runtime import (cdiv, enabled_for, import_triton, interpreting, last_dim_contiguous, launches,
                      next_power_of_2, reduction_combines)

triton, tl = import_triton()

RMS_EPS = 1e-6

# tl.reduce with Triton's own combines (runtime.reduction_combines says why).
_max, _add = reduction_combines()


def qkv_norm_rope_reference(qkv: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor,
                            num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, L, 3*H*D]; q_scale, k_scale [D]; cos, sin [B or 1, 1, L, D/2] -> q, k, v [B, H, L, D].

    The model's own steps: split into heads, RMSNorm (float32 statistics) on q and k, then RoPE on
    adjacent pairs computed in float32. All three outputs are contiguous, in qkv.dtype.
    """
    batch, length, _ = qkv.shape
    q, k, v = qkv.view(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)
        return normed.to(x.dtype) * weight.to(x.dtype)

    def rope(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        cos32, sin32 = cos.float(), sin.float()
        rotated = torch.stack((cos32 * even - sin32 * odd, sin32 * even + cos32 * odd), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    q = rope(rms_norm(q, q_scale))
    k = rope(rms_norm(k, k_scale))
    return q.contiguous(), k.contiguous(), v.contiguous()


def qkv_norm_rope(qkv: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv_norm_rope_reference`'s values, the Triton kernel where it can run; q, k, v laid out
    [B, L, H, D] in memory, as `joint_qkv_norm_rope` writes them."""
    q, k, v = joint_qkv_norm_rope([(qkv, q_scale, k_scale)], cos, sin, num_heads)
    return q, k, v


@triton.jit
def _norm_rope_tile(x, scale, cos, sin, head_dim, eps,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """RMSNorm then RoPE on a [BLOCK_L, BLOCK_D] float32 tile (padding columns are zero)."""
    rstd = tl.rsqrt(tl.reduce(x * x, 1, _add) / head_dim + eps)
    normed = x * rstd[:, None] * scale[None, :]
    even, odd = tl.split(tl.reshape(normed, (BLOCK_L, BLOCK_D // 2, 2)))
    rotated = tl.join(cos * even - sin * odd, sin * even + cos * odd)
    return tl.reshape(rotated, (BLOCK_L, BLOCK_D))


@triton.jit
def head_tile(qkv_ptr, batch, column, tokens, length, head_dim, stride_qkv_b, stride_qkv_l, BLOCK_D: tl.constexpr):
    """One head's slice of a [B, L, 3*H*D] projection, from `column` on, for `tokens`: [BLOCK_L, BLOCK_D] as
    stored, zero outside the tokens and head dims."""
    dims = tl.arange(0, BLOCK_D)
    inside = (tokens < length)[:, None] & (dims < head_dim)[None, :]
    row = qkv_ptr + batch * stride_qkv_b + tokens[:, None].to(tl.int64) * stride_qkv_l + dims[None, :]
    return tl.load(row + column, mask=inside, other=0.0)


@triton.jit
def rope_tables(cos_ptr, sin_ptr, batch, tokens, length, head_dim, stride_cos_b, stride_cos_l, stride_sin_b,
                stride_sin_l, BLOCK_D: tl.constexpr):
    """cos and sin of `tokens`' pairs: [BLOCK_L, BLOCK_D // 2] float32, zero outside."""
    pairs = tl.arange(0, BLOCK_D // 2)
    inside = (tokens < length)[:, None] & (pairs[None, :] < head_dim // 2)
    cos = tl.load(cos_ptr + batch * stride_cos_b + tokens[:, None] * stride_cos_l + pairs[None, :],
                  mask=inside, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + batch * stride_sin_b + tokens[:, None] * stride_sin_l + pairs[None, :],
                  mask=inside, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def normed_head_tile(qkv_ptr, scale_ptr, cos, sin, batch, column, tokens, length, head_dim, eps, stride_qkv_b,
                     stride_qkv_l, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One head's q or k (the slice from `column` on), RMS-normalised with `scale` and rotated by `rope_tables`'
    cos and sin: [BLOCK_L, BLOCK_D] float32."""
    dims = tl.arange(0, BLOCK_D)
    x = head_tile(qkv_ptr, batch, column, tokens, length, head_dim, stride_qkv_b, stride_qkv_l, BLOCK_D)
    scale = tl.load(scale_ptr + dims, mask=dims < head_dim, other=0.0).to(tl.float32)
    return _norm_rope_tile(x.to(tl.float32), scale, cos, sin, head_dim, eps, BLOCK_L, BLOCK_D)


@triton.jit
def normed_head_pairs(qkv_ptr, scale_ptr, cos, sin, batch, column, tokens, length, head_dim, eps, stride_qkv_b,
                      stride_qkv_l, BLOCK_D: tl.constexpr):
    """`normed_head_tile`'s values as two [BLOCK_L, BLOCK_D // 2] float32 tiles, the even channels and the odd ones.

    Each pair is read as one 32-bit word and split by bit operations, so RoPE pairs up values the thread already
    holds: no split and join of the tile through a layout change. The norm's sum adds each pair's squares first,
    so its last bit can differ from `normed_head_tile`'s. 16-bit activations, even strides and column."""
    pairs = tl.arange(0, BLOCK_D // 2)
    pair_inside = pairs < head_dim // 2
    inside = (tokens < length)[:, None] & pair_inside[None, :]
    words = qkv_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
    offsets = batch * (stride_qkv_b // 2) + tokens[:, None].to(tl.int64) * (stride_qkv_l // 2) + column // 2
    bits = tl.load(words + offsets + pairs[None, :], mask=inside, other=0)
    element = qkv_ptr.dtype.element_ty
    even = (bits & 0xFFFF).to(tl.uint16).to(element, bitcast=True).to(tl.float32)  # little-endian: low half first
    odd = (bits >> 16).to(tl.uint16).to(element, bitcast=True).to(tl.float32)
    scale_even = tl.load(scale_ptr + 2 * pairs, mask=pair_inside, other=0.0).to(tl.float32)
    scale_odd = tl.load(scale_ptr + 2 * pairs + 1, mask=pair_inside, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(even * even + odd * odd, 1, _add) / head_dim + eps)
    even = even * rstd[:, None] * scale_even[None, :]
    odd = odd * rstd[:, None] * scale_odd[None, :]
    return cos * even - sin * odd, sin * even + cos * odd


@triton.jit
def store_pairs(ptr, rows, even, odd, BLOCK_D: tl.constexpr):
    """Integral float32 values in [-128, 127], two [BLOCK_L, BLOCK_D // 2] tiles of even and odd channels, stored
    interleaved as int8 rows of BLOCK_D at `rows` of an int8 tensor: one 16-bit word a pair."""
    pairs = tl.arange(0, BLOCK_D // 2)
    words = ((even.to(tl.int32) & 0xFF) | ((odd.to(tl.int32) & 0xFF) << 8)).to(tl.uint16)
    tl.store(ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + rows[:, None] * (BLOCK_D // 2) + pairs[None, :],
             words)


@triton.jit
def normed_qkv_tile(qkv_ptr, q_scale_ptr, k_scale_ptr, cos_ptr, sin_ptr, batch, head, tokens, length, num_heads,
                    head_dim, eps, stride_qkv_b, stride_qkv_l, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One head's q and k (float32, RMS-normalised and rotated) and v (as stored) for `tokens` of a [B, L, 3*H*D]
    projection: [BLOCK_L, BLOCK_D] tiles, zero outside the tokens and head dims."""
    cos, sin = rope_tables(cos_ptr, sin_ptr, batch, tokens, length, head_dim, stride_cos_b, stride_cos_l,
                           stride_sin_b, stride_sin_l, BLOCK_D)
    q = normed_head_tile(qkv_ptr, q_scale_ptr, cos, sin, batch, head * head_dim, tokens, length, head_dim, eps,
                         stride_qkv_b, stride_qkv_l, BLOCK_L, BLOCK_D)
    k = normed_head_tile(qkv_ptr, k_scale_ptr, cos, sin, batch, (num_heads + head) * head_dim, tokens, length,
                         head_dim, eps, stride_qkv_b, stride_qkv_l, BLOCK_L, BLOCK_D)
    v = head_tile(qkv_ptr, batch, (2 * num_heads + head) * head_dim, tokens, length, head_dim, stride_qkv_b,
                  stride_qkv_l, BLOCK_D)
    return q, k, v


@triton.jit
def _qkv_norm_rope_kernel(
    qkv_ptr, q_scale_ptr, k_scale_ptr, cos_ptr, sin_ptr, qk_ptr, v_ptr,
    stride_out_plane, stride_out_b, stride_out_h, stride_out_l, stride_v_b, stride_v_h, stride_v_l,
    length, num_heads, head_dim, eps,
    stride_qkv_b, stride_qkv_l, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l,
    bounds_ptr, work_ptr, amax_v_slot, descale_q_slot, descale_k_slot, sqrt_head_dim,
    QK_FP8: tl.constexpr, EXACT_ROUNDING: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (block of tokens, head, batch): q, k and v of that head for those tokens.
    block_l = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    tokens = block_l * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    tile_inside = (tokens < length)[:, None] & (dims[None, :] < head_dim)
    q, k, v = normed_qkv_tile(qkv_ptr, q_scale_ptr, k_scale_ptr, cos_ptr, sin_ptr, batch, head, tokens, length,
                              num_heads, head_dim, eps, stride_qkv_b, stride_qkv_l, stride_cos_b, stride_cos_l,
                              stride_sin_b, stride_sin_l, BLOCK_L, BLOCK_D)

    # qk is [2, B, H, L_out, D] and v [B, H, L_out, D] from this stream's first token, head dims
    # contiguous, the other strides as given.
    plane = stride_out_plane
    token_rows = tokens[:, None].to(tl.int64)
    tile = batch * stride_out_b + head * stride_out_h + token_rows * stride_out_l + dims[None, :]
    v_tile = batch * stride_v_b + head * stride_v_h + token_rows * stride_v_l + dims[None, :]
    if QK_FP8:
        # Static per-tensor scales from the bounds (kontext_kernels/fp8_qkv.py derives them); v's amax for
        # its own quantization pass, which needs the whole tensor's.
        bound_q = tl.load(bounds_ptr) * sqrt_head_dim
        bound_k = tl.load(bounds_ptr + 1) * sqrt_head_dim
        tl.store(qk_ptr + tile, to_e4m3(q, tl.math.div_rn(448.0, bound_q), EXACT_ROUNDING), mask=tile_inside)
        tl.store(qk_ptr + plane + tile, to_e4m3(k, tl.math.div_rn(448.0, bound_k), EXACT_ROUNDING),
                 mask=tile_inside)
        tl.atomic_max(work_ptr + amax_v_slot, tl.reduce(tl.reduce(tl.abs(v.to(tl.float32)), 1, _max), 0, _max),
                     sem="relaxed")  # read after the kernel ends: no barrier before the atomic
        if (block_l == 0) & (head == 0) & (batch == 0):
            tl.store(work_ptr + descale_q_slot, tl.math.div_rn(bound_q, 448.0))
            tl.store(work_ptr + descale_k_slot, tl.math.div_rn(bound_k, 448.0))
    else:
        element = qk_ptr.dtype.element_ty
        tl.store(qk_ptr + tile, q.to(element), mask=tile_inside)
        tl.store(qk_ptr + plane + tile, k.to(element), mask=tile_inside)
    tl.store(v_ptr + v_tile, v, mask=tile_inside)


def stream_parts(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor, sin: torch.Tensor):
    """Each stream of a joint sequence with its offset along L and its part of the joint cos/sin tables:
    (stream, offset, cos part, sin part)."""
    offset = 0
    for stream in streams:
        length = stream[0].shape[1]
        yield stream, offset, cos[:, :, offset:offset + length], sin[:, :, offset:offset + length]
        offset += length


def joint_qkv_norm_rope_reference(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                                  sin: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The joint sequence's q, k, v [B, H, sum L, D] by `qkv_norm_rope_reference` per stream, each with its
    part of the joint cos/sin tables."""
    parts = [qkv_norm_rope_reference(*stream, cos_part, sin_part, num_heads)
             for stream, _, cos_part, sin_part in stream_parts(streams, cos, sin)]
    return tuple(torch.cat(tensors, dim=2) for tensors in zip(*parts))


def joint_qkv_norm_rope(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cos: torch.Tensor,
                        sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Several streams' (qkv, q_scale, k_scale) -> one [3, B, H, sum L, D] tensor: q, k, v of the joint sequence,
    laid out [3, B, sum L, H, D] in memory (`joint_layout`).

    Each stream is written at its offset along L, so the joint attention needs no concatenation;
    cos/sin are the joint sequence's tables [B or 1, 1, sum L, D/2]. The Triton kernel where it can
    run, else the reference per stream.
    """
    batch = streams[0][0].shape[0]
    lengths = [qkv.shape[1] for qkv, _, _ in streams]
    head_dim = streams[0][0].shape[-1] // (3 * num_heads)
    first = streams[0][0]
    out = joint_layout(first.new_empty((3, batch, sum(lengths), num_heads, head_dim)))
    for (qkv, q_scale, k_scale), offset, cos_part, sin_part in stream_parts(streams, cos, sin):
        if enabled_for(qkv) and qkv.numel() > 0 and head_dim % 2 == 0:
            launch_stream(qkv, q_scale, k_scale, cos_part, sin_part, num_heads, out[:2], out[2], offset)
        else:
            out[:, :, :, offset:offset + qkv.shape[1]] = torch.stack(
                qkv_norm_rope_reference(qkv, q_scale, k_scale, cos_part, sin_part, num_heads))
    return out


def joint_layout(tokens_major: torch.Tensor) -> torch.Tensor:
    """[3, B, L, H, D] memory viewed as q, k, v [3, B, H, L, D]: the joint entry point's output layout."""
    return tokens_major.permute(0, 1, 3, 2, 4)


def launch_stream(qkv: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, num_heads: int, qk: torch.Tensor, v: torch.Tensor, offset: int,
                  fp8: tuple | None = None) -> None:
    """The kernel on one stream of a joint sequence: write q, k (into qk [2, B, H, L_out, D]) and v
    ([B, H, L_out, D]), any strides with the head dims contiguous, of qkv's tokens at tokens
    offset..offset+L. With `fp8` = (bounds, work, amax_v_slot, descale_q_slot, descale_k_slot), qk is
    e4m3 at the static scales of `bounds` and v's amax goes to work's slot (kontext_kernels/fp8_qkv.py)."""
    batch, length, width = qkv.shape
    head_dim = width // (3 * num_heads)
    qkv = last_dim_contiguous(qkv)
    # Batch-1 tables broadcast through a zero batch stride; slices along L keep their strides.
    cos = last_dim_contiguous(cos.expand(batch, 1, length, head_dim // 2))
    sin = last_dim_contiguous(sin.expand(batch, 1, length, head_dim // 2))
    q_scale, k_scale = q_scale.contiguous(), k_scale.contiguous()
    bounds, work, *slots = fp8 if fp8 is not None else (q_scale, q_scale, 0, 0, 0)

    if qk.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("launch_stream writes q, k, v with their head dims contiguous: allocate qk and v "
                         "contiguous or through joint_layout")
    block_d = next_power_of_2(head_dim)
    # 32 tokens x 128 dims per tensor is 32 float32 registers a thread at 4 warps: three such
    # tiles live at once, well under the register budget; measured neither way yet on Hopper.
    block_l = max(1, min(32, 4096 // block_d))
    grid = (cdiv(length, block_l), num_heads, batch)
    _qkv_norm_rope_kernel[grid](
        qkv, q_scale, k_scale, cos, sin, qk[:, :, :, offset:], v[:, :, offset:],
        qk.stride(0), qk.stride(1), qk.stride(2), qk.stride(3), v.stride(0), v.stride(1), v.stride(2),
        length, num_heads, head_dim, RMS_EPS,
        qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        bounds, work, *slots, math.sqrt(head_dim),
        QK_FP8=fp8 is not None, EXACT_ROUNDING=interpreting(), BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4,
    )
    launches["qkv_norm_rope"] += 1
