"""Activations to 8-bit rows for the 8-bit GEMMs, in one pass with the operation that produces them.

An fp8 GEMM (`torch._scaled_mm`) takes its activations as e4m3 rows, each with a float32 scale
amax(row) / 448; the int8 GEMM (kontext_kernels/int8_gemm.py) as int8 rows with scales amax(row) / 127 (`dtype`
torch.int8, rounded to nearest, ties to even, as torch.round). Quantizing is a row reduction (the amax)
and a rewrite; left to the compiler it reads the row twice and divides every value (0.75-1.7 TB/s on an
H100). These kernels hold each row in registers and multiply by one reciprocal per row, so the producer's
output is read once and written once, in 8 bits (1.8-2.9 TB/s; bench/RESULTS.md, "The row quantizers
timed without the host in the way"):

- `quantize_rows(x)`: rows of x (an attention output before its projection);
- `gelu_quantize_rows(h)`: GELU(tanh) of the MLP's up-projection, before its down-projection;
- `concat_gelu_quantize_rows(a, h)`: [a, GELU(h)] per row, the single block's linear2 input, with no
  concatenated bf16 copy;
- `layernorm_modulate_quantize(x, shift, scale)`: (1 + scale) * LayerNorm(x) + shift, the input of
  every block's first GEMMs.

Each returns (data, scale): data (e4m3 or int8) of x's leading shape and the row width, scale float32
[rows, 1], data * scale ~= the float32 result. With `spare` > 0 each row of data has that many
columns more, left unwritten, after the quantized values: room for a LoRA's columns that the layer's
fp8 GEMM multiplies in the same pass (kontext_core/adapters/wide_lora.py). The `*_reference` functions compute the same
in PyTorch, in float32 throughout; the kernels scale and round as they do (kontext_kernels/e4m3.py), so only
the last float32 bits of GELU and LayerNorm can tell them apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .e4m3 import E4M3_MAX, int8_grid, to_e4m3
from .modulation import layernorm_modulate_rows, layernorm_modulate_tile, modulation_operands
from .runtime import (cdiv, enabled_for, import_triton, interpreting, last_dim_contiguous, launches, loop_count,
                      next_power_of_2, reduction_combines, row_warps, rows_per_program)

triton, tl = import_triton()

Quantized = tuple[torch.Tensor, torch.Tensor]

E4M3 = torch.float8_e4m3fn
INT8_MAX = 127.0
FORMATS = (E4M3, torch.int8)


def format_max(dtype: torch.dtype) -> float:
    """The largest magnitude of an 8-bit row format: what a row's amax is scaled to."""
    if dtype not in FORMATS:
        raise ValueError(f"8-bit rows are float8_e4m3fn or int8, not {dtype}")
    return INT8_MAX if dtype == torch.int8 else E4M3_MAX


def _quantize_reference(values: torch.Tensor, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """float32 [..., K] -> (8-bit [..., K + spare], float32 [rows, 1]): per-row amax / format_max(dtype) scales."""
    top = format_max(dtype)
    rows = values.reshape(-1, values.shape[-1])
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    # A true division (python_float / tensor would multiply by a rounded reciprocal): as the kernels.
    scaled = (rows * (amax.new_tensor(top) / amax)).clamp(-top, top)
    data = scaled.round().to(torch.int8) if dtype == torch.int8 else scaled.to(E4M3)
    if spare:
        wide = data.new_empty((data.shape[0], data.shape[1] + spare))
        wide[:, :data.shape[1]] = data
        data = wide
    return data.view(*values.shape[:-1], data.shape[-1]), amax / top


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.float(), approximate="tanh")


def quantize_rows_reference(x: torch.Tensor, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """x [..., K] -> its rows in `dtype` (e4m3 or int8) with per-row scales."""
    return _quantize_reference(x.float(), spare, dtype)


def gelu_quantize_rows_reference(x: torch.Tensor, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """x [..., K] -> GELU(tanh)(x) in `dtype` with per-row scales."""
    return _quantize_reference(_gelu(x), spare, dtype)


def concat_gelu_quantize_rows_reference(first: torch.Tensor, second: torch.Tensor, spare: int = 0,
                                        dtype: torch.dtype = E4M3) -> Quantized:
    """first [..., K1], second [..., K2] -> [first, GELU(tanh)(second)] [..., K1 + K2] in `dtype`, per-row scales."""
    return _quantize_reference(torch.cat((first.float(), _gelu(second)), dim=-1), spare, dtype)


def layernorm_modulate_quantize_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                          eps: float = 1e-6, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """x [B, L, C], shift and scale [B or 1, 1, C] -> (1 + scale) * layer_norm(x) + shift in `dtype`, per-row
    scales."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return _quantize_reference((1 + scale.float()) * normed + shift.float(), spare, dtype)


def quantize_rows(x: torch.Tensor, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """Same contract as `quantize_rows_reference`; the Triton kernel where it can run."""
    if enabled_for(x) and x.numel() > 0:
        return _concat_quantize_triton(None, x, gelu=False, spare=spare, dtype=dtype)
    return quantize_rows_reference(x, spare, dtype)


def gelu_quantize_rows(x: torch.Tensor, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """Same contract as `gelu_quantize_rows_reference`; the Triton kernel where it can run."""
    if enabled_for(x) and x.numel() > 0:
        return _concat_quantize_triton(None, x, gelu=True, spare=spare, dtype=dtype)
    return gelu_quantize_rows_reference(x, spare, dtype)


def concat_gelu_quantize_rows(first: torch.Tensor, second: torch.Tensor, spare: int = 0,
                              dtype: torch.dtype = E4M3) -> Quantized:
    """Same contract as `concat_gelu_quantize_rows_reference`; the Triton kernel where it can run."""
    if enabled_for(second) and second.numel() > 0 and first.shape[-1] > 0:
        return _concat_quantize_triton(first, second, gelu=True, spare=spare, dtype=dtype)
    return concat_gelu_quantize_rows_reference(first, second, spare, dtype)


# cuBLASLt's row-wise scaled fp8 GEMM (torch._scaled_mm) refuses a scale vector that does not start on a 16-byte
# boundary (CUBLAS_STATUS_NOT_SUPPORTED on an H100, bench/RESULTS.md, 2026-12-07 ninth session).
SCALE_ALIGNMENT_BYTES = 16


def split_stacked(stacked: Quantized, x: torch.Tensor, other: torch.Tensor) -> tuple[Quantized, Quantized]:
    """A `*_stacked` result back as (x's rows, other's rows): views of its one buffer, shaped as each input; other's
    scales copied out (4 bytes a row) where x's row count, not a multiple of 4, leaves them off a 16-byte boundary:
    never with the pipeline's 512 text tokens an image, which come first."""
    data, scale = stacked
    rows = math.prod(x.shape[:-1])
    other_scale = scale[rows:]
    # From the offset, not data_ptr(), which torch.compile cannot trace: the op allocated the scale itself, aligned.
    if rows * scale.stride(0) * scale.element_size() % SCALE_ALIGNMENT_BYTES:
        other_scale = other_scale.clone()
    return ((data[:rows].view(*x.shape[:-1], data.shape[-1]), scale[:rows]),
            (data[rows:].view(*other.shape[:-1], data.shape[-1]), other_scale))


def can_stack(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether one launch can take x's and other's rows: one device, dtype and width (what callers check before
    a `*_stacked` call, where a mismatch would cost copies)."""
    return other.device == x.device and other.dtype == x.dtype and other.shape[-1] == x.shape[-1]


def _stackable(x: torch.Tensor, other: torch.Tensor) -> bool:
    return enabled_for(x) and x.numel() > 0 and other.numel() > 0 and can_stack(x, other)


def _stack(first: Quantized, second: Quantized) -> Quantized:
    # Where no kernel runs both: each stream quantized alone, then copied into one buffer.
    (data, scale), (data2, scale2) = first, second
    if data.shape[-1] != data2.shape[-1]:
        raise ValueError(f"stacked row quantizers take rows of one width, not {data.shape[-1]} and "
                         f"{data2.shape[-1]}: quantize each stream alone")
    return (torch.cat((data.reshape(-1, data.shape[-1]), data2.reshape(-1, data2.shape[-1]))),
            torch.cat((scale, scale2)))


# The `*_stacked` functions quantize two streams' rows of one width, x's then other's, into one [rows of both,
# width] buffer and one [rows of both, 1] scale: one launch where the kernel runs (the double block's text rows
# alone leave most of the GPU idle). Two tensors, not four views of them, so that a custom op can return them:
# an op's outputs may not alias each other (`split_stacked` makes the views outside it).
def quantize_rows_stacked(x: torch.Tensor, other: torch.Tensor, spare: int = 0,
                          dtype: torch.dtype = E4M3) -> Quantized:
    """`quantize_rows` of x and of other, stacked."""
    if _stackable(x, other):
        return _concat_quantize_triton(None, x, gelu=False, spare=spare, dtype=dtype, other=other)
    return _stack(quantize_rows(x, spare, dtype), quantize_rows(other, spare, dtype))


def gelu_quantize_rows_stacked(x: torch.Tensor, other: torch.Tensor, spare: int = 0,
                               dtype: torch.dtype = E4M3) -> Quantized:
    """`gelu_quantize_rows` of x and of other, stacked."""
    if _stackable(x, other):
        return _concat_quantize_triton(None, x, gelu=True, spare=spare, dtype=dtype, other=other)
    return _stack(gelu_quantize_rows(x, spare, dtype), gelu_quantize_rows(other, spare, dtype))


def layernorm_modulate_quantize_stacked(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                        other: torch.Tensor, other_shift: torch.Tensor, other_scale: torch.Tensor,
                                        eps: float = 1e-6, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """`layernorm_modulate_quantize(x, shift, scale)` and the same of other with its own shift and scale, stacked."""
    if _stackable(x, other) and x.dim() == 3 and other.dim() == 3:
        return _layernorm_modulate_quantize_triton(x, shift, scale, eps, spare, dtype,
                                                   other=(other, other_shift, other_scale))
    return _stack(layernorm_modulate_quantize(x, shift, scale, eps, spare, dtype),
                  layernorm_modulate_quantize(other, other_shift, other_scale, eps, spare, dtype))


def layernorm_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float = 1e-6, spare: int = 0, dtype: torch.dtype = E4M3) -> Quantized:
    """Same contract as `layernorm_modulate_quantize_reference`; the Triton kernel where it can run."""
    if enabled_for(x) and x.dim() == 3 and x.numel() > 0:
        return _layernorm_modulate_quantize_triton(x, shift, scale, eps, spare, dtype)
    return layernorm_modulate_quantize_reference(x, shift, scale, eps, spare, dtype)


# tl.reduce with Triton's own combines (runtime.reduction_combines says why).
_max, _ = reduction_combines()


# GELU modes of the row kernels: none; through exp2 and a division (two MUFU operations a value, the references'
# values to their last float32 bits); or through the GPU's tanh.approx (one MUFU operation: the GELU row kernels
# ~10% faster on an H200, bench/RESULTS.md). tanh.approx is off by at most ~2**-11 relative, which moves a GELU
# by under 2.5e-4 of its input: a 30th of an int8 step at the row's largest value, so a value now and then lands
# on the neighbouring 8-bit number and the scales move by under TANH_APPROX_SCALE_RTOL.
GELU_NONE, GELU_EXP, GELU_TANH_APPROX = 0, 1, 2
TANH_APPROX_SCALE_RTOL = 1e-3
# The GPU kernels' GELU form (the interpreter has no inline assembly and always takes GELU_EXP).
GELU_ON_GPU = GELU_TANH_APPROX


def gelu_mode() -> int:
    """The GELU form the row kernels launched now use."""
    return GELU_EXP if interpreting() else GELU_ON_GPU


@triton.jit
def _gelu_tanh(x, MODE: tl.constexpr):
    # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if MODE == 2:  # GELU_TANH_APPROX: kernels read module globals only as constexprs, which need Triton
        tanh = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [inner], dtype=tl.float32,
                                         is_pure=True, pack=1)
        half = 0.5 * x
        return half + half * tanh
    return x / (1.0 + tl.exp(-2.0 * inner))


@triton.jit
def _row_scales(amax, INT8: tl.constexpr):
    """(amax / top, top / amax) as [ROWS, 1] columns, top = 127 (int8) or 448 (e4m3); IEEE divisions as
    PyTorch's."""
    amax = tl.maximum(amax, 1e-12)
    if INT8:
        return tl.math.div_rn(amax, 127.0)[:, None], tl.math.div_rn(127.0, amax)[:, None]
    return tl.math.div_rn(amax, 448.0)[:, None], tl.math.div_rn(448.0, amax)[:, None]


@triton.jit
def _store_8bit(ptr, values, inv_scale, mask, INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """Store values * inv_scale in the row format: int8 rounded to nearest, ties to even, or e4m3
    (kontext_kernels/e4m3.py). (A store, not a returned value: Triton wants one return type from both branches.)"""
    if INT8:
        tl.store(ptr, int8_grid(values, inv_scale).to(tl.int8), mask=mask)
    else:
        tl.store(ptr, to_e4m3(values, inv_scale, EXACT_ROUNDING), mask=mask)


@triton.jit
def _row_tile(ptr, rows, n_rows, stride, width, BLOCK: tl.constexpr):
    """A [ROWS, BLOCK] float32 tile of a [M, width] matrix (row stride `stride`), its column offsets and mask."""
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < width)[None, :]
    tile = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return tile, cols, mask


# The largest |GELU(tanh)(x)| of any x < 0 is 0.17004 (at x = -0.7525), with margin: a row whose GELU of its
# largest input is above this has that value as its amax, since GELU rises on x > 0.
_NEGATIVE_GELU_BOUND = 0.171


@triton.jit
def _chunked_amax(ptr, rows, n_rows, stride, width, chunks, CHUNK: tl.constexpr, ROWS: tl.constexpr,
                  GELU: tl.constexpr, SIGNED: tl.constexpr):
    """Per row of a [M, width] matrix read in CHUNK-wide chunks: the largest |x| (|GELU(x)| with GELU), or with
    SIGNED the largest x itself."""
    top = tl.full([ROWS], 0.0, tl.float32)
    for start in range(0, chunks * CHUNK, CHUNK):
        tile, _, _ = _row_tile(ptr + start, rows, n_rows, stride, width - start, CHUNK)
        if GELU:
            tile = _gelu_tanh(tile, GELU)
        if not SIGNED:
            tile = tl.abs(tile)
        top = tl.maximum(top, tl.reduce(tile, 1, _max))
    return top


@triton.jit
def _store_chunks(ptr, out_rows, rows, n_rows, stride, width, chunks, inv_scale, CHUNK: tl.constexpr,
                  GELU: tl.constexpr, INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """A [M, width] matrix (GELU of it), read in chunks, stored 8-bit from `out_rows` on at `inv_scale` per row."""
    cols = tl.arange(0, CHUNK)
    for start in range(0, chunks * CHUNK, CHUNK):
        tile, _, mask = _row_tile(ptr + start, rows, n_rows, stride, width - start, CHUNK)
        if GELU:
            tile = _gelu_tanh(tile, GELU)
        _store_8bit(out_rows + start + cols[None, :], tile, inv_scale, mask, INT8, EXACT_ROUNDING)


@triton.jit
def _concat_quantize_kernel(
    first_ptr, second_ptr, out_ptr, scale_ptr,
    n_rows, first_width, second_width, first_chunks, second_chunks, stride_first, stride_second, stride_out,
    other_ptr, other_from, stride_other,
    HAS_FIRST: tl.constexpr, GELU_SECOND: tl.constexpr, CHUNK: tl.constexpr,
    ROWS: tl.constexpr, INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr, NEGATIVE_GELU_BOUND: tl.constexpr,
    STACKED: tl.constexpr,
):
    # Two passes over chunks of ROWS rows: the amax, then the rewrite, which reads the rows again from the
    # cache. Holding a whole 15k-wide row in registers instead left two programs per SM, each waiting on its
    # loads before it could compute (2x the memory floor at FLUX's widths, bench/RESULTS.md).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if STACKED:
        # Rows from `other_from` on come from another tensor (the double block's other stream): each row's own
        # base pointer, the row stride then 0.
        second_ptr = tl.where(rows < other_from, second_ptr + rows * stride_second,
                              other_ptr + (rows - other_from) * stride_other)[:, None]
        stride_second = 0
    amax = tl.full([ROWS], 0.0, tl.float32)
    if HAS_FIRST:
        amax = _chunked_amax(first_ptr, rows, n_rows, stride_first, first_width, first_chunks, CHUNK, ROWS, False,
                             False)
    if GELU_SECOND:
        # GELU rises on x > 0 and stays under the bound below 0: the amax is GELU(the largest input), found without
        # a GELU per value, unless that is under the bound; then a pass takes every GELU's magnitude.
        second_amax = _gelu_tanh(_chunked_amax(second_ptr, rows, n_rows, stride_second, second_width, second_chunks,
                                               CHUNK, ROWS, False, True), GELU_SECOND)
        if tl.reduce(tl.where((rows < n_rows) & (second_amax < NEGATIVE_GELU_BOUND), 1.0, 0.0), 0, _max) > 0.0:
            second_amax = _chunked_amax(second_ptr, rows, n_rows, stride_second, second_width, second_chunks, CHUNK,
                                        ROWS, GELU_SECOND, False)
    else:
        second_amax = _chunked_amax(second_ptr, rows, n_rows, stride_second, second_width, second_chunks, CHUNK,
                                    ROWS, False, False)
    scale, inv_scale = _row_scales(tl.maximum(amax, second_amax), INT8)
    out_rows = out_ptr + rows[:, None] * stride_out
    if HAS_FIRST:
        _store_chunks(first_ptr, out_rows, rows, n_rows, stride_first, first_width, first_chunks, inv_scale, CHUNK,
                      False, INT8, EXACT_ROUNDING)
    _store_chunks(second_ptr, out_rows + first_width, rows, n_rows, stride_second, second_width, second_chunks,
                  inv_scale, CHUNK, GELU_SECOND, INT8, EXACT_ROUNDING)
    tl.store(scale_ptr + rows[:, None], scale, mask=(rows < n_rows)[:, None])


# Values per chunk of the two-pass row kernel: a power of two, as tl.arange needs (timed on an H200,
# bench/linear/row_quant_probe.py and bench/RESULTS.md).
ROW_CHUNK = 4096


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with unit column stride (a view where the strides allow)."""
    return last_dim_contiguous(x.reshape(-1, x.shape[-1]))


def _concat_quantize_triton(first: torch.Tensor | None, second: torch.Tensor, gelu: bool, spare: int,
                            dtype: torch.dtype, other: torch.Tensor | None = None) -> Quantized:
    # With `other` (no `first`), other's rows are quantized after second's in the same launch, into one [rows of
    # both, width] buffer; the caller splits it.
    format_max(dtype)  # refuses other dtypes
    second_rows = _as_rows(second)
    first_rows = _as_rows(first) if first is not None else second_rows
    other_rows = _as_rows(other) if other is not None else second_rows
    first_width = first.shape[-1] if first is not None else 0
    if first is not None and first_rows.shape[0] != second_rows.shape[0]:
        raise ValueError(f"concat_gelu_quantize_rows: {first_rows.shape[0]} rows in first, "
                         f"{second_rows.shape[0]} in second")
    stacked_rows, second_width = second_rows.shape
    n_rows = stacked_rows + (other_rows.shape[0] if other is not None else 0)
    width = first_width + second_width + spare
    data = torch.empty((n_rows, width), dtype=dtype, device=second.device)
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=second.device)
    chunk = min(ROW_CHUNK, next_power_of_2(max(first_width, second_width)))
    rows = rows_per_program(chunk)
    _concat_quantize_kernel[(cdiv(n_rows, rows),)](
        first_rows, second_rows, data, scale,
        n_rows, first_width, second_width, loop_count(cdiv(first_width, chunk)), loop_count(cdiv(second_width, chunk)),
        first_rows.stride(0), second_rows.stride(0), width, other_rows, stacked_rows, other_rows.stride(0),
        HAS_FIRST=first is not None, GELU_SECOND=gelu_mode() if gelu else GELU_NONE, CHUNK=chunk, ROWS=rows,
        INT8=dtype == torch.int8, EXACT_ROUNDING=interpreting(), NEGATIVE_GELU_BOUND=_NEGATIVE_GELU_BOUND,
        STACKED=other is not None, num_warps=row_warps(rows * chunk),
    )
    launches["concat_gelu_quantize_rows" if first is not None else
             "gelu_quantize_rows" if gelu else "quantize_rows"] += 1
    if other is not None:
        launches["row_quantizer_pair"] += 1
    return data.view(*second.shape[:-1], width) if other is None else data, scale


@triton.jit
def _layernorm_modulate_quantize_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, row_scale_ptr,
    n_rows, length, channels, eps,
    stride_xb, stride_xl, stride_shift_b, stride_scale_b, stride_out,
    other_x_ptr, other_shift_ptr, other_scale_ptr, other_from, other_length,
    stride_other_xb, stride_other_xl, stride_other_shift_b, stride_other_scale_b,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr, INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
    STACKED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if STACKED:
        # Rows from `other_from` on are another stream's, with its own x, shift and scale: each row's base pointers
        # chosen, the offsets then 0.
        first_stream = rows < other_from
        batch, token = rows // length, rows % length
        other = tl.maximum(rows - other_from, 0)
        other_batch, other_token = other // other_length, other % other_length
        x_base = tl.where(first_stream, x_ptr + batch * stride_xb + token * stride_xl,
                          other_x_ptr + other_batch * stride_other_xb + other_token * stride_other_xl)
        shift_base = tl.where(first_stream, shift_ptr + batch * stride_shift_b,
                              other_shift_ptr + other_batch * stride_other_shift_b)
        scale_base = tl.where(first_stream, scale_ptr + batch * stride_scale_b,
                              other_scale_ptr + other_batch * stride_other_scale_b)
        zero = rows * 0
        out, cols, mask = layernorm_modulate_tile(x_base[:, None], zero, shift_base[:, None], zero,
                                                  scale_base[:, None], zero, rows < n_rows, channels, eps, BLOCK_C)
    else:
        out, cols, mask = layernorm_modulate_rows(x_ptr, shift_ptr, scale_ptr, rows, n_rows, length, channels, eps,
                                                  stride_xb, stride_xl, stride_shift_b, stride_scale_b, BLOCK_C)
    row_scale, inv_scale = _row_scales(tl.reduce(tl.abs(out), 1, _max), INT8)
    _store_8bit(out_ptr + rows[:, None] * stride_out + cols[None, :], out, inv_scale, mask, INT8, EXACT_ROUNDING)
    tl.store(row_scale_ptr + rows[:, None], row_scale, mask=(rows < n_rows)[:, None])


def _layernorm_modulate_quantize_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                        eps: float, spare: int, dtype: torch.dtype,
                                        other: tuple | None = None) -> Quantized:
    # With `other` (x2, shift2, scale2 of the same width), its rows are quantized after x's in the same launch,
    # into one [rows of both, width] buffer; the caller splits it.
    format_max(dtype)  # refuses other dtypes
    batch, length, channels = x.shape
    x, shift, scale = modulation_operands(x, shift, scale)
    x2, shift2, scale2 = modulation_operands(*other) if other is not None else (x, shift, scale)
    first_rows = batch * length
    n_rows = first_rows + (x2.shape[0] * x2.shape[1] if other is not None else 0)
    data = torch.empty((n_rows, channels + spare), dtype=dtype, device=x.device)
    row_scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device)
    block = next_power_of_2(channels)
    rows = rows_per_program(block)
    _layernorm_modulate_quantize_kernel[(cdiv(n_rows, rows),)](
        x, shift, scale, data, row_scale,
        n_rows, length, channels, eps,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), channels + spare,
        x2, shift2, scale2, first_rows, x2.shape[1], x2.stride(0), x2.stride(1), shift2.stride(0), scale2.stride(0),
        BLOCK_C=block, ROWS=rows, INT8=dtype == torch.int8, EXACT_ROUNDING=interpreting(), STACKED=other is not None,
        num_warps=row_warps(rows * block),
    )
    launches["layernorm_modulate_quantize"] += 1
    if other is not None:
        launches["row_quantizer_pair"] += 1
        return data, row_scale
    return data.view(batch, length, channels + spare), row_scale
