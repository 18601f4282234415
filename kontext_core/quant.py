"""FP8 weight storage: linear layers that keep float8 weights and upcast them per call."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max

_fp8_matmul = True
_fp8_matmul_on_cpu = False


def set_fp8_matmul(enabled: bool, on_cpu: bool = False) -> None:
    """On GPUs with fp8 tensor cores (Ada, Hopper), Fp8Linear multiplies in fp8; off: upcast weights.

    on_cpu: also take the fp8 path on the CPU (e4m3 operands, float32 products), so that a machine
    without a GPU can run and test it.
    """
    global _fp8_matmul, _fp8_matmul_on_cpu
    _fp8_matmul = bool(enabled)
    _fp8_matmul_on_cpu = bool(on_cpu)


# Fast accumulation skips the periodic promotion of the fp8 tensor cores' partial sums to fp32: on an
# H100 the block GEMMs run ~1.35x faster and the step's error vs bf16 did not move (8.50e-2 vs 8.56e-2
# L2, bench/RESULTS.md), e4m3's own rounding dominating.
_fast_accumulation = True


def set_fp8_fast_accumulation(enabled: bool) -> None:
    """fp8 GEMMs with the tensor cores' fast (less precise) accumulation."""
    global _fast_accumulation
    _fast_accumulation = bool(enabled)


def fp8_matmul_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether activations like x multiply with this weight on fp8 tensor cores (`torch._scaled_mm`)."""
    return x.device.type == weight.device.type and fp8_weight_ok(weight, x.dtype)


def fp8_weight_ok(weight: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether `compute_dtype` activations on the weight's device multiply with it on fp8 tensor cores."""
    if not (_fp8_matmul and weight.dtype == torch.float8_e4m3fn):
        return False
    if compute_dtype not in (torch.bfloat16, torch.float16) or weight.shape[0] % 16 or weight.shape[1] % 16:
        return False
    if weight.device.type == "cpu":
        return _fp8_matmul_on_cpu
    return weight.is_cuda and torch.cuda.get_device_capability(weight.device) >= (8, 9)


class QuantizedRows(NamedTuple):
    """Activations ready for an fp8 GEMM: e4m3 `data` [..., K] ~= float rows / `scale` [rows, 1]."""

    data: torch.Tensor
    scale: torch.Tensor


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """Per-token (row) dynamic scales amax/448, the rows then in e4m3: the plain form of what
    kernels/fp8_rows.py fuses with the op producing x. The same arithmetic as its
    `quantize_rows_reference` (kontext_core runs without kernels/; tests/test_fp8_matmul.py holds them equal)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    # full_like, not new_tensor: a host-to-device copy could not be captured in a CUDA graph.
    data = (rows * (torch.full_like(amax, E4M3_MAX) / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return QuantizedRows(data.view(x.shape), amax / E4M3_MAX)


def fp8_linear_rows(rows: QuantizedRows, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """rows @ (weight * weight_scale).T + bias on fp8 tensor cores, accumulated in fp32, in out_dtype."""
    shape = rows.data.shape
    data = rows.data.reshape(-1, shape[-1])
    w_scale = weight_scale.float().reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    if data.device.type == "cpu":
        # The same arithmetic on the CPU, whose _scaled_mm takes per-tensor scales only in some releases:
        # e4m3 times e4m3 is exact in float32, which accumulates; the scales apply to the sums.
        out = (data.float() @ weight.float().t()) * rows.scale * w_scale
        out = (out + bias.float() if bias is not None else out).to(out_dtype)
    else:
        out = torch._scaled_mm(data, weight.t(), scale_a=rows.scale, scale_b=w_scale,
                               bias=bias.to(out_dtype) if bias is not None else None, out_dtype=out_dtype,
                               use_fast_accum=_fast_accumulation)
    return out.reshape(*shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (weight * weight_scale).T + bias on fp8 tensor cores.

    Activations are quantized per token (row) with a dynamic scale amax/448, weights carry their
    per-tensor or per-row scale; the product accumulates in fp32 and is written in x's dtype.
    """
    return fp8_linear_rows(quantize_rows(x), weight, weight_scale, bias, x.dtype)


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

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):  # already quantized by a fused kernel (kontext_core/fused.py)
            return fp8_linear_rows(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)
        if fp8_matmul_ok(x, self.weight):
            return fp8_linear(x, self.weight, self.weight_scale, self.bias)
        weight = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight.dtype}, compute={self.compute_dtype}")


def quantize_weight(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled float8: (weight_fp8, scale) with weight ~= weight_fp8 * scale.

    Per-tensor scales are what ComfyUI's scaled-fp8 files hold; per-row scales ([out_features])
    follow each output channel's range and lose less.
    """
    max_value = torch.finfo(fp8_dtype).max
    magnitude = weight.detach().float().abs()
    amax = magnitude.amax(dim=1) if per_row else magnitude.max()
    scale = (amax.clamp(min=1e-12) / max_value).to(torch.float32)
    divisor = scale[:, None] if per_row else scale
    return (weight.float() / divisor).clamp(-max_value, max_value).to(fp8_dtype), scale


def quantize_model_fp8(model: nn.Module, prefixes: tuple[str, ...] = ("double_blocks.", "single_blocks."),
                       per_row: bool = True) -> nn.Module:
    """Replace the model's block linears, in place, by Fp8Linear layers with e4m3 weights."""
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and name.startswith(prefixes)):
            continue
        weight, scale = quantize_weight(module.weight, per_row=per_row)
        fp8 = Fp8Linear(module.in_features, module.out_features, module.bias is not None,
                        compute_dtype=module.weight.dtype, device="meta")
        fp8.weight = nn.Parameter(weight, requires_grad=False)
        fp8.weight_scale = nn.Parameter(scale, requires_grad=False)
        if module.bias is not None:
            fp8.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fp8)
    return model


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
