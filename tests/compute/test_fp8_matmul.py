"""QuantizedLinear on fp8 tensor cores (torch._scaled_mm) against its own dequantized weights (needs Ada/Hopper).

The reference is F.linear in float64 with the dequantized weight, so the only error measured is the
per-token e4m3 quantization of the activations (and the accumulation): for one Gaussian layer that is
about 3% relative L2 (bench/linear/fp8_noise_floor.py), hence the bound of 6%.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fp8_tensor_cores, fresh_generator, random_linear, rel_l2
from kontext_core.compute import quant

needs_fp8_tensor_cores = pytest.mark.skipif(not fp8_tensor_cores(),
                                            reason="needs a GPU with fp8 tensor cores (Ada or Hopper)")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["e4m3", "int8"])
def test_plain_row_quantization_is_the_kernels_reference(dtype):
    # kontext_core.compute.quant.quantize_rows (the unfused path, no kontext_kernels/ needed) and the row kernels'
    # reference must quantize alike: the fused and plain 8-bit paths are compared on that assumption.
    from kontext_kernels.row_quant import quantize_rows_reference

    x = (torch.randn(3, 17, 96, generator=fresh_generator()) * 5).bfloat16()
    x[1, 4] = 0  # an all-zero row
    ours, reference = quant.quantize_rows(x, dtype), quantize_rows_reference(x, dtype=dtype)
    assert ours.data.dtype == dtype
    assert torch.equal(ours.data.float(), reference[0].float()) and torch.equal(ours.scale, reference[1])


@pytest.fixture(autouse=True)
def restore_accumulation():
    yield
    quant.set_fp8_fast_accumulation(True)


@needs_fp8_tensor_cores
@pytest.mark.parametrize("fast", [True, False], ids=["fast-accum", "exact-accum"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "per-tensor"])
@pytest.mark.parametrize("shape", [(2, 13, 96, 48), (1, 4096, 3072, 3072)], ids=["awkward", "flux"])
def test_scaled_mm_matches_the_dequantized_layer(fast, per_row, shape):
    batch, tokens, in_features, out_features = shape
    generator = fresh_generator()
    linear = random_linear(in_features, out_features, torch.bfloat16, "cuda", generator, bias_scale=0.1)
    model = quant.quantize_model(nn.Sequential(linear), prefixes=("0",), per_row=per_row)
    layer = model[0]
    assert isinstance(layer, quant.QuantizedLinear) and quant.fp8_matmul_ok(torch.empty(1, device="cuda",
                                                                                  dtype=torch.bfloat16), layer.weight)
    x = torch.randn(batch, tokens, in_features, generator=generator).to("cuda", torch.bfloat16)
    quant.set_fp8_fast_accumulation(fast)
    with torch.no_grad():
        ours = layer(x)
        reference = F.linear(x.double(), layer.dequantized_weight(torch.float64), layer.bias.double())
    assert ours.shape == (batch, tokens, out_features) and ours.dtype == torch.bfloat16
    assert rel_l2(ours, reference) < 0.06
