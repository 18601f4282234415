"""sage8's operands made in the QK-norm + RoPE pass (kontext_kernels/sage_qkv.py) against the unfused path: the
QK-norm + RoPE kernel, then sage_attention.quantize_operands. Bit for bit: both round the same float32 values the
same way, and K's sums are exact float64 sums, whatever the atomics' order. (The frozen pass reads q and k as
channel pairs and sums their norms in another order: one int8 step apart at most, at rounding boundaries.) Under
Triton's interpreter on the CPU and compiled on a GPU; fresh random projections each run.
"""

from __future__ import annotations

import pytest
import torch

from attention_cases import assert_operands_close, assert_operands_equal, eager_and_compiled
from conftest import kernel_device, tiny_edit_args
from kontext_kernels.runtime import launches


@pytest.fixture(scope="module", params=["interpreter", "cuda"])
def device(request) -> str:
    with kernel_device(request.param) as device:
        yield device


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
            assert_operands_equal(fused, sa.quantize_operands(q, k, v, fp8_pv=fp8_pv, permute_keys=permute))


def test_head_dims_the_fused_pass_does_not_take(device):
    # 16 channels pad to 32 in the operands (an int8 dot's depth): wider than the kernel's tile. The joint attention
    # and its operator then take the unfused route (QK-norm + RoPE, then sage8), with its result bit for bit.
    from kontext_core.compute import attention  # noqa: F401  (defines the kontext:: operators)
    from kontext_kernels import qk_norm_rope, sage_attention as sa, sage_qkv

    streams, cos, sin = _streams(1, (8, 21), 2, 16, device)
    assert not sage_qkv.runs_fused(streams, 2)
    q, k, v = qk_norm_rope.joint_qkv_norm_rope(streams, cos, sin, 2)
    for fp8_pv in ([True, False] if device == "cpu" or sa.fp8_tensor_cores(torch.device(device)) else [False]):
        unfused = sa.sage_attention(q, k, v, fp8_pv=fp8_pv)
        assert torch.equal(sage_qkv.joint_sage_attention(streams, cos, sin, 2, fp8_pv=fp8_pv), unfused)
        through_op = torch.ops.kontext.sage_joint_attention([s[0] for s in streams], [s[1] for s in streams],
                                                            [s[2] for s in streams], cos, sin, 2, not fp8_pv)
        assert torch.equal(through_op, unfused)


def test_the_model_with_the_fused_pass_equals_the_unfused_one(device, tiny_transformer, monkeypatch):
    # The sage8 backend in every block of a tiny model, the fused pass on (it is off by default) and off; and in
    # compiled blocks, where the pass is one opaque op (the compiler's own fusions elsewhere round differently on
    # the GPU: bounded as tests/kernels/test_sage_attention.py bounds compiled against eager).
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


# Frozen statistics: the whole of sage8's operands in the one pass, from K's mean and V's amax of an earlier step.

@pytest.mark.parametrize("batch, lengths, heads, head_dim", [(1, (128, 150), 3, 64), (2, (70,), 2, 128),
                                                             (1, (128, 256, 51), 2, 48)], ids=str)
def test_frozen_operands_match_the_reference_with_those_statistics(device, batch, lengths, heads, head_dim):
    # Statistics recorded on other projections (a stale step): K offset elsewhere, V at 0.3 of the scale, so that
    # with V_MARGIN = 2 some of V saturates at e4m3's 448 (the reference clamps the same way).
    from kontext_kernels import qk_norm_rope, sage_attention as sa, sage_qkv

    stale, cos, sin = _streams(batch, lengths, heads, head_dim, device)
    stale = [(qkv.unflatten(2, (3, heads, head_dim)) * torch.tensor([1.0, 1.0, 0.3], device=device)[:, None, None])
             .flatten(2).to(qkv.dtype) for qkv, _, _ in stale]
    streams, _, _ = _streams(batch, lengths, heads, head_dim, device)
    stale = [(qkv, q_scale, k_scale) for qkv, (_, q_scale, k_scale) in zip(stale, streams)]
    assert sage_qkv.runs_frozen(streams, heads, fp8_pv=True)
    _, statistics = sage_qkv.record_sage_operands(stale, cos, sin, heads, fp8_pv=True)
    q, k, v = qk_norm_rope.joint_qkv_norm_rope(streams, cos, sin, heads)
    saturated = (v.float().abs() > statistics.v_amax[:, :, None, :head_dim]).sum().item()
    assert saturated > 0  # the clamp is exercised
    for permute in (False, True):
        before = launches["frozen_sage_qkv"]
        frozen = sage_qkv.frozen_sage_operands(streams, cos, sin, heads, statistics, permute_keys=permute)
        assert launches["frozen_sage_qkv"] == before + 1
        reference = sa.quantize_operands_reference(q, k, v, fp8_pv=True, permute_keys=permute,
                                                   statistics=statistics.reference_statistics())
        # Read as channel pairs, q's and k's norms add their squares in another order: a last-bit difference.
        assert_operands_close(frozen, reference)


def test_recording_gives_the_unfused_operands_and_their_statistics(device):
    from kontext_kernels import qk_norm_rope, sage_attention as sa, sage_qkv

    heads, head_dim = 2, 64
    streams, cos, sin = _streams(2, (128, 77), heads, head_dim, device)
    q, k, v = qk_norm_rope.joint_qkv_norm_rope(streams, cos, sin, heads)
    operands, statistics = sage_qkv.record_sage_operands(streams, cos, sin, heads, fp8_pv=True, permute_keys=True)
    assert_operands_equal(operands, sa.quantize_operands(q, k, v, fp8_pv=True, permute_keys=True))
    k_sum, v_amax = sa.column_stats_reference(k, v)
    expected = sage_qkv.FrozenStatistics.of(k_sum.to(device), v_amax.to(device), k.shape[2])
    for name, mine, theirs in zip(sage_qkv.FrozenStatistics._fields, statistics, expected):
        assert torch.equal(mine, theirs), name
    # Statistics of the very tokens being quantized: only V's scale differs from the unfused operands (V_MARGIN),
    # up to the channel pairs' last-bit rounding in q and k.
    frozen = sage_qkv.frozen_sage_operands(streams, cos, sin, heads, statistics, permute_keys=True)
    assert_operands_close(frozen._replace(v8t=operands.v8t, v_scale=operands.v_scale), operands)


def test_frozen_attention_stays_within_sage8s_bound_on_a_later_step(device):
    # The statistics of one step, used on the next: the projection moved by 20% of its scale (a denoising step
    # moves it less). The attention must stay within the bound the sage8 tests give e4m3 P·V (attention_cases).
    from attention_cases import FP8_BOUND, exact_attention
    from kontext_kernels import qk_norm_rope, sage_attention as sa, sage_qkv

    heads, head_dim = 2, 128
    earlier, cos, sin = _streams(1, (128, 200), heads, head_dim, device)
    later = [(qkv + (0.2 * torch.randn(qkv.shape)).to(qkv), q_scale, k_scale) for qkv, q_scale, k_scale in earlier]
    _, statistics = sage_qkv.record_sage_operands(earlier, cos, sin, heads, fp8_pv=True)
    out = sa.attend(sage_qkv.frozen_sage_operands(later, cos, sin, heads, statistics), torch.bfloat16)
    q, k, v = qk_norm_rope.joint_qkv_norm_rope(later, cos, sin, heads)
    exact = exact_attention(q, k, v)
    assert (out.double() - exact).norm() <= FP8_BOUND * exact.norm()


def test_streams_the_frozen_pass_does_not_take(device):
    from kontext_kernels import sage_qkv

    streams, _, _ = _streams(1, (100, 28), 2, 64, device)  # the first stream ends inside a 128-token tile
    assert not sage_qkv.runs_frozen(streams, 2, fp8_pv=True)
    streams, _, _ = _streams(1, (128, 28), 2, 64, device)
    assert sage_qkv.runs_frozen(streams, 2, fp8_pv=True)
    assert not sage_qkv.runs_frozen(streams, 2, fp8_pv=False)  # fp16 P·V: k scales per token
    # q and k are read as 32-bit channel pairs: not from float32 projections.
    assert not sage_qkv.runs_frozen([(qkv.float(), *scales) for qkv, *scales in streams], 2, fp8_pv=True)


def test_frozen_pass_takes_a_projection_that_starts_mid_word(device):
    # One bf16 value into its storage, q's and k's channel pairs straddle 32-bit words: the pass reads a copy.
    from kontext_kernels import sage_qkv

    streams, cos, sin = _streams(1, (128, 60), 2, 64, device)
    _, statistics = sage_qkv.record_sage_operands(streams, cos, sin, 2, fp8_pv=True)
    (qkv, *scales), last = streams
    shifted = torch.empty(qkv.numel() + 1, dtype=qkv.dtype, device=device)[1:].view(qkv.shape).copy_(qkv)
    assert shifted.storage_offset() == 1
    aligned = sage_qkv.frozen_sage_operands(streams, cos, sin, 2, statistics)
    assert_operands_equal(sage_qkv.frozen_sage_operands([(shifted, *scales), last], cos, sin, 2, statistics),
                          aligned)


def _edit_args_with_text(batch: int, text_tokens: int, device: str, dtype: torch.dtype = torch.bfloat16) -> tuple:
    """tiny_edit_args with `text_tokens` text tokens: 128 makes the double blocks' text stream a whole tile, so that
    they take the frozen pass too (with 7 only the single blocks do)."""
    args = list(tiny_edit_args(batch, dtype, device))
    args[2] = torch.randn(batch, text_tokens, args[2].shape[-1]).to(device, dtype)
    args[3] = torch.zeros(batch, text_tokens, 3, device=device)
    return tuple(args)


def test_model_records_then_reuses_the_statistics(device, tiny_transformer):
    # "record" is the unfused sage8 path bit for bit; "reuse" on the next step's input (the latent moved) is one
    # frozen pass a block, eager and compiled, and stays as close to exact attention as sage8 itself.
    from kontext_core import set_attention_backend
    from kontext_core.compute import attention

    model = tiny_transformer.to(device, torch.bfloat16)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    first = _edit_args_with_text(1, 128, device)
    later = (first[0] + 0.1 * torch.randn(first[0].shape).to(first[0]),) + first[1:]
    previous = attention.get_attention_backend()
    attention.forget_frozen_statistics()
    try:
        with torch.no_grad():
            set_attention_backend("sdpa")
            exact = model.velocity(*later).double()
            set_attention_backend("sage8")
            unfused_first, unfused_later = model.velocity(*first), model.velocity(*later)
            before = launches["frozen_sage_qkv"]
            with attention.frozen_statistics("record"):
                recorded = model.velocity(*first)
            assert launches["frozen_sage_qkv"] == before
            with attention.frozen_statistics("reuse"):
                reused, compiled = eager_and_compiled(model, later, device, "frozen_sage_qkv")
    finally:
        set_attention_backend(previous)
        attention.forget_frozen_statistics()
    assert torch.equal(recorded, unfused_first)
    sage8_error = (unfused_later.double() - exact).norm()
    # On the CPU (three runs) the frozen run's error against exact attention was 0.99-1.06x the unfused one's
    # (~0.6% of the velocity).
    assert (reused.double() - exact).norm() <= 1.5 * sage8_error
    assert (compiled.double() - reused.double()).norm() <= 2e-2 * reused.double().norm()
    assert blocks == 4


def test_sampler_records_every_refresh_steps(device, tiny_transformer):
    from kontext_core import set_attention_backend
    from kontext_core.compute import attention
    from kontext_core.sampling import TextConditioning, sample_euler

    model = tiny_transformer.to(device, torch.bfloat16)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    img, ids, txt, _, _, y, _, ctx, ctx_ids = _edit_args_with_text(1, 128, device)
    cond = TextConditioning(txt, y)
    steps = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]  # five steps
    previous = attention.get_attention_backend()
    set_attention_backend("sage8")
    runs = {}
    try:
        with torch.no_grad():
            for refresh in (0, 1, 2):
                attention.forget_frozen_statistics()
                frozen, quantized = launches["frozen_sage_qkv"], launches["sage_quantize"]
                runs[refresh] = sample_euler(model, img.float(), ids, cond, steps, context=ctx, context_ids=ctx_ids,
                                             attention_statistics_refresh=refresh)
                counts = (launches["frozen_sage_qkv"] - frozen, launches["sage_quantize"] - quantized)
                recorded = 0 if refresh == 0 else len(range(0, 5, refresh))
                reused = 0 if refresh == 0 else 5 - recorded
                assert counts == (reused * blocks, (5 - reused) * blocks), refresh
    finally:
        set_attention_backend(previous)
        attention.forget_frozen_statistics()
    assert torch.equal(runs[1], runs[0])  # recording every step is the unfused path
    assert not torch.equal(runs[2], runs[0])
    assert (runs[2] - runs[0]).norm() <= 2e-2 * runs[0].norm()
    with pytest.raises(ValueError, match="attention_statistics_refresh"):
        sample_euler(model, img.float(), ids, cond, steps, attention_statistics_refresh=-1)


def test_the_one_pass_kernels_refuse_streams_they_do_not_tile(device):
    # Called past their `runs_*` checks, the passes would write outside their operands: they refuse instead.
    from kontext_kernels import sage_qkv

    streams, cos, sin = _streams(1, (5, 7), 2, 16, device)  # head dim 16: under the fused tile's 32 channels
    with pytest.raises(ValueError, match="runs_fused"):
        sage_qkv.joint_sage_operands(streams, cos, sin, 2, fp8_pv=True)
    streams, cos, sin = _streams(1, (37, 150), 2, 64, device)  # the first stream not whole 128-token tiles
    assert sage_qkv.runs_fused(streams, 2) and not sage_qkv.runs_frozen(streams, 2, fp8_pv=True)
    _, statistics = sage_qkv.record_sage_operands(streams, cos, sin, 2, fp8_pv=True)
    with pytest.raises(ValueError, match="runs_frozen"):
        sage_qkv.frozen_sage_operands(streams, cos, sin, 2, statistics)
