"""Our 8-bit attention (kontext_kernels/sage_attention.py: int8 Q·Kᵀ, e4m3 or fp16 P·V) against its PyTorch
reference and against exact attention, and the attention backend 'sage8' that runs it.

On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) at small awkward sizes (token counts
no tile divides, batch 2, 3 heads, head dims 64, 128 and 48); on a GPU the same tests run compiled, plus one at
FLUX's full size. Every test checks the launch counters, so that a silent fallback to the reference cannot pass.

Tolerances:
- quantization: bit-exact (the kernels and the reference round the same float32 values the same way; K's mean
  comes from exact float64 sums either way);
- the attention kernel against the reference on the same quantized operands, float32 outputs: rel_error
  (max|diff| / max|reference|) <= 2e-3 (measured ~2e-7 under the interpreter: exp2's last bits, summation order,
  and the e4m3 roundings of P that those flip; the GPU's exp2 is approximate);
- against exact attention (float64), rel L2, with q and k unit-RMS per row (as after QK-norm) and v ~ N(0, 1):
  e4m3 P·V <= 5%: rounding P and V to 3 mantissa bits costs ~2.6% each, which attention's averages keep (the
  rounding errors average down as fast as the output does), ~3.7% together, plus ~1% from int8 Q·Kᵀ: measured
  3.4-3.8%; fp16 P·V <= 2%: int8 Q·Kᵀ alone, 0.8-1.1% measured at these sizes (and 0.93% at [1, 2, 2048, 128]).
  The interpreter's float32 -> bf16 conversion truncates instead of rounding (~0.4% more with bf16 outputs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention_cases import (FP8_BOUND, FP16_BOUND, GPU_KERNEL_VS_REFERENCE, KERNEL_VS_REFERENCE,
                             assert_operands_equal, attention_inputs, eager_and_compiled, exact_attention)
from conftest import kernel_device, kernels_built_for, rel_error, rel_l2
from kontext_kernels.runtime import launches, triton_available


def kernel_bound(device: str) -> float:
    return KERNEL_VS_REFERENCE if device == "cpu" else GPU_KERNEL_VS_REFERENCE


@pytest.fixture(scope="module", params=["interpreter", "cuda"])
def device(request) -> str:
    """Where the kernels run: Triton's CPU interpreter, and compiled on a GPU (kernel modules rebuilt for each)."""
    with kernel_device(request.param) as device:
        yield device


def _launched(name: str, before: int) -> None:
    assert launches[name] > before, f"{name} fell back to its reference instead of running the Triton kernel"


def _fp8_modes(device: str) -> list[bool]:
    """P·V modes this device runs: fp16 everywhere, e4m3 where there are fp8 tensor cores (or the interpreter)."""
    from kontext_kernels import sage_attention as sa

    return [False, True] if sa.fp8_tensor_cores(torch.device(device)) else [False]


SHAPES = [  # (batch, heads, length_q, length_k, head_dim)
    (2, 3, 150, 150, 64),
    (1, 2, 77, 77, 128),
    (1, 3, 70, 201, 64),   # cross lengths: 70 queries over 201 keys
    (1, 2, 129, 129, 48),  # head dim 48, padded to 64
]


class TestKernels:
    @pytest.mark.parametrize("q_rows, k_rows", [(1, 1), (128, 128), (16, 64)])
    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_quantization_is_bit_exact(self, device, shape, q_rows, k_rows):
        from kontext_kernels import sage_attention as sa

        batch, heads, length_q, length_k, head_dim = shape
        q, k, v = attention_inputs(batch, heads, length_q, length_k, head_dim, device)
        k = k + 0.3  # an offset shared by every key, which the centring removes
        for fp8_pv in _fp8_modes(device):
            before = launches["sage_quantize"]
            ours = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv, q_rows=q_rows, k_rows=k_rows)
            _launched("sage_quantize", before)
            reference = sa.quantize_operands_reference(q, k, v, fp8_pv=fp8_pv, q_rows=q_rows, k_rows=k_rows,
                                                       permute_keys=ours.keys_permuted)
            assert_operands_equal(ours, reference)
            assert ours.v8t.dtype == (torch.float8_e4m3fn if fp8_pv else torch.float16)

    def test_keys_in_the_hopper_kernels_order(self, device):
        # k8's rows permuted within each 128-token tile (sage_attention.key_tokens): bit-exact against the reference's
        # permutation of its own operands, the same attention as keys in token order, and no other operand moved.
        from kontext_kernels import sage_attention as sa

        tile = torch.arange(128)
        assert sorted(sa.key_tokens(tile).tolist()) == tile.tolist()
        assert torch.equal(sa.key_positions(sa.key_tokens(tile)), tile)
        q, k, v = attention_inputs(2, 3, 150, 300, 64, device)
        permuted = sa.quantize_operands(q, k, v, permute_keys=True)
        plain = sa.quantize_operands(q, k, v, permute_keys=False)
        assert permuted.keys_permuted and not plain.keys_permuted
        reference = sa.quantize_operands_reference(q, k, v, permute_keys=True)
        assert torch.equal(permuted.k8, reference.k8)
        assert not torch.equal(permuted.k8, plain.k8)
        assert torch.equal(sa.keys_in_token_order(permuted).k8, plain.k8)
        for name in ("q8", "q_scale", "k_scale", "v8t", "v_scale"):
            assert torch.equal(getattr(permuted, name).float(), getattr(plain, name).float()), name
        assert torch.equal(sa.attend_reference(permuted, torch.float32), sa.attend_reference(plain, torch.float32))
        # Wherever the kernels run, permuted operands give the same attention (the Triton-language kernel reads them
        # back in token order).
        out = sa._launch_attention(permuted, torch.float32, kernel="triton")
        assert rel_error(out, sa.attend_reference(plain, torch.float32, block_n=sa.last_config["BLOCK_N"])) <= \
            kernel_bound(device)
        with pytest.raises(ValueError, match="needs one k scale per tile"):
            sa.quantize_operands(q, k, v, k_rows=1, permute_keys=True)

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_attention_kernel_matches_reference(self, device, shape):
        from kontext_kernels import sage_attention as sa

        batch, heads, length_q, length_k, head_dim = shape
        q, k, v = attention_inputs(batch, heads, length_q, length_k, head_dim, device)
        for fp8_pv in _fp8_modes(device):
            operands = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv)
            before = launches["sage_attention"]
            out = sa.attend(operands, torch.float32)
            _launched("sage_attention", before)
            assert out.shape == (batch, heads, length_q, head_dim) and out.transpose(1, 2).is_contiguous()
            reference = sa.attend_reference(operands, torch.float32, block_n=sa.last_config["BLOCK_N"])
            assert rel_error(out, reference) <= kernel_bound(device), fp8_pv

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_error_against_exact_attention(self, device, shape):
        from kontext_kernels import sage_attention as sa

        batch, heads, length_q, length_k, head_dim = shape
        q, k, v = attention_inputs(batch, heads, length_q, length_k, head_dim, device)
        exact = exact_attention(q, k, v)
        for fp8_pv in _fp8_modes(device):
            before = launches["sage_attention"]
            out = sa.sage_attention(q, k, v, fp8_pv=fp8_pv)
            _launched("sage_attention", before)
            assert out.dtype == q.dtype and out.shape == q.shape
            error = rel_l2(out, exact)
            print(f"{shape} P·V {'e4m3' if fp8_pv else 'fp16'}: rel L2 {error:.4f}")
            assert error <= (FP8_BOUND if fp8_pv else FP16_BOUND)

    @pytest.mark.parametrize("block_m, block_n", [(64, 64), (128, 128), (128, 64), (64, 128)])
    def test_tile_shapes_tma_and_accumulators_agree(self, device, block_m, block_n):
        # The GPU configs' tile shapes, through TMA descriptors (Hopper's loads; the interpreter reads them too) and
        # pointers, with a fresh accumulator per key block or one across them: all the same attention, each equal
        # to the reference at its key-block width.
        from kontext_kernels import sage_attention as sa

        if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("TMA needs a Hopper GPU")
        q, k, v = attention_inputs(2, 3, 150, 150, 64, device)
        for fp8_pv in _fp8_modes(device):
            operands = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv)
            config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8 if block_m == 128 else 4}
            outs = [sa._launch_attention(operands, torch.float32, config=config, tma=tma, split_accumulator=split)
                    for tma, split in ((False, True), (True, True), (True, False))]
            assert sa.last_config["tma"] and sa.last_config["BLOCK_N"] == block_n
            reference = sa.attend_reference(operands, torch.float32, block_n=block_n)
            for out in outs:
                assert rel_error(out, reference) <= kernel_bound(device), fp8_pv
            # Under the interpreter the accumulations are exact float32 either way; Hopper's e4m3 MMAs accumulate in
            # fewer bits (module docstring), so on a GPU the last bits differ.
            assert rel_error(outs[1], outs[0]) <= (0 if device == "cpu" else kernel_bound(device))

    @pytest.mark.parametrize("k_rows", [128, 1])
    def test_score_conversions_agree(self, device, k_rows):
        # The two ways the kernel turns its int32 dots into scores (sage_attention.SCORES_*). 300 keys: two whole
        # 128-key blocks (where the folded bias applies) and a masked rest; k scales per block and per key (which
        # takes the exact path). A large shared q factor (scores spanning ~40 in log2 units) would show an
        # exponent rounded by more than the documented half ulp of 1.5 * 2**23 * scale.
        from kontext_kernels import sage_attention as sa

        q, k, v = attention_inputs(1, 2, 300, 300, 64, device)
        q = q * 4.0
        for fp8_pv in _fp8_modes(device):
            operands = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv, k_rows=k_rows)
            config = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4}
            outs = {scores: sa._launch_attention(operands, torch.float32, config=config, scores=scores)
                    for scores in (sa.SCORES_CONVERT, sa.SCORES_FOLDED)}
            assert sa.last_config["scores"] == sa.SCORES_FOLDED
            for scores, out in outs.items():
                reference = sa.attend_reference(operands, torch.float32, block_n=128, scores=scores)
                assert rel_error(out, reference) <= kernel_bound(device), (fp8_pv, scores)
            # The folded bias moves each row's max by up to ~5e-4 (log2 units) here, which scales that row's P alike
            # and moves some across an e4m3 rounding boundary: a different rounding of the same softmax, as close to
            # exact attention.
            exact = exact_attention(q, k, v)
            converted_error = rel_l2(outs[sa.SCORES_CONVERT], exact)
            assert rel_l2(outs[sa.SCORES_FOLDED], exact) <= converted_error * 1.05 + 1e-4, fp8_pv

    def test_shared_key_offset_costs_no_precision(self, device):
        # softmax(q·(k + c)) = softmax(q·k): the kernel centres k on its mean, so a large offset common to every
        # key (float32 inputs: exact) gives the same int8 keys and the same attention.
        from kontext_kernels import sage_attention as sa

        q, k, v = attention_inputs(1, 2, 150, 150, 64, device, dtype=torch.float32, packed=False)
        offset = 8.0 * torch.randn(1, 2, 1, 64).to(device)
        plain = sa.sage_attention(q, k, v, fp8_pv=False)
        shifted = sa.sage_attention(q, k + offset, v, fp8_pv=False)
        assert rel_l2(shifted, plain) < 1e-3
        assert rel_l2(plain, exact_attention(q, k, v)) <= FP16_BOUND

    @pytest.mark.parametrize("backend", ["sage8", "sage8-fp16"])
    def test_attention_backends(self, device, backend):
        # attention.py's entry point with backend 'sage8' / 'sage8-fp16': the registered op runs the kernel (P·V in
        # e4m3 where the device has fp8 tensor cores, or in fp16) and the result is laid out [B, L, H*D] as the
        # model's projection wants it.
        from kontext_kernels import sage_attention as sa
        from kontext_core import get_attention_backend, set_attention_backend
        from kontext_core.compute import attention

        q, k, v = attention_inputs(2, 3, 100, 100, 64, device)
        fp8_pv = backend == "sage8" and sa.fp8_tensor_cores(q.device)
        before_backend = get_attention_backend()
        try:
            set_attention_backend(backend)
            before = launches["sage_attention"]
            out = attention.attention(q, k, v)
            assert launches["sage_attention"] == before + 1
        finally:
            set_attention_backend(before_backend)
        assert out.shape == (2, 100, 3 * 64) and out.dtype == q.dtype
        expected = sa.sage_attention(q, k, v, fp8_pv=fp8_pv).transpose(1, 2).reshape(2, 100, 3 * 64)
        assert torch.equal(out, expected)
        bound = FP8_BOUND if fp8_pv else FP16_BOUND
        assert rel_l2(out, exact_attention(q, k, v).transpose(1, 2).reshape(2, 100, 3 * 64)) <= bound

    def test_tiny_model_with_sage8_compiled_and_eager(self, device):
        # The whole tiny model (head dim 64, 82 tokens) with backend 'sage8': every block's attention runs the
        # kernel, inside compiled blocks too (an opaque op), and the velocity stays near the exact backend's.
        from conftest import randomize_, tiny_edit_args
        from kontext_core import KontextTransformer, TransformerConfig, set_attention_backend

        model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=8).to(device, torch.bfloat16).eval()
        args = tiny_edit_args(1, torch.bfloat16, device)
        try:
            with torch.no_grad():
                reference = model.velocity(*args)
            set_attention_backend("sage8")
            eager, compiled = eager_and_compiled(model, args, device, "sage_attention")
        finally:
            set_attention_backend("auto")
        error = rel_l2(eager, reference)
        print(f"tiny model, sage8 vs default attention: velocity rel L2 {error:.4f}")
        # Measured 0.5-1.5%; per-call errors (above) of up to 5% in 4 blocks that also add residuals.
        assert 1e-4 < error < 0.05
        assert rel_l2(compiled, eager) < 2e-2


@pytest.mark.parametrize("fp8_pv", [True, False], ids=["e4m3", "fp16"])
def test_rounded_row_sums_make_the_weights_add_up_to_one(fp8_pv):
    # Every key has the same value row: exact attention returns that row. Normalised by the sums of P as P·V takes it
    # (the Hopper kernel's tensor-core row sums), the weights add up to one and the reference returns the row as V's
    # 8-bit form holds it, to float32's rounding; normalised by the float32 sums, P's rounding (~2.6% a value in
    # e4m3) moves every output by the ratio of the two sums.
    from kontext_kernels import sage_attention as sa

    q, k, v = attention_inputs(2, 3, 150, 300, 64, "cpu", dtype=torch.float32, packed=False)
    v = v[:, :, :1].expand_as(v).contiguous()
    operands = sa.quantize_operands_reference(q, k, v, fp8_pv=fp8_pv)
    held = (operands.v8t[..., :1].float() * operands.v_scale[..., None]).transpose(2, 3)[..., :64]  # [B, H, 1, D]
    rounded = sa.attend_reference(operands, torch.float32, rounded_row_sums=True)
    assert rel_error(rounded, held.expand_as(rounded)) <= 1e-5
    unrounded = sa.attend_reference(operands, torch.float32)
    if fp8_pv:
        assert rel_error(unrounded, held.expand_as(unrounded)) > 1e-4
    # Either way the reference stays as close to exact attention as test_error_against_exact_attention asks.
    exact = exact_attention(q, k, v)
    assert rel_l2(rounded, exact) <= (FP8_BOUND if fp8_pv else FP16_BOUND)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_full_flux_shape_on_the_gpu():
    # [1, 24, 8704, 128] as the edit step has it; the exact reference in float64 over four heads (0.6 GB each).
    from kontext_kernels import sage_attention as sa

    with kernels_built_for("cuda"):
        q, k, v = attention_inputs(1, 24, 8704, 8704, 128, "cuda", packed=False)
        before = launches["sage_attention"]
        out = sa.sage_attention(q, k, v)
        _launched("sage_attention", before)
        heads = slice(0, 4)
        exact = exact_attention(q[:, heads], k[:, heads], v[:, heads])
        bf16 = F.scaled_dot_product_attention(q, k, v)
        error, bf16_error = rel_l2(out[:, heads], exact), rel_l2(bf16[:, heads], exact)
        fp8_pv = sa.fp8_tensor_cores(q.device)
        print(f"full shape, P·V {'e4m3' if fp8_pv else 'fp16'}: rel L2 {error:.4f} (bf16 SDPA {bf16_error:.4f})")
        assert error <= (FP8_BOUND if fp8_pv else FP16_BOUND)
        operands = sa.quantize_operands(q, k, v, fp8_pv=fp8_pv)
        kernel = sa.attend(operands, torch.float32)
        reference = sa.attend_reference(operands, torch.float32, block_n=sa.last_config["BLOCK_N"])
        assert rel_error(kernel, reference) <= GPU_KERNEL_VS_REFERENCE


def test_refusals_say_why_and_what_to_do(monkeypatch):
    from kontext_kernels import sage_attention as sa
    from kontext_core import get_attention_backend, set_attention_backend
    from kontext_core.compute.attention import sage_unavailable_reason

    with pytest.raises(ValueError, match="head dims up to 256, got 320; choose attention backend 'auto'"):
        sa.sage_attention(*(torch.randn(1, 2, 8, 320) for _ in range(3)))
    with pytest.raises(ValueError, match="mismatched shapes"):
        sa.sage_attention(torch.randn(1, 2, 8, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 8, 64))
    with pytest.raises(ValueError, match="tokens per scale must be one of"):
        sa.sage_attention(*(torch.randn(1, 2, 8, 64) for _ in range(3)), k_rows=3)
    monkeypatch.setenv("KONTEXT_KERNELS", "0")
    assert "switched off" in sage_unavailable_reason()
    monkeypatch.delenv("KONTEXT_KERNELS")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = sage_unavailable_reason()
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) and triton_available():
        assert reason is None
        return
    before = get_attention_backend()
    for backend in ("sage8", "sage8-fp16"):
        reason = f"'{backend}' cannot run here: .*(GPU|Triton|switched off).*; or choose"
        with pytest.raises(RuntimeError, match=reason):
            set_attention_backend(backend)
    assert get_attention_backend() == before


def test_attention_calls_the_registered_op(monkeypatch):
    # The backend goes through `kontext::sage_attention`, so compiled blocks see one opaque op rather than tracing
    # into the Triton launches.
    from kontext_core.compute import attention

    calls = []
    monkeypatch.setattr(attention, "_backend", "sage8")
    monkeypatch.setattr(attention._kernel_runtime, "enabled_for_traced", lambda tensor: True)
    monkeypatch.setattr(torch.ops.kontext, "sage_attention", lambda q, k, v, fp16_pv: calls.append(fp16_pv) or q)
    q = torch.randn(1, 2, 16, 8)
    out = attention.attention(q, q, q)
    monkeypatch.setattr(attention, "_backend", "sage8-fp16")
    attention.attention(q, q, q)
    assert calls == [False, True] and out.shape == (1, 16, 16)
