"""Conversion to float8 e4m3 (and int8's grid) inside Triton kernels, bit-exact with PyTorch's.

Quantizing kernels scale by a reciprocal (one IEEE division per row or tensor, then a multiply per
value: an IEEE division per value cost the row quantizers 2-3x their memory time on an H100) and
convert with round to nearest, ties to even, as `tensor.to(torch.float8_e4m3fn)` does; their
PyTorch references compute the same products, so the bytes agree.

Under Triton 3.6's interpreter the conversion mis-rounds values that carry into the next power of
two (7.99 -> 4, not 8), so there (EXACT_ROUNDING) the values are first rounded to the e4m3 grid in
float32, which leaves the conversion nothing to round; on the GPU the hardware conversion does it.
"""

from __future__ import annotations

from .runtime import import_triton

triton, tl = import_triton()

E4M3_MAX = 448.0  # the jit functions below spell their constants out: Triton reads no plain globals


@triton.jit
def round_to_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), still float32."""
    # Normal range: keep 3 of float32's 23 mantissa bits; the carry of the rounding add moves into
    # the exponent by itself. The sign bit is never reached for finite |v| <= 448.
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal, a fixed spacing of 2**-9: adding 1.5 * 2**14 (whose float32
    # spacing is 2**-9) and subtracting it again rounds |v| to that spacing, ties to even.
    magnitude = tl.abs(v)
    subnormal = (magnitude + 24576.0) - 24576.0
    subnormal = tl.where(v < 0, -subnormal, subnormal)
    return tl.where(magnitude < 0.015625, subnormal, normal)


@triton.jit
def to_e4m3(values, inv_scale, EXACT_ROUNDING: tl.constexpr):
    """values * inv_scale, saturated to e4m3's range, as float8e4nv (round to nearest even)."""
    scaled = tl.minimum(tl.maximum(values * inv_scale, -448.0), 448.0)
    if EXACT_ROUNDING:
        scaled = round_to_e4m3(scaled)
    return scaled.to(tl.float8e4nv)


@triton.jit
def int8_grid(values, inv_scale):
    """values * inv_scale clamped to [-127, 127] and rounded to an integer, ties to even as torch.round: float32
    values that convert to int8 exactly."""
    scaled = tl.minimum(tl.maximum(values * inv_scale, -127.0), 127.0)
    # Adding and removing 1.5 * 2**23 (whose float32 spacing is 1) rounds |v| <= 2**22 to an integer, ties to
    # even; the clamp before it keeps the multiply from fusing into the add.
    return (scaled + 12582912.0) - 12582912.0
