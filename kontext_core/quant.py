"""FP8 weight storage: linear layers that keep float8 weights and upcast them per call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored as float8 times `weight_scale` (a scalar or one per row).

    The weight is upcast to the compute dtype for each call, so the model holds half the bytes
    of a bf16 model while the arithmetic stays in bf16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_dtype: torch.dtype = torch.float8_e4m3fn, compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        scale = self.weight_scale.float()
        if scale.ndim == 1:
            scale = scale[:, None]
        return (self.weight.float() * scale).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight.dtype}, compute={self.compute_dtype}")


def quantize_weight(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled float8: returns (weight_fp8, scale) with weight ~= weight_fp8 * scale."""
    max_value = torch.finfo(fp8_dtype).max
    amax = weight.detach().float().abs().max().clamp(min=1e-12)
    scale = (amax / max_value).to(torch.float32)
    return (weight.float() / scale).clamp(-max_value, max_value).to(fp8_dtype), scale


def replace_linears_with_fp8(model: nn.Module, names: set[str], weight_dtypes: dict[str, torch.dtype],
                             compute_dtype: torch.dtype) -> None:
    """Swap the named nn.Linear modules (on the meta device) for Fp8Linear ones."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        fp8 = Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                        weight_dtypes.get(name, torch.float8_e4m3fn), compute_dtype, device="meta")
        setattr(parent, child, fp8)
