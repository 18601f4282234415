"""The AE's own mechanics beyond the golden vectors: its attention in query chunks equals the whole.

Chunked, whole and the plain reference sum in different orders (the chunks change BLAS's blocking, and
thread counts change it further), so they agree to float32 reordering error (conftest.reordering_tolerance),
not bit for bit.
"""

from __future__ import annotations

import torch

import kontext_core.model.autoencoder as autoencoder
from conftest import reordering_tolerance


def test_attention_in_query_chunks_equals_unchunked(monkeypatch):
    torch.manual_seed(0)
    block = autoencoder.AttnBlock(64).eval()
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.copy_(torch.randn_like(param) * (0.2 if param.ndim > 1 else 0.05) + (1.0 if "norm.weight" in name else 0))
    x = torch.randn(2, 64, 40, 48)
    with torch.no_grad():
        whole = block(x)  # 2 x 1920 x 1920 scores: one chunk under the default budget
        # A budget of 100 query rows for the batch of 2: 20 chunks, the last one partial.
        monkeypatch.setattr(autoencoder, "ATTENTION_SCORE_BUDGET", 2 * 1920 * 100)
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(autoencoder.F, "scaled_dot_product_attention", lambda *a: calls.append(1) or sdpa(*a))
        chunked = block(x)
        monkeypatch.setattr(autoencoder.F, "scaled_dot_product_attention", sdpa)
        assert len(calls) == 20
        reference = x + block.proj_out(torch.nn.functional.scaled_dot_product_attention(
            *(t.reshape(2, 1, 64, -1).transpose(-1, -2) for t in (block.q(block.norm(x)), block.k(block.norm(x)),
                                                                 block.v(block.norm(x))))
        ).transpose(-1, -2).reshape(2, 64, 40, 48))
    # Scores sum 64 channels, the attention 1920 keys, the projection 64 channels: three sums in a row.
    tolerance = reordering_tolerance(whole, terms=1920, chained=3)
    assert torch.allclose(chunked, whole, **tolerance)
    assert torch.allclose(whole, reference, **tolerance)
