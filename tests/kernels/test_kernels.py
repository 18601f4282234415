"""The fused Triton kernels (kontext_kernels/) against their PyTorch references (`*_reference`, same module).

On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) on small, awkward
shapes (few tokens: the interpreter reduces rows one element at a time); every test checks the launch counter so
that a silent fallback to the reference cannot pass.
Tolerance: rel_error (max|ours - reference| / max|reference|) <= 1e-4 in float32, 2e-2 in
bfloat16 (the kernels round once at the end, the references after every step). On a CUDA GPU,
the compiled kernels are checked at the full FLUX sizes in bfloat16 by the benchmark's check step
(kontext_kernels/check.py), which also runs here at small sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kontext_kernels
from conftest import NO_TRITON, kernel_device, kernels_built_for, rel_error, rel_l2
from kontext_kernels import check as kernel_check
from kontext_kernels.runtime import launches, triton_available

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="class", params=["interpreter", "cuda"])
def device(request) -> str:
    """Where the awkward-size checks run: Triton's CPU interpreter, and the compiled kernels on a GPU.

    The kernel modules are rebuilt for the mode (their @triton.jit reads TRITON_INTERPRET at
    import) and put back as they were afterwards.
    """
    with kernel_device(request.param) as device:
        yield device


@pytest.fixture(scope="class")
def compiled():
    """Kernel modules built for the GPU, even if an interpreted build was loaded before."""
    if not triton_available():
        pytest.skip(NO_TRITON)
    with kernels_built_for("cuda"):
        yield


def _assert_launched(name: str, before: int) -> None:
    assert launches[name] > before, f"{name} fell back to its reference instead of running the Triton kernel"


def _randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu", scale: float = 1.0,
           offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale + offset).to(device=device, dtype=dtype)


def _modulation_chunks(batch: int, channels: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """shift and scale as the model has them: strided chunks of one [B, 1, 3C] projection."""
    shift, scale, _gate = _randn(batch, 1, 3 * channels, dtype=dtype, device=device).chunk(3, dim=-1)
    return shift, scale


def _rope_tables(batch: int, length: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    angle = _randn(batch, 1, length, head_dim // 2, device=device, scale=3.0)
    return torch.cos(angle), torch.sin(angle)


def _assert_e4m3_close(ours: torch.Tensor, reference: torch.Tensor, exact: bool) -> None:
    """e4m3 values equal, or (where the float32 GELU or rsqrt of kernel and reference differ in their
    last bits) off by at most one e4m3 step in under 1% of the elements: the check step's measure."""
    if exact:
        assert torch.equal(ours, reference)  # +0 and -0 alike
        return
    assert kernel_check.e4m3_error(ours, reference) <= kernel_check.EIGHT_BIT_MISMATCH_TOLERANCE


def _assert_int8_close(ours: torch.Tensor, reference: torch.Tensor, exact: bool) -> None:
    """int8 values equal, or (float32 GELU / rsqrt differing in their last bits) one step apart in under 1%."""
    difference = (ours.int() - reference.int()).abs()
    if exact:
        assert int(difference.max()) == 0
        return
    assert (int(difference.max()) <= 1
            and float((difference > 0).float().mean()) <= kernel_check.EIGHT_BIT_MISMATCH_TOLERANCE)


def _check_rows(variant: str, args: tuple, rows: int, exact: bool, spare: int = 0,
                dtype: torch.dtype = torch.float8_e4m3fn) -> None:
    """kontext_kernels.row_quant.<variant> launches its kernel and agrees with <variant>_reference: scales to 1e-5,
    8-bit values (e4m3 or int8) exactly (or, where `exact` is False, as `_assert_e4m3_close` /
    `_assert_int8_close` allow). With `spare` columns after each row, the kernel leaves them as they were
    (filled with a sentinel here)."""
    from kontext_kernels import row_quant

    before = launches[variant]
    sentinel = torch.full((), 7.0).to(dtype)
    real_empty = torch.empty
    with pytest.MonkeyPatch.context() as patch:  # the kernel's output buffer, pre-filled to see what it writes
        patch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(sentinel)
                      if k.get("dtype") == dtype else real_empty(*a, **k))
        # GELU as the references compute it (test_gelu_through_tanh_approx checks the GPU's faster form).
        patch.setattr(row_quant, "GELU_ON_GPU", row_quant.GELU_EXP)
        data, row_scale = getattr(row_quant, variant)(*args, spare=spare, dtype=dtype)
    _assert_launched(variant, before)
    ref_data, ref_scale = getattr(row_quant, variant + "_reference")(*args, dtype=dtype)
    width = ref_data.shape[-1]
    assert data.dtype == dtype and data.shape == (*ref_data.shape[:-1], width + spare)
    assert row_scale.dtype == torch.float32 and row_scale.shape == (rows, 1)
    assert torch.allclose(row_scale, ref_scale, rtol=1e-5, atol=0)
    close = _assert_int8_close if dtype == torch.int8 else _assert_e4m3_close
    close(data[..., :width].float(), ref_data.float(), exact=exact)
    assert bool((data[..., width:].float() == 7.0).all())
    if spare:
        ref_wide, _ = getattr(row_quant, variant + "_reference")(*args, spare=spare, dtype=dtype)
        assert ref_wide.shape == data.shape and torch.equal(ref_wide[..., :width].float(), ref_data.float())


class TestAwkwardSizes:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("channels", [100, 129])
    def test_layernorm_modulate(self, device, dtype, channels):
        from kontext_kernels import modulation

        x = _randn(2, 13, channels, dtype=dtype, device=device, scale=2.0, offset=0.5)
        shift, scale = _modulation_chunks(2, channels, dtype, device)
        before = launches["layernorm_modulate"]
        out = modulation.layernorm_modulate(x, shift, scale)
        _assert_launched("layernorm_modulate", before)
        assert out.dtype == dtype and out.shape == x.shape
        assert rel_error(out, modulation.layernorm_modulate_reference(x, shift, scale)) <= TOLERANCE[dtype]

    def test_layernorm_modulate_strided_rows_and_batch_one_modulation(self, device):
        from kontext_kernels import modulation

        # x as a slice of a wider tensor (rows not contiguous), shift/scale shared by the batch.
        x = _randn(3, 5, 160, device=device)[..., 30:130]
        shift, scale = _modulation_chunks(1, 100, torch.float32, device)
        before = launches["layernorm_modulate"]
        out = modulation.layernorm_modulate(x, shift, scale)
        _assert_launched("layernorm_modulate", before)
        assert rel_error(out, modulation.layernorm_modulate_reference(x, shift, scale)) <= TOLERANCE[torch.float32]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rope_batch", [1, 2], ids=["rope-batch-1", "rope-batch-B"])
    def test_qkv_norm_rope(self, device, dtype, rope_batch):
        from kontext_kernels import qk_norm_rope

        batch, length, heads, head_dim = 2, 13, 2, 64
        qkv = _randn(batch, length, 3 * heads * head_dim, dtype=dtype, device=device, scale=1.5)
        q_scale = _randn(head_dim, dtype=dtype, device=device, scale=0.2, offset=1.0)
        k_scale = _randn(head_dim, dtype=dtype, device=device, scale=0.2, offset=1.0)
        cos, sin = _rope_tables(rope_batch, length, head_dim, device)
        before = launches["qkv_norm_rope"]
        outs = qk_norm_rope.qkv_norm_rope(qkv, q_scale, k_scale, cos, sin, heads)
        _assert_launched("qkv_norm_rope", before)
        references = qk_norm_rope.qkv_norm_rope_reference(qkv, q_scale, k_scale, cos, sin, heads)
        for name, out, reference in zip("qkv", outs, references):
            # [B, L, H, D] memory: attention's output then views as [B, L, H*D] without a copy.
            assert out.shape == (batch, heads, length, head_dim) and out.transpose(1, 2).is_contiguous(), name
            assert out.dtype == dtype, name
            assert rel_error(out, reference) <= TOLERANCE[dtype], name

    def test_qkv_norm_rope_padded_head_dim_and_strided_views(self, device):
        from kontext_kernels import qk_norm_rope

        # head_dim 24 pads to a 32-wide tile; qkv is the front of a wider projection (the single
        # block's split) and cos/sin a slice along L (one stream of the joint sequence).
        batch, length, heads, head_dim = 2, 9, 3, 24
        qkv = _randn(batch, length, 3 * heads * head_dim + 40, device=device)[..., : 3 * heads * head_dim]
        q_scale, k_scale = _randn(head_dim, device=device), _randn(head_dim, device=device)
        cos, sin = _rope_tables(batch, length + 11, head_dim, device)
        cos, sin = cos[:, :, 11:], sin[:, :, 11:]
        before = launches["qkv_norm_rope"]
        outs = qk_norm_rope.qkv_norm_rope(qkv, q_scale, k_scale, cos, sin, heads)
        _assert_launched("qkv_norm_rope", before)
        references = qk_norm_rope.qkv_norm_rope_reference(qkv, q_scale, k_scale, cos, sin, heads)
        for name, out, reference in zip("qkv", outs, references):
            assert rel_error(out, reference) <= TOLERANCE[torch.float32], name

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_joint_qkv_norm_rope_writes_each_stream_at_its_offset(self, device, dtype):
        from kontext_kernels import qk_norm_rope

        # Two streams (text 5 tokens, image 11) with their own norm scales, batch 2, one RoPE table
        # over the joint 16 tokens: the result is the two streams' references concatenated along L.
        batch, heads, head_dim, lengths = 2, 2, 32, (5, 11)
        streams = [(_randn(batch, length, 3 * heads * head_dim, dtype=dtype, device=device, scale=1.5),
                    _randn(head_dim, dtype=dtype, device=device, scale=0.2, offset=1.0),
                    _randn(head_dim, dtype=dtype, device=device, scale=0.2, offset=1.0)) for length in lengths]
        cos, sin = _rope_tables(1, sum(lengths), head_dim, device)
        before = launches["qkv_norm_rope"]
        joint = qk_norm_rope.joint_qkv_norm_rope(streams, cos, sin, heads)
        assert launches["qkv_norm_rope"] == before + 2
        assert joint.shape == (3, batch, heads, sum(lengths), head_dim) and joint.dtype == dtype
        parts = [qk_norm_rope.qkv_norm_rope_reference(*stream, cos[:, :, start:start + length],
                                                      sin[:, :, start:start + length], heads)
                 for stream, start, length in zip(streams, (0, lengths[0]), lengths)]
        for index, name in enumerate("qkv"):
            reference = torch.cat([part[index] for part in parts], dim=2)
            assert rel_error(joint[index], reference) <= TOLERANCE[dtype], name

    def test_joint_qkv_norm_rope_op_fake_has_the_real_layout(self, device):
        # Compiled blocks plan their buffers from the op's fake: its strides must be the real output's
        # ([B, L, H, D] memory), or the attention after it would read a wrong layout.
        from torch._subclasses.fake_tensor import FakeTensorMode

        from kontext_core.compute import fused

        if fused._kernels is None:
            pytest.skip("the kontext ops are registered only where Triton imports")
        batch, heads, head_dim, lengths = 2, 3, 16, (4, 9)
        qkvs = [_randn(batch, length, 3 * heads * head_dim, device=device) for length in lengths]
        scales = [_randn(head_dim, device=device, scale=0.2, offset=1.0) for _ in range(4)]
        cos, sin = _rope_tables(1, sum(lengths), head_dim, device)
        real = torch.ops.kontext.joint_qkv_norm_rope(qkvs, scales[:2], scales[2:], cos, sin, heads)
        with FakeTensorMode() as mode:
            fake = torch.ops.kontext.joint_qkv_norm_rope([mode.from_tensor(t) for t in qkvs],
                                                         [mode.from_tensor(t) for t in scales[:2]],
                                                         [mode.from_tensor(t) for t in scales[2:]],
                                                         mode.from_tensor(cos), mode.from_tensor(sin), heads)
        assert real.shape == fake.shape == (3, batch, heads, sum(lengths), head_dim)
        assert real.stride() == fake.stride() and real[0].transpose(1, 2).is_contiguous()

    def test_joint_qkv_norm_rope_fp8(self, device):
        from kontext_kernels import fp8_qkv

        # Text 5 tokens and image 37 with their own norm weights (one weight of the image key norm far
        # larger: it sets k's bound), batch 2, head dim 48 (a padded 64-wide tile); the image projection a
        # column slice of a wider one, as the single block's is.
        batch, heads, head_dim, lengths = 2, 3, 48, (5, 37)
        width = 3 * heads * head_dim
        image = _randn(batch, lengths[1], width + 40, dtype=torch.bfloat16, device=device, scale=1.5)[..., 40:]
        streams = [(_randn(batch, lengths[0], width, dtype=torch.bfloat16, device=device, scale=1.5), image)]
        norms = [_randn(head_dim, dtype=torch.bfloat16, device=device, scale=0.3, offset=1.0) for _ in range(4)]
        norms[3][7] = 4.0
        streams = [(streams[0][0], norms[0], norms[1]), (image, norms[2], norms[3])]
        cos, sin = _rope_tables(1, sum(lengths), head_dim, device)
        before = launches["joint_qkv_norm_rope_fp8"]
        *ours, work = fp8_qkv.joint_qkv_norm_rope_fp8(streams, cos, sin, heads)
        _assert_launched("joint_qkv_norm_rope_fp8", before)
        *reference, reference_work = fp8_qkv.joint_qkv_norm_rope_fp8_reference(streams, cos, sin, heads)
        written = [slot for slot in range(0, fp8_qkv.AMAX_S_OUT, 4) if slot not in (fp8_qkv.AMAX_Q, fp8_qkv.AMAX_K)]
        assert torch.allclose(work[written], reference_work[written], rtol=1e-6, atol=0)
        bounds = [max(norms[i].float().abs().max() for i in (0, 2)), max(norms[i].float().abs().max() for i in (1, 3))]
        for slot, bound in zip((fp8_qkv.DESCALE_Q, fp8_qkv.DESCALE_K), bounds):
            assert work[slot].item() == pytest.approx(bound.item() * head_dim**0.5 / 448, rel=1e-6)
        bf16 = fp8_qkv.qk_norm_rope.joint_qkv_norm_rope_reference(streams, cos, sin, heads)
        for name, x8, r8, x, slot in zip("qkv", ours, reference, bf16,
                                         (fp8_qkv.DESCALE_Q, fp8_qkv.DESCALE_K, fp8_qkv.DESCALE_V)):
            assert x8.dtype == torch.float8_e4m3fn and x8.is_contiguous() and x8.shape == x.shape
            if name == "v":
                assert torch.equal(x8.float(), r8.float())  # v is copied, then quantized as quantize_qkv does
                continue
            # q, k: both quantize float32 values computed in another order: a rare element lands on the
            # neighbouring e4m3 value, none further.
            ours_values = x8.float()
            _assert_e4m3_close(ours_values, r8.float(), exact=False)
            assert ours_values.abs().max() < 448, name  # the static range is never exceeded
            # And the dequantized values are the attention inputs to e4m3's precision (~2.6% RMS).
            assert rel_l2(ours_values * work[slot], x.float()) < 0.04, name

    def test_joint_qkv_norm_rope_fp8_zero_key_norm(self, device):
        # All-zero key-norm weights (k all zero): finite scales, k8 all zero, q unaffected.
        from kontext_kernels import fp8_qkv

        heads, head_dim = 2, 32
        qkv = _randn(1, 9, 3 * heads * head_dim, dtype=torch.bfloat16, device=device)
        query_norm = _randn(head_dim, dtype=torch.bfloat16, device=device, scale=0.2, offset=1.0)
        key_norm = torch.zeros(head_dim, dtype=torch.bfloat16, device=device)
        cos, sin = _rope_tables(1, 9, head_dim, device)
        before = launches["joint_qkv_norm_rope_fp8"]
        q8, k8, v8, work = fp8_qkv.joint_qkv_norm_rope_fp8([(qkv, query_norm, key_norm)], cos, sin, heads)
        _assert_launched("joint_qkv_norm_rope_fp8", before)
        assert torch.isfinite(work[: fp8_qkv.AMAX_S_OUT]).all()
        assert not k8.float().any() and q8.float().abs().max() > 1

    def test_quantize_qkv_for_fp8_attention(self, device):
        from kontext_kernels import fp8_qkv

        # q contiguous, k a [B, L, H, D]-ordered view, v a gapped view of a packed projection; head dim 48
        # pads to a 64-wide tile, 2 x 3 x 37 rows fill no 16-row tile.
        batch, heads, length, head_dim = 2, 3, 37, 48
        packed = _randn(batch, length, 3, heads, head_dim, dtype=torch.bfloat16, device=device, scale=2.0)
        q = packed[:, :, 0].transpose(1, 2).contiguous()
        k = packed[:, :, 1].contiguous().transpose(1, 2)
        v = packed.permute(2, 0, 3, 1, 4)[2] * 5
        before = launches["quantize_qkv"]
        *ours, work = fp8_qkv.quantize_qkv(q, k, v)
        _assert_launched("quantize_qkv", before)
        *reference, reference_work = fp8_qkv.quantize_qkv_reference(q, k, v)
        written = [slot for slot in range(0, fp8_qkv.AMAX_S_OUT, 4)]  # the slots cuDNN reads; it writes the rest
        assert torch.allclose(work[written], reference_work[written], rtol=1e-6, atol=0)
        for name, x8, r8 in zip("qkv", ours, reference):
            assert (x8.dtype == torch.float8_e4m3fn and x8.is_contiguous()
                    and x8.shape == (batch, heads, length, head_dim))
            assert torch.equal(x8.float(), r8.float()), name  # +0 and -0 alike

    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["e4m3", "int8"])
    @pytest.mark.parametrize("spare", [0, 24])
    @pytest.mark.parametrize("variant", ["quantize_rows", "gelu_quantize_rows", "concat_gelu_quantize_rows",
                                         "layernorm_modulate_quantize"])
    def test_row_quantization(self, device, variant, spare, dtype):
        # Rows of 100 and 37 + 100 values (no power of two), batch 2, the second input a column slice of a
        # wider projection as in the single block; one row far larger than the rest, one all zero.
        projection = _randn(2, 13, 160, dtype=torch.bfloat16, device=device, scale=3.0)
        projection[0, 4] *= 40
        projection[1, 7] = 0
        x = projection[..., 60:]
        shift, scale = _modulation_chunks(1, 100, torch.bfloat16, device)
        args = {"quantize_rows": (x,), "gelu_quantize_rows": (x,),
                "concat_gelu_quantize_rows": (_randn(2, 13, 37, dtype=torch.bfloat16, device=device), x),
                "layernorm_modulate_quantize": (x, shift, scale)}[variant]
        _check_rows(variant, args, rows=26, exact=variant == "quantize_rows", spare=spare, dtype=dtype)

    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["e4m3", "int8"])
    @pytest.mark.parametrize("variant", ["gelu_quantize_rows", "concat_gelu_quantize_rows"])
    def test_row_quantization_in_chunks(self, device, variant, dtype, monkeypatch):
        # 32-value chunks, so that rows of 37 and 100 take partial chunks and several passes; rows whose GELU
        # amax is not GELU(their largest value): one all below zero (largest |GELU| near x = -0.75), one of
        # small positive and negative values, for which the kernel takes its exact pass.
        from kontext_kernels import row_quant

        monkeypatch.setattr(row_quant, "ROW_CHUNK", 32)
        x = _randn(2, 13, 100, dtype=torch.bfloat16, device=device, scale=3.0)
        x[0, 2] = -x[0, 2].abs() - 0.2
        x[0, 3] = _randn(100, dtype=torch.bfloat16, device=device, scale=0.05)
        x[1, 5] = -0.75
        args = (_randn(2, 13, 37, dtype=torch.bfloat16, device=device), x) if variant.startswith("concat") else (x,)
        _check_rows(variant, args, rows=26, exact=False, dtype=dtype)

    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["e4m3", "int8"])
    @pytest.mark.parametrize("variant", ["quantize_rows", "gelu_quantize_rows"])
    def test_a_pair_of_inputs_in_one_launch_equals_two_launches(self, device, variant, dtype, monkeypatch):
        # The double block's two streams in one launch: 26 rows of a strided view and 7 rows of another tensor,
        # 100 values wide in 32-value chunks, with spare columns, the rows whose GELU amax needs the exact pass among
        # them; each stream's bytes and scales must equal its own launch's.
        from kontext_kernels import row_quant

        monkeypatch.setattr(row_quant, "ROW_CHUNK", 32)
        projection = _randn(2, 13, 160, dtype=torch.bfloat16, device=device, scale=3.0)
        x = projection[..., 60:]
        x[0, 2] = -x[0, 2].abs() - 0.2
        x[1, 5] = -0.75
        other = _randn(1, 7, 100, dtype=torch.bfloat16, device=device, scale=2.0)
        other[0, 3] *= 40
        before = launches[variant], launches["row_quantizer_pair"]
        stacked = getattr(row_quant, variant + "_stacked")(x, other, spare=3, dtype=dtype)
        assert (launches[variant], launches["row_quantizer_pair"]) == (before[0] + 1, before[1] + 1)
        for (data, scale), alone in zip(row_quant.split_stacked(stacked, x, other), (x, other)):
            expected, expected_scale = getattr(row_quant, variant)(alone, spare=3, dtype=dtype)
            assert data.shape == expected.shape and scale.shape == expected_scale.shape
            # 26 rows before other's: its scales start 104 bytes in, so the split copies them to where
            # torch._scaled_mm's row-wise scaling takes them.
            assert scale.data_ptr() % row_quant.SCALE_ALIGNMENT_BYTES == 0
            assert torch.equal(scale, expected_scale)
            assert torch.equal(data[..., :100].view(torch.uint8), expected[..., :100].view(torch.uint8))

    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["e4m3", "int8"])
    def test_a_pair_of_layernorm_modulations_in_one_launch_equals_two_launches(self, device, dtype):
        # Two streams' LayerNorm + modulation rows, each with its own shift and scale: two batches of 13 tokens
        # with a modulation row each (chunked views, as the model's), and one batch of 7 with a broadcast one;
        # spare columns; each stream's bytes and scales must equal its own launch's.
        from kontext_kernels import row_quant

        x = _randn(2, 13, 100, dtype=torch.bfloat16, device=device, scale=3.0)
        x[1, 4] *= 40
        shift, scale = _modulation_chunks(2, 100, torch.bfloat16, device)
        other = _randn(1, 7, 100, dtype=torch.bfloat16, device=device)
        other_shift, other_scale = _modulation_chunks(1, 100, torch.bfloat16, device)
        before = launches["layernorm_modulate_quantize"], launches["row_quantizer_pair"]
        stacked = row_quant.layernorm_modulate_quantize_stacked(x, shift, scale, other, other_shift, other_scale,
                                                                spare=3, dtype=dtype)
        assert (launches["layernorm_modulate_quantize"], launches["row_quantizer_pair"]) == (before[0] + 1,
                                                                                               before[1] + 1)
        for (data, row_scale), args in zip(row_quant.split_stacked(stacked, x, other),
                                           ((x, shift, scale), (other, other_shift, other_scale))):
            expected, expected_scale = row_quant.layernorm_modulate_quantize(*args, spare=3, dtype=dtype)
            assert data.shape == expected.shape and torch.equal(row_scale, expected_scale)
            assert torch.equal(data[..., :100].view(torch.uint8), expected[..., :100].view(torch.uint8))

    def test_stacked_rows_without_the_kernel_are_each_streams_rows_copied_together(self, device, monkeypatch):
        # Where the kernel cannot take both streams (here: switched off for them), the stacked forms quantize
        # each stream alone and copy the two into one buffer (the tests above take the one-launch form); rows of
        # two widths cannot share one and are refused.
        from kontext_kernels import row_quant

        x = _randn(2, 5, 64, dtype=torch.bfloat16, device=device, scale=3.0)
        other = _randn(1, 3, 64, dtype=torch.bfloat16, device=device)
        shift, scale = _modulation_chunks(2, 64, torch.bfloat16, device)
        other_shift, other_scale = _modulation_chunks(1, 64, torch.bfloat16, device)
        monkeypatch.setattr(row_quant, "enabled_for", lambda _x: False)
        before = launches["row_quantizer_pair"]
        cases = [(row_quant.quantize_rows_stacked(x, other, spare=2, dtype=torch.int8),
                  [row_quant.quantize_rows(rows, spare=2, dtype=torch.int8) for rows in (x, other)]),
                 (row_quant.gelu_quantize_rows_stacked(x, other, spare=2, dtype=torch.int8),
                  [row_quant.gelu_quantize_rows(rows, spare=2, dtype=torch.int8) for rows in (x, other)]),
                 (row_quant.layernorm_modulate_quantize_stacked(x, shift, scale, other, other_shift, other_scale,
                                                                spare=2, dtype=torch.int8),
                  [row_quant.layernorm_modulate_quantize(*args, spare=2, dtype=torch.int8)
                   for args in ((x, shift, scale), (other, other_shift, other_scale))])]
        assert launches["row_quantizer_pair"] == before
        for stacked, alone in cases:
            assert stacked[0].shape == (13, 66) and stacked[1].shape == (13, 1)
            for (data, row_scale), (expected, expected_scale) in zip(row_quant.split_stacked(stacked, x, other),
                                                                     alone):
                assert data.shape == expected.shape and torch.equal(row_scale, expected_scale)
                assert torch.equal(data[..., :64], expected[..., :64])
        with pytest.raises(ValueError, match="one width"):
            row_quant.quantize_rows_stacked(x, _randn(1, 3, 32, dtype=torch.bfloat16, device=device))

    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["e4m3", "int8"])
    @pytest.mark.parametrize("variant", ["gelu_quantize_rows", "concat_gelu_quantize_rows"])
    def test_gelu_through_tanh_approx(self, device, variant, dtype, monkeypatch):
        # The GPU's GELU form (row_quant.GELU_TANH_APPROX, inline PTX the interpreter cannot run), on rows long
        # enough for a mismatch rate to mean something, with the chunk test's awkward rows among them: scales
        # within TANH_APPROX_SCALE_RTOL, 8-bit values as the check step allows, and values no further from float64
        # GELU than the exact form's.
        from kontext_kernels import row_quant

        if device != "cuda":
            pytest.skip("tanh.approx is PTX: the interpreter runs the exp2 form")
        monkeypatch.setattr(row_quant, "ROW_CHUNK", 256)
        x = _randn(2, 64, 1000, dtype=torch.bfloat16, device=device, scale=2.0)
        x[0, 2] = -x[0, 2].abs() - 0.2
        x[0, 3] = _randn(1000, dtype=torch.bfloat16, device=device, scale=0.05)
        first = _randn(2, 64, 300, dtype=torch.bfloat16, device=device)
        args = (first, x) if variant.startswith("concat") else (x,)
        quantize = getattr(row_quant, variant)
        monkeypatch.setattr(row_quant, "GELU_ON_GPU", row_quant.GELU_TANH_APPROX)
        before = launches[variant]
        data, scale = quantize(*args, dtype=dtype)
        _assert_launched(variant, before)
        monkeypatch.setattr(row_quant, "GELU_ON_GPU", row_quant.GELU_EXP)
        exact_data, exact_scale = quantize(*args, dtype=dtype)
        ref_data, ref_scale = getattr(row_quant, variant + "_reference")(*args, dtype=dtype)

        assert torch.allclose(scale, ref_scale, rtol=row_quant.TANH_APPROX_SCALE_RTOL, atol=0)
        error = (kernel_check.int8_error if dtype == torch.int8 else kernel_check.e4m3_error)(data, ref_data)
        assert error <= kernel_check.EIGHT_BIT_MISMATCH_TOLERANCE
        parts = [t.double() for t in args]
        truth = torch.cat(parts[:-1] + [torch.nn.functional.gelu(parts[-1], approximate="tanh")], dim=-1)
        approx_error = rel_l2(data.double() * scale.view(*data.shape[:-1], 1).double(), truth)
        exact_error = rel_l2(exact_data.double() * exact_scale.view(*data.shape[:-1], 1).double(), truth)
        assert approx_error <= exact_error * 1.02 + 1e-6

    def test_int8_rounding_ties_to_even(self, device):
        # Rows whose scaled values land exactly on .5 (amax 127 makes the scale 1): rounded as torch.round.
        from kontext_kernels import row_quant

        x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49, -3.51, 0.0]],
                         device=device)
        data, scale = row_quant.quantize_rows(x, dtype=torch.int8)
        assert float(scale) == 1.0
        assert data.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 3, -4, 0]]

    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("shape", [(75, 100, 129), (3, 64, 200), (130, 48, 16), (300, 208, 520)], ids=str)
    def test_int8_linear(self, device, shape, bias):
        # No dimension a multiple of the tiles (M 75, N 129, K 100), a K that takes the unmasked loop, rows
        # fewer than a tile, and (on Hopper) partial TMA tiles in every dimension (K 208 = 128 + 80); against
        # the exact reference, bf16 out (float32 out too, which on Hopper the pointer kernel computes), fresh
        # random operands.
        from kontext_kernels import int8_gemm

        rows, k, n = shape
        data = torch.randint(-127, 128, (rows, k), dtype=torch.int8).to(device)
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8).to(device)
        scale = (torch.rand(rows, 1) * 1e-2 + 1e-4).to(device)
        weight_scale = (torch.rand(n) * 1e-2 + 1e-4).to(device)
        bias_values = _randn(n, dtype=torch.bfloat16, device=device) if bias else None
        before = launches["int8_linear"]
        out = int8_gemm.int8_linear(data, scale, weight, weight_scale, bias_values, torch.bfloat16)
        _assert_launched("int8_linear", before)
        reference = int8_gemm.int8_linear_reference(data, scale, weight, weight_scale, bias_values, torch.float32)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16
        assert rel_error(out, reference) <= TOLERANCE[torch.bfloat16]
        exact = int8_gemm.int8_linear(data, scale, weight, weight_scale, bias_values, torch.float32)
        assert rel_error(exact, reference) <= TOLERANCE[torch.float32]

    def test_int8_linear_partial_last_tile_group(self, device):
        # 2700 rows make 22 row blocks of 128 (11 of 256): the last group of 8 row blocks is partial (6 or 3
        # rows), with 8 or 4 column blocks, which a walk that indexes the group from the tile number alone
        # gets wrong. GPU only: the interpreter's 32-row tiles would take minutes.
        from kontext_kernels import int8_gemm

        if device == "cpu":
            pytest.skip("a GPU-sized problem (the interpreter runs the same pointer kernel at small sizes above)")
        data = torch.randint(-127, 128, (2700, 256), dtype=torch.int8, device=device)
        weight = torch.randint(-127, 128, (1000, 256), dtype=torch.int8, device=device)
        scale = torch.rand(2700, 1, device=device) * 1e-2 + 1e-4
        weight_scale = torch.rand(1000, device=device) * 1e-2 + 1e-4
        out = int8_gemm.int8_linear(data, scale, weight, weight_scale, None, torch.bfloat16)  # bf16: the TMA kernel
        reference = int8_gemm.int8_linear_reference(data, scale, weight, weight_scale, None, torch.float32)
        assert rel_error(out, reference) <= TOLERANCE[torch.bfloat16]  # a wrong tile would be far off

    def test_int8_linear_batched_rows_and_strided_weight(self, device):
        # [B, L, K] activations, a weight given as a column slice (made contiguous), per-tensor weight scale.
        from kontext_kernels import int8_gemm

        data = torch.randint(-127, 128, (2, 21, 96), dtype=torch.int8).to(device)
        weight = torch.randint(-127, 128, (40, 120), dtype=torch.int8).to(device)[:, 10:106]
        scale = (torch.rand(42, 1) * 1e-2).to(device)
        weight_scale = torch.tensor(3e-3, device=device)
        out = int8_gemm.int8_linear(data, scale, weight, weight_scale, None, torch.float32)
        reference = int8_gemm.int8_linear_reference(data, scale, weight, weight_scale, None, torch.float32)
        assert out.shape == (2, 21, 40) and rel_error(out, reference) <= TOLERANCE[torch.float32]

    def test_dequantize_output(self, device):
        from kontext_kernels import fp8_qkv

        o8 = _randn(2, 9, 3, 32, device=device, scale=100.0).to(torch.float8_e4m3fn).transpose(1, 2)
        work = torch.zeros(fp8_qkv.WORK_FLOATS, device=device)
        work[fp8_qkv.DESCALE_O] = 0.37
        before = launches["dequantize_output"]
        out = fp8_qkv.dequantize_output(o8, work, torch.bfloat16)
        _assert_launched("dequantize_output", before)
        reference = fp8_qkv.dequantize_output_reference(o8, work, torch.bfloat16)
        assert out.stride() == o8.stride() and rel_error(out, reference) <= TOLERANCE[torch.bfloat16]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_linear_gelu(self, device, dtype):
        from kontext_kernels import ffn

        # M = 75, N = 129, K = 100: no dimension a multiple of any tile size.
        x = _randn(3, 25, 100, dtype=dtype, device=device)
        weight = _randn(129, 100, dtype=dtype, device=device, scale=0.1)
        bias = _randn(129, dtype=dtype, device=device)
        before = launches["linear_gelu"]
        out = ffn.linear_gelu(x, weight, bias)
        _assert_launched("linear_gelu", before)
        assert out.shape == (3, 25, 129) and out.dtype == dtype
        assert rel_error(out, ffn.linear_gelu_reference(x, weight, bias)) <= TOLERANCE[dtype]

    def test_linear_gelu_even_k_transposed_weight_no_bias(self, device):
        from kontext_kernels import ffn

        # K = 64 takes the unmasked loop; a transposed weight view must be made contiguous.
        x = _randn(75, 64, device=device)
        weight = _randn(64, 129, device=device, scale=0.125).t()
        before = launches["linear_gelu"]
        out = ffn.linear_gelu(x, weight, None)
        _assert_launched("linear_gelu", before)
        assert rel_error(out, ffn.linear_gelu_reference(x, weight, None)) <= TOLERANCE[torch.float32]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("gate_batch", [1, 3], ids=["gate-batch-1", "gate-batch-B"])
    def test_linear_gated_residual(self, device, dtype, gate_batch):
        from kontext_kernels import ffn

        x = _randn(3, 25, 100, dtype=dtype, device=device)
        weight = _randn(129, 100, dtype=dtype, device=device, scale=0.1)
        bias = _randn(129, dtype=dtype, device=device)
        gate = _randn(gate_batch, 1, 129, dtype=dtype, device=device)
        residual = _randn(3, 25, 129, dtype=dtype, device=device)
        before = launches["linear_gated_residual"]
        out = ffn.linear_gated_residual(x, weight, bias, gate, residual)
        _assert_launched("linear_gated_residual", before)
        assert out.shape == residual.shape and out.dtype == dtype
        reference = ffn.linear_gated_residual_reference(x, weight, bias, gate, residual)
        assert rel_error(out, reference) <= TOLERANCE[dtype]

    def test_linear_gated_residual_strided_inputs(self, device):
        from kontext_kernels import ffn

        # x and residual as slices of wider tensors, gate a chunk of the modulation projection.
        x = _randn(2, 33, 150, device=device)[..., 10:110]
        weight = _randn(129, 100, device=device, scale=0.1)
        bias = _randn(129, device=device)
        gate = _randn(2, 1, 3 * 129, device=device).chunk(3, dim=-1)[2]
        residual = _randn(2, 33, 200, device=device)[..., 50:179]
        before = launches["linear_gated_residual"]
        out = ffn.linear_gated_residual(x, weight, bias, gate, residual)
        _assert_launched("linear_gated_residual", before)
        reference = ffn.linear_gated_residual_reference(x, weight, bias, gate, residual)
        assert rel_error(out, reference) <= TOLERANCE[torch.float32]

    def test_check_step_passes_at_small_sizes(self, device):
        results = kernel_check.run(device, kernel_check.SMALL)
        assert [r.name for r in results] == list(kernel_check.CASES)
        failed = [str(r) for r in results if not r.passed]
        assert not failed, failed

    def test_check_step_reports_wrong_kernels_and_fallbacks(self, device, monkeypatch):
        from kontext_kernels import ffn, modulation, row_quant

        # A kernel 5% off, a row quantizer with scales 1% off, and a "kernel" that is really its reference.
        real_modulate, real_quantize = modulation.layernorm_modulate, row_quant.quantize_rows
        monkeypatch.setattr(modulation, "layernorm_modulate", lambda *args: real_modulate(*args) * 1.05)
        monkeypatch.setattr(row_quant, "quantize_rows",
                            lambda x, **kw: (lambda data, scales: (data, scales * 1.01))(*real_quantize(x, **kw)))
        monkeypatch.setattr(ffn, "linear_gelu", ffn.linear_gelu_reference)
        results = {r.name: r for r in kernel_check.run(device, kernel_check.SMALL,
                                                       only=["layernorm_modulate", "quantize_rows", "linear_gelu"])}
        assert results["layernorm_modulate"].launched and results["layernorm_modulate"].error > 0.03
        assert results["quantize_rows"].launched and results["quantize_rows"].error == float("inf")
        assert not results["linear_gelu"].launched and results["linear_gelu"].error == 0
        assert not any(r.passed for r in results.values())

    def test_switched_off_runs_the_reference(self, device, monkeypatch):
        from kontext_kernels import modulation

        x = _randn(2, 5, 100, device=device)
        shift, scale = _modulation_chunks(2, 100, torch.float32, device)
        before = launches["layernorm_modulate"]
        try:
            kontext_kernels.set_enabled(False)
            assert not kontext_kernels.enabled_for(x)
            out = modulation.layernorm_modulate(x, shift, scale)
        finally:
            kontext_kernels.set_enabled(True)
        monkeypatch.setenv("KONTEXT_KERNELS", "0")
        assert not kontext_kernels.enabled_for(x)
        modulation.layernorm_modulate(x, shift, scale)
        assert launches["layernorm_modulate"] == before
        torch.testing.assert_close(out, modulation.layernorm_modulate_reference(x, shift, scale), rtol=0, atol=0)


def test_row_kernel_launch_shapes(monkeypatch):
    # The interpreter ignores num_warps, so only a GPU would reveal a bad launch (3 warps once): the
    # shapes chosen for each row width are checked here. (block width, interpreting) -> (rows, warps).
    from kontext_kernels import runtime

    expected = {(64, False): (32, 2), (192, False): (8, 1), (4096, False): (1, 4), (8192, False): (1, 8),
                (16384, False): (1, 8), (192, True): (64, 8), (20480, True): (1, 8)}
    for (block, interpreted), (rows, warps) in expected.items():
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
        got = runtime.rows_per_program(block)
        assert (got, runtime.row_warps(got * block)) == (rows, warps), (block, interpreted)


def test_cpu_tensors_use_the_references_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kontext_kernels.enabled_for(torch.randn(4))


def test_meta_tensors_never_go_to_the_interpreter(monkeypatch):
    # Shapes on the meta device (the full-size tests) have no data to run a kernel on, interpreter or not.
    from kontext_kernels import runtime

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kontext_kernels.enabled_for(torch.randn(4)) == runtime.switched_on()
    meta = torch.empty(4, device="meta")
    assert not kontext_kernels.enabled_for(meta) and not runtime.enabled_for_traced(meta)


def test_import_and_fallback_without_triton():
    # A fresh interpreter where `import triton` fails, as on a machine without it.
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kontext_kernels\n"
        "assert not kontext_kernels.triton_available()\n"
        "x = torch.randn(2, 7, 16); shift, scale = torch.randn(2, 1, 16), torch.randn(2, 1, 16)\n"
        "assert not kontext_kernels.enabled_for(x)\n"
        "torch.testing.assert_close(kontext_kernels.layernorm_modulate(x, shift, scale),\n"
        "                           kontext_kernels.layernorm_modulate_reference(x, shift, scale))\n"
        "w, b = torch.randn(24, 16), torch.randn(24)\n"
        "torch.testing.assert_close(kontext_kernels.linear_gelu(x, w, b), "
        "kontext_kernels.linear_gelu_reference(x, w, b))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("case", list(kernel_check.CASES))
def test_full_size_on_the_gpu(case):
    # The benchmark's check step for one kernel at FLUX.1 [dev]'s sizes (kontext_kernels/check.py states the measures).
    (result,) = kernel_check.run("cuda", kernel_check.FULL, only=[case])
    assert result.passed, str(result)
