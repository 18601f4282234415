"""cuBLASLt's GELU epilogue and the single block's linear2 over its input's two parts (kontext_core.compute.fused)
against the plain PyTorch forms they replace.

`linear_gelu` / `linear_then_gelu_part` take the epilogue on CUDA only; on the CPU they must stay the
plain forms (there torch._addmm_activation computes the erf GELU, not FLUX's tanh one).
Tolerance: rel_error (max|ours - reference| / max|reference|) <= 2e-2 in bf16 against float64; 1e-5 in
float32 for the two-part linear (the same products, summed in another order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import fresh_generator, random_linear, randomize_, rel_error, tiny_edit_args
from kontext_core import KontextTransformer, TransformerConfig
from kontext_core.compute import fused

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuBLASLt epilogues)")


@pytest.fixture(autouse=True)
def epilogues_on():
    fused.set_cublas_epilogues(True)
    yield
    fused.set_cublas_epilogues(True)


def test_cpu_keeps_the_tanh_gelu(monkeypatch):
    # bf16 on the CPU is where the epilogue could wrongly be taken (the dtype qualifies, the device not):
    # there torch._addmm_activation computes the erf GELU, so it must never be called.
    def no_epilogue_on_the_cpu(*args, **kwargs):
        raise AssertionError("torch._addmm_activation called for a CPU tensor")

    monkeypatch.setattr(torch, "_addmm_activation", no_epilogue_on_the_cpu)
    generator = fresh_generator()
    layer = random_linear(24, 72, torch.bfloat16, "cpu", generator)
    x = (torch.randn(2, 5, 24, generator=generator) * 3).bfloat16()
    with torch.no_grad():
        exact = F.gelu(layer(x), approximate="tanh")
        first, second = fused.linear_then_gelu_part(x, layer, 40)
        assert torch.equal(fused.linear_gelu(x, layer), exact)
        assert torch.equal(first, layer(x)[..., :40])
    # GELU of a strided slice may take another vector path than of the whole tensor (on AVX-512 CPUs the
    # last bit differs): within one bf16 step. The forbidden epilogue above is what keeps the erf GELU out.
    torch.testing.assert_close(second, exact[..., 40:], rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_linear_over_parts_equals_the_linear_of_the_concatenation(device):
    # The first part a transposed view (as attention's output is), batch 2, widths off any tile size.
    generator = fresh_generator()
    layer = random_linear(20 + 52, 36, torch.float32, device, generator)
    first = torch.randn(2, 4, 11, 5, generator=generator).to(device).transpose(1, 2).reshape(2, 11, 20)
    second = torch.randn(2, 11, 52, generator=generator).to(device) * 2
    with torch.no_grad():
        ours = fused.linear_over_parts(fused.ColumnParts(first, second), layer)
        reference = F.linear(torch.cat((first, second), -1).double(), layer.weight.double(), layer.bias.double())
    assert ours.shape == (2, 11, 36) and ours.dtype == torch.float32
    assert rel_error(ours, reference) <= 1e-5
    # Traced, it is the opaque kontext::linear_over_parts op (its fake gives the shape the graph plans for).
    torch._dynamo.reset()
    try:
        traced = torch.compile(lambda a, b: fused.linear_over_parts(fused.ColumnParts(a, b), layer),
                               backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            assert rel_error(traced(first, second), reference) <= 1e-5
    finally:
        torch._dynamo.reset()


def test_cpu_single_block_concatenates(monkeypatch):
    # Off CUDA linear2 gets the concatenation (the two-GEMM form is a cuBLAS choice).
    generator = fresh_generator()
    linear1 = random_linear(16, 3 * 16 + 40, torch.bfloat16, "cpu", generator)
    linear2 = random_linear(16 + 40, 16, torch.bfloat16, "cpu", generator)
    x = torch.randn(1, 5, 16, generator=generator).bfloat16()
    with torch.no_grad():
        hidden = fused.parallel_attention_mlp(x, linear1, linear2, 3 * 16, lambda qkv: qkv[..., :16] * 2)
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (1, 5, 56)


@pytest.fixture
def epilogue_calls(monkeypatch):
    """How many times the cuBLASLt epilogue path runs (so a test can tell it was taken)."""
    calls = []
    epilogue = fused._linear_gelu_rows
    monkeypatch.setattr(fused, "_linear_gelu_rows", lambda *args: calls.append(1) or epilogue(*args))
    return calls


@cuda_only
@pytest.mark.parametrize("shape", [(2, 13, 64), (1, 4096, 3072)], ids=["awkward", "flux-width"])
def test_linear_gelu_epilogue_is_tanh_gelu(shape, epilogue_calls):
    generator = fresh_generator()
    width = shape[-1]
    layer = random_linear(width, 4 * width - 8, torch.bfloat16, "cuda", generator)
    x = torch.randn(*shape, generator=generator).to("cuda", torch.bfloat16)
    with torch.no_grad():
        ours = fused.linear_gelu(x, layer)
        first, gelu_part = fused.linear_then_gelu_part(x, layer, 3 * width)
        exact = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()), approximate="tanh")
        exact_linear = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert len(epilogue_calls) == 2  # both functions took the epilogue
    assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
    assert rel_error(ours, exact) <= 2e-2
    assert rel_error(first, exact_linear[..., :3 * width]) <= 2e-2
    assert rel_error(gelu_part, exact[..., 3 * width:]) <= 2e-2


@cuda_only
def test_model_with_epilogues_equals_plain_pytorch(epilogue_calls, monkeypatch):
    parts_calls = []
    over_parts = fused.linear_over_parts
    monkeypatch.setattr(fused, "linear_over_parts", lambda *args: parts_calls.append(1) or over_parts(*args))
    model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=7).to("cuda", torch.bfloat16).eval()
    args = tiny_edit_args(2, torch.bfloat16, "cuda")
    with torch.no_grad():
        with_epilogues = model.velocity(*args)
        # Each double block's two MLPs and each single block's linear1 take the epilogue; each single
        # block's linear2 runs over the two parts.
        assert len(epilogue_calls) == 2 * len(model.double_blocks) + len(model.single_blocks)
        assert len(parts_calls) == len(model.single_blocks)
        fused.set_cublas_epilogues(False)
        plain = model.velocity(*args)
    assert len(epilogue_calls) == 2 * len(model.double_blocks) + len(model.single_blocks)  # none while off
    assert len(parts_calls) == len(model.single_blocks)
    assert rel_error(with_epilogues, plain) <= 2e-2
