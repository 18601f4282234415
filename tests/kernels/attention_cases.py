"""Attention test cases shared by test_sage_attention.py and test_sage_attention_hopper.py (both here): inputs as
the model makes them, exact attention, and the error bounds those tests state (test_sage_attention.py's
docstring says where each comes from)."""

from __future__ import annotations

import torch

FP8_BOUND = 0.05
FP16_BOUND = 0.02
KERNEL_VS_REFERENCE = 2e-3
# On a GPU the kernel's exp2 is the hardware approximation, not PyTorch's: the few values of P it moves across an
# e4m3 rounding boundary change by an e4m3 step (1/16) each. Max-abs error seen at full size on an H200: 3.1e-3.
GPU_KERNEL_VS_REFERENCE = 1e-2


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True))


def attention_inputs(batch: int, heads: int, length_q: int, length_k: int, head_dim: int, device: str,
                     dtype: torch.dtype = torch.bfloat16, packed: bool = True):
    """Fresh q, k (unit-RMS rows) and v ~ N(0, 1), [B, H, L, D]; with `packed` (and equal lengths) gapped views of
    one [B, L, 3, H, D] projection, as the model's unfused path gives them."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    if packed and length_q == length_k:
        qkv = torch.randn(batch, length_q, 3, heads, head_dim, generator=generator)
        qkv[:, :, :2] = _unit_rms(qkv[:, :, :2])
        q, k, v = qkv.to(device, dtype).permute(2, 0, 3, 1, 4)
        return q, k, v
    q = _unit_rms(torch.randn(batch, heads, length_q, head_dim, generator=generator))
    k = _unit_rms(torch.randn(batch, heads, length_k, head_dim, generator=generator))
    v = torch.randn(batch, heads, length_k, head_dim, generator=generator)
    return tuple(x.to(device, dtype) for x in (q, k, v))


def assert_operands_equal(mine, theirs) -> None:
    """Two sage_attention.Operands: every tensor of the same shape, dtype and values (+0 and -0 alike), every other
    field equal."""
    from kontext_kernels import sage_attention as sa

    for name, a, b in zip(sa.Operands._fields, mine, theirs):
        if torch.is_tensor(a):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert torch.equal(a.float(), b.float()), name
        else:
            assert a == b, name


def assert_operands_close(mine, theirs, changed_at_most: float = 0.01) -> None:
    """Two sage_attention.Operands from float32 values that may differ in their last bits: 8-bit integer tensors
    one step apart at most, and in at most `changed_at_most` of their entries (a value that sat on a rounding
    boundary); float tensors within 1e-6 relative, except in at most `changed_at_most` of their entries, which may
    be one bf16 step apart (2**-7 relative at most: q is rounded to the activations' dtype before its row's amax is
    taken, so a last-bit difference can move that amax to the neighbouring bf16 value); the e4m3 tensors and every
    other field equal."""
    from kontext_kernels import sage_attention as sa

    for name, a, b in zip(sa.Operands._fields, mine, theirs):
        if not torch.is_tensor(a):
            assert a == b, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.dtype == torch.int8:
            steps = (a.int() - b.int()).abs()
            assert steps.max().item() <= 1 and steps.bool().float().mean().item() <= changed_at_most, name
        elif a.dtype == torch.float32:
            # Bounds times |b|, not ratios: equal zeros pass instead of making 0 / 0.
            off = (a - b).abs()
            assert (off <= 2**-7 * b.abs()).all().item(), name
            assert (off > 1e-6 * b.abs()).float().mean().item() <= changed_at_most, name
        else:
            assert torch.equal(a.float(), b.float()), name


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v in float64, [B, H, L, D]."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v.double()


def eager_and_compiled(model, args: tuple, device: str, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.velocity(*args)` eagerly, then with its blocks compiled ("aot_eager" on the CPU), checking each time that
    the launch counter `kernel` moved once a block (its op really ran, inside the compiled blocks too). The
    blocks are uncompiled again after."""
    from kontext_kernels.runtime import launches

    blocks = len(model.double_blocks) + len(model.single_blocks)
    outputs = []
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for compiled in (False, True):
                if compiled:
                    model.compile_blocks(backend="aot_eager" if device == "cpu" else "inductor")
                before = launches[kernel]
                outputs.append(model.velocity(*args))
                assert launches[kernel] - before == blocks, (kernel, compiled)
    finally:
        model.uncompile_blocks()
        torch._dynamo.reset()
    return outputs[0], outputs[1]
