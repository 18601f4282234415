"""FlashAttention as a backend: the dispatch (which installed version 'auto' takes, where) and, on a GPU with
flash-attn installed, its results against exact attention, alone and inside compiled blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import fresh_generator, rel_l2
from kontext_core.compute import attention


def _qkv(batch: int, heads: int, length: int, head_dim: int, device: str, dtype=torch.bfloat16):
    """[B, H, L, D] views of [B, L, H, D] memory, as the QK-norm kernel lays them out."""
    generator = fresh_generator()
    return [torch.randn(batch, length, heads, head_dim, generator=generator).to(device, dtype).transpose(1, 2)
            for _ in range(3)]


def _exact(q, k, v):
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.fixture
def fake_flash(monkeypatch):
    """An installed 'FlashAttention' that computes exactly, over [B, L, H, D] as the real ones do, and counts
    its calls."""
    calls = []

    def flash(q, k, v):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    monkeypatch.setattr(attention, "_FLASH_ATTN", flash)
    monkeypatch.setattr(attention, "_flash_beats_cudnn", lambda index: True)
    monkeypatch.setattr(attention, "_backend", "auto")
    return calls


def test_flash_backend_takes_and_returns_the_token_major_layout(fake_flash):
    q, k, v = _qkv(2, 3, 37, 16, "cpu", torch.float32)
    attention.set_attention_backend("flash-attn")
    try:
        out = attention.attention(q, k, v)
    finally:
        attention.set_attention_backend("auto")
    assert fake_flash == [torch.Size([2, 37, 3, 16])]
    assert out.shape == (2, 37, 48) and rel_l2(out, _exact(q, k, v)) < 1e-5


def test_auto_takes_flash_only_on_cuda_where_the_scope_chose_it(fake_flash):
    q, k, v = _qkv(1, 2, 20, 16, "cpu")
    with attention.attention_scope(torch.device("cpu")):
        attention.attention(q, k, v)
    assert fake_flash == [] and not attention._auto_flash  # CPU tensors: SDPA


@pytest.mark.parametrize("variant, major, expected", [
    ("FlashAttention-4", 9, True), ("FlashAttention-4", 10, True),
    ("FlashAttention-3", 9, False),  # cuDNN's speed on Hopper (bench/attention/fa3_probe.py)
    ("FlashAttention-2", 9, False),  # about half cuDNN's rate on Hopper
    ("FlashAttention-4", 8, False),  # before Hopper SDPA's own kernels are as fast
    (None, 9, False),
])
def test_which_flash_auto_prefers_to_cudnn(monkeypatch, variant, major, expected):
    monkeypatch.setattr(attention, "_FLASH_NAME", variant)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, 0))
    attention._flash_beats_cudnn.cache_clear()
    try:
        assert attention._flash_beats_cudnn(0) is expected
    finally:
        attention._flash_beats_cudnn.cache_clear()


# --- on a GPU with flash-attn installed --------------------------------------------------------------

needs_flash = pytest.mark.skipif(
    not torch.cuda.is_available() or attention.flash_attn_variant() is None,
    reason="needs a CUDA GPU with flash-attn installed (flash-attn-4 on Hopper: pip install flash-attn-4)")


@needs_flash
@pytest.mark.parametrize("batch, length", [(1, 8704), (2, 333)])  # the edit shape; awkward length, batch > 1
def test_flash_attention_equals_exact_attention(batch, length):
    q, k, v = _qkv(batch, 24, length, 128, "cuda")
    attention.set_attention_backend("flash-attn")
    try:
        out = attention.attention(q, k, v)
    finally:
        attention.set_attention_backend("auto")
    expected = _exact(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(expected.shape)
    # bf16 inputs and output: within the error of SDPA's own bf16 kernels (2.3e-3 measured on the H100)
    assert rel_l2(out, expected) < 1.5 * rel_l2(sdpa, expected) + 1e-4


@needs_flash
def test_compiled_blocks_with_flash_attention_match_sdpa():
    from conftest import randomize_, tiny_edit_args
    from kontext_core import KontextTransformer, TransformerConfig

    if not attention._flash_beats_cudnn(torch.cuda.current_device()):
        pytest.skip(f"'auto' keeps cuDNN here ({attention.flash_attn_variant()} on this GPU)")
    config = TransformerConfig.tiny(depth=1, depth_single_blocks=1)  # head_dim 64
    model = randomize_(KontextTransformer(config), seed=5).to("cuda", torch.bfloat16).eval()
    args = tiny_edit_args(2, torch.bfloat16, "cuda")
    with torch.no_grad():
        attention.set_attention_backend("sdpa")
        reference = model.velocity(*args)
        attention.set_attention_backend("auto")
        model.compile_blocks()
        flash = model.velocity(*args)
    assert attention._auto_flash  # this GPU takes FlashAttention in 'auto'
    assert rel_l2(flash, reference) < 2e-2  # bf16 kernels of two kinds (compiled vs eager: ~1-2%)
