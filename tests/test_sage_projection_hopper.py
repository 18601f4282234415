"""sage8's operands written by the QKV projection's GEMM (kontext_kernels/sage_projection_hopper.py) against the
plain GEMM followed by the frozen pass (sage_qkv.frozen_sage_operands).

Both round the same bf16 projection the same way, except that their norms sum each token's squares in another
order: int8 values one step apart at most, at rounding boundaries (attention_cases.assert_operands_close). A single
block's columns past q, k and v come out of the same GEMM as the plain kernel's, bit for bit. Gluon does not run
under the interpreter: off Hopper the kernel is built for sm_90 and its SASS checked; on a Hopper GPU the operands
are compared on fresh random projections, for two streams at their offsets in the joint sequence (a double block's
text and image), batch 2, and a stream with MLP columns (a single block's linear1), keys in either order.
"""

from __future__ import annotations

import re

import pytest
import torch

from attention_cases import assert_operands_close
from conftest import eight_bit_kernels, sass_of, spills
from kontext_kernels import int8_gemm_hopper, sage_projection_hopper, sage_qkv
from kontext_kernels.runtime import triton_available

needs_gluon = pytest.mark.skipif(not int8_gemm_hopper.gluon_available(),
                                 reason="this Triton has no Gluon with Hopper warp specialisation")
hopper_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
                                     and int8_gemm_hopper.gluon_available()), reason="needs a Hopper GPU and Gluon")


@needs_gluon
@pytest.mark.parametrize("permute_keys", [True, False], ids=["hopper-key-order", "token-order"])
def test_builds_for_sm90_without_spills(permute_keys):
    kernel = sage_projection_hopper.build_offline(permute_keys=permute_keys)
    sass = sass_of(kernel)
    assert len(re.findall(r"IGMMA\.64x128x32\.S8\.S8", sass)) == 2 * 8  # the plain kernel's main loops
    assert "UTMASTG" in sass  # the MLP columns' TMA stores
    assert not spills(sass), "registers spill"
    assert kernel.metadata.shared <= 227 * 1024


def _projection(rows: int, columns: int, depth: int, device: str) -> tuple:
    """Random int8 operands of a projection and their scales, with a bf16 bias."""
    data = torch.randint(-127, 128, (rows, depth), dtype=torch.int8, device=device)
    weight = torch.randint(-127, 128, (columns, depth), dtype=torch.int8, device=device)
    scale = torch.rand(rows, device=device) * 1e-3 + 5e-4
    weight_scale = torch.rand(columns, device=device) * 1e-2 + 5e-3
    bias = (0.5 * torch.randn(columns, device=device)).to(torch.bfloat16)
    return data, scale, weight, weight_scale, bias


@hopper_gpu
@pytest.mark.parametrize("batch, lengths, mlp_columns, permute_keys",
                         [(1, (128, 256), 0, True), (2, (256,), 256, True), (1, (128, 384), 0, False)],
                         ids=["two-streams", "batch-2-with-mlp-columns", "token-order"])
def test_operands_match_the_plain_projection_and_the_frozen_pass(batch, lengths, mlp_columns, permute_keys):
    heads, head_dim, depth, device = 2, 128, 256, "cuda"
    qkv_columns = 3 * heads * head_dim
    total = sum(lengths)
    angles = torch.rand(1, 1, total, head_dim // 2, device=device) * 6.2832
    cos, sin = angles.cos(), angles.sin()
    norms = [(1 + 0.2 * torch.randn(2, head_dim, device=device)).to(torch.bfloat16) for _ in lengths]
    projections = [_projection(batch * length, qkv_columns + mlp_columns, depth, device) for length in lengths]
    plain = [int8_gemm_hopper.launch(*projection[:4], projection[4], torch.bfloat16) for projection in projections]

    def streams_of(products):
        return [(product[:, :qkv_columns].view(batch, length, qkv_columns), norm[0], norm[1])
                for product, length, norm in zip(products, lengths, norms)]

    # Statistics of another step: the same layer's projection of other inputs.
    stale = [int8_gemm_hopper.launch(_projection(batch * length, 1, depth, device)[0], *projection[1:4],
                                     projection[4], torch.bfloat16) for length, projection in zip(lengths, projections)]
    _, statistics = sage_qkv.record_sage_operands(streams_of(stale), cos, sin, heads, fp8_pv=True)
    reference = sage_qkv.frozen_sage_operands(streams_of(plain), cos, sin, heads, True, statistics,
                                              permute_keys=permute_keys)

    operands = sage_qkv.empty_operands(batch, heads, total, head_dim, True, statistics, permute_keys, device)
    offset = 0
    for (data, scale, weight, weight_scale, bias), length, norm, product in zip(projections, lengths, norms, plain):
        assert sage_projection_hopper.takes(data, weight, heads, length, offset)
        out = sage_projection_hopper.project_to_operands(
            data, scale, weight, weight_scale, bias, operands, statistics, norm[0], norm[1],
            cos[:, :, offset:offset + length], sin[:, :, offset:offset + length], heads, length, offset)
        assert torch.equal(out[:, qkv_columns:], product[:, qkv_columns:])
        offset += length
    assert_operands_close(operands, reference)


def test_streams_it_does_not_take():
    data = torch.zeros(256, 128, dtype=torch.int8)
    weight = torch.zeros(3 * 2 * 128, 128, dtype=torch.int8)
    # Off a Hopper GPU, or with a stream (or its offset) that is not whole 128-token tiles: the frozen pass instead.
    assert not sage_projection_hopper.takes(data, weight, 2, 256, 0)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        data, weight = data.cuda(), weight.cuda()
        assert sage_projection_hopper.takes(data, weight, 2, 256, 0) == int8_gemm_hopper.gluon_available()
        assert not sage_projection_hopper.takes(data, weight, 2, 128 + 64, 0)
        assert not sage_projection_hopper.takes(data, weight, 2, 256, 64)
        assert not sage_projection_hopper.takes(data, weight, 3, 256, 0)  # fewer columns than 3 heads' q, k, v


@pytest.fixture(params=["interpreter", "cuda"])
def eight_bit_device(request):
    if not triton_available():
        pytest.skip("needs Triton (pip install triton==3.6.0)")
    if request.param == "cuda" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip("needs a CUDA GPU with fp8 tensor cores (sage8's e4m3 P·V)")
    with eight_bit_kernels(request.param) as device:
        yield device


def _whole_tile_edit_args(device: str, context_in_dim: int, vec_in_dim: int) -> tuple:
    """`velocity` arguments whose streams are whole 128-token tiles: 128 text tokens, a 32x16 target and a 32x16
    context (128 tokens each), so that every projection can write the operands."""
    from conftest import fresh_generator
    from kontext_core import context_tokens, pack_latent, position_ids

    generator = fresh_generator()

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    img, ids = pack_latent(randn(1, 16, 32, 16)), position_ids(32, 16, batch=1, device=device)
    ctx, ctx_ids = context_tokens([randn(1, 16, 32, 16)], (32, 16), "kontext")
    return (img, ids, randn(1, 128, context_in_dim), torch.zeros(1, 128, 3, device=device),
            torch.rand(1, device=device), randn(1, vec_in_dim), torch.full((1,), 2.5, device=device), ctx, ctx_ids)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_int8_model_projects_into_the_frozen_attention(eight_bit_device, head_dim, monkeypatch):
    # An int8 model with sage8's frozen statistics: each block's q/k/v projections and its attention go through one
    # op, kontext::sage_frozen_projected_attention. Where the GEMM cannot write the operands (the interpreter, a head
    # dim other than 128) the op projects and attends as the separate layers do: the same velocity bit for bit. On
    # Hopper at head dim 128 the GEMM writes them: the velocity within the int8 steps' rounding of it.
    from conftest import randomize_
    from kontext_core import KontextTransformer, TransformerConfig, set_attention_backend
    from kontext_core.compute import attention, quant

    device = eight_bit_device
    if device == "cpu" and head_dim == 128:
        pytest.skip("under the interpreter head dim 64 covers the same path (no GEMM writes operands there)")
    config = TransformerConfig.tiny(depth=1, depth_single_blocks=1, hidden_size=2 * head_dim,
                                    axes_dim=(8, 28, 28) if head_dim == 64 else (16, 56, 56))
    model = quant.quantize_model(randomize_(KontextTransformer(config), seed=5).to(device, torch.bfloat16).eval(),
                                 torch.int8)
    first = _whole_tile_edit_args(device, config.context_in_dim, config.vec_in_dim)
    later = (first[0] + 0.1 * torch.randn(first[0].shape).to(first[0]),) + first[1:]
    monkeypatch.setattr(attention, "PROJECTION_WRITES_OPERANDS", True)
    asked = []
    real_takes = sage_projection_hopper.takes
    monkeypatch.setattr(sage_projection_hopper, "takes", lambda *args: asked.append(args) or real_takes(*args))

    def record_then_reuse() -> torch.Tensor:
        attention.forget_frozen_statistics()
        with attention.frozen_statistics("record"):
            model.velocity(*first)
        with attention.frozen_statistics("reuse"):
            return model.velocity(*later)

    previous = attention.get_attention_backend()
    try:
        set_attention_backend("sage8")
        with torch.no_grad():
            projected = record_then_reuse()
            blocks_asked = len(asked)
            monkeypatch.setattr(attention, "PROJECTION_WRITES_OPERANDS", False)  # the separate layers
            separate = record_then_reuse()
    finally:
        set_attention_backend(previous)
        attention.forget_frozen_statistics()
    assert blocks_asked >= 2  # each block's op asked whether its GEMMs could write the operands
    writes = all(real_takes(*args) for args in asked)
    if writes:
        assert (projected.double() - separate.double()).norm() <= 5e-3 * separate.double().norm()
    else:
        assert torch.equal(projected, separate)
    if device == "cuda" and head_dim == 128 and int8_gemm_hopper.gluon_available() \
            and torch.cuda.get_device_capability() == (9, 0):
        assert writes  # on Hopper the kernel ran
