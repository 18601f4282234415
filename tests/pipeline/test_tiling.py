"""Tiled AE encode/decode on the tiny random AE: blending weights, tolerance against the untiled pass, no seams.

Measured on the tiny AE (2x downsampling, 48x48 latents, tiles of 24 latent pixels overlapping by 8, six
seeds), max|tiled - untiled| / max|untiled|:
  decode of random latents   0.005 - 0.009     (asserted < 0.02)
  encode of random images    0.018 - 0.046     (asserted < 0.08)
  a smooth gradient image    0.17 - 0.63       (not asserted: see below)
An untrained AE amplifies the gradient's near-constant features through GroupNorms of one channel each,
so the tile statistics' small estimation error becomes a large low-frequency shift; what must hold there
is that no seam appears, which test_no_seams_on_a_smooth_gradient checks (and shows that plain hard-cut
tiling fails the same check).
"""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_, rel_error
from kontext_core.placement import tiling
from kontext_core.model.autoencoder import Autoencoder
from kontext_core.model.config import AutoencoderConfig
from kontext_core.placement.tiling import decode_tiled, encode_tiled, feather_weights, tile_starts

TILE, OVERLAP = 24, 8  # latent pixels


def _gradient(size: int = 96) -> torch.Tensor:
    """A smooth RGB gradient in [-0.9, 0.9], [1, 3, size, size]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return 0.9 * torch.stack([x, y, (x + y) / 2])[None]


@pytest.mark.parametrize("size, tile, overlap", [(48, 24, 8), (50, 16, 4), (128, 64, 16), (70, 64, 16), (64, 64, 8)])
def test_tiles_cover_with_the_overlap_and_weights_sum_to_one(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    for margin in (0, overlap // 4):
        weights = feather_weights(starts, min(tile, size), margin)
        total = torch.zeros(size)
        for start, weight in zip(starts, weights):
            assert weight.min() >= 0 and weight.max() <= 1
            total[start:start + min(tile, size)] += weight
        assert torch.allclose(total, torch.ones(size), atol=1e-6)


def test_one_tile_is_the_untiled_pass(tiny_autoencoder):
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 16, 20, 12, generator=generator)
    image = torch.rand(2, 3, 40, 24, generator=generator) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decode_tiled(tiny_autoencoder, latent, tile=24), tiny_autoencoder.decode(latent))
        assert torch.equal(encode_tiled(tiny_autoencoder, image, tile=24), tiny_autoencoder.encode(image))


@pytest.mark.parametrize("seed", [3, 4])
def test_tiled_is_close_to_untiled(seed):
    ae = randomize_(Autoencoder(AutoencoderConfig.tiny()), seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 16, 48, 48, generator=generator)
    image = torch.rand(1, 3, 96, 96, generator=generator) * 2 - 1
    with torch.no_grad():
        decoded = decode_tiled(ae, latent, TILE, OVERLAP)
        encoded = encode_tiled(ae, image, TILE, OVERLAP)
        assert decoded.shape == (1, 3, 96, 96) and encoded.shape == (1, 16, 48, 48)
        assert rel_error(decoded, ae.decode(latent)) < 0.02
        assert rel_error(encoded, ae.encode(image)) < 0.08


@pytest.mark.parametrize("seed", [6, 7])
def test_tiled_encode_of_an_uneven_image_matches_untiled(seed):
    """Tiles of a gradient have very different statistics of their own: only whole-image GroupNorm
    statistics, gathered norm by norm, keep the tiled encode close to the untiled one (one pass gathering
    all norms at once, with the earlier norms still tile-local, was measured 0.54 off here; this is 0.03,
    the zero padding at tile edges)."""
    ae = randomize_(Autoencoder(AutoencoderConfig.tiny()), seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    image = _gradient(192) + 0.05 * torch.randn(1, 3, 192, 192, generator=generator)
    with torch.no_grad():
        assert rel_error(encode_tiled(ae, image, TILE, OVERLAP), ae.encode(image)) < 0.05


def _hard_cut_weights(starts, length, margin=0, device=None):
    """Each tile owns up to the middle of its overlaps, no blending: the naive tiling that shows seams."""
    size = starts[-1] + length
    cuts = [0] + [(start + starts[i - 1] + length) // 2 for i, start in enumerate(starts) if i] + [size]
    weights = []
    for i, start in enumerate(starts):
        weight = torch.zeros(length)
        weight[cuts[i] - start:cuts[i + 1] - start] = 1
        weights.append(weight)
    return weights


def _seam_ratio(difference: torch.Tensor, starts: list[int], tile: int, scale: int) -> float:
    """Largest step of tiled - untiled across a tile border, over the typical step elsewhere.

    A seam runs the whole border, so steps are averaged along it (over rows, channels) first; "elsewhere"
    leaves out the image's outer 6 pixels, where the AE's own zero padding dominates.
    """
    steps = difference.diff(dim=-1).abs().mean(dim=(0, 1, 2))  # [W - 1]: step between column c and c + 1
    borders = {s * scale for s in starts[1:]} | {(s + tile) * scale for s in starts[:-1]}
    borders |= {(s + starts[i - 1] + tile) // 2 * scale for i, s in enumerate(starts) if i}
    at_border = torch.zeros_like(steps, dtype=torch.bool)
    for column in borders:
        at_border[column - 1] = True
    inside = ~at_border
    inside[:6] = inside[-6:] = False
    return (steps[at_border].max() / steps[inside].median()).item()


@pytest.mark.parametrize("seed", [2, 5])
def test_no_seams_on_a_smooth_gradient(seed, monkeypatch):
    ae = randomize_(Autoencoder(AutoencoderConfig.tiny()), seed=seed).eval()
    image = _gradient()
    starts = tile_starts(48, TILE, OVERLAP)
    with torch.no_grad():
        latent = ae.encode(image)
        reference = ae.decode(latent)
        ours = decode_tiled(ae, latent, TILE, OVERLAP)
        encoded = encode_tiled(ae, image, TILE, OVERLAP)
        monkeypatch.setattr(tiling, "feather_weights", _hard_cut_weights)
        naive = tiling.blend_tiles(ae.decode, latent, TILE, OVERLAP, 1, 2)  # whole AE per tile, hard cuts
    # Ours: no step at a tile border much above the typical column-to-column step (measured 1.0 - 1.9).
    assert _seam_ratio(ours - reference, starts, TILE, 2) < 2.5
    assert _seam_ratio((ours - reference).transpose(-1, -2), starts, TILE, 2) < 2.5
    assert _seam_ratio(encoded - latent, starts, TILE, 1) < 2.5
    # The check does see seams: naive tiling steps 6.5 - 10.7 times the typical amount at its cuts.
    assert _seam_ratio(naive - reference, starts, TILE, 2) > 4.0


def test_auto_tiles_only_when_the_full_pass_would_not_fit(tiny_autoencoder, monkeypatch):
    latent = torch.randn(1, 16, 48, 40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        untiled = tiny_autoencoder.decode(latent)
        assert torch.equal(tiling.decode(tiny_autoencoder, latent, "auto"), untiled)  # the CPU: no limit
        assert torch.equal(tiling.decode(tiny_autoencoder, latent, "never"), untiled)
        always = tiling.decode(tiny_autoencoder, latent, "always", tile=TILE, overlap=OVERLAP)
        assert torch.equal(always, decode_tiled(tiny_autoencoder, latent, TILE, OVERLAP))

        asked = []

        def little_free_memory(device, needed):
            asked.append(needed)
            return 4_000_000  # bytes: less than the whole decode (11.8 MB estimated), enough for a 24-pixel tile
        monkeypatch.setattr(tiling, "make_room", little_free_memory)
        tiled = tiling.decode(tiny_autoencoder, latent, "auto")
        assert asked[0] > 4_000_000 and tiled.shape == untiled.shape
        assert torch.equal(tiled, decode_tiled(tiny_autoencoder, latent, 24, 6))  # the largest tile that fits
        image = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(7)) * 2 - 1
        assert tiling.encode(tiny_autoencoder, image, "auto").shape == (1, 16, 48, 40)
    with pytest.raises(ValueError, match="unknown AE tiling"):
        tiling.decode(tiny_autoencoder, latent, "sometimes")


def test_pipeline_decodes_in_tiles_on_request(tiny_transformer, tiny_autoencoder):
    from PIL import Image

    from conftest import FakeEncoders
    from kontext_core.pipeline import KontextPipeline

    config = tiny_transformer.config
    pipeline = KontextPipeline(tiny_transformer, tiny_autoencoder,
                               FakeEncoders(config.context_in_dim, config.vec_in_dim))
    image = Image.new("RGB", (96, 64), (30, 120, 200))
    untiled = pipeline.edit(image, "x", steps=1, seed=1, resize="keep")
    pipeline.ae_tiling = "always"
    tiled = pipeline.edit(image, "x", steps=1, seed=1, resize="keep")
    assert tiled.images[0].size == untiled.images[0].size == (96, 64)
