"""8-bit attention of our own (SageAttention-style): Q·Kᵀ in int8, P·V in e4m3 (or fp16), one Triton kernel.

`sage_attention(q, k, v)` takes q, k, v [B, H, L, D] (any strides, bf16 / fp16 / fp32) and returns what
`F.scaled_dot_product_attention(q, k, v)` returns (non-causal, no mask, softmax scale 1/sqrt(D), q's dtype,
[B, H, Lq, D]), as a [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer, so that the model's
`out.transpose(1, 2).reshape(B, L, H * D)` is free. Two passes:

1. Quantization (`quantize_operands`), four launches of three small memory-bound kernels:
   - column statistics: K's sum over tokens (per batch, head and channel; float64, which holds every sum
     of bf16 values exactly, so the order the programs add in cannot change it) and V's amax over tokens;
   - q and k to int8 with one scale per `q_rows` / `k_rows` consecutive tokens (1: per token), K first
     centred on its mean over tokens: softmax(q·(k_j - m)) = softmax(q·k_j), since q·m is the same for
     every key j of a query, while the centred keys use int8's range for what differs between them;
     the softmax scale 1/sqrt(D) and log2(e) go into q's scales, so that the kernel uses exp2;
   - v to e4m3 with one scale per channel (amax over tokens / 448), written transposed, [B, H, D, L] (this
     kernel also finishes K's mean):
     P·V contracts over tokens, and Hopper's 8-bit tensor-core instruction (wgmma) wants both operands'
     contraction dimension contiguous in memory. Where P·V runs in fp16 (no fp8 tensor cores: Ampere),
     v / scale goes to fp16 instead, same layout.
   Every quantized tensor is zero-padded to a multiple of 128 tokens (and of 32 channels, a power of two),
   so the attention kernel reads whole tiles with no bounds checks, and through TMA on Hopper.
2. Attention (`attend`): FlashAttention-2's loop over key blocks, online softmax in base 2.
   S = q8·k8ᵀ is exact in the int32 accumulator (|S| <= 256 * 127² < 2^24 for head dims up to 256, so exact
   in float32 too) and is scaled by q's and k's scales. P = exp2(S - m + 8): the numerators times 256 (the
   running row max m maps to 256, inside e4m3's range, where its normal numbers reach down to 2^-6 / 256 =
   6e-5 relative to the row max), rounded to e4m3 (fp16) for the tensor cores, while the row sums l add the
   unrounded float32 values. With e4m3, each block's P·V goes into a fresh accumulator and is added to the running
   one in float32 (`SPLIT_ACCUMULATOR`): Hopper's fp8 tensor cores keep only ~14 bits of their
   accumulator's mantissa (DeepSeek-V3 report, sec. 3.3.2), which over 68 key blocks adds up (on an H200 one
   accumulator took the error on the model's own q, k, v from 0.41% to 2.1%: bench/RESULTS.md). It costs nothing
   in instructions: the running accumulator's rescale becomes the add's FFMA. O = acc / l * v_scale[channel].
   On Hopper, with e4m3 P·V and the default scales, a warp-specialised Gluon kernel takes this step instead
   (sage_attention_hopper.py, `HOPPER_KERNEL`); for it k8's rows are stored in its key order (`key_tokens`,
   `Operands.keys_permuted`), which this module's kernel and the reference read back in token order.

Numerics: `sage_attention_reference` does the same arithmetic in PyTorch, block by block with the same
key-block width, so that the kernel can be checked close to it (the remaining differences: exp2's last
bits, float32 summation order, and the rare e4m3 rounding they flip). Against exact attention, on q, k
unit-RMS per row (as after QK-norm) and v ~ N(0, 1), [1, 2, 2048, 128] (PyTorch emulation, float64
reference; bf16 SDPA itself: 0.23%):

  q, k scales per token,     P·V fp16: 0.93%     P·V e4m3: 3.7%
  q per token, k per 128,    P·V fp16: 1.13%     P·V e4m3: 3.7%
  q, k per 128 tokens,       P·V fp16: 1.30%     P·V e4m3: 3.8%

e4m3 keeps 3 mantissa bits: rounding P and V costs ~2.6% (relative RMS) each, and attention's weighted
averages keep that ratio (the errors average down as fast as the output does), so P·V in e4m3 is ~3.7% on
such inputs whatever Q·Kᵀ does. Per-token q scales cost the kernel nothing (a per-row factor it applies
anyway); per-token k scales cost one multiply per score.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from . import cute_runtime, sage_attention_hopper
from .e4m3 import int8_grid, round_to_e4m3, to_e4m3
from .runtime import (cdiv, enabled_for, hopper, import_triton, interpreting, launches, loop_count,
                      multiprocessors, next_power_of_2, reduction_combines)

triton, tl = import_triton()

# tl.reduce with Triton's own combines and tl.full, not tl.zeros (runtime.reduction_combines says why: tl.zeros is
# a jit function of the same kind).
_max, _add = reduction_combines()

LOG2E = 1.4426950408889634
INT8_MAX = 127.0
E4M3_MAX = 448.0
P_EXPONENT = 8.0  # P is stored as exp2(s - m + 8) = 256 * exp2(s - m), so the row max lands on 256 (module doc)
TOKEN_TILE = 128  # quantized tensors are padded to whole tiles of this many tokens; the kernel's blocks divide it
Q_ROWS = 1  # tokens per q scale: per token, free in the kernel (module docstring: its error)
# Tokens per k scale (`default_k_rows`): 1, or a multiple of the kernel's key block (then one scale per block).
# Per token costs the kernel a multiply per score and a gather of the block's scales: 703 SASS instructions per
# thread for an e4m3 key block instead of 614 (sm_90, 128x128 tile, 8 warps; bench/attention/sage_attention_builds.py
# --loop; not timed). There 8 warps issue ~1200-1400 cycles of instructions against ~1000 cycles of 8-bit MMAs,
# so the issue rate bounds the loop, and e4m3's P·V error dwarfs what per-token k saves. With fp16 P·V (657
# instructions against ~1500 cycles of MMAs, fp16's at half the 8-bit rate) the multiply is hidden, and per
# token takes the error from 1.13% to 0.93%.
K_ROWS_FP8 = 128
K_ROWS_FP16 = 1
# How the kernel turns the int32 dots into float32 scores. 0 (SCORES_CONVERT): a conversion instruction
# (I2FP), one per score, on the same narrow pipe as exp2. 1 (SCORES_FOLDED), in whole key blocks with one k scale
# (elsewhere: 0): the int32 dot plus the bits of 1.5 * 2**23, read as a float32, is 1.5 * 2**23 + dot exactly
# (|dot| < 2**22, module docstring), and the exponent's FFMA takes that bias off with the row max. The row max
# then moves by up to half an ulp of 1.5 * 2**23 * scale (~1e-4 in log2 units), which the running max carries, so
# it cancels in the softmax but for the e4m3 roundings of P it moves (~1e-4 of the output; H200, edit shape: the
# kernel 1.305 -> 1.202 ms, the same error against exact attention; bench/RESULTS.md; taking the bias off by a
# float add instead was no faster than the conversion).
SCORES_CONVERT, SCORES_FOLDED = 0, 1
SCORES_DEFAULT = SCORES_FOLDED
# A rows-per-scale value must divide TOKEN_TILE and be a power of two.
ROW_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128)


class Operands(NamedTuple):
    """q, k, v quantized for the attention kernel; the token and channel counts padded (module docstring).

    q8 int8 [B, H, Lq_pad, D_pad]; q_scale float32 [B, H, Lq_pad / q_rows] (with 1/sqrt(D) * log2(e));
    k8 int8 [B, H, Lk_pad, D_pad]; k_scale float32 [B, H, Lk_pad / k_rows];
    v8t e4m3 or fp16 [B, H, D_pad, Lk_pad] (v / v_scale, transposed); v_scale float32 [B, H, D_pad].
    keys_permuted: k8's rows within each 128-token tile in the order of `key_tokens` (for the Hopper kernel), not
    in token order.
    """

    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v8t: torch.Tensor
    v_scale: torch.Tensor
    length_q: int
    length_k: int
    head_dim: int
    q_rows: int
    k_rows: int
    keys_permuted: bool = False


# The Hopper kernel's key order (kontext_kernels/sage_attention_hopper.py): row c of a 128-key tile of k8 holds token
# key_tokens(c) of the tile. c's bits (i3 i2 i1 i0 q1 q0 e) give the token (i3 i2 i1 q1 q0 i0 e): then the scores
# Q·Kᵀ's accumulator registers hold are, thread by thread, the P values P·V's register operand wants there.
def key_tokens(positions: torch.Tensor) -> torch.Tensor:
    return (positions & 0x71) | ((positions & 0x6) << 1) | ((positions & 0x8) >> 2)


def key_positions(tokens: torch.Tensor) -> torch.Tensor:
    """The inverse of `key_tokens`: where token t of a tile is stored."""
    return (tokens & 0x71) | ((tokens & 0x2) << 2) | ((tokens & 0xC) >> 1)


@triton.jit
def key_rows_in_tile(local):
    """`key_positions` inside a kernel: the row of its 128-key tile where token `local` of the tile is stored."""
    return (local & 0x71) | ((local & 0x2) << 2) | ((local & 0xC) >> 1)


def _reorder_key_rows(k8: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    batch, heads, length, channels = k8.shape
    tiles = k8.view(batch, heads, length // TOKEN_TILE, TOKEN_TILE, channels)
    return tiles[:, :, :, order.to(k8.device)].reshape(k8.shape)


def keys_in_token_order(operands: Operands) -> Operands:
    """`operands` with k8's rows in token order (a copy where they were permuted)."""
    if not operands.keys_permuted:
        return operands
    order = key_positions(torch.arange(TOKEN_TILE))  # token t's row
    return operands._replace(k8=_reorder_key_rows(operands.k8, order), keys_permuted=False)


def padded_head_dim(head_dim: int) -> int:
    """The channel count of the quantized tensors: a power of two, at least 32 (an int8 dot's depth)."""
    return max(32, next_power_of_2(head_dim))


def padded_tokens(length: int) -> int:
    """Rows the quantized operands hold for `length` tokens: whole token tiles, the padding written as zeros."""
    return cdiv(length, TOKEN_TILE) * TOKEN_TILE


def fp8_tensor_cores(device: torch.device) -> bool:
    """Whether P·V runs in e4m3 on `device`: CUDA GPUs of compute capability 8.9 (Ada) and newer; under Triton's
    interpreter too (its tl.dot takes e4m3 operands and multiplies them exactly in float32)."""
    if device.type != "cuda":
        return interpreting()
    return _fp8_capable(device.index if device.index is not None else torch.cuda.current_device())


_FP8_CAPABLE: dict[int, bool] = {}


def _fp8_capable(device_index: int) -> bool:
    # Cached, as the 'sage8' backend asks on every attention call (57 a step); in a plain dict, which the compiler
    # traces without the warning it gives for a functools cache inside compiled blocks.
    if device_index not in _FP8_CAPABLE:
        _FP8_CAPABLE[device_index] = (torch.version.hip is None
                                      and torch.cuda.get_device_capability(device_index) >= (8, 9))
    return _FP8_CAPABLE[device_index]


def default_k_rows(fp8_pv: bool) -> int:
    """Tokens per k scale by default: one scale per 128 keys with e4m3 P·V, per key with fp16 (K_ROWS_FP8 says why)."""
    return K_ROWS_FP8 if fp8_pv else K_ROWS_FP16


def _check_rows(q_rows: int, k_rows: int) -> None:
    if q_rows not in ROW_CHOICES or k_rows not in ROW_CHOICES:
        raise ValueError(f"tokens per scale must be one of {ROW_CHOICES}, got q_rows={q_rows}, k_rows={k_rows}")


def _check_key_order(permute_keys: bool, k_rows: int) -> None:
    if permute_keys and k_rows != TOKEN_TILE:
        raise ValueError(f"keys are permuted within {TOKEN_TILE}-token tiles, which needs one k scale per tile, "
                         f"got k_rows={k_rows}: pass k_rows={TOKEN_TILE}, or permute_keys=False")


# ----------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------

def _int8_groups_reference(x: torch.Tensor, rows: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x [B, H, L_pad, D_pad] -> int8 values and float32 scales [B, H, L_pad / rows] (times `factor`),
    rounded to nearest, ties to even, as the kernel does."""
    batch, heads, length, channels = x.shape
    groups = x.view(batch, heads, length // rows, rows * channels)
    amax = groups.abs().amax(dim=-1).clamp_min(1e-30)
    # True divisions (a Python float over a tensor multiplies by a rounded reciprocal): the kernel's div_rn.
    inverse = amax.new_tensor(INT8_MAX) / amax
    scaled = (groups * inverse[..., None]).clamp(-INT8_MAX, INT8_MAX)
    scale = (amax / amax.new_tensor(INT8_MAX)) * amax.new_tensor(factor)
    return scaled.round().to(torch.int8).view(batch, heads, length, channels), scale


def _padded(x: torch.Tensor, length: int, channels: int) -> torch.Tensor:
    """float32 copy of x [B, H, L, D] zero-padded to [B, H, length, channels]."""
    out = x.new_zeros((*x.shape[:2], length, channels), dtype=torch.float32)
    out[:, :, :x.shape[2], :x.shape[3]] = x
    return out


def column_stats_reference(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, H, L, D] -> (k's sum over tokens, float64 [B, H, D_pad]; v's amax over tokens, float32
    [B, H, D_pad]), zero in the padding channels."""
    channels = padded_head_dim(k.shape[3])
    k_sum = k.new_zeros((*k.shape[:2], channels), dtype=torch.float64)
    k_sum[..., :k.shape[3]] = k.double().sum(dim=2)
    v_amax = v.new_zeros((*v.shape[:2], channels), dtype=torch.float32)
    v_amax[..., :v.shape[3]] = v.float().abs().amax(dim=2)
    return k_sum, v_amax


def k_mean_from_sum(k_sum: torch.Tensor, length: int) -> torch.Tensor:
    """K's mean over `length` tokens from its float64 sums: the float32 sum over a float32 length, a true division
    as the kernels' (PyTorch on CUDA would multiply by a rounded reciprocal of a Python number)."""
    # The length by a fill, not a host copy, so that this runs inside CUDA graph capture.
    return k_sum.float() / torch.full((), length, dtype=torch.float32, device=k_sum.device)


def quantize_operands_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fp8_pv: bool = True,
                                q_rows: int = Q_ROWS, k_rows: int | None = None,
                                permute_keys: bool = False,
                                statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> Operands:
    """q, k, v [B, H, L, D] (any strides) -> `Operands` (the module docstring says how); k_rows None:
    `default_k_rows(fp8_pv)`; `permute_keys`: k8's rows in the Hopper kernel's order (`key_tokens`);
    `statistics`: (K's mean, V's amax) [B, H, D_pad] float32 to quantize with instead of k's and v's own (the frozen
    statistics of kontext_kernels/sage_qkv.py)."""
    k_rows = default_k_rows(fp8_pv) if k_rows is None else k_rows
    _check_rows(q_rows, k_rows)
    _check_key_order(permute_keys, k_rows)
    head_dim, channels = q.shape[3], padded_head_dim(q.shape[3])
    length_q, length_k = q.shape[2], k.shape[2]
    if statistics is None:
        k_sum, v_amax = column_stats_reference(k, v)
        k_mean = k_mean_from_sum(k_sum, length_k)
    else:
        k_mean, v_amax = statistics
    k_mean = k_mean[:, :, None, :head_dim]
    q8, q_scale = _int8_groups_reference(_padded(q.float(), padded_tokens(length_q), channels), q_rows,
                                         head_dim**-0.5 * LOG2E)
    k8, k_scale = _int8_groups_reference(_padded(k.float() - k_mean, padded_tokens(length_k), channels), k_rows, 1.0)
    amax = v_amax.clamp_min(1e-30)[:, :, None, :]
    scaled = (_padded(v.float(), padded_tokens(length_k), channels) * (amax.new_tensor(E4M3_MAX) / amax))
    scaled = scaled.clamp(-E4M3_MAX, E4M3_MAX)
    v8 = scaled.to(torch.float8_e4m3fn if fp8_pv else torch.float16)
    v_scale = (amax / amax.new_tensor(E4M3_MAX))[:, :, 0]
    if permute_keys:
        k8 = _reorder_key_rows(k8, key_tokens(torch.arange(TOKEN_TILE)))
    return Operands(q8, q_scale, k8, k_scale, v8.transpose(2, 3).contiguous(), v_scale, length_q, length_k,
                    head_dim, q_rows, k_rows, permute_keys)


def _folded_exponent(dots: torch.Tensor, factor: torch.Tensor, row_max: torch.Tensor):
    """SCORES_FOLDED's arithmetic for one key block, as the kernel does it: int32-valued dots [B, H, M, N] (float32),
    factor [B, H, M] -> (exponent of P [B, H, M, N], the new running row max [B, H, M])."""
    factor = (factor.contiguous().view(torch.int32) & -4).view(torch.float32)
    new_max = torch.maximum(row_max, dots.amax(dim=-1) * factor)
    bias = factor * 12582912.0
    shift = bias + (new_max - 8.0)
    new_max = (shift - bias) + 8.0
    # One rounding of the exact product-difference, as the kernel's FFMA: float64 holds both exactly.
    exponent = ((dots.double() + 12582912.0) * factor.double()[..., None] - shift.double()[..., None]).float()
    return exponent, new_max


def attend_reference(operands: Operands, out_dtype: torch.dtype, block_n: int = 128,
                     scores: int | None = None, rounded_row_sums: bool = False) -> torch.Tensor:
    """`Operands` -> attention [B, H, Lq, D] in out_dtype: the kernel's arithmetic, key block by key block of
    `block_n` tokens (the running row max decides how P rounds, so the block width matters), its scores made as
    `scores` says (SCORES_*; None: SCORES_DEFAULT); P's row sums of P as P·V takes it (e4m3 or fp16) with
    `rounded_row_sums`, as the Hopper kernel's tensor-core row sums make them, else of P in float32."""
    scores_kind = SCORES_DEFAULT if scores is None else scores
    o = keys_in_token_order(operands)
    batch, heads, padded_q, channels = o.q8.shape
    fp8_pv = o.v8t.dtype == torch.float8_e4m3fn
    q_scale = o.q_scale.repeat_interleave(o.q_rows, dim=2)[:, :, :o.length_q]       # [B, H, Lq]
    k_scale = o.k_scale.repeat_interleave(o.k_rows, dim=2)                            # [B, H, Lk_pad]
    # float32 products of int8 values and their sums (under 2^24) are exact, on TF32 tensor cores too (int8 values
    # fit TF32's significand), so the scores equal the kernel's int32 ones whatever PyTorch's matmul settings.
    q8 = o.q8[:, :, :o.length_q].float()
    v8 = o.v8t.transpose(2, 3).float()                                               # [B, H, Lk_pad, D_pad]
    row_max = q8.new_full((batch, heads, o.length_q), -math.inf, dtype=torch.float32)
    row_sum = torch.zeros_like(row_max)
    acc = row_max.new_zeros((batch, heads, o.length_q, channels))
    full_end = o.length_k // TOKEN_TILE * TOKEN_TILE  # the kernel's unmasked blocks end there
    for start in range(0, o.length_k, block_n):
        end = min(start + block_n, o.length_k)
        scores = q8 @ o.k8[:, :, start:end].float().transpose(2, 3)
        if scores_kind == SCORES_FOLDED and start < full_end and o.k_rows >= block_n:
            exponent, new_max = _folded_exponent(scores, q_scale * k_scale[:, :, start:start + 1], row_max)
            p = torch.exp2(exponent)
        else:
            if o.k_rows < block_n:  # a scale per key column, then q's per row
                scores = scores * k_scale[:, :, None, start:end]
                factor = q_scale
            else:
                factor = q_scale * k_scale[:, :, start:start + 1]
            new_max = torch.maximum(row_max, scores.amax(dim=-1) * factor)
            p = torch.exp2(scores * factor[..., None] - (new_max - P_EXPONENT)[..., None])
        alpha = torch.exp2(row_max - new_max)
        rounded = p.to(torch.float8_e4m3fn if fp8_pv else torch.float16).float()
        row_sum = row_sum * alpha + (rounded if rounded_row_sums else p).sum(dim=-1)
        acc = acc * alpha[..., None] + rounded @ v8[:, :, start:end]
        row_max = new_max
    out = acc * (1.0 / row_sum)[..., None] * o.v_scale[:, :, None, :]
    return out[..., :o.head_dim].to(out_dtype)


def sage_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fp8_pv: bool = True,
                             q_rows: int = Q_ROWS, k_rows: int | None = None, block_n: int = 128) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v computed as the kernels compute it (module docstring): q, k, v [B, H, L, D]
    -> [B, H, Lq, D] in q's dtype."""
    operands = quantize_operands_reference(q, k, v, fp8_pv=fp8_pv, q_rows=q_rows, k_rows=k_rows)
    return attend_reference(operands, q.dtype, block_n)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"sage_attention wants [B, H, L, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[3] != k.shape[3]:
        raise ValueError(f"sage_attention: mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (k and v alike, q's batch, heads and head dim theirs)")
    if q.shape[3] > 256:
        raise ValueError(f"sage_attention takes head dims up to 256, got {q.shape[3]}; choose attention "
                         "backend 'auto' for this model")


def _runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return enabled_for(q) and min(q.numel(), k.numel()) > 0 and q.device == k.device == v.device


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fp8_pv: bool = True,
                      q_rows: int = Q_ROWS, k_rows: int | None = None,
                      permute_keys: bool | None = None) -> Operands:
    """Same contract as `quantize_operands_reference`; the Triton kernels where they can run. `permute_keys` None:
    in the Hopper kernel's key order where that kernel will take the operands."""
    k_rows = default_k_rows(fp8_pv) if k_rows is None else k_rows
    _check_rows(q_rows, k_rows)
    if permute_keys is None:
        permute_keys = hopper_kernel_takes(q.device, fp8_pv, q_rows, k_rows, q.shape[3])
    _check_key_order(permute_keys, k_rows)
    if not _runs(q, k, v):
        return quantize_operands_reference(q, k, v, fp8_pv=fp8_pv, q_rows=q_rows, k_rows=k_rows,
                                           permute_keys=permute_keys)
    return _quantize_triton(q, k, v, fp8_pv, q_rows, k_rows, permute_keys)


def attend(operands: Operands, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as `attend_reference` at the key-block width the kernel chose (`last_config`), returning
    a [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer; the reference where the kernel cannot run."""
    if not enabled_for(operands.q8):
        return attend_reference(operands, out_dtype)
    return _launch_attention(operands, out_dtype)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fp8_pv: bool | None = None,
                   q_rows: int = Q_ROWS, k_rows: int | None = None) -> torch.Tensor:
    """Same contract as `sage_attention_reference`, P·V in e4m3 where the GPU has fp8 tensor cores (`fp8_pv`
    None) or as `fp8_pv` says; the output is a [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer.
    Inference only (no backward)."""
    _check_inputs(q, k, v)
    if fp8_pv is None:
        fp8_pv = fp8_tensor_cores(q.device)
    k_rows = default_k_rows(fp8_pv) if k_rows is None else k_rows
    _check_rows(q_rows, k_rows)
    if not _runs(q, k, v):
        return sage_attention_reference(q, k, v, fp8_pv=fp8_pv, q_rows=q_rows, k_rows=k_rows)
    permute_keys = hopper_kernel_takes(q.device, fp8_pv, q_rows, k_rows, q.shape[3])
    operands = _quantize_triton(q, k, v, fp8_pv, q_rows, k_rows, permute_keys)
    return _launch_attention(operands, q.dtype)


# ----------------------------------------------------------------------------------------------
# Quantization kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _column_stats_kernel(k_ptr, v_ptr, k_sum_ptr, v_amax_ptr, heads, length, head_dim,
                         stride_kb, stride_kh, stride_kl, stride_kd, stride_vb, stride_vh, stride_vl, stride_vd,
                         tiles_per_program, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program sums a run of tiles of one head; programs meet in atomics. K's sums are float64: exact for
    # bf16 values (and for any whose exponents span under ~30 binades), so the atomics' order cannot change
    # them and the mean equals the reference's bit for bit. Relaxed atomics: they are read after the kernel ends, and
    # the default acq_rel would put a GPU-wide barrier before each.
    bh = tl.program_id(0)
    first_tile = tl.program_id(1) * tiles_per_program
    cols = tl.arange(0, BLOCK_D)
    k_base = k_ptr + (bh // heads).to(tl.int64) * stride_kb + (bh % heads).to(tl.int64) * stride_kh
    v_base = v_ptr + (bh // heads).to(tl.int64) * stride_vb + (bh % heads).to(tl.int64) * stride_vh
    k_sum = tl.full([BLOCK_L, BLOCK_D], 0.0, tl.float64)
    v_amax = tl.full([BLOCK_L, BLOCK_D], 0.0, tl.float32)
    for i in range(0, tiles_per_program):
        rows = ((first_tile + i) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
        mask = (rows < length)[:, None] & (cols < head_dim)[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kl + cols[None, :] * stride_kd, mask=mask, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vl + cols[None, :] * stride_vd, mask=mask, other=0.0)
        k_sum += k.to(tl.float64)
        v_amax = tl.maximum(v_amax, tl.abs(v.to(tl.float32)))
    tl.atomic_add(k_sum_ptr + bh * BLOCK_D + cols, tl.reduce(k_sum, 0, _add), sem="relaxed")
    tl.atomic_max(v_amax_ptr + bh * BLOCK_D + cols, tl.reduce(v_amax, 0, _max), sem="relaxed")


@triton.jit
def _quantize_int8_kernel(x_ptr, k_mean_ptr, out_ptr, scale_ptr, heads, length, padded_length, head_dim, factor,
                          stride_b, stride_h, stride_l, stride_d,
                          CENTRE: tl.constexpr, PERMUTE: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # One tile of TILE tokens of one head -> int8, one scale per ROWS tokens; the padding written as zeros.
    # PERMUTE (TILE = ROWS = 128): rows stored in the Hopper kernel's key order (key_positions).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * TILE + tl.arange(0, TILE)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows < length)[:, None] & (cols < head_dim)[None, :]
    base = x_ptr + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    x = tl.load(base + rows.to(tl.int64)[:, None] * stride_l + cols[None, :] * stride_d, mask=inside,
                other=0.0).to(tl.float32)
    if CENTRE:
        mean = tl.load(k_mean_ptr + bh * BLOCK_D + cols)
        # Padding rows stay zero (the padding channels' mean is zero: their sums are).
        x = tl.where((rows < length)[:, None], x - mean[None, :], 0.0)
    groups: tl.constexpr = TILE // ROWS
    amax = tl.reduce(tl.reshape(tl.abs(x), [groups, ROWS * BLOCK_D]), 1, _max)
    amax = tl.maximum(amax, 1e-30)
    inverse = tl.math.div_rn(tl.full([groups], 127.0, tl.float32), amax)
    inverse_rows = tl.reshape(tl.broadcast_to(inverse[:, None], [groups, ROWS]), [TILE])
    values = int8_grid(x, inverse_rows[:, None]).to(tl.int8)
    if PERMUTE:
        local = tl.arange(0, TILE)
        out_rows = bh.to(tl.int64) * padded_length + tile * TILE + key_rows_in_tile(local)
    else:
        out_rows = bh.to(tl.int64) * padded_length + rows
    tl.store(out_ptr + out_rows[:, None] * BLOCK_D + cols[None, :], values)
    scale = tl.math.div_rn(amax, tl.full([groups], 127.0, tl.float32)) * factor
    tl.store(scale_ptr + bh.to(tl.int64) * (padded_length // ROWS) + tile * groups + tl.arange(0, groups), scale)


@triton.jit
def _quantize_v_kernel(v_ptr, v_amax_ptr, out_ptr, scale_ptr, k_sum_ptr, k_mean_ptr, heads, length, padded_length,
                       head_dim, stride_b, stride_h, stride_l, stride_d,
                       FP8: tl.constexpr, EXACT_ROUNDING: tl.constexpr, BLOCK_L: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    # One tile of tokens of one head -> v / v_scale (per channel) in e4m3 or fp16, stored transposed. Each head's
    # first tile also writes v's scales and K's mean over tokens (float32 sum / float32 length): a division per
    # channel, here once per head; in the int8 kernel's tile layout every thread would repeat it (its registers
    # spilled on sm_90).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tile * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows < length)[:, None] & (cols < head_dim)[None, :]
    base = v_ptr + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    v = tl.load(base + rows.to(tl.int64)[:, None] * stride_l + cols[None, :] * stride_d, mask=inside,
                other=0.0).to(tl.float32)
    amax = tl.maximum(tl.load(v_amax_ptr + bh * BLOCK_D + cols), 1e-30)
    inverse = tl.math.div_rn(tl.full([BLOCK_D], 448.0, tl.float32), amax)
    if FP8:
        values = to_e4m3(v, inverse[None, :], EXACT_ROUNDING)
    else:
        values = tl.minimum(tl.maximum(v * inverse[None, :], -448.0), 448.0).to(tl.float16)
    out_cols = (bh * BLOCK_D + cols).to(tl.int64)
    tl.store(out_ptr + out_cols[None, :] * padded_length + rows[:, None], values)
    if tile == 0:
        tl.store(scale_ptr + bh * BLOCK_D + cols, tl.math.div_rn(amax, tl.full([BLOCK_D], 448.0, tl.float32)))
        k_sum = tl.load(k_sum_ptr + bh * BLOCK_D + cols).to(tl.float32)
        tl.store(k_mean_ptr + bh * BLOCK_D + cols, tl.math.div_rn(k_sum, tl.full([BLOCK_D], 1.0, tl.float32) * length))


# Column statistics: 64-token tiles, two programs an SM (per head, programs meet in atomics). On an H200 these
# beat 32 tokens and four programs by ~15% of the quantization pass (bench/linear/row_quant_probe.py).
_STATS_BLOCK_L = 64
_STATS_PROGRAMS_PER_SM = 2
_V_BLOCK_L = 64


def _quantize_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8_pv: bool, q_rows: int,
                     k_rows: int, permute_keys: bool = False) -> Operands:
    k_sum, v_amax = column_statistics(k, v)
    return quantize_with_statistics(q, k, v, k_sum, v_amax, fp8_pv, q_rows, k_rows, permute_keys)


def column_statistics(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`column_stats_reference`'s values by the Triton kernel (k, v [B, H, L, D], any strides)."""
    batch, heads, length_k, head_dim = k.shape
    channels = padded_head_dim(head_dim)
    device = k.device
    k_sum = torch.zeros((batch, heads, channels), dtype=torch.float64, device=device)
    v_amax = torch.zeros((batch, heads, channels), dtype=torch.float32, device=device)
    tiles = cdiv(length_k, _STATS_BLOCK_L)
    if device.type == "cuda":
        splits = max(1, min(tiles, cdiv(_STATS_PROGRAMS_PER_SM * multiprocessors(device), batch * heads)))
    else:
        splits = min(tiles, 2)
    per_program = cdiv(tiles, splits)
    _column_stats_kernel[(batch * heads, cdiv(tiles, per_program))](
        k, v, k_sum, v_amax, heads, length_k, head_dim, *k.stride(), *v.stride(), loop_count(per_program),
        BLOCK_L=_STATS_BLOCK_L, BLOCK_D=channels, num_warps=8)
    return k_sum, v_amax


def quantize_with_statistics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_sum: torch.Tensor,
                             v_amax: torch.Tensor, fp8_pv: bool, q_rows: int, k_rows: int,
                             permute_keys: bool) -> Operands:
    """The operands of q, k, v [B, H, L, D] given k's and v's column statistics (`column_statistics`)."""
    batch, heads, length_q, head_dim = q.shape
    padded_q = padded_tokens(length_q)
    channels = padded_head_dim(head_dim)
    device = q.device
    q8 = torch.empty((batch, heads, padded_q, channels), dtype=torch.int8, device=device)
    q_scale = torch.empty((batch, heads, padded_q // q_rows), dtype=torch.float32, device=device)
    _launch_int8(q, None, q8, q_scale, q_rows, head_dim**-0.5 * LOG2E, centre=False, permute=False)
    return quantize_from_statistics(q8, q_scale, k, v, k_sum, v_amax, length_q, fp8_pv, k_rows, permute_keys,
                                    q_rows=q_rows)


def _launch_int8(x: torch.Tensor, k_mean: torch.Tensor | None, out: torch.Tensor, scale: torch.Tensor, rows: int,
                 factor: float, centre: bool, permute: bool) -> None:
    batch, heads, _, head_dim = x.shape
    channels = out.shape[3]
    _quantize_int8_kernel[(out.shape[2] // TOKEN_TILE, batch * heads)](
        x, k_mean if k_mean is not None else scale, out, scale, heads, x.shape[2], out.shape[2], head_dim, factor,
        *x.stride(), CENTRE=centre, PERMUTE=permute, ROWS=rows, TILE=TOKEN_TILE, BLOCK_D=channels,
        num_warps=8 if channels >= 128 else 4)


def quantize_from_statistics(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             k_sum: torch.Tensor, v_amax: torch.Tensor, length_q: int, fp8_pv: bool, k_rows: int,
                             permute_keys: bool, q_rows: int = Q_ROWS) -> Operands:
    """The operands from q already quantized (q8, q_scale) and k, v [B, H, L, D] with their column statistics
    (K's float64 sums over tokens, V's amax over tokens, [B, H, D_pad]): V and the centred k quantized here."""
    batch, heads, length_k, head_dim = k.shape
    channels = padded_head_dim(head_dim)
    padded_k = padded_tokens(length_k)
    device = k.device
    v8t = torch.empty((batch, heads, channels, padded_k), dtype=torch.float8_e4m3fn if fp8_pv else torch.float16,
                      device=device)
    v_scale = torch.empty((batch, heads, channels), dtype=torch.float32, device=device)
    k_mean = torch.empty((batch, heads, channels), dtype=torch.float32, device=device)
    _quantize_v_kernel[(padded_k // _V_BLOCK_L, batch * heads)](
        v, v_amax, v8t, v_scale, k_sum, k_mean, heads, length_k, padded_k, head_dim, *v.stride(), FP8=fp8_pv,
        EXACT_ROUNDING=interpreting(), BLOCK_L=_V_BLOCK_L, BLOCK_D=channels, num_warps=4)
    k8 = torch.empty((batch, heads, padded_k, channels), dtype=torch.int8, device=device)
    k_scale = torch.empty((batch, heads, padded_k // k_rows), dtype=torch.float32, device=device)
    _launch_int8(k, k_mean, k8, k_scale, k_rows, 1.0, centre=True, permute=permute_keys)
    launches["sage_quantize"] += 1
    return Operands(q8, q_scale, k8, k_scale, v8t, v_scale, length_q, length_k, head_dim, q_rows, k_rows,
                    permute_keys)


# ----------------------------------------------------------------------------------------------
# The attention kernel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(src, row, col, row_stride, ROWS: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr):
    """[ROWS, COLS] at (row, col) of a dense 2-D operand: through its TMA descriptor, or by pointer (every tile
    lies inside the padded tensors: no mask)."""
    if TMA:
        tile = src.load([row, col])
    else:
        offsets = (row + tl.arange(0, ROWS)).to(tl.int64)[:, None] * row_stride + (col + tl.arange(0, COLS))[None, :]
        tile = tl.load(src + offsets)
    return tile


@triton.jit
def _key_block(acc, row_sum, row_max, q, q_factor, k_src, v_src, k_scale_ptr, start_n, k_row0, v_row0, length_k,
               padded_k, MASK: tl.constexpr, K_ROWS: tl.constexpr, FP8_PV: tl.constexpr,
               SPLIT_ACCUMULATOR: tl.constexpr, EXACT_ROUNDING: tl.constexpr, TMA: tl.constexpr,
               SCORES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block of the online softmax: (acc, row_sum, row_max) updated."""
    k = _load_tile(k_src, k_row0 + start_n, 0, BLOCK_D, BLOCK_N, BLOCK_D, TMA)
    dots = tl.dot(q, tl.trans(k), out_dtype=tl.int32)  # exact (module docstring)
    if SCORES == 1 and not MASK and K_ROWS >= BLOCK_N:
        # The bias folded into the exponent's FFMA: one integer add per score and no conversion (SCORES_* say why).
        # The scale cut to 22 significant bits, so that the bias, 1.5 * 2**23 (= 3 * 2**22) times it, is exact.
        factor = q_factor * tl.load(k_scale_ptr + start_n // K_ROWS)
        factor = (factor.to(tl.int32, bitcast=True) & -4).to(tl.float32, bitcast=True)
        biased = (dots + 0x4B400000).to(tl.float32, bitcast=True)  # 1.5 * 2**23 + dot, exactly
        new_max = tl.maximum(row_max, tl.reduce(dots, 1, _max).to(tl.float32) * factor)
        bias = 12582912.0 * factor
        shift = bias + (new_max - 8.0)  # rounded at the bias's magnitude
        # The row max the exponent really subtracts (shift - bias is exact: Fast2Sum), carried as the running max, so
        # that the rounding above moves every block of a row alike and cancels in acc / row_sum.
        new_max = (shift - bias) + 8.0
        if EXACT_ROUNDING:  # the interpreter's fma rounds twice; the GPU's once
            exponent = (biased.to(tl.float64) * factor.to(tl.float64)[:, None]
                        - shift.to(tl.float64)[:, None]).to(tl.float32)
        else:
            exponent = tl.math.fma(biased, factor[:, None], -shift[:, None])
        p = tl.math.exp2(exponent)
    else:
        scores = dots.to(tl.float32)
        if K_ROWS < BLOCK_N:  # a scale per key column, then q's per row
            offs_n = start_n + tl.arange(0, BLOCK_N)
            scores = scores * tl.load(k_scale_ptr + offs_n // K_ROWS)[None, :]
            factor = q_factor
        else:
            factor = q_factor * tl.load(k_scale_ptr + start_n // K_ROWS)
        if MASK:
            scores = tl.where((start_n + tl.arange(0, BLOCK_N) < length_k)[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.reduce(scores, 1, _max) * factor)
        p = tl.math.exp2(scores * factor[:, None] - (new_max - 8.0)[:, None])  # 8.0: P_EXPONENT
    alpha = tl.math.exp2(row_max - new_max)
    row_sum = row_sum * alpha + tl.reduce(p, 1, _add)
    # v8t's [D, N] tile: tokens, P·V's contraction dimension, contiguous, as 8-bit wgmma wants its B operand.
    v = tl.trans(_load_tile(v_src, v_row0, start_n, padded_k, BLOCK_D, BLOCK_N, TMA))
    if FP8_PV:
        if EXACT_ROUNDING:  # the interpreter's own e4m3 conversion mis-rounds (kontext_kernels/e4m3.py)
            p = round_to_e4m3(p)
        rounded = p.to(tl.float8e4nv)
    else:
        rounded = p.to(tl.float16)
    if SPLIT_ACCUMULATOR:
        acc = acc * alpha[:, None] + tl.dot(rounded, v, out_dtype=tl.float32)
    else:
        acc = tl.dot(rounded, v, acc * alpha[:, None], out_dtype=tl.float32)
    return acc, row_sum, new_max


@triton.jit
def _attention_kernel(q_src, k_src, v_src, q_scale_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                      heads, length_q, length_k, full_end, padded_q, padded_k, length_bucket,
                      stride_ob, stride_oh, stride_ol,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_ROWS: tl.constexpr, K_ROWS: tl.constexpr,
                      FP8_PV: tl.constexpr, SPLIT_ACCUMULATOR: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
                      TMA: tl.constexpr, SCORES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # length_bucket: unused here, a key of the autotuner's.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_src, bh * padded_q + start_m, 0, BLOCK_D, BLOCK_M, BLOCK_D, TMA)
    q_factor = tl.load(q_scale_ptr + bh.to(tl.int64) * (padded_q // Q_ROWS) + offs_m // Q_ROWS)
    k_scale_ptr += bh.to(tl.int64) * (padded_k // K_ROWS)
    k_row0 = bh * padded_k
    v_row0 = bh * BLOCK_D

    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    row_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Keys [0, full_end) fill whole blocks of any BLOCK_N (full_end: a multiple of 128, which they divide), the
    # rest (under 128 keys, 0-2 blocks) get their columns past the keys masked out.
    for start_n in range(0, full_end, BLOCK_N):
        acc, row_sum, row_max = _key_block(
            acc, row_sum, row_max, q, q_factor, k_src, v_src, k_scale_ptr, start_n, k_row0, v_row0, length_k,
            padded_k, False, K_ROWS, FP8_PV, SPLIT_ACCUMULATOR, EXACT_ROUNDING, TMA, SCORES, BLOCK_N, BLOCK_D)
    for start_n in range(full_end, length_k, BLOCK_N):
        acc, row_sum, row_max = _key_block(
            acc, row_sum, row_max, q, q_factor, k_src, v_src, k_scale_ptr, start_n, k_row0, v_row0, length_k,
            padded_k, True, K_ROWS, FP8_PV, SPLIT_ACCUMULATOR, EXACT_ROUNDING, TMA, SCORES, BLOCK_N, BLOCK_D)

    cols = tl.arange(0, BLOCK_D)
    v_scale = tl.load(v_scale_ptr + bh * BLOCK_D + cols)
    out = acc * tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), row_sum)[:, None] * v_scale[None, :]
    out_base = out_ptr + (bh // heads).to(tl.int64) * stride_ob + (bh % heads).to(tl.int64) * stride_oh
    mask = (offs_m < length_q)[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(out_base + offs_m.to(tl.int64)[:, None] * stride_ol + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _tma_block_shapes(nargs: dict) -> None:
    # The descriptors are made before a config is chosen; each config sets the tiles it loads.
    block_m, block_n, channels = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
    nargs["q_src"].block_shape = [block_m, channels]
    nargs["k_src"].block_shape = [block_n, channels]
    nargs["v_src"].block_shape = [channels, block_n]


def _config(block_m: int, block_n: int, warps: int, stages: int, tma: bool, registers: int | None = None):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=registers, pre_hook=_tma_block_shapes if tma else None)


# NOT YET TIMED on any GPU. Chosen from builds for sm_90 / sm_89 / sm_80 made without a GPU
# (bench/attention/sage_attention_builds.py): the configs whose registers do not spill, for head dim 128, e4m3 and fp16
# P·V. Their timings on an H200: bench/attention/sage_attention_probe.py.
# Hopper (sm_90, TMA; int8, e4m3 and fp16 wgmma): 152-212 registers, 66-166 KB of shared memory; 128-query tiles
# on 4 warps spilled.
# 64x128 on 4 warps, 2 stages, capped at 168 registers (3 programs an SM instead of 2): 1.20 ms at the edit shape
# in two runs on an H200, the fastest (bench/RESULTS.md, "folded scores").
_TMA_CONFIGS = [_config(128, 128, 8, 2, True), _config(128, 128, 8, 3, True), _config(128, 64, 8, 3, True),
                _config(128, 64, 8, 4, True), _config(64, 128, 4, 3, True), _config(64, 128, 4, 2, True, 168)]
# Ampere / Ada (pointer loads, cp.async pipelining): 199-237 registers, 33-91 KB (128x128 tiles spilled there).
_POINTER_CONFIGS = [_config(128, 64, 8, 2, False), _config(128, 64, 8, 3, False), _config(128, 64, 8, 4, False),
                    _config(64, 64, 4, 3, False)]

_AUTOTUNE_KEY = ["length_bucket", "BLOCK_D", "FP8_PV", "K_ROWS", "SPLIT_ACCUMULATOR", "SCORES"]
_attention_tma_tuned = triton.autotune(configs=_TMA_CONFIGS, key=_AUTOTUNE_KEY)(_attention_kernel)
_attention_pointer_tuned = triton.autotune(configs=_POINTER_CONFIGS, key=_AUTOTUNE_KEY)(_attention_kernel)

# Small tiles keep the interpreter quick; BLOCK_M 64 also checks that q's scales need not align with the tile.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}

# The launch parameters of the last attention launch in this process (tests and the check step read the key
# block width, which the reference needs: module docstring).
last_config: dict = {}


def split_accumulator_default(operands: Operands) -> bool:
    """Whether each key block's P·V gets a fresh accumulator (module docstring): with e4m3 operands."""
    return operands.v8t.dtype == torch.float8_e4m3fn


# Which kernel takes sage8's attention on Hopper: "gluon" (the warp-specialised kernel of
# sage_attention_hopper.py, where it can run and no variant is pinned), "cute" (sage_attention_cute.py's, with
# FlashAttention-3's in-warpgroup overlap, where cute_runtime finds it and the output is bf16 with 128 channels;
# else the Gluon kernel) or "triton" (this module's kernel). KONTEXT_SAGE_HOPPER_KERNEL sets it for a process.
HOPPER_KERNELS = ("gluon", "cute", "triton")
_READ_PERMUTED_KEYS = ("gluon", "cute")  # the Hopper kernels proper: one schedule, keys in key_tokens order
HOPPER_KERNEL = os.environ.get("KONTEXT_SAGE_HOPPER_KERNEL", "gluon")
if HOPPER_KERNEL not in HOPPER_KERNELS:
    raise ValueError(f"KONTEXT_SAGE_HOPPER_KERNEL={HOPPER_KERNEL!r}: choose one of {', '.join(HOPPER_KERNELS)} "
                     f"(or unset it for the default, gluon)")


def hopper_kernel_takes(device: torch.device, fp8_pv: bool, q_rows: int, k_rows: int, head_dim: int) -> bool:
    """Whether a Hopper kernel (sage_attention_hopper.py's or sage_attention_cute.py's; they read the same operands)
    will take operands of this shape on `device` (then quantized in their key order)."""
    return (HOPPER_KERNEL in _READ_PERMUTED_KEYS
            and sage_attention_hopper.takes(device, fp8_pv, q_rows, k_rows, padded_head_dim(head_dim)))


def _takes_hopper_kernel(operands: Operands, kernel: str | None, config: dict | None, tma: bool | None,
                         split_accumulator: bool | None, scores: int | None) -> bool:
    # The Hopper kernels have one schedule: TMA, 128x128 tiles, a fresh P·V accumulator per key block, folded scores.
    default_variant = (config is None and tma is not False and split_accumulator is not False
                       and (SCORES_DEFAULT if scores is None else scores) == SCORES_FOLDED)
    return ((kernel or HOPPER_KERNEL) in _READ_PERMUTED_KEYS and default_variant
            and sage_attention_hopper.ready_for(operands))


def _launch_attention(operands: Operands, out_dtype: torch.dtype, config: dict | None = None,
                      tma: bool | None = None, split_accumulator: bool | None = None,
                      scores: int | None = None, kernel: str | None = None) -> torch.Tensor:
    """The attention kernel on quantized operands. `config` ({"BLOCK_M", "BLOCK_N", "num_warps",
    "num_stages"}), `tma`, `split_accumulator` and `scores` pin a variant of this module's kernel (the probe times
    each); by default the autotuner picks among the configs of the GPU's kind. On Hopper the default variant runs
    the Gluon kernel instead (`kernel`: "gluon" / "triton" overrides HOPPER_KERNEL)."""
    o = operands
    batch, heads, padded_q, channels = o.q8.shape
    padded_k = o.k8.shape[2]
    device = o.q8.device
    out = torch.empty((batch, o.length_q, heads, o.head_dim), dtype=out_dtype, device=device)
    if _takes_hopper_kernel(o, kernel, config, tma, split_accumulator, scores):
        cute = (kernel or HOPPER_KERNEL) == "cute" and cute_runtime.takes(o, out_dtype)
        if cute:
            cute_runtime.launch(o, out)
        else:
            sage_attention_hopper.launch(o, out)
        last_config.clear()
        last_config.update(BLOCK_M=sage_attention_hopper.BLOCK_M, BLOCK_N=sage_attention_hopper.BLOCK_N,
                           num_stages=sage_attention_hopper.STAGES, kernel="cute" if cute else "gluon", tma=True,
                           split_accumulator=True, scores=SCORES_FOLDED,
                           rounded_row_sums=(cute_runtime.ROUNDED_ROW_SUMS if cute else
                                             sage_attention_hopper.ROW_SUMS_ON_TENSOR_CORES
                                             and not sage_attention_hopper.PV_DURING_SOFTMAX),
                           pv_during_softmax=cute or sage_attention_hopper.PV_DURING_SOFTMAX)
        launches["sage_attention"] += 1
        return out.transpose(1, 2)
    o = keys_in_token_order(o)  # this module's kernel reads keys in token order
    if split_accumulator is None:
        split_accumulator = split_accumulator_default(o)
    args = dict(heads=heads, length_q=o.length_q, length_k=loop_count(o.length_k),
                full_end=loop_count(o.length_k // TOKEN_TILE * TOKEN_TILE), padded_q=padded_q, padded_k=padded_k,
                length_bucket=next_power_of_2(o.length_k), stride_ob=out.stride(0), stride_oh=out.stride(2),
                stride_ol=out.stride(1), HEAD_DIM=o.head_dim, BLOCK_D=channels, Q_ROWS=o.q_rows, K_ROWS=o.k_rows,
                FP8_PV=o.v8t.dtype == torch.float8_e4m3fn, SPLIT_ACCUMULATOR=split_accumulator,
                EXACT_ROUNDING=interpreting(), SCORES=SCORES_DEFAULT if scores is None else scores)
    scales = (o.q_scale, o.k_scale, o.v_scale, out)
    if interpreting():
        config = dict(_INTERPRETER_CONFIG) if config is None else config
        tma = bool(tma)  # pointer loads unless asked: the interpreter reads TMA descriptors too (a test does)
    elif tma is None:
        tma = hopper(device)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # Block shapes here are placeholders: each config's pre-hook (or the pinned config below) sets them.
        sources = (TensorDescriptor.from_tensor(o.q8.view(-1, channels), [64, channels]),
                   TensorDescriptor.from_tensor(o.k8.view(-1, channels), [64, channels]),
                   TensorDescriptor.from_tensor(o.v8t.view(-1, padded_k), [channels, 64]))
    else:
        sources = (o.q8, o.k8, o.v8t)

    if config is not None:
        block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
        extra = {key: config[key] for key in ("num_warps", "num_stages", "maxnreg") if key in config}
        if tma:
            _tma_block_shapes({"q_src": sources[0], "k_src": sources[1], "v_src": sources[2], "BLOCK_M": block_m,
                               "BLOCK_N": block_n, "BLOCK_D": channels})
        _attention_kernel[(cdiv(o.length_q, block_m), batch * heads)](
            *sources, *scales, TMA=tma, BLOCK_M=block_m, BLOCK_N=block_n,
            **args, **extra)
        chosen = {"BLOCK_M": block_m, "BLOCK_N": block_n, **extra}
    else:
        tuned = _attention_tma_tuned if tma else _attention_pointer_tuned
        tuned[lambda meta: (cdiv(o.length_q, meta["BLOCK_M"]), batch * heads)](*sources, *scales, TMA=tma, **args)
        best = tuned.best_config
        chosen = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    last_config.clear()
    last_config.update(chosen, kernel="triton", tma=tma, split_accumulator=split_accumulator, scores=args["SCORES"],
                       rounded_row_sums=False)
    launches["sage_attention"] += 1
    return out.transpose(1, 2)
