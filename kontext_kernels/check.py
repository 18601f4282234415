"""Every kernel of this package against its PyTorch reference at a model's sizes: the benchmark's check step.

`run(device, sizes)` feeds each kernel fresh random bf16 inputs shaped as FLUX.1 [dev]'s blocks feed it
(`FULL`: 8704 joint tokens of which 512 text, hidden 3072, 24 heads of 128, MLP 12288), checks that the kernel
itself ran (its launch counter moved: a silent fallback would compare the reference with itself), and
measures its output against the reference's:

- float outputs: max|ours - reference| / max|reference|, at most 2e-2 (the kernels round once at the end,
  the references after every step);
- e4m3 outputs (the fp8 path): the fraction of values that differ from the reference's, at most 1e-2, with
  none more than one e4m3 step away and the scales equal to 1e-5 (both quantize float32 values computed in
  another order, so a rare value lands on the neighbouring e4m3 number; GELU rows made through the GPU's
  tanh.approx, to row_quant.TANH_APPROX_SCALE_RTOL); int8 outputs (the int8 path) alike, one int8 step at most.

The 8-bit attention (kontext_kernels/sage_attention.py) is checked in two parts: its quantization pass by the 8-bit
measures (q, k int8, v e4m3 or fp16, scales), and its attention kernel on those very operands against the
reference's arithmetic at the kernel's key-block width, by the float measure.

bench/bench_step.py runs it before timing anything; tests run it at `SMALL` sizes under Triton's
interpreter and at `FULL` size on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# Modules, not their functions: tests rebuild the kernel modules in place for the interpreter or the GPU.
from . import ffn, fp8_qkv, int8_gemm, modulation, qk_norm_rope, row_quant, runtime, sage_attention

FLOAT_TOLERANCE = 2e-2
EIGHT_BIT_MISMATCH_TOLERANCE = 1e-2
SCALE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Sizes:
    tokens: int  # the joint sequence: text + image (+ context) tokens
    text: int
    hidden: int
    heads: int
    mlp: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


FULL = Sizes(tokens=8704, text=512, hidden=3072, heads=24, mlp=12288)
# Interpreter-sized, and awkward: no power of two, head dim 48 in a 64-wide tile.
SMALL = Sizes(tokens=45, text=7, hidden=96, heads=2, mlp=200)


@dataclass(frozen=True)
class CheckResult:
    name: str
    error: float
    tolerance: float
    launched: bool

    @property
    def passed(self) -> bool:
        return self.launched and self.error <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else ("FAILED" if self.launched else "FAILED (the kernel did not run)")
        return f"{self.name:28s} error {self.error:.2e} (tolerance {self.tolerance:.0e})  {verdict}"


def float_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max|ours - reference| / max|reference| in float64; inf where either has a NaN or an infinity."""
    ours, reference = ours.double(), reference.double()
    if not (bool(torch.isfinite(ours).all()) and bool(torch.isfinite(reference).all())):
        return math.inf
    return ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def e4m3_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of e4m3 values differing from the reference's; inf when any is more than one step away."""
    ours, reference = ours.float(), reference.float()
    step = torch.maximum(ours.abs(), reference.abs()).clamp(min=2.0**-6) * 2.0**-3
    if not bool(((ours - reference).abs() <= step).all()):
        return math.inf
    return (ours != reference).float().mean().item()


def int8_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of int8 values differing from the reference's; inf when any is more than one step away."""
    difference = (ours.int() - reference.int()).abs()
    if int(difference.max()) > 1:
        return math.inf
    return (difference > 0).float().mean().item()


def _scales_error(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = SCALE_TOLERANCE) -> float:
    """0 when the scales agree to `tolerance` (relative), else inf: a wrong scale fails the check."""
    close = torch.allclose(ours.float(), reference.float(), rtol=tolerance, atol=0)
    return 0.0 if close else math.inf


class _Inputs:
    def __init__(self, sizes: Sizes, device: str):
        self.sizes, self.device = sizes, device

    def randn(self, *shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, device=self.device) * scale + offset).to(torch.bfloat16)

    def modulation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """shift, scale as the model has them: strided chunks of one [1, 1, 3C] projection."""
        shift, scale, _gate = self.randn(1, 1, 3 * self.sizes.hidden).chunk(3, dim=-1)
        return shift, scale

    def mlp_part(self) -> torch.Tensor:
        """The single block's linear1 output read from its MLP columns (a strided view)."""
        s = self.sizes
        return self.randn(1, s.tokens, 3 * s.hidden + s.mlp)[..., 3 * s.hidden:]

    def streams(self) -> tuple[list, torch.Tensor, torch.Tensor]:
        """The double block's two streams (text, image: a column slice of a wider projection, as the single
        block's is), each with its own norm weights, and RoPE tables over the joint sequence."""
        s = self.sizes
        width = 3 * s.hidden
        text = self.randn(1, s.text, width, scale=1.5)
        image = self.randn(1, s.tokens - s.text, width + s.mlp, scale=1.5)[..., :width]
        norms = [self.randn(s.head_dim, scale=0.2, offset=1.0) for _ in range(4)]
        angle = torch.randn(1, 1, s.tokens, s.head_dim // 2, device=self.device) * 3.0
        return [(text, norms[0], norms[1]), (image, norms[2], norms[3])], torch.cos(angle), torch.sin(angle)


def _layernorm_modulate(inputs: _Inputs) -> tuple[float, float]:
    x = inputs.randn(1, inputs.sizes.tokens, inputs.sizes.hidden)
    shift, scale = inputs.modulation()
    out = modulation.layernorm_modulate(x, shift, scale)
    return float_error(out, modulation.layernorm_modulate_reference(x, shift, scale)), FLOAT_TOLERANCE


def _joint_qkv_norm_rope(inputs: _Inputs) -> tuple[float, float]:
    streams, cos, sin = inputs.streams()
    heads = inputs.sizes.heads
    joint = qk_norm_rope.joint_qkv_norm_rope(streams, cos, sin, heads)
    reference = qk_norm_rope.joint_qkv_norm_rope_reference(streams, cos, sin, heads)
    return max(float_error(ours, theirs) for ours, theirs in zip(joint, reference)), FLOAT_TOLERANCE


def _linear_gelu(inputs: _Inputs) -> tuple[float, float]:
    s = inputs.sizes
    x = inputs.randn(1, s.tokens, s.hidden)
    weight, bias = inputs.randn(s.mlp, s.hidden, scale=s.hidden**-0.5), inputs.randn(s.mlp, scale=0.05)
    out = ffn.linear_gelu(x, weight, bias)
    return float_error(out, ffn.linear_gelu_reference(x, weight, bias)), FLOAT_TOLERANCE


def _linear_gated_residual(inputs: _Inputs) -> tuple[float, float]:
    s = inputs.sizes
    x = inputs.randn(1, s.tokens, s.mlp)
    weight, bias = inputs.randn(s.hidden, s.mlp, scale=s.mlp**-0.5), inputs.randn(s.hidden, scale=0.05)
    gate, residual = inputs.randn(1, 1, s.hidden), inputs.randn(1, s.tokens, s.hidden)
    out = ffn.linear_gated_residual(x, weight, bias, gate, residual)
    reference = ffn.linear_gated_residual_reference(x, weight, bias, gate, residual)
    return float_error(out, reference), FLOAT_TOLERANCE


def _row_quantizer(variant: str, dtype: torch.dtype = torch.float8_e4m3fn) -> Callable[[_Inputs], tuple[float, float]]:
    def check(inputs: _Inputs) -> tuple[float, float]:
        x = inputs.randn(1, inputs.sizes.tokens, inputs.sizes.hidden)
        args = {"quantize_rows": lambda: (x,), "gelu_quantize_rows": lambda: (inputs.mlp_part(),),
                "concat_gelu_quantize_rows": lambda: (x, inputs.mlp_part()),
                "layernorm_modulate_quantize": lambda: (x, *inputs.modulation())}[variant]()
        data, scales = getattr(row_quant, variant)(*args, dtype=dtype)
        reference_data, reference_scales = getattr(row_quant, variant + "_reference")(*args, dtype=dtype)
        values_error = (int8_error if dtype == torch.int8 else e4m3_error)(data, reference_data)
        # GELU through the GPU's tanh.approx moves a row's scale by up to row_quant.TANH_APPROX_SCALE_RTOL.
        approximate = "gelu" in variant and row_quant.gelu_mode() == row_quant.GELU_TANH_APPROX
        tolerance = row_quant.TANH_APPROX_SCALE_RTOL if approximate else SCALE_TOLERANCE
        return max(_scales_error(scales, reference_scales, tolerance), values_error), EIGHT_BIT_MISMATCH_TOLERANCE
    return check


def _int8_linear(inputs: _Inputs) -> tuple[float, float]:
    # The MLP's up-projection of the joint sequence, in int8 rows and weights as the int8 path feeds it.
    s = inputs.sizes
    data = torch.randint(-127, 128, (s.tokens, s.hidden), dtype=torch.int8, device=inputs.device)
    weight = torch.randint(-127, 128, (s.mlp, s.hidden), dtype=torch.int8, device=inputs.device)
    scale = torch.rand(s.tokens, 1, device=inputs.device) * 1e-3 + 1e-5
    weight_scale = torch.rand(s.mlp, device=inputs.device) * 1e-3 + 1e-5
    bias = inputs.randn(s.mlp)
    out = int8_gemm.int8_linear(data, scale, weight, weight_scale, bias, torch.bfloat16)
    reference = int8_gemm.int8_linear_reference(data, scale, weight, weight_scale, bias, torch.float32)
    return float_error(out, reference), FLOAT_TOLERANCE


def _joint_qkv_norm_rope_fp8(inputs: _Inputs) -> tuple[float, float]:
    streams, cos, sin = inputs.streams()
    heads = inputs.sizes.heads
    *ours, work = fp8_qkv.joint_qkv_norm_rope_fp8(streams, cos, sin, heads)
    *reference, reference_work = fp8_qkv.joint_qkv_norm_rope_fp8_reference(streams, cos, sin, heads)
    slots = [fp8_qkv.DESCALE_Q, fp8_qkv.DESCALE_K, fp8_qkv.AMAX_V, fp8_qkv.DESCALE_V]
    errors = [_scales_error(work[slots], reference_work[slots])]
    errors += [e4m3_error(x8, r8) for x8, r8 in zip(ours, reference)]
    return max(errors), EIGHT_BIT_MISMATCH_TOLERANCE


def _quantize_qkv(inputs: _Inputs) -> tuple[float, float]:
    s = inputs.sizes
    # q, k, v as attention gets them from the QK-norm + RoPE kernel: [B, H, L, D] views of [B, L, H, D] memory.
    q, k, v = (inputs.randn(1, s.tokens, s.heads, s.head_dim, scale=2.0).transpose(1, 2) for _ in range(3))
    *ours, work = fp8_qkv.quantize_qkv(q, k, v)
    *reference, reference_work = fp8_qkv.quantize_qkv_reference(q, k, v)
    written = list(range(0, fp8_qkv.AMAX_S_OUT, 4))  # the slots cuDNN reads
    errors = [_scales_error(work[written], reference_work[written])]
    errors += [e4m3_error(x8, r8) for x8, r8 in zip(ours, reference)]
    return max(errors), EIGHT_BIT_MISMATCH_TOLERANCE


def _dequantize_output(inputs: _Inputs) -> tuple[float, float]:
    s = inputs.sizes
    # Clamped into e4m3's range first: the cast makes NaN of anything beyond +-448 (at full size a few
    # hundred of these 27M samples would be).
    values = (torch.randn(1, s.tokens, s.heads, s.head_dim, device=inputs.device) * 100).clamp(-448, 448)
    o8 = values.to(torch.float8_e4m3fn)
    o8 = o8.transpose(1, 2)  # the graph's O: [B, H, L, D] over [B, L, H, D] storage
    work = torch.zeros(fp8_qkv.WORK_FLOATS, device=inputs.device)
    work[fp8_qkv.DESCALE_O] = 0.37
    out = fp8_qkv.dequantize_output(o8, work, torch.bfloat16)
    return float_error(out, fp8_qkv.dequantize_output_reference(o8, work, torch.bfloat16)), FLOAT_TOLERANCE


def _attention_inputs(inputs: _Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (unit-RMS rows, as after QK-norm) and v as the blocks give attention: [B, H, L, D] views of
    [B, L, H, D] memory."""
    s = inputs.sizes
    q, k, v = (torch.randn(1, s.tokens, s.heads, s.head_dim, device=inputs.device).transpose(1, 2) for _ in range(3))
    q, k = (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True)) for x in (q, k))
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def _sage_quantize(inputs: _Inputs) -> tuple[float, float]:
    q, k, v = _attention_inputs(inputs)
    fp8_pv = sage_attention.fp8_tensor_cores(torch.device(inputs.device))
    ours = sage_attention.quantize_operands(q, k, v, fp8_pv=fp8_pv)
    reference = sage_attention.quantize_operands_reference(q, k, v, fp8_pv=fp8_pv, permute_keys=ours.keys_permuted)
    errors = [_scales_error(getattr(ours, name), getattr(reference, name))
              for name in ("q_scale", "k_scale", "v_scale")]
    errors += [int8_error(ours.q8, reference.q8), int8_error(ours.k8, reference.k8)]
    if fp8_pv:
        errors.append(e4m3_error(ours.v8t, reference.v8t))
    else:
        errors.append(0.0 if torch.equal(ours.v8t, reference.v8t) else math.inf)
    return max(errors), EIGHT_BIT_MISMATCH_TOLERANCE


def _sage_attention(inputs: _Inputs) -> tuple[float, float]:
    q, k, v = _attention_inputs(inputs)
    operands = sage_attention.quantize_operands(q, k, v, fp8_pv=sage_attention.fp8_tensor_cores(q.device))
    out = sage_attention.attend(operands, torch.float32)
    chosen = sage_attention.last_config
    reference = sage_attention.attend_reference(operands, torch.float32, chosen.get("BLOCK_N", 128),
                                                rounded_row_sums=chosen.get("rounded_row_sums", False))
    return float_error(out, reference), FLOAT_TOLERANCE


# name -> (launch counter, check)
CASES: dict[str, tuple[str, Callable[[_Inputs], tuple[float, float]]]] = {
    "layernorm_modulate": ("layernorm_modulate", _layernorm_modulate),
    "joint_qkv_norm_rope": ("qkv_norm_rope", _joint_qkv_norm_rope),
    "linear_gelu": ("linear_gelu", _linear_gelu),
    "linear_gated_residual": ("linear_gated_residual", _linear_gated_residual),
    **{variant: (variant, _row_quantizer(variant)) for variant in
       ("quantize_rows", "gelu_quantize_rows", "concat_gelu_quantize_rows", "layernorm_modulate_quantize")},
    **{f"{variant} (int8)": (variant, _row_quantizer(variant, torch.int8)) for variant in
       ("quantize_rows", "gelu_quantize_rows", "concat_gelu_quantize_rows", "layernorm_modulate_quantize")},
    "int8_linear": ("int8_linear", _int8_linear),
    "joint_qkv_norm_rope_fp8": ("joint_qkv_norm_rope_fp8", _joint_qkv_norm_rope_fp8),
    "quantize_qkv": ("quantize_qkv", _quantize_qkv),
    "dequantize_output": ("dequantize_output", _dequantize_output),
    "sage_quantize": ("sage_quantize", _sage_quantize),
    "sage_attention": ("sage_attention", _sage_attention),
}


def run(device: str = "cuda", sizes: Sizes = FULL, only: list[str] | None = None) -> list[CheckResult]:
    """Check the kernels named in `only` (default: all of CASES) on `device` at `sizes`."""
    results = []
    with torch.no_grad():
        for name in only or list(CASES):
            counter, check = CASES[name]
            before = runtime.launches[counter]
            error, tolerance = check(_Inputs(sizes, device))
            results.append(CheckResult(name, error, tolerance, runtime.launches[counter] > before))
    return results
