"""The transformer with the Triton kernels in its blocks equals it without them (needs a CUDA GPU).

Tolerance: rel_error <= 1e-4 in float32, 2e-2 in bf16 (the kernels round once at the end).
"""

from __future__ import annotations

import pytest
import torch

from conftest import kernels_off, randomize_, rel_error, tiny_edit_args
from kontext_kernels.runtime import launches, triton_available
from kontext_core import KontextTransformer, TransformerConfig

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                reason="needs a CUDA GPU with Triton")


@pytest.fixture(params=[False, True], ids=["row-kernels", "all-kernels"])
def fused_gemms(request):
    from kontext_core.compute import fused

    fused.set_fused_gemms(request.param)
    yield request.param
    fused.set_fused_gemms(False)


def _model_and_plain_velocity(dtype: torch.dtype, seed: int, batch: int):
    """A tiny model on the GPU, fresh arguments, and its velocity with the kernels off (the reference)."""
    model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=seed).to("cuda", dtype).eval()
    args = tiny_edit_args(batch, dtype, "cuda")
    with torch.no_grad(), kernels_off():
        plain = model.velocity(*args)
    return model, args, plain


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_with_kernels_equal_plain_pytorch(dtype, fused_gemms):
    model, args, plain = _model_and_plain_velocity(dtype, seed=5, batch=2)
    before = sum(launches.values())
    with torch.no_grad():
        fused = model.velocity(*args)
    assert sum(launches.values()) > before
    assert rel_error(fused, plain) <= _tolerance(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_blocks_call_the_qk_kernel(dtype):
    # Regional torch.compile with the kernels on: the QK-norm + RoPE kernel runs inside the compiled
    # blocks (as an opaque op) and the result equals the plain eager model.
    model, args, plain = _model_and_plain_velocity(dtype, seed=6, batch=1)
    torch._dynamo.reset()
    try:
        model.compile_blocks()
        before = launches["qkv_norm_rope"]
        with torch.no_grad():
            compiled = model.velocity(*args)
        assert launches["qkv_norm_rope"] - before == 2 * len(model.double_blocks) + len(model.single_blocks)
    finally:
        torch._dynamo.reset()
    assert rel_error(compiled, plain) <= _tolerance(dtype)
