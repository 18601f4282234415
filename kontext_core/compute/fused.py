"""The blocks' fusable operations: the Triton kernels of `kontext_kernels/` where they run, PyTorch elsewhere.

Each function here has one meaning; which implementation computes it is decided per call. Inside
torch.compile'd blocks the compiler fuses the PyTorch forms itself, except where a kernel beats its
fusion: those kernels enter the graph as opaque custom ops (`kontext::*`).

For 8-bit layers (`QuantizedLinear`) the activations a GEMM needs are e4m3 or int8 rows with per-row
scales (`QuantizedRows`); the functions that produce a layer's input produce them in that form directly,
the quantization fused with the producing op (kontext_kernels/row_quant.py), so no bf16 copy is written only
to be read back and quantized.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .quant import (E4M3_MAX, Int8Product, QuantizedLinear, QuantizedRows, fp8_linear_rows, fp8_matmul_ok,
                    int8_gated_residual, int8_gated_residual_pair, int8_linear_pair, rows_format)

try:  # kontext_kernels/ is optional: without it every op runs its PyTorch reference
    import kontext_kernels as _kernels
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


# cuBLASLt's GELU epilogue instead of a separate elementwise pass, and the single block's linear2
# accumulated over its input's two parts instead of over their concatenation; off gives the plain
# PyTorch formulation, the reference the tests compare against.
_cublas_epilogues = True


def set_cublas_epilogues(enabled: bool) -> None:
    """GELU in cuBLASLt's epilogue and the single block's linear2 as two accumulating GEMMs (True), or
    GEMM then a separate GELU, and linear2 over a concatenation."""
    global _cublas_epilogues
    _cublas_epilogues = bool(enabled)


# The single block's linear2 as two GEMMs over its input's parts (where cuBLAS runs it) rather than
# over their concatenation; a separate switch so the bench can time the two forms in one run.
_linear2_parts = True


def set_linear2_parts(enabled: bool) -> None:
    """The single block's linear2 over its input's two parts (True) or over their concatenation."""
    global _linear2_parts
    _linear2_parts = bool(enabled)


# The double block's two streams' 8-bit rows of one kind (LayerNorm + modulation, attention outputs, GELU rows)
# quantized in one launch of the row kernel rather than one a stream: the text stream's 512 rows alone leave most
# of the GPU idle. The same bytes either way (tests under Triton's interpreter). The int8 rows of the fast preset
# are paired by default: 76 launches fewer a step, within the run-to-run spread of the step's time on an H100
# (-1.6 and +0.4 ms in two processes), their model tests passed there (bench/RESULTS.md, 2026-12-07, eighth and
# ninth sessions). The fp8 path's e4m3 rows pair only when asked until their model tests pass on a GPU: paired, the
# second stream's scales reach torch._scaled_mm at a row offset, which cuBLASLt refused off a 16-byte boundary
# (now copied out there: row_quant.split_stacked).
PAIRED_ROW_FORMATS_DEFAULT = frozenset({torch.int8})
_paired_row_formats = PAIRED_ROW_FORMATS_DEFAULT


def set_paired_row_quantizers(enabled: bool | None) -> None:
    """Both streams' row quantizers in one launch for every 8-bit row format (True), a launch a stream (False),
    or the default (None: int8 rows paired, e4m3 rows not)."""
    global _paired_row_formats
    _paired_row_formats = (PAIRED_ROW_FORMATS_DEFAULT if enabled is None
                           else frozenset({torch.int8, torch.float8_e4m3fn}) if enabled else frozenset())


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


def modulated_input(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor | QuantizedRows:
    """(1 + scale) * LayerNorm(x) + shift, as `layer`'s input: e4m3 or int8 rows for an 8-bit layer."""
    form = _row_format(layer, x)
    if form is not None:
        return QuantizedRows(*torch.ops.kontext.layernorm_modulate_quantize(x, shift, scale, lora_columns(layer),
                                                                           form == torch.int8))
    return modulate(x, shift, scale)


def modulated_input_pair(first: tuple, second: tuple) -> tuple:
    """`modulated_input` of two (layer, x, shift, scale) quadruples: the double block's two streams, in one launch
    of the row kernel where it can take both (`set_paired_row_quantizers`)."""
    (layer, x, shift, scale), (layer2, x2, shift2, scale2) = first, second
    form = _row_form_pair(x, layer, x2, layer2)
    if form is not None:
        return _quantized_pair(torch.ops.kontext.layernorm_modulate_quantize_stacked(
            x, shift, scale, x2, shift2, scale2, lora_columns(layer), form == torch.int8), x, x2)
    return modulated_input(layer, x, shift, scale), modulated_input(layer2, x2, shift2, scale2)


# --- LoRAs on the fly ---------------------------------------------------------------------------
# A layer with on-the-fly LoRAs carries their low-rank factors as a plain attribute (kontext_core/adapters/lora.py
# sets it): every LoRA on the layer stacked into one `down` [R, in] and one `up` [out, R] (strengths folded
# into `up`, rows a LoRA does not touch zero). The functions here add `up @ (down @ x)` where they compute
# the layer, so compiled blocks trace the LoRA into their graph and CUDA graphs replay it; forward hooks
# did neither (a compiled block ran uncompiled while its layers had hooks).
LORA_FACTORS = "kontext_lora_factors"


class LoraFactors(NamedTuple):
    """A layer's on-the-fly LoRAs stacked (R padded with zeros, kontext_core/adapters/lora.py says why). For fp8
    layers also `down` in e4m3 with one scale per row (`down_scales` [1, R]), so that the down-projection
    reads the layer's own e4m3 input rows instead of a bf16 copy written for it. In the wide layout
    (kontext_core/adapters/wide_lora.py) also the columns' down factor in e4m3 `column_down` [C, in] and its GEMM's
    scales `column_scale` [1, C], and `wide`, the [N, K + C] e4m3 buffer holding the layer's weight and the
    LoRA's columns."""
    down: torch.Tensor
    up: torch.Tensor
    down_e4m3: torch.Tensor | None = None
    down_scales: torch.Tensor | None = None
    column_down: torch.Tensor | None = None
    column_scale: torch.Tensor | None = None
    wide: torch.Tensor | None = None


def factors_layout(factors: LoraFactors) -> list:
    """What must match for new factors to be written into the present ones in place."""
    return [None if t is None else (t.shape, t.dtype, t.device) for t in factors]


def lora_factors(layer: nn.Module) -> LoraFactors | None:
    """The stacked factors of the LoRAs applied on the fly to `layer`, or None."""
    if torch.compiler.is_compiling():
        return getattr(layer, LORA_FACTORS, None)
    # Eagerly, a dict lookup: getattr's miss goes through nn.Module.__getattr__ and builds an exception
    # (~7 us on the CI machine's CPU, ~900 times a step, on the host's critical path in eager fp8).
    return layer.__dict__.get(LORA_FACTORS)


def apply_to_lora_factors(model: nn.Module, fn) -> None:
    """Apply `fn` (what `Module._apply` passes: a move or a cast) to every layer's LoRA factors, so that they
    follow the model's `.to()` (ComfyUI moving it off the GPU and back, say) as its weights do."""
    for module in model.modules():
        factors = lora_factors(module)
        if factors is not None:
            setattr(module, LORA_FACTORS, LoraFactors(*(None if t is None else fn(t) for t in factors)))


def _lora_low(factors: LoraFactors, x: torch.Tensor | QuantizedRows | ColumnParts) -> torch.Tensor:
    """down @ x for every row of x: [..., R]."""
    down = factors.down
    if isinstance(x, QuantizedRows):
        rows = x.data.reshape(-1, x.data.shape[-1])
        if factors.down_e4m3 is not None and rows.is_cuda and fp8_matmul_ok(down, factors.down_e4m3):
            low = torch._scaled_mm(rows, factors.down_e4m3.t(), scale_a=x.scale, scale_b=factors.down_scales,
                                   out_dtype=down.dtype)
        else:
            # x = data * scale row by row; e4m3 and int8 values are exact in bf16, so the scale is applied after.
            low = (F.linear(rows.to(down.dtype), down).float() * x.scale).to(down.dtype)
        return low.view(*x.data.shape[:-1], low.shape[-1])
    if isinstance(x, ColumnParts):
        split = x.first.shape[-1]
        return F.linear(x.first, down[:, :split]) + F.linear(x.second, down[:, split:])
    return F.linear(x.to(down.dtype), down)


def _add_low_rank(out: torch.Tensor, low: torch.Tensor, up: torch.Tensor) -> None:
    # In place, the sum in the GEMM's epilogue (cuBLAS's beta = 1): the delta is never written out, and the
    # output is read and written once instead of a delta written, then both read and the sum written.
    out.view(-1, out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), up.t())


# A mutating operator, so compiled graphs call cuBLAS in place too (the compiler's functional addmm would
# copy the output first).
ops.define("add_low_rank_(Tensor(a!) out, Tensor low, Tensor up) -> ()", _add_low_rank,
           lambda out, low, up: None)


def _plus_lora(out: torch.Tensor, factors: LoraFactors | None, x) -> torch.Tensor:
    """out (= layer(x), a fresh tensor: updated in place) plus the layer's on-the-fly LoRAs `factors`."""
    if factors is None:
        return out
    out = out if out.is_contiguous() else out.contiguous()
    low = _lora_low(factors, x)
    if torch.compiler.is_compiling():
        torch.ops.kontext.add_low_rank_(out, low, factors.up)
    else:
        _add_low_rank(out, low, factors.up)
    return out


def _fill_lora_columns(data: torch.Tensor, scale: torch.Tensor, down: torch.Tensor, column_scale: torch.Tensor) -> None:
    # The spare columns of e4m3 rows [M, K + C] <- x @ down.T / c in the rows' own scale (the wide layout's
    # `a`): the row scale cancels out of x = data * scale, so a = (data @ column_down.T) * column_scale.
    rows = data.view(-1, data.shape[-1])
    width = down.shape[1]
    inputs = rows[:, :width]
    if rows.is_cuda:
        low = torch._scaled_mm(inputs, down.t(), scale_a=scale, scale_b=column_scale, out_dtype=torch.bfloat16)
        columns = low / scale  # float32 (the scale's dtype)
    else:  # e4m3 products are exact in float32
        columns = (inputs.float() @ down.float().t()) * column_scale
    rows[:, width:].copy_(columns.clamp_(-E4M3_MAX, E4M3_MAX))


ops.define("lora_columns_(Tensor(a!) data, Tensor scale, Tensor down, Tensor column_scale) -> ()",
           _fill_lora_columns, lambda data, scale, down, column_scale: None)


def lora_columns(layer: nn.Module) -> int:
    """The spare columns the layer's input rows need for its LoRAs (0: none, or not in the wide layout)."""
    factors = lora_factors(layer)
    return 0 if factors is None or factors.wide is None else factors.column_scale.shape[1]


def linear(layer: nn.Module, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
    """layer(x), with the layer's on-the-fly LoRAs."""
    factors = lora_factors(layer)
    if factors is not None and factors.wide is not None and isinstance(x, QuantizedRows):
        # e4m3 rows made with the spare columns: one GEMM over [x | a] and [W | b] (kontext_core/adapters/wide_lora.py).
        if torch.compiler.is_compiling():
            torch.ops.kontext.lora_columns_(x.data, x.scale, factors.column_down, factors.column_scale)
        else:
            _fill_lora_columns(x.data, x.scale, factors.column_down, factors.column_scale)
        return fp8_linear_rows(x, factors.wide, layer.weight_scale, layer.bias, layer.compute_dtype)
    return _plus_lora(layer(x), factors, x)


def _unhooked(layer: nn.Module) -> bool:
    return not layer._forward_hooks and not layer._forward_pre_hooks


def hooked(module: nn.Module) -> bool:
    """Whether `module` or any module inside it has forward hooks (LoRAs on the fly, block offload): code
    that replaces the modules' calls (compiled blocks, CUDA graphs) must then let them run."""
    return not all(_unhooked(m) for m in module.modules())


def _row_format(layer: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The 8-bit rows (e4m3 or int8) the fused quantizers make for `layer`'s input x, or None (x as it is)."""
    # Hooked layers see bf16 inputs: their hooks read them.
    fused = (type(layer) is QuantizedLinear and _unhooked(layer) and _kernels is not None
             and _kernels.runtime.enabled_for_traced(x))
    return rows_format(x, layer.weight) if fused else None


def _plain_linear(layer: nn.Module) -> bool:
    # Hooks must see the call: a layer that has them is called, not bypassed.
    return type(layer) is nn.Linear and _unhooked(layer)


def _epilogue_free(layer: nn.Module) -> bool:
    # A LoRA's delta is added before the GELU or the gated residual, so the forms that fuse those into
    # the layer's GEMM epilogue are for layers without one.
    return lora_factors(layer) is None


def _cublas_forms(x: torch.Tensor, layer: nn.Module) -> bool:
    # Where the cuBLAS-specific forms apply: a plain fp16/bf16 linear with a bias, on CUDA. cuBLASLt's
    # bias+GELU(tanh) epilogue (torch._addmm_activation) saves a read and a write of the 4x-wide MLP
    # activation; on the CPU that op computes the exact (erf) GELU instead. The accumulating GEMMs of
    # linear_over_parts are a measured cuBLAS win, not known elsewhere.
    return (_cublas_epilogues and x.is_cuda and _plain_linear(layer) and layer.bias is not None
            and x.dtype in (torch.float16, torch.bfloat16) and layer.weight.dtype == x.dtype)


class ColumnParts(NamedTuple):
    """A linear's input [..., K] kept as its column blocks, first [..., S] and second [..., K - S], never
    concatenated: the linear runs as two GEMMs over the matching column slices of its weight."""
    first: torch.Tensor
    second: torch.Tensor


def _linear_over_parts(first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    split = first.shape[-1]
    out = F.linear(second, weight[:, split:], bias)
    # In place (cuBLAS's beta = 1 on the output itself): out-of-place addmm would first copy the
    # accumulator, and in a CUDA graph each such copy also left the GPU idle (~0.1 ms, measured).
    out.view(-1, out.shape[-1]).addmm_(first.reshape(-1, split), weight[:, :split].t())
    return out


# Opaque to the compiler, whose functional addmm copies the accumulator first.
ops.define("linear_over_parts(Tensor first, Tensor second, Tensor weight, Tensor? bias) -> Tensor",
           _linear_over_parts,
           lambda first, second, weight, bias: second.new_empty((*second.shape[:-1], weight.shape[0])))


def linear_over_parts(parts: ColumnParts, layer: nn.Module) -> torch.Tensor:
    """layer(cat(parts)): the wide part's GEMM with the bias, the narrow part's accumulated onto it.
    Saves the concatenation's read and write of the whole input (bench/RESULTS.md)."""
    if torch.compiler.is_compiling():
        return torch.ops.kontext.linear_over_parts(parts.first, parts.second, layer.weight, layer.bias)
    return _linear_over_parts(parts.first, parts.second, layer.weight, layer.bias)


def _linear_gelu_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.shape[0])


def linear_gelu(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """GELU(tanh)(layer(x)), the bias and GELU in the GEMM's epilogue where one can hold them."""
    if _epilogue_free(layer):
        if _fused_gemms and _plain_linear(layer) and _active(x):
            return _kernels.linear_gelu(x, layer.weight, layer.bias)
        if _cublas_forms(x, layer):
            return _linear_gelu_rows(x, layer.weight, layer.bias)
    return F.gelu(linear(layer, x), approximate="tanh")


def linear_then_gelu_part(x: torch.Tensor, layer: nn.Module, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y[..., :split], GELU(tanh)(y[..., split:])) for y = layer(x), the single block's linear1.

    On CUDA the two output ranges are two GEMMs over row slices of the weight (views, no copy), so
    the GELU half runs in cuBLASLt's epilogue and the first half comes out contiguous.
    """
    if _cublas_forms(x, layer) and _epilogue_free(layer):
        weight, bias = layer.weight, layer.bias
        return F.linear(x, weight[:split], bias[:split]), _linear_gelu_rows(x, weight[split:], bias[split:])
    first, second = linear(layer, x).split([split, layer.out_features - split], dim=-1)
    return first, F.gelu(second, approximate="tanh")


def mlp_hidden(x: torch.Tensor | QuantizedRows, up: nn.Module, down: nn.Module) -> torch.Tensor | QuantizedRows:
    """GELU(tanh)(up(x)), as the input of the down-projection `down`: e4m3 rows for an fp8 layer."""
    if isinstance(x, QuantizedRows):
        return _gelu_input(linear(up, x), down)
    return linear_gelu(x, up)


def _gelu_input(hidden: torch.Tensor, down: nn.Module) -> torch.Tensor | QuantizedRows:
    # GELU(tanh)(hidden) as `down`'s input: 8-bit rows for an 8-bit layer.
    form = _row_format(down, hidden)
    if form is not None:
        return QuantizedRows(*torch.ops.kontext.gelu_quantize_rows(hidden, lora_columns(down), form == torch.int8))
    return F.gelu(hidden, approximate="tanh")


# --- The double block's two streams, op by op ------------------------------------------------------------------
# Its text (512 tokens) and image streams run the same ops with their own weights. The text stream's int8 GEMMs
# are too small to fill the GPU (four 128-row tiles); the pair forms below give both streams' GEMMs one launch of
# the Hopper kernel (kontext_kernels/int8_gemm_hopper.py, `launch_pair`), and compute each stream as its single form
# does elsewhere: the same values either way.

def _int8_product(layer: nn.Module, x) -> Int8Product | None:
    # A plain int8 layer's product of int8 rows (no hooks, no LoRA on the fly), as the pair ops take it.
    if (isinstance(x, QuantizedRows) and x.data.dtype == torch.int8 and type(layer) is QuantizedLinear
            and _unhooked(layer) and lora_factors(layer) is None):
        return Int8Product(x, layer.weight, layer.weight_scale, layer.bias)
    return None


def _pairable(first: tuple[nn.Module, object], second: tuple[nn.Module, object]) -> tuple | None:
    products = (_int8_product(*first), _int8_product(*second))
    if None in products or first[0].compute_dtype != second[0].compute_dtype:
        return None
    return products


def linear_pair(first: tuple[nn.Module, torch.Tensor | QuantizedRows],
                second: tuple[nn.Module, torch.Tensor | QuantizedRows]) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear` of two (layer, x) pairs."""
    products = _pairable(first, second)
    if products is not None:
        return int8_linear_pair(*products, first[0].compute_dtype)
    return linear(*first), linear(*second)


def _row_form_pair(x: torch.Tensor, layer: nn.Module, x2: torch.Tensor, layer2: nn.Module) -> torch.dtype | None:
    # The one 8-bit row format both layers' inputs take, where one launch can quantize both (rows it can stack,
    # as many LoRA columns), else None.
    if not _paired_row_formats:  # a launch a stream: nothing more to look at on every block's call
        return None
    form = _row_format(layer, x)  # None without the kernels
    if (form not in _paired_row_formats or form != _row_format(layer2, x2) or not _kernels.row_quant.can_stack(x, x2)
            or lora_columns(layer) != lora_columns(layer2)):
        return None
    return form


def mlp_hidden_pair(first: tuple, second: tuple) -> tuple:
    """`mlp_hidden` of two (x, up, down) triples."""
    (x, up, down), (x2, up2, down2) = first, second
    if isinstance(x, QuantizedRows) and isinstance(x2, QuantizedRows):
        hidden, hidden2 = linear_pair((up, x), (up2, x2))
        form = _row_form_pair(hidden, down, hidden2, down2)
        if form is not None:
            return _quantized_pair(torch.ops.kontext.gelu_quantize_rows_stacked(hidden, hidden2, lora_columns(down),
                                                                                form == torch.int8), hidden, hidden2)
        return _gelu_input(hidden, down), _gelu_input(hidden2, down2)
    return mlp_hidden(*first), mlp_hidden(*second)


def gated_residual_pair(first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_residual` of two (residual, gate, x, layer) quadruples."""
    inputs = _layer_input_pair(first[2], first[3], second[2], second[3])
    products = _pairable((first[3], inputs[0]), (second[3], inputs[1]))
    if products is not None and all(_epilogue_gated(residual, gate, layer)
                                    for (residual, gate, _, layer) in (first, second)):
        return int8_gated_residual_pair((first[0], first[1], products[0]), (second[0], second[1], products[1]))
    return (gated_residual(first[0], first[1], inputs[0], first[3]),
            gated_residual(second[0], second[1], inputs[1], second[3]))


def parallel_attention_mlp(x: torch.Tensor | QuantizedRows, linear1: nn.Module, linear2: nn.Module, split: int,
                           attend) -> torch.Tensor | QuantizedRows | ColumnParts:
    """The single block's middle: y = linear1(x); [attend(y[..., :split]), GELU(tanh)(y[..., split:])] as
    linear2's input: 8-bit rows for an 8-bit linear2, the two parts unconcatenated where cuBLAS runs linear2,
    else their concatenation."""
    if isinstance(x, QuantizedRows):
        # One 8-bit GEMM; the attention and the quantizing concat read their parts of it as strided views.
        qkv, mlp = linear(linear1, x).split([split, linear1.out_features - split], dim=-1)
        attended = attend(qkv)
        form = _row_format(linear2, attended)
        if form is not None:
            return QuantizedRows(*torch.ops.kontext.concat_gelu_quantize_rows(attended, mlp, lora_columns(linear2),
                                                                             form == torch.int8))
        return torch.cat((attended, F.gelu(mlp, approximate="tanh")), dim=-1)
    qkv, mlp = linear_then_gelu_part(x, linear1, split)
    attended = attend(qkv)
    if _linear2_parts and _cublas_forms(attended, linear2) and not (_fused_gemms and _active(attended)):
        return ColumnParts(attended, mlp)
    return torch.cat((attended, mlp), dim=-1)


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor | QuantizedRows | ColumnParts,
                   layer: nn.Module) -> torch.Tensor:
    """residual + gate * layer(x), the gated add in the GEMM's epilogue when fused."""
    if isinstance(x, ColumnParts):
        return residual + gate * _plus_lora(linear_over_parts(x, layer), lora_factors(layer), x)
    if isinstance(x, torch.Tensor):
        if _fused_gemms and _plain_linear(layer) and _epilogue_free(layer) and _active(x):
            return _kernels.linear_gated_residual(x, layer.weight, layer.bias, gate, residual)
        x = _layer_input(layer, x)
    if _int8_product(layer, x) is not None and _epilogue_gated(residual, gate, layer):
        # The add in the int8 GEMM's epilogue: the product is not rounded to bf16 and read back for it.
        return int8_gated_residual(residual, gate, x, layer.weight, layer.weight_scale, layer.bias)
    return residual + gate * linear(layer, x)


def _quantized_pair(stacked: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                    x2: torch.Tensor) -> tuple[QuantizedRows, QuantizedRows]:
    # A stacked op's one buffer as each stream's rows: views made here, outside the op, whose outputs may not
    # alias each other.
    first, second = _kernels.row_quant.split_stacked(stacked, x, x2)
    return QuantizedRows(*first), QuantizedRows(*second)


def _layer_input_pair(x, layer: nn.Module, x2, layer2: nn.Module) -> list:
    # `_layer_input` of two (x, layer) pairs, both quantized in one launch where they can be.
    if isinstance(x, torch.Tensor) and isinstance(x2, torch.Tensor):
        form = _row_form_pair(x, layer, x2, layer2)
        if form is not None:
            return list(_quantized_pair(torch.ops.kontext.quantize_rows_stacked(x, x2, lora_columns(layer),
                                                                                form == torch.int8), x, x2))
    return [_layer_input(layer, x), _layer_input(layer2, x2)]


def _layer_input(layer: nn.Module, x):
    # A bf16 input of an 8-bit layer as its 8-bit rows; anything else as it is.
    if isinstance(x, torch.Tensor):
        form = _row_format(layer, x)
        if form is not None:
            return QuantizedRows(*torch.ops.kontext.quantize_rows(x, lora_columns(layer), form == torch.int8))
    return x


def _epilogue_gated(residual: torch.Tensor, gate: torch.Tensor, layer: nn.Module) -> bool:
    # Where the int8 GEMM's epilogue can add residual + gate * product: a [B, 1, N] gate, residual in the layer's dtype.
    return (layer.compute_dtype == residual.dtype and gate.dim() == 3 and gate.shape[1] == 1
            and residual.dim() == 3)


if _kernels is not None:
    # The QK-norm + RoPE kernel as an opaque op, so compiled blocks call it too: it writes q, k, v once,
    # in the attention layout and at each stream's offset of the joint sequence, where the compiler's
    # own fusion needed ~2.5x its time plus layout copies and the concatenation (bench/RESULTS.md).
    def _joint_qkv_norm_rope_fake(qkvs, query_scales, key_scales, cos, sin, num_heads):
        first = qkvs[0]
        return _kernels.qk_norm_rope.joint_layout(first.new_empty(
            (3, first.shape[0], sum(qkv.shape[1] for qkv in qkvs), num_heads, first.shape[-1] // (3 * num_heads))))

    ops.define("joint_qkv_norm_rope(Tensor[] qkvs, Tensor[] query_scales, Tensor[] key_scales, Tensor cos, "
               "Tensor sin, int num_heads) -> Tensor",
               lambda qkvs, query_scales, key_scales, cos, sin, num_heads: _kernels.joint_qkv_norm_rope(
                   list(zip(qkvs, query_scales, key_scales)), cos, sin, num_heads),
               _joint_qkv_norm_rope_fake)

    # The 8-bit row quantizers (kontext_kernels/row_quant.py), opaque for the same reason: the compiler's fusion of
    # their references ran at 0.75-1.7 TB/s on an H100 (a division per value, a second read of each row),
    # the kernels at 1.8-2.9 TB/s (bench/RESULTS.md).
    def _format(int8: bool) -> torch.dtype:
        return torch.int8 if int8 else torch.float8_e4m3fn

    def _quantized_fake(x: torch.Tensor, width: int, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return (x.new_empty((*x.shape[:-1], width), dtype=_format(int8)),
                x.new_empty((rows, 1), dtype=torch.float32))

    # `spare`: columns left after each row for a LoRA's (kontext_core/adapters/wide_lora.py); `int8`: int8 rows,
    # not e4m3.
    ops.define("quantize_rows(Tensor x, int spare=0, bool int8=False) -> (Tensor, Tensor)",
               lambda x, spare=0, int8=False: _kernels.row_quant.quantize_rows(x, spare=spare, dtype=_format(int8)),
               lambda x, spare=0, int8=False: _quantized_fake(x, x.shape[-1] + spare, int8))
    ops.define("gelu_quantize_rows(Tensor x, int spare=0, bool int8=False) -> (Tensor, Tensor)",
               lambda x, spare=0, int8=False: _kernels.row_quant.gelu_quantize_rows(x, spare=spare,
                                                                                     dtype=_format(int8)),
               lambda x, spare=0, int8=False: _quantized_fake(x, x.shape[-1] + spare, int8))
    ops.define("concat_gelu_quantize_rows(Tensor first, Tensor second, int spare=0, bool int8=False) "
               "-> (Tensor, Tensor)",
               lambda first, second, spare=0, int8=False: _kernels.row_quant.concat_gelu_quantize_rows(
                   first, second, spare=spare, dtype=_format(int8)),
               lambda first, second, spare=0, int8=False: _quantized_fake(
                   second, first.shape[-1] + second.shape[-1] + spare, int8))
    # Two streams' rows of one width in one launch (kontext_kernels/row_quant.py, `*_stacked`): x's rows then x2's,
    # in one [rows of both, width] buffer and one [rows of both, 1] scale.
    def _stacked_fake(x: torch.Tensor, x2: torch.Tensor, spare: int = 0,
                      int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        rows = math.prod(x.shape[:-1]) + math.prod(x2.shape[:-1])
        return (x.new_empty((rows, x.shape[-1] + spare), dtype=_format(int8)),
                x.new_empty((rows, 1), dtype=torch.float32))

    def _stacked_of(name: str):
        def run(x: torch.Tensor, x2: torch.Tensor, spare: int = 0, int8: bool = False) -> tuple[torch.Tensor, ...]:
            # Looked up per call, as the ops above: the tests rebuild the kernel modules.
            return getattr(_kernels.row_quant, name)(x, x2, spare=spare, dtype=_format(int8))
        return run

    for _name in ("quantize_rows_stacked", "gelu_quantize_rows_stacked"):
        ops.define(f"{_name}(Tensor x, Tensor x2, int spare=0, bool int8=False) -> (Tensor, Tensor)",
                   _stacked_of(_name), _stacked_fake)
    del _name
    ops.define("layernorm_modulate_quantize_stacked(Tensor x, Tensor shift, Tensor scale, Tensor x2, Tensor shift2, "
               "Tensor scale2, int spare=0, bool int8=False) -> (Tensor, Tensor)",
               lambda x, shift, scale, x2, shift2, scale2, spare=0, int8=False:
                   _kernels.row_quant.layernorm_modulate_quantize_stacked(x, shift, scale, x2, shift2, scale2,
                                                                          spare=spare, dtype=_format(int8)),
               lambda x, shift, scale, x2, shift2, scale2, spare=0, int8=False: _stacked_fake(x, x2, spare, int8))
    ops.define("layernorm_modulate_quantize(Tensor x, Tensor shift, Tensor scale, int spare=0, bool int8=False) "
               "-> (Tensor, Tensor)",
               lambda x, shift, scale, spare=0, int8=False: _kernels.row_quant.layernorm_modulate_quantize(
                   x, shift, scale, spare=spare, dtype=_format(int8)),
               lambda x, shift, scale, spare=0, int8=False: _quantized_fake(x, x.shape[-1] + spare, int8))


def qk_kernel_active(x: torch.Tensor) -> bool:
    """Whether the QK-norm + RoPE kernel makes the attention inputs from projections like `x`."""
    return _kernels is not None and _kernels.runtime.enabled_for_traced(x)


def joint_qkv_heads(streams: list[tuple[torch.Tensor, nn.Module, nn.Module]], cos: torch.Tensor, sin: torch.Tensor,
                    num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streams of (qkv [B, L_i, 3*H*D], query_norm, key_norm) -> joint q, k, v [B, H, sum L_i, D].

    Each stream's q and k are RMS-normalised with its own norms and rotated by RoPE with the joint
    tables (cos, sin over the whole joint sequence, streams in order).
    """
    if qk_kernel_active(streams[0][0]):
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
