"""8-bit weight storage and 8-bit GEMMs: linear layers that keep float8 (e4m3, e5m2) or int8 weights.

Where the GPU has the units, a layer multiplies in 8 bits: e4m3 weights with e4m3 activation rows on fp8
tensor cores (`torch._scaled_mm`, Ada and Hopper), int8 weights with int8 activation rows on int8 tensor
cores (our Triton kernel, kontext_kernels/int8_gemm.py: Ampere and newer). Activations are quantized per token
with dynamic scales, weights per output row. Elsewhere the weights are upcast per call and the
arithmetic stays in the compute dtype.

int8 rounds ~3x less than e4m3 on FLUX's roughly Gaussian activations and weights (7 bits of uniform
steps against 3 mantissa bits): on random full-size weights the velocity's error vs bf16 is 2.9% with
int8 blocks against 8.5% with e4m3 ones, at 95% of the fp8 step's speed on an H200 (bench/RESULTS.md, "An
int8 path"). e4m3 keeps its place for
the fp8 files users have and for activations with strong outliers, where its floating steps fare better.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

try:  # kontext_kernels/ is optional (its int8 GEMM is the only int8 one): without it int8 weights are upcast
    from kontext_kernels import int8_gemm as _int8_gemm
    from kontext_kernels import runtime as _kernel_runtime
except Exception:  # pragma: no cover - absent or broken Triton install
    _int8_gemm = None

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
INT8_MAX = 127.0

# The int8 path keeps the blocks' modulation linears in the compute dtype: on random full-size weights,
# rounding their operands alone took the velocity's error from 2.9% to 3.6% (their outputs scale and gate
# every token of a block, so the error does not average out), for 0.8 ms a step in bf16 (they are
# one-row products, memory-bound) and 3.2 GB more weights (bench/RESULTS.md, "An int8 path").
INT8_KEPT = ("_mod.lin", "modulation.lin")

_fp8_matmul = True
_fp8_matmul_on_cpu = False


def set_fp8_matmul(enabled: bool, on_cpu: bool = False) -> None:
    """On GPUs with fp8 tensor cores (Ada, Hopper), QuantizedLinear multiplies in fp8; off: upcast weights.

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


def int8_weight_ok(weight: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether `compute_dtype` activations multiply with this int8 weight on int8 tensor cores (our Triton
    kernel: a CUDA GPU of compute capability 8.0+, or the CPU under Triton's interpreter)."""
    if weight.dtype != torch.int8 or compute_dtype not in (torch.bfloat16, torch.float16) or _int8_gemm is None:
        return False
    if not _kernel_runtime.enabled_for_traced(weight):
        return False
    return not weight.is_cuda or torch.cuda.get_device_capability(weight.device) >= (8, 0)


def rows_format(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The 8-bit form (e4m3 or int8) in which activations like x multiply with `weight`, or None: upcast."""
    if x.device.type != weight.device.type:
        return None
    if fp8_weight_ok(weight, x.dtype):
        return torch.float8_e4m3fn
    return torch.int8 if int8_weight_ok(weight, x.dtype) else None


class QuantizedRows(NamedTuple):
    """Activations ready for an 8-bit GEMM: `data` [..., K] (e4m3 or int8) ~= float rows / `scale` [rows, 1]."""

    data: torch.Tensor
    scale: torch.Tensor


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> QuantizedRows:
    """Per-token (row) dynamic scales amax/448 (e4m3) or amax/127 (int8, rounded to nearest), the rows then
    in `dtype`: the plain form of what kontext_kernels/row_quant.py fuses with the op producing x. The same arithmetic
    as its `quantize_rows_reference` (kontext_core runs without kontext_kernels/; tests/compute/test_fp8_matmul.py holds
    them equal)."""
    top = INT8_MAX if dtype == torch.int8 else E4M3_MAX
    rows = x.reshape(-1, x.shape[-1]).float()
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    # full_like, not new_tensor: a host-to-device copy could not be captured in a CUDA graph.
    scaled = (rows * (torch.full_like(amax, top) / amax)).clamp(-top, top)
    data = scaled.round().to(torch.int8) if dtype == torch.int8 else scaled.to(torch.float8_e4m3fn)
    return QuantizedRows(data.view(x.shape), amax / top)


def _int8_linear(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    # Looked up per call, as fused.py's ops do: the tests rebuild the kernel modules for the interpreter or the GPU.
    return _int8_gemm.int8_linear(data, scale, weight, weight_scale, bias, out_dtype)


def _int8_linear_gated_residual(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                                weight_scale: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                                residual: torch.Tensor) -> torch.Tensor:
    return _int8_gemm.int8_linear_gated_residual(data, scale, weight, weight_scale, bias, gate, residual)


if _int8_gemm is not None:
    # Opaque to the compiler, which would otherwise trace into the kernel's autotuner and descriptors.
    ops.define("int8_linear(Tensor data, Tensor scale, Tensor weight, Tensor weight_scale, Tensor? bias, "
               "ScalarType out_dtype) -> Tensor", _int8_linear,
               lambda data, scale, weight, weight_scale, bias, out_dtype: data.new_empty(
                   (*data.shape[:-1], weight.shape[0]), dtype=out_dtype))
    ops.define("int8_linear_gated_residual(Tensor data, Tensor scale, Tensor weight, Tensor weight_scale, "
               "Tensor? bias, Tensor gate, Tensor residual) -> Tensor", _int8_linear_gated_residual,
               lambda data, scale, weight, weight_scale, bias, gate, residual: torch.empty_like(residual))


def _int8_linear_pair(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, data2: torch.Tensor, scale2: torch.Tensor, weight2: torch.Tensor,
                      weight_scale2: torch.Tensor, bias2: torch.Tensor | None,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _int8_gemm.int8_linear_pair((data, scale, weight, weight_scale, bias),
                                       (data2, scale2, weight2, weight_scale2, bias2), out_dtype)


def _int8_linear_gated_residual_pair(data: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                                     weight_scale: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                                     residual: torch.Tensor, data2: torch.Tensor, scale2: torch.Tensor,
                                     weight2: torch.Tensor, weight_scale2: torch.Tensor, bias2: torch.Tensor | None,
                                     gate2: torch.Tensor, residual2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _int8_gemm.int8_linear_gated_residual_pair((data, scale, weight, weight_scale, bias, gate, residual),
                                                      (data2, scale2, weight2, weight_scale2, bias2, gate2, residual2))


if _int8_gemm is not None:
    ops.define("int8_linear_pair(Tensor data, Tensor scale, Tensor weight, Tensor weight_scale, Tensor? bias, "
               "Tensor data2, Tensor scale2, Tensor weight2, Tensor weight_scale2, Tensor? bias2, "
               "ScalarType out_dtype) -> (Tensor, Tensor)", _int8_linear_pair,
               lambda data, scale, weight, weight_scale, bias, data2, scale2, weight2, weight_scale2, bias2,
               out_dtype: (data.new_empty((*data.shape[:-1], weight.shape[0]), dtype=out_dtype),
                           data2.new_empty((*data2.shape[:-1], weight2.shape[0]), dtype=out_dtype)))
    ops.define("int8_linear_gated_residual_pair(Tensor data, Tensor scale, Tensor weight, Tensor weight_scale, "
               "Tensor? bias, Tensor gate, Tensor residual, Tensor data2, Tensor scale2, Tensor weight2, "
               "Tensor weight_scale2, Tensor? bias2, Tensor gate2, Tensor residual2) -> (Tensor, Tensor)",
               _int8_linear_gated_residual_pair,
               lambda *operands: (torch.empty_like(operands[6]), torch.empty_like(operands[13])))


class Int8Product(NamedTuple):
    """One int8 layer's product as a pair op takes it: int8 rows and the layer's weight, scales and bias."""

    rows: QuantizedRows
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def operands(self) -> tuple:
        return (self.rows.data, self.rows.scale, self.weight, self.weight_scale, self.bias)


def int8_linear_pair(first: Int8Product, second: Int8Product,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both products in out_dtype, from one launch where the kernel takes them (kontext_kernels/int8_gemm.py,
    `int8_linear_pair`): the double block's text and image streams."""
    if torch.compiler.is_compiling():
        return torch.ops.kontext.int8_linear_pair(*first.operands(), *second.operands(), out_dtype)
    return _int8_linear_pair(*first.operands(), *second.operands(), out_dtype)


def int8_gated_residual_pair(first: tuple[torch.Tensor, torch.Tensor, Int8Product],
                             second: tuple[torch.Tensor, torch.Tensor, Int8Product]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`int8_gated_residual` of two (residual, gate, product) triples, one launch where the kernel takes both."""
    (residual, gate, product), (residual2, gate2, product2) = first, second
    operands = (*product.operands(), gate, residual, *product2.operands(), gate2, residual2)
    if torch.compiler.is_compiling():
        return torch.ops.kontext.int8_linear_gated_residual_pair(*operands)
    return _int8_linear_gated_residual_pair(*operands)


def int8_gated_residual(residual: torch.Tensor, gate: torch.Tensor, rows: QuantizedRows, weight: torch.Tensor,
                        weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """residual + gate * (int8 rows @ weight.T ...), the add in the int8 GEMM's epilogue where it can be. (int8
    rows exist only where the int8 kernels imported: `int8_weight_ok`.)"""
    if torch.compiler.is_compiling():
        return torch.ops.kontext.int8_linear_gated_residual(rows.data, rows.scale, weight, weight_scale, bias, gate,
                                                            residual)
    return _int8_linear_gated_residual(rows.data, rows.scale, weight, weight_scale, bias, gate, residual)


def linear_rows(rows: QuantizedRows, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """rows @ (weight * weight_scale).T + bias on the 8-bit tensor cores of rows' format, in out_dtype."""
    if rows.data.dtype == torch.int8:
        if torch.compiler.is_compiling():
            return torch.ops.kontext.int8_linear(rows.data, rows.scale, weight, weight_scale, bias, out_dtype)
        return _int8_linear(rows.data, rows.scale, weight, weight_scale, bias, out_dtype)
    return fp8_linear_rows(rows, weight, weight_scale, bias, out_dtype)


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


_int8_upcast_warned = False


def _warn_int8_upcast(device: torch.device) -> None:
    """Once per process: int8 weights on an accelerator without our int8 GEMM are upcast per layer, which is
    slower than plain bf16 weights; say why and what to do."""
    global _int8_upcast_warned
    if _int8_upcast_warned:
        return
    _int8_upcast_warned = True
    warnings.warn(
        f"int8 weights are upcast to bf16 for every layer on {device}: int8 matrix products need our Triton "
        "kernel, i.e. Triton installed (pip install triton; triton-windows on Windows), an NVIDIA GPU of the "
        "Ampere generation or newer, and the kernels on (KONTEXT_KERNELS unset). This way steps run slower than "
        "with bf16 weights: install Triton, or load the model in bf16 or fp8.", RuntimeWarning, stacklevel=3)


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored in 8 bits (float8 e4m3 / e5m2, or int8) times `weight_scale` (a scalar
    or one per row): half the bytes of a bf16 layer.

    It multiplies on 8-bit tensor cores where `rows_format` finds them (activations quantized per token),
    otherwise the weight is upcast to the compute dtype for the call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_dtype: torch.dtype = torch.float8_e4m3fn, compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype, device=device),
                                   requires_grad=False)
        # int8 weights always have a scale per row (its uniform steps need them); float8 ones as their file has.
        scale_shape = (out_features,) if weight_dtype == torch.int8 else ()
        self.weight_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        scale = self.weight_scale.float()
        if scale.ndim == 1:
            scale = scale[:, None]
        return (self.weight.float() * scale).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):  # already quantized by a fused kernel (kontext_core/compute/fused.py)
            return linear_rows(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)
        form = rows_format(x, self.weight)
        if form is not None:
            return linear_rows(quantize_rows(x, form), self.weight, self.weight_scale, self.bias, x.dtype)
        if self.weight.dtype == torch.int8 and x.device.type != "cpu" and not torch.compiler.is_compiling():
            _warn_int8_upcast(x.device)
        weight = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight.dtype}, compute={self.compute_dtype}")


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                    per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled 8-bit weights: (weight_8bit, scale) with weight ~= weight_8bit * scale; int8 rounded to nearest.

    Per-tensor scales are what ComfyUI's scaled-fp8 files hold; per-row scales ([out_features])
    follow each output channel's range and lose less (int8's uniform steps need them).
    """
    max_value = INT8_MAX if dtype == torch.int8 else torch.finfo(dtype).max
    magnitude = weight.detach().float().abs()
    amax = magnitude.amax(dim=1) if per_row else magnitude.max()
    scale = (amax.clamp(min=1e-12) / max_value).to(torch.float32)
    divisor = scale[:, None] if per_row else scale
    scaled = (weight.float() / divisor).clamp(-max_value, max_value)
    return (scaled.round() if dtype == torch.int8 else scaled).to(dtype), scale


BLOCKS = ("double_blocks.", "single_blocks.")


def quantized_layers(model: nn.Module, dtype: torch.dtype, prefixes: tuple[str, ...] = BLOCKS) -> list[str]:
    """The linears an 8-bit `dtype` model keeps in 8 bits: every linear under `prefixes` (the blocks), but for
    int8 not the modulation linears (INT8_KEPT)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefixes)
            and not (dtype == torch.int8 and name.endswith(INT8_KEPT))]


def quantize_model(model: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn, prefixes: tuple[str, ...] = BLOCKS,
                   per_row: bool = True) -> nn.Module:
    """Replace the model's block linears (`quantized_layers`), in place, by QuantizedLinear layers with `dtype`
    weights (e4m3, e5m2 or int8; int8 always per row)."""
    for name in quantized_layers(model, dtype, prefixes):
        module = model.get_submodule(name)
        weight, scale = quantize_weight(module.weight, dtype, per_row=per_row or dtype == torch.int8)
        layer = QuantizedLinear(module.in_features, module.out_features, module.bias is not None, weight_dtype=dtype,
                                compute_dtype=module.weight.dtype, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def replace_linears_with_quantized(model: nn.Module, names: set[str], weight_dtypes: dict[str, torch.dtype],
                                   compute_dtype: torch.dtype) -> None:
    """Swap the named nn.Linear modules (on the meta device) for QuantizedLinear ones."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        layer = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                weight_dtypes.get(name, torch.float8_e4m3fn), compute_dtype, device="meta")
        setattr(parent, child, layer)
