"""Rounding to float8 e4m3 inside Triton kernels, bit-exact with PyTorch's conversion.

Kernels that quantize round their float32 values to the e4m3 grid here (round to nearest, ties to
even, as `tensor.to(torch.float8_e4m3fn)` does) and only then convert: the conversion of a value
already on the grid is exact everywhere, on the GPU and in Triton 3.6's interpreter, which mis-rounds
conversions that carry into the next power of two (7.99 -> 4, not 8). So the kernels' bytes can be
compared with their references on the CPU too.
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
def to_e4m3(values, scale):
    """values / scale, saturated to e4m3's range and rounded; as float8e4nv. IEEE division, as PyTorch's."""
    scaled = tl.minimum(tl.maximum(tl.math.div_rn(values, scale), -448.0), 448.0)
    return round_to_e4m3(scaled).to(tl.float8e4nv)
