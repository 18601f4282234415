"""fp8_attention (cuDNN fp8 flash attention, Hopper) against exact attention.

The reference is `F.scaled_dot_product_attention` in float32 on the same bf16 inputs, so the error
measured is fp8's: q, k and v are rounded to e4m3 (3 mantissa bits, ~2.6% relative RMS each for
Gaussian data at a per-tensor scale), so are the softmax numerators P and the output O (Hopper's
cuDNN writes O only in fp8). With q and k RMS-normalised (unit-RMS rows, scores ~ N(0, 1)) and
v ~ N(0, 1) the relative L2 error measured on an H100 (cuDNN 9.19) is 5.8-5.9% at every shape
and layout tested (bf16 SDPA: 0.23%). That matches adding the five roundings in quadrature: O, P
and v ~2.6% each, the scores ~3.7% (q and k both rounded): sqrt(3 * 2.6^2 + 3.7^2) = 5.8%. Being a
norm over 10^5..10^7 elements it barely moves between seeds, so the bound of 8% (~1.35x margin)
still catches any real fault: a wrong scale (a factor 2 anywhere gives 50%+) or a wrong layout
(~140%).

The GPU tests skip without CUDA, without the cuDNN frontend package (`nvidia-cudnn-frontend`) or on a
GPU older than Hopper; the dispatch and refusal tests at the end run anywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_l2
from kontext_core.compute import fp8_attention as fa

REL_L2_BOUND = 0.08
# The tiny model's velocity moved 1.1-1.35% L2 over three H100 runs (4 blocks); 4% keeps a 3x margin.
MODEL_REL_L2_BOUND = 0.04


_UNAVAILABLE = fa.unavailable_reason("cuda")
needs_fp8_attention = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"fp8 attention unavailable: {_UNAVAILABLE}")


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True))


def _inputs(batch: int, heads: int, length: int, head_dim: int, layout: str, seed: int):
    """bf16 q, k (unit-RMS rows, as after the model's RMS norm) and v ~ N(0, 1), [B, H, L, D]
    views in the given memory layout."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, length, 3, heads, head_dim)
    qkv = torch.randn(shape, generator=generator, device="cuda")
    qkv[:, :, :2] = _unit_rms(qkv[:, :, :2])
    qkv = qkv.to(torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # gapped views of a packed projection
    if layout == "contiguous":
        return q.contiguous(), k.contiguous(), v.contiguous()
    if layout == "bshd":
        return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert layout == "packed"
    return q, k, v


def _reference(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


@pytest.mark.parametrize("layout", ["contiguous", "bshd", "packed"])
@needs_fp8_attention
def test_awkward_shape(layout):
    q, k, v = _inputs(2, 3, 333, 128, layout, seed=torch.seed() % 2**31)
    out = fa.fp8_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()
    error = rel_l2(out, _reference(q, k, v))
    print(f"awkward {layout}: rel L2 {error:.4f}")
    assert error < REL_L2_BOUND


@needs_fp8_attention
def test_head_dim_64_and_cross_lengths():
    generator = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    q = _unit_rms(torch.randn(1, 4, 200, 64, generator=generator, device="cuda")).bfloat16()
    k = _unit_rms(torch.randn(1, 4, 517, 64, generator=generator, device="cuda")).bfloat16()
    v = torch.randn(1, 4, 517, 64, generator=generator, device="cuda").bfloat16()
    out = fa.fp8_attention(q, k, v)
    assert out.shape == (1, 4, 200, 64)
    error = rel_l2(out, _reference(q, k, v))
    print(f"d64, 200x517: rel L2 {error:.4f}")
    assert error < REL_L2_BOUND


@needs_fp8_attention
def test_full_flux_shape():
    q, k, v = _inputs(1, 24, 8704, 128, "contiguous", seed=torch.seed() % 2**31)
    out = fa.fp8_attention(q, k, v)
    reference = _reference(q, k, v)
    error = rel_l2(out, reference)
    bf16_error = rel_l2(F.scaled_dot_product_attention(q, k, v), reference)
    print(f"full shape: fp8 rel L2 {error:.4f}, bf16 SDPA rel L2 {bf16_error:.4f}")
    assert error < REL_L2_BOUND
    # Scales are per call: v 64x larger (exact in bf16) quantizes to the same fp8 values.
    scaled = fa.fp8_attention(q, k, v * 64) / 64
    assert rel_l2(scaled, out) < 1e-3


@pytest.mark.parametrize("lengths, heads, head_dim", [((512, 8192), 24, 128), ((7, 333), 3, 64)])
@needs_fp8_attention
def test_joint_attention_from_projections(lengths, heads, head_dim):
    # Two streams' packed projections (text, image) with their own norm weights straight to fp8 attention,
    # q and k at the static scales of their norm bounds: as accurate as quantizing the finished bf16 q, k, v
    # with their amaxes (within 10%), and within the same bound of exact attention.
    from kontext_kernels import fp8_qkv
    from kontext_kernels.runtime import launches

    generator = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    width = 3 * heads * head_dim
    streams = [(torch.randn(1, length, width, generator=generator, device="cuda").bfloat16(),
                (1 + 0.3 * torch.randn(head_dim, generator=generator, device="cuda")).bfloat16(),
                (1 + 0.3 * torch.randn(head_dim, generator=generator, device="cuda")).bfloat16()) for length in lengths]
    angles = torch.rand(1, 1, sum(lengths), head_dim // 2, generator=generator, device="cuda") * 6.3
    cos, sin = angles.cos(), angles.sin()
    q, k, v = fp8_qkv.qk_norm_rope.joint_qkv_norm_rope_reference(streams, cos, sin, heads)
    reference = _reference(q, k, v)
    before = launches["joint_qkv_norm_rope_fp8"]
    out = fa.fp8_joint_attention(streams, cos, sin, heads)
    assert launches["joint_qkv_norm_rope_fp8"] == before + 1
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    error, dynamic_error = rel_l2(out, reference), rel_l2(fa.fp8_attention(q, k, v), reference)
    print(f"joint {lengths}: static q/k scales rel L2 {error:.4f}, amax scales {dynamic_error:.4f}")
    assert error < REL_L2_BOUND and error < 1.1 * dynamic_error


@needs_fp8_attention
def test_compiled_block_equals_eager():
    q, k, v = _inputs(2, 3, 333, 128, "packed", seed=1234)
    batch, heads, length, head_dim = q.shape

    def block(q, k, v):
        out = fa.fp8_attention(q * 2, k, v)  # doubling is exact in bf16: same op either way
        return out.transpose(1, 2).reshape(batch, length, heads * head_dim) * 2

    compiled = torch.compile(block, fullgraph=True)
    eager = block(q, k, v)
    assert torch.equal(compiled(q, k, v), eager)
    assert torch.equal(compiled(q, k, v), eager)


@needs_fp8_attention
def test_model_with_fp8_attention_backend():
    # The whole (tiny, head dim 64) model with attention backend "cudnn-fp8", blocks compiled, against the
    # default backend: the fp8 path really runs (the outputs differ) and stays near bf16 (bound: see print).
    from conftest import randomize_, tiny_edit_args
    from kontext_core import KontextTransformer, TransformerConfig, set_attention_backend

    from kontext_kernels.runtime import launches

    torch._dynamo.reset()
    model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=8).to("cuda", torch.bfloat16).eval()
    args = tiny_edit_args(1, torch.bfloat16, "cuda")
    try:
        with torch.no_grad():
            reference = model.velocity(*args)
            set_attention_backend("cudnn-fp8")
            before = launches["joint_qkv_norm_rope_fp8"]
            eager = model.velocity(*args)
            # Every block quantizes in the QK-norm + RoPE pass (the kernels are on by default on CUDA).
            assert launches["joint_qkv_norm_rope_fp8"] - before == len(model.double_blocks) + len(model.single_blocks)
            model.compile_blocks()
            compiled = model.velocity(*args)
    finally:
        set_attention_backend("auto")
        torch._dynamo.reset()
    error = rel_l2(eager, reference)
    print(f"tiny model, fp8 attention vs default: rel L2 {error:.4f}")
    assert 1e-3 < error < MODEL_REL_L2_BOUND
    assert rel_l2(compiled, eager) < 2e-2


@needs_fp8_attention
def test_describe_reports_versions_and_graphs():
    q, k, v = _inputs(1, 2, 64, 64, "contiguous", seed=9)
    fa.fp8_attention(q, k, v)
    info = fa.describe()
    assert info["frontend"] != "?" and info["backend"] and info["graphs"]
    assert all(graph["plans"] >= 1 and graph["workspace_bytes"] >= 0 for graph in info["graphs"])


def test_fp8_attention_calls_the_registered_op(monkeypatch):
    # The public function must go through `kontext::fp8_attention`, so compiled blocks see one opaque op
    # rather than tracing into the quantization and the cuDNN graph (which torch.compile cannot trace).
    calls = []
    monkeypatch.setattr(fa, "_check", lambda q, k, v: None)
    monkeypatch.setattr(torch.ops.kontext, "fp8_attention", lambda q, k, v: calls.append((q, k, v)) or q)
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    assert fa.fp8_attention(q, k, v) is q and calls == [(q, k, v)]


def test_unsupported_inputs_are_refused_with_the_way_out():
    # Checked before any GPU work, so on any machine: float32 projections, a head dim cuDNN's graph refuses.
    cos = sin = torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="takes bf16/fp16 inputs, got torch.float32; run the model in bf16"):
        fa.fp8_joint_attention([(torch.randn(1, 8, 3 * 2 * 32), torch.ones(32), torch.ones(32))], cos, sin, 2)
    with pytest.raises(ValueError, match="head dims must be multiples of 16 .* got q/k 24, v 24; choose attention"):
        fa.fp8_joint_attention([(torch.randn(1, 8, 3 * 2 * 24).bfloat16(), torch.ones(24), torch.ones(24))],
                               cos, sin, 2)
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="one CUDA device; run the model on a CUDA GPU"):
        fa.fp8_attention(q.bfloat16(), q.bfloat16(), q.bfloat16())


@pytest.mark.skipif(_UNAVAILABLE is None, reason="fp8 attention runs here")
def test_unavailable_backend_is_refused_with_the_reason_and_a_way_out():
    from kontext_core import get_attention_backend, set_attention_backend

    before = get_attention_backend()
    with pytest.raises(RuntimeError, match="cannot run here: .*(GPU|install|reinstall|PyTorch).*; or choose 'auto'"):
        set_attention_backend("cudnn-fp8")
    assert get_attention_backend() == before

