"""cuBLASLt's GELU epilogue (kontext_core.fused) against the plain PyTorch forms it replaces.

`linear_gelu` / `linear_then_gelu_part` take the epilogue on CUDA only; on the CPU they must stay the
plain forms (there torch._addmm_activation computes the erf GELU, not FLUX's tanh one).
Tolerance: rel_error (max|ours - reference| / max|reference|) <= 2e-2 in bf16 against float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_, rel_error, tiny_edit_args
from kontext_core import KontextTransformer, TransformerConfig, fused

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuBLASLt epilogues)")


@pytest.fixture(autouse=True)
def epilogues_on():
    fused.set_cublas_epilogues(True)
    yield
    fused.set_cublas_epilogues(True)


def test_cpu_keeps_the_tanh_gelu():
    generator = _fresh_generator()
    layer = _linear(24, 72, torch.float64, "cpu", generator)
    x = torch.randn(2, 5, 24, generator=generator, dtype=torch.float64) * 3
    with torch.no_grad():
        exact = F.gelu(layer(x), approximate="tanh")
        first, second = fused.linear_then_gelu_part(x, layer, 40)
        assert rel_error(fused.linear_gelu(x, layer), exact) <= 1e-12
    assert rel_error(first, layer(x)[..., :40]) <= 1e-12
    assert rel_error(second, exact[..., 40:]) <= 1e-12


def _fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _linear(in_features: int, out_features: int, dtype: torch.dtype, device: str, generator) -> nn.Linear:
    layer = nn.Linear(in_features, out_features).to(device, dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator) * in_features**-0.5)
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    return layer


@cuda_only
@pytest.mark.parametrize("shape", [(2, 13, 64), (1, 4096, 3072)], ids=["awkward", "flux-width"])
def test_linear_gelu_epilogue_is_tanh_gelu(shape):
    generator = _fresh_generator()
    width = shape[-1]
    layer = _linear(width, 4 * width - 8, torch.bfloat16, "cuda", generator)
    x = torch.randn(*shape, generator=generator).to("cuda", torch.bfloat16)
    with torch.no_grad():
        ours = fused.linear_gelu(x, layer)
        first, gelu_part = fused.linear_then_gelu_part(x, layer, 3 * width)
        exact = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()), approximate="tanh")
        exact_linear = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
    assert rel_error(ours, exact) <= 2e-2
    assert rel_error(first, exact_linear[..., :3 * width]) <= 2e-2
    assert rel_error(gelu_part, exact[..., 3 * width:]) <= 2e-2


@cuda_only
def test_model_with_epilogues_equals_plain_pytorch():
    model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=7).to("cuda", torch.bfloat16).eval()
    args = tiny_edit_args(2, torch.bfloat16, "cuda")
    with torch.no_grad():
        with_epilogues = model.velocity(*args)
        fused.set_cublas_epilogues(False)
        plain = model.velocity(*args)
    assert rel_error(with_epilogues, plain) <= 2e-2
