"""LayerNorm (no affine) followed by the adaLN modulation, in one pass over each token.

Unfused, `(1 + scale) * layer_norm(x) + shift` reads and writes the activations three times; the
kernel reads each row once, keeps it in registers for both statistics, and writes it once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import enabled_for, import_triton, launches, next_power_of_2, reduction_combines

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
def _layernorm_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    length, channels, eps,
    stride_xb, stride_xl, stride_shift_b, stride_scale_b,
    BLOCK_C: tl.constexpr,
):
    # One program per token; the whole row (up to 3072 channels in FLUX) sits in registers.
    row = tl.program_id(0)
    batch = (row // length).to(tl.int64)
    token = (row % length).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < channels

    x = tl.load(x_ptr + batch * stride_xb + token * stride_xl + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 0, _add) / channels
    centred = tl.where(inside, x - mean, 0.0)
    variance = tl.reduce(centred * centred, 0, _add) / channels
    normed = centred * tl.rsqrt(variance + eps)

    shift = tl.load(shift_ptr + batch * stride_shift_b + cols, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + batch * stride_scale_b + cols, mask=inside, other=0.0).to(tl.float32)
    out = (1.0 + scale) * normed + shift
    tl.store(out_ptr + row.to(tl.int64) * channels + cols, out.to(out_ptr.dtype.element_ty), mask=inside)


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _layernorm_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float) -> torch.Tensor:
    batch, length, channels = x.shape
    x = _last_dim_contiguous(x)
    # Batch-1 modulation broadcasts through a zero batch stride; chunked views keep their strides.
    shift = _last_dim_contiguous(shift.expand(batch, 1, channels))
    scale = _last_dim_contiguous(scale.expand(batch, 1, channels))
    out = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)

    block = next_power_of_2(channels)
    # 16 elements per thread: two 16-byte loads of bf16; 8 warps for the real 3072 channels.
    num_warps = max(1, min(16, block // 512))
    _layernorm_modulate_kernel[(batch * length,)](
        x, shift, scale, out,
        length, channels, eps,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        BLOCK_C=block, num_warps=num_warps,
    )
    launches["layernorm_modulate"] += 1
    return out
