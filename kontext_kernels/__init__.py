"""Optional fused Triton kernels, each beside a plain PyTorch reference with the same signature.

The public functions dispatch: the Triton kernel where `enabled_for(tensor)` holds (a CUDA tensor
of compute capability 8.0+, Triton importable, not switched off by `set_enabled(False)` or
`KONTEXT_KERNELS=0`; or any tensor under `TRITON_INTERPRET=1`), the `*_reference` otherwise.
Importing this package never needs Triton.
"""

from . import int8_gemm, row_quant, sage_attention
from .ffn import linear_gated_residual, linear_gated_residual_reference, linear_gelu, linear_gelu_reference
from .modulation import layernorm_modulate, layernorm_modulate_reference
from .qk_norm_rope import joint_qkv_norm_rope, qkv_norm_rope, qkv_norm_rope_reference
from .runtime import enabled_for, set_enabled, triton_available

__all__ = [
    "enabled_for",
    "int8_gemm",
    "row_quant",
    "sage_attention",
    "joint_qkv_norm_rope",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "linear_gated_residual",
    "linear_gated_residual_reference",
    "linear_gelu",
    "linear_gelu_reference",
    "qkv_norm_rope",
    "qkv_norm_rope_reference",
    "set_enabled",
    "triton_available",
]
