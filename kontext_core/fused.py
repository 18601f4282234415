"""The blocks' fusable operations: the Triton kernels of `kernels/` where they run, PyTorch elsewhere.

Each function here has one meaning; which implementation computes it is decided per call. The
kernels stay out of torch.compile'd graphs (the compiler fuses the PyTorch form itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # kernels/ is optional; a foreign package of the same name is ignored
    import kernels as _kernels

    if not hasattr(_kernels, "qkv_norm_rope"):
        _kernels = None
except Exception:  # pragma: no cover - absent or broken Triton install
    _kernels = None


# The Triton FFN GEMMs fuse their epilogues but multiply about 30% slower than cuBLAS on an H100, a
# net loss (bench/RESULTS.md: 319.8 vs 306.9 ms per edit step); so cuBLAS GEMMs by default, the row
# kernels (norm + modulation, QK-norm + RoPE) fused.
_fused_gemms = False


def set_fused_gemms(enabled: bool) -> None:
    """Use the Triton GEMMs with fused epilogues (True) or cuBLAS plus separate elementwise ops."""
    global _fused_gemms
    _fused_gemms = bool(enabled)


# cuBLASLt's GELU epilogue instead of a separate elementwise pass; off gives the plain PyTorch
# formulation, the reference the tests compare against.
_cublas_epilogues = True


def set_cublas_epilogues(enabled: bool) -> None:
    """GELU in cuBLASLt's epilogue (True), or GEMM then a separate GELU."""
    global _cublas_epilogues
    _cublas_epilogues = bool(enabled)


def _active(x: torch.Tensor) -> bool:
    return _kernels is not None and not torch.compiler.is_compiling() and _kernels.enabled_for(x)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 as in every FLUX norm."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift."""
    if _active(x):
        return _kernels.layernorm_modulate(x, shift, scale)
    return (1 + scale) * layer_norm(x) + shift


def _plain_linear(layer: nn.Module) -> bool:
    # Hooks (on-the-fly LoRA) must see the call: a layer that has them is called, not bypassed.
    return type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks


def _cublaslt_gelu(x: torch.Tensor, layer: nn.Module) -> bool:
    # cuBLASLt's bias+GELU(tanh) epilogue (torch._addmm_activation) saves a read and a write of the
    # 4x-wide MLP activation. CUDA only: on the CPU that op computes the exact (erf) GELU instead.
    return (_cublas_epilogues and x.is_cuda and _plain_linear(layer) and layer.bias is not None
            and x.dtype in (torch.float16, torch.bfloat16) and layer.weight.dtype == x.dtype)


def _linear_gelu_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.shape[0])


def linear_gelu(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """GELU(tanh)(layer(x)), the bias and GELU in the GEMM's epilogue where one can hold them."""
    if _fused_gemms and _plain_linear(layer) and _active(x):
        return _kernels.linear_gelu(x, layer.weight, layer.bias)
    if _cublaslt_gelu(x, layer):
        return _linear_gelu_rows(x, layer.weight, layer.bias)
    return F.gelu(layer(x), approximate="tanh")


def linear_then_gelu_part(x: torch.Tensor, layer: nn.Module, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y[..., :split], GELU(tanh)(y[..., split:])) for y = layer(x), the single block's linear1.

    On CUDA the two output ranges are two GEMMs over row slices of the weight (views, no copy), so
    the GELU half runs in cuBLASLt's epilogue and the first half comes out contiguous.
    """
    if _cublaslt_gelu(x, layer):
        weight, bias = layer.weight, layer.bias
        return F.linear(x, weight[:split], bias[:split]), _linear_gelu_rows(x, weight[split:], bias[split:])
    first, second = layer(x).split([split, layer.out_features - split], dim=-1)
    return first, F.gelu(second, approximate="tanh")


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """residual + gate * layer(x), the gated add in the GEMM's epilogue when fused."""
    if _fused_gemms and _plain_linear(layer) and _active(x):
        return _kernels.linear_gated_residual(x, layer.weight, layer.bias, gate, residual)
    return residual + gate * layer(x)


if _kernels is not None:
    # The QK-norm + RoPE kernel as an opaque op, so compiled blocks call it too: it writes q, k, v once,
    # in the attention layout and at each stream's offset of the joint sequence, where the compiler's
    # own fusion needed ~2.5x its time plus layout copies and the concatenation (bench/RESULTS.md).
    @torch.library.custom_op("kontext::joint_qkv_norm_rope", mutates_args=())
    def _joint_qkv_norm_rope(qkvs: list[torch.Tensor], query_scales: list[torch.Tensor],
                             key_scales: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                             num_heads: int) -> torch.Tensor:
        return _kernels.joint_qkv_norm_rope(list(zip(qkvs, query_scales, key_scales)), cos, sin, num_heads)

    @_joint_qkv_norm_rope.register_fake
    def _(qkvs, query_scales, key_scales, cos, sin, num_heads):
        first = qkvs[0]
        return first.new_empty((3, first.shape[0], num_heads, sum(qkv.shape[1] for qkv in qkvs),
                                first.shape[-1] // (3 * num_heads)))


def _qk_kernel_active(x: torch.Tensor) -> bool:
    return _kernels is not None and _kernels.runtime.enabled_for_traced(x)


def joint_qkv_heads(streams: list[tuple[torch.Tensor, nn.Module, nn.Module]], cos: torch.Tensor, sin: torch.Tensor,
                    num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams of (qkv [B, L_i, 3*H*D], query_norm, key_norm) -> joint q, k, v [B, H, sum L_i, D].

    Each stream's q and k are RMS-normalised with its own norms and rotated by RoPE with the joint
    tables (cos, sin over the whole joint sequence, streams in order).
    """
    if _qk_kernel_active(streams[0][0]):
        joint = torch.ops.kontext.joint_qkv_norm_rope([qkv for qkv, _, _ in streams],
                                                      [norm.scale for _, norm, _ in streams],
                                                      [norm.scale for _, _, norm in streams], cos, sin, num_heads)
        return joint[0], joint[1], joint[2]
    parts, offset = [], 0
    for qkv, query_norm, key_norm in streams:
        length = qkv.shape[1]
        parts.append(_plain_qkv_heads(qkv, query_norm, key_norm, cos[:, :, offset:offset + length],
                                      sin[:, :, offset:offset + length], num_heads))
        offset += length
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(tensors, dim=2) for tensors in zip(*parts))


def _plain_qkv_heads(qkv: torch.Tensor, query_norm: nn.Module, key_norm: nn.Module, cos: torch.Tensor,
                     sin: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, 3*H*D] -> q, k, v [B, H, L, D]: q and k RMS-normalised and rotated by RoPE (plain PyTorch;
    `joint_qkv_heads` takes the kernel where it runs)."""
    batch, length, _ = qkv.shape
    q, k, v = qkv.view(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = query_norm(q).to(v.dtype), key_norm(k).to(v.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the head dim by the position angles."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
