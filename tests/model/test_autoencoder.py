"""The AE's own mechanics beyond the golden vectors: its attention in query chunks equals the whole, and through
SDPA's fused kernels (the fast preset's) equals the exact path's.

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
            param.copy_(torch.randn_like(param) * (0.2 if param.ndim > 1 else 0.05)
                        + (1.0 if "norm.weight" in name else 0))
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


def test_compiled_parts_compute_what_the_eager_ae_does(tiny_autoencoder):
    # compile_parts puts torch.compile on the encoder and the decoder; traced here with "aot_eager" (inductor's
    # GPU build is timed and compared against float32 in bench/pipeline/ae_probe.py). The compiled graph may decompose
    # the norms and sum in another order: float32 reordering error, across the AE's ~20 convolutions in a row.
    ae = tiny_autoencoder
    image = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latent, decoded = ae.encode(image), ae.decode(ae.encode(image))
        assert not ae.parts_compiled
        ae.compile_parts(backend="aot_eager")
        assert ae.parts_compiled
        compiled_latent = ae.encode(image)
        compiled_decoded = ae.decode(latent)
    terms = 9 * max(ae.config.ch * m for m in ae.config.ch_mult)
    assert torch.allclose(compiled_latent, latent, **reordering_tolerance(latent, terms=terms, chained=20))
    assert torch.allclose(compiled_decoded, decoded, **reordering_tolerance(decoded, terms=terms, chained=20))


def test_fused_attention_computes_what_the_exact_path_does(tiny_autoencoder, monkeypatch):
    # The exact path hands SDPA strided views (its math path); fused_attention hands it contiguous q/k/v, which a
    # fused kernel takes (the CPU's flash kernel here, the memory-efficient one on a GPU): the same attention
    # summed in another order, so float32 reordering error across the AE's ~20 layers in a row.
    ae = tiny_autoencoder
    blocks = [m for m in ae.modules() if isinstance(m, autoencoder.AttnBlock)]
    assert len(blocks) == 2 and not any(block.fused_attention for block in blocks)  # off unless asked
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 32, 40, generator=generator) * 2 - 1
    latent = torch.randn(2, ae.config.z_channels, 6, 4, generator=generator)
    with torch.no_grad():
        exact_latent, exact_decoded = ae.encode(image), ae.decode(latent)
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(autoencoder.F, "scaled_dot_product_attention",
                            lambda *a: calls.append(all(t.is_contiguous() for t in a)) or sdpa(*a))
        ae.use_fused_attention()
        try:
            assert all(block.fused_attention for block in blocks)
            fused_latent, fused_decoded = ae.encode(image), ae.decode(latent)
        finally:
            ae.use_fused_attention(False)
    assert calls == [True, True]  # one whole call each for the encoder and the decoder, on contiguous operands
    terms = 9 * max(ae.config.ch * m for m in ae.config.ch_mult)
    assert torch.allclose(fused_latent, exact_latent, **reordering_tolerance(exact_latent, terms=terms, chained=20))
    assert torch.allclose(fused_decoded, exact_decoded,
                          **reordering_tolerance(exact_decoded, terms=terms, chained=20))


def test_the_fused_attention_flag_is_read_by_compiled_parts_too(tiny_autoencoder):
    # load_pipeline sets the flag before compile_parts; one set later must not meet a graph traced without it.
    # torch.compile guards on the flag: the other setting traces its own graph, and off again reuses the first.
    from torch._dynamo.utils import counters

    ae = tiny_autoencoder
    image = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        exact = ae.encode(image)
        ae.use_fused_attention()
        fused = ae.encode(image)
        ae.use_fused_attention(False)
        torch._dynamo.reset()
        counters.clear()
        ae.compile_parts(backend="aot_eager")
        try:
            compiled_exact = ae.encode(image)
            traced_exact = counters["stats"]["unique_graphs"]
            ae.use_fused_attention()
            compiled_fused = ae.encode(image)
            traced_both = counters["stats"]["unique_graphs"]
            ae.use_fused_attention(False)
            compiled_exact_again = ae.encode(image)
            traced_after = counters["stats"]["unique_graphs"]
        finally:
            ae.use_fused_attention(False)
            torch._dynamo.reset()
    assert traced_exact >= 1 and traced_both > traced_exact and traced_after == traced_both
    assert torch.equal(compiled_exact_again, compiled_exact)
    terms = 9 * max(ae.config.ch * m for m in ae.config.ch_mult)
    tolerance = reordering_tolerance(exact, terms=terms, chained=20)
    assert torch.allclose(compiled_exact, exact, **tolerance) and torch.allclose(compiled_fused, fused, **tolerance)
