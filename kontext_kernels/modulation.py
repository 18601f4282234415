"""LayerNorm (no affine) followed by the adaLN modulation, in one pass over each token.

Unfused, `(1 + scale) * layer_norm(x) + shift` reads and writes the activations three times; the
kernel reads each row once, keeps it in registers for both statistics, and writes it once. The row
arithmetic (`layernorm_modulate_rows`) is shared with the fp8 quantizer of kontext_kernels/row_quant.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import (cdiv, enabled_for, import_triton, last_dim_contiguous, launches, next_power_of_2,
                      reduction_combines, row_warps, rows_per_program)

triton, tl = import_triton()

# tl.reduce with Triton's own combines (runtime.reduction_combines says why).
_, _add = reduction_combines()


def layernorm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                 eps: float = 1e-6) -> torch.Tensor:
    """x [B, L, C], shift and scale [B or 1, 1, C] -> (1 + scale) * layer_norm(x) + shift, in x.dtype."""
    return ((1 + scale) * F.layer_norm(x, (x.shape[-1],), eps=eps) + shift).to(x.dtype)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """Same contract as `layernorm_modulate_reference`; the Triton kernel where it can run."""
    if enabled_for(x) and x.dim() == 3 and x.numel() > 0:
        return _layernorm_modulate_triton(x, shift, scale, eps)
    return layernorm_modulate_reference(x, shift, scale, eps)


@triton.jit
def layernorm_modulate_rows(x_ptr, shift_ptr, scale_ptr, rows, n_rows, length, channels, eps,
                            stride_xb, stride_xl, stride_shift_b, stride_scale_b, BLOCK_C: tl.constexpr):
    """(1 + scale) * LayerNorm(x) + shift for `rows` (flat b * L + l) of x [B, L, C], in float32:
    ([ROWS, BLOCK_C] tile, zero outside the rows and channels; its column offsets; its mask). Each row
    is read once and stays in registers for both statistics."""
    batch = rows // length
    token = rows % length
    return layernorm_modulate_tile(x_ptr, batch * stride_xb + token * stride_xl, shift_ptr, batch * stride_shift_b,
                                   scale_ptr, batch * stride_scale_b, rows < n_rows, channels, eps, BLOCK_C)


@triton.jit
def layernorm_modulate_tile(x_base, x_offsets, shift_base, shift_offsets, scale_base, scale_offsets, inside,
                            channels, eps, BLOCK_C: tl.constexpr):
    """`layernorm_modulate_rows`' tile for rows at base + offsets ([ROWS] offsets; a base is one pointer, or a
    [ROWS, 1] tensor of them where rows come from different tensors); `inside` masks rows past the end."""
    cols = tl.arange(0, BLOCK_C)
    mask = inside[:, None] & (cols < channels)[None, :]

    x = tl.load(x_base + x_offsets[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 1, _add) / channels
    centred = tl.where(mask, x - mean[:, None], 0.0)
    variance = tl.reduce(centred * centred, 1, _add) / channels
    normed = centred * tl.rsqrt(variance + eps)[:, None]
    shift = tl.load(shift_base + shift_offsets[:, None] + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_base + scale_offsets[:, None] + cols[None, :], mask=mask, other=0.0)
    out = tl.where(mask, (1.0 + scale.to(tl.float32)) * normed + shift.to(tl.float32), 0.0)
    return out, cols, mask


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    n_rows, length, channels, eps,
    stride_xb, stride_xl, stride_shift_b, stride_scale_b,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    out, cols, mask = layernorm_modulate_rows(x_ptr, shift_ptr, scale_ptr, rows, n_rows, length, channels, eps,
                                              stride_xb, stride_xl, stride_shift_b, stride_scale_b, BLOCK_C)
    tl.store(out_ptr + rows[:, None] * channels + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def modulation_operands(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """x [B, L, C] and shift, scale [B or 1, 1, C] as the row kernels take them: unit last-dim strides,
    batch-1 modulation broadcast through a zero batch stride (chunked views keep their strides)."""
    batch, _, channels = x.shape
    return (last_dim_contiguous(x), last_dim_contiguous(shift.expand(batch, 1, channels)),
            last_dim_contiguous(scale.expand(batch, 1, channels)))


def _layernorm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float) -> torch.Tensor:
    batch, length, channels = x.shape
    x, shift, scale = modulation_operands(x, shift, scale)
    out = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    block = next_power_of_2(channels)
    rows = rows_per_program(block)
    _layernorm_modulate_kernel[(cdiv(batch * length, rows),)](
        x, shift, scale, out,
        batch * length, length, channels, eps,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        BLOCK_C=block, ROWS=rows, num_warps=row_warps(rows * block),
    )
    launches["layernorm_modulate"] += 1
    return out
