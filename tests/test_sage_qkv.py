"""sage8's operands made in the QK-norm + RoPE pass (kontext_kernels/sage_qkv.py) against the unfused path: the
QK-norm + RoPE kernel, then sage_attention.quantize_operands. Bit for bit: both round the same float32 values the
same way, and K's sums are exact float64 sums, whatever the atomics' order. Under Triton's interpreter on the CPU
and compiled on a GPU; fresh random projections each run.
"""

from __future__ import annotations

import pytest
import torch

from attention_cases import eager_and_compiled
from conftest import kernels_built_for, tiny_edit_args
from kontext_kernels.runtime import launches, triton_available


@pytest.fixture(scope="module", params=["interpreter", "cuda"])
def device(request) -> str:
    if not triton_available():
        pytest.skip("triton is not installed")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with kernels_built_for(request.param):
        yield "cpu" if request.param == "interpreter" else "cuda"


def _streams(batch: int, lengths: tuple[int, ...], heads: int, head_dim: int, device: str):
    """Streams (qkv, q_scale, k_scale) of a joint sequence with random projections and norm scales, and its
    RoPE tables; k offset per channel (which K's centring removes), v of another scale."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    streams = []
    for length in lengths:
        qkv = torch.randn(batch, length, 3, heads, head_dim, generator=generator)
        qkv[:, :, 1] += torch.randn(head_dim, generator=generator)
        qkv[:, :, 2] *= 3
        scales = 1 + 0.2 * torch.randn(2, head_dim, generator=generator)
        streams.append((qkv.flatten(2).to(device, torch.bfloat16), scales[0].to(device), scales[1].to(device)))
    angles = torch.rand(1, 1, sum(lengths), head_dim // 2, generator=generator) * 6.2832
    return streams, angles.cos().to(device), angles.sin().to(device)


@pytest.mark.parametrize("batch, lengths, heads, head_dim", [(1, (37, 150), 3, 64), (2, (70,), 2, 128),
                                                             (1, (13, 64, 51), 2, 48)], ids=str)
def test_operands_equal_the_unfused_path(device, batch, lengths, heads, head_dim):
    from kontext_kernels import qk_norm_rope, sage_attention as sa, sage_qkv

    streams, cos, sin = _streams(batch, lengths, heads, head_dim, device)
    assert sage_qkv.runs_fused(streams, heads)
    q, k, v = qk_norm_rope.joint_qkv_norm_rope(streams, cos, sin, heads)
    for fp8_pv in ([True, False] if device == "cpu" or sa.fp8_tensor_cores(torch.device(device)) else [False]):
        for permute in ((False, True) if fp8_pv else (False,)):  # keys permute with one k scale per tile
            before = launches["qkv_norm_rope_sage"]
            fused = sage_qkv.joint_sage_operands(streams, cos, sin, heads, fp8_pv, permute_keys=permute)
            assert launches["qkv_norm_rope_sage"] == before + 1
            unfused = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv, permute_keys=permute)
            for name, mine, theirs in zip(sa.Operands._fields, fused, unfused):
                if torch.is_tensor(mine):
                    assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, name
                    assert torch.equal(mine.float(), theirs.float()), name  # +0 and -0 alike
                else:
                    assert mine == theirs, name


def test_head_dims_the_fused_pass_does_not_take(device):
    from kontext_kernels import sage_qkv

    # 16 channels pad to 32 in the operands (an int8 dot's depth): wider than the kernel's tile.
    streams, _, _ = _streams(1, (8,), 2, 16, device)
    assert not sage_qkv.runs_fused(streams, 2)


def test_the_model_with_the_fused_pass_equals_the_unfused_one(device, tiny_transformer, monkeypatch):
    # The sage8 backend in every block of a tiny model, the fused pass on (it is off by default) and off; and in
    # compiled blocks, where the pass is one opaque op (the compiler's own fusions elsewhere round differently on
    # the GPU: bounded as tests/test_sage_attention.py bounds compiled against eager).
    from kontext_core import set_attention_backend
    from kontext_core.compute import attention

    model = tiny_transformer.to(device, torch.bfloat16)
    args = tiny_edit_args(1, torch.bfloat16, device)
    previous = attention.get_attention_backend()
    set_attention_backend("sage8")
    try:
        with torch.no_grad():
            unfused = model.velocity(*args)
        monkeypatch.setattr(attention, "FUSED_SAGE_QKV", True)
        fused, compiled = eager_and_compiled(model, args, device, "qkv_norm_rope_sage")
    finally:
        set_attention_backend(previous)
    assert torch.equal(fused, unfused)
    assert (compiled.double() - fused.double()).norm() <= 2e-2 * fused.double().norm()
