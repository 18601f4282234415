"""Tiled AE encode and decode: overlapping tiles blended with linear (feathered) weights.

Tile size and overlap are counted in latent pixels, so image tiles are whole multiples of the AE's
downsampling. Across each overlap the two tiles' weights ramp linearly in opposite directions; the
weights are divided by their sum, so they add up to exactly 1 everywhere.

Only the full-resolution part is tiled. The mid block (whose attention is global) runs once on the whole
latent-resolution feature map: decoding runs conv_in and the mid block untiled and tiles the upsampling
path; encoding tiles the downsampling path, blends its latent-resolution features and runs the mid block
and the output layers untiled. GroupNorm statistics are made whole-image too, gathered norm by norm over
the tiles (see _GlobalGroupNorm). What remains different from the untiled pass is the zero padding at
tile edges, which the feathering fades out (tests/pipeline/test_tiling.py states the tolerance).

`encode` / `decode` pick: the full-size pass when its estimated memory fits (after asking reclaimable
caches, such as offloaded transformer blocks, to make room), tiles otherwise, or as asked.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..model.autoencoder import Autoencoder
from .memory import ae_decode_bytes, ae_encode_bytes, make_room

TILING_MODES = ("auto", "always", "never")
TILE_SIZES = (96, 64, 48, 32, 24, 16)  # latent pixels tried by "auto", largest first
DEFAULT_TILE = 64  # latent pixels: 512-pixel image tiles
DEFAULT_OVERLAP = 16  # latent pixels: 128 image pixels of cross-fade


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of length `tile` covering `size` with at least `overlap` shared, evenly spread."""
    if size <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap ({overlap}) must be at least 0 and smaller than the tile ({tile})")
    count = max(-(-(size - overlap) // (tile - overlap)), 2)
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def feather_weights(starts: list[int], length: int, margin: int = 0,
                    device: torch.device | str | None = None) -> list[torch.Tensor]:
    """One weight vector per tile of `length` along one axis: 1 inside, linear ramps across each overlap.

    Where two tiles overlap, the `margin` pixels at each tile's inner edge get weight 0 (their zero padding
    reaches that far in), and across the rest of the overlap one tile's weight falls as the other's rises,
    so they sum to 1. Callers still divide by the sum, which also covers a point shared by three tiles.
    """
    position = torch.arange(length, dtype=torch.float64, device=device) + 0.5  # pixel centres in the tile
    weights = []
    for index, start in enumerate(starts):
        weight = torch.ones(length, dtype=torch.float64, device=device)
        if index > 0 and (shared := starts[index - 1] + length - start) > 0:
            edge = min(margin, (shared - 1) // 2)
            weight = torch.minimum(weight, ((position - edge) / (shared - 2 * edge)).clamp(min=0))
        if index < len(starts) - 1 and (shared := start + length - starts[index + 1]) > 0:
            edge = min(margin, (shared - 1) // 2)
            weight = torch.minimum(weight, ((length - position - edge) / (shared - 2 * edge)).clamp(min=0))
        weights.append(weight.float())
    return weights


def blend_tiles(run: Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor, tile: int, overlap: int,
                scale_in: int, scale_out: int) -> torch.Tensor:
    """Run `run` on overlapping tiles of `source` and blend its outputs with feathered weights.

    tile and overlap are in latent pixels; `source` has `scale_in` pixels per latent pixel and `run`'s
    output `scale_out`. The result has run's channels and dtype.
    """
    batch, _, height, width = source.shape
    latent_h, latent_w = height // scale_in, width // scale_in
    rows, cols = tile_starts(latent_h, tile, overlap), tile_starts(latent_w, tile, overlap)
    tile_h, tile_w = min(tile, latent_h), min(tile, latent_w)
    out_h, out_w = tile_h * scale_out, tile_w * scale_out
    margin = overlap * scale_out // 4
    row_weights = feather_weights([r * scale_out for r in rows], out_h, margin, source.device)
    col_weights = feather_weights([c * scale_out for c in cols], out_w, margin, source.device)
    out = total = None
    for row, row_weight in zip(rows, row_weights):
        for col, col_weight in zip(cols, col_weights):
            piece = source[..., row * scale_in:(row + tile_h) * scale_in, col * scale_in:(col + tile_w) * scale_in]
            result = run(piece)  # [B, C, out_h, out_w]
            if out is None:
                out = torch.zeros(batch, result.shape[1], latent_h * scale_out, latent_w * scale_out,
                                  dtype=torch.float32, device=result.device)
                total = torch.zeros(latent_h * scale_out, latent_w * scale_out, dtype=torch.float32,
                                    device=result.device)
                dtype = result.dtype
            weight = row_weight[:, None] * col_weight[None, :]
            window = (slice(row * scale_out, row * scale_out + out_h), slice(col * scale_out, col * scale_out + out_w))
            out[(..., *window)] += result.float() * weight
            total[window] += weight
            del result
    return (out / total).to(dtype)


# --- global GroupNorm statistics -----------------------------------------------------------------


class _StopPass(Exception):
    """Ends a tile's forward at the norm whose statistics are being gathered: nothing after it is needed."""


class _GlobalGroupNorm:
    """Swaps a network's GroupNorm forwards for ones that use whole-image statistics.

    A norm's input depends on the norms before it, so whole-image statistics are exact only when they are
    gathered norm by norm: `gather(norm)` makes the next pass over the tiles normalise the earlier norms
    with their (already exact) statistics, sum the input of `norm` over the part of each tile that the
    tile owns (`region`: the tile cut at the middle of its overlaps, as fractions of the tile, so overlaps
    count once and zero-padded tile edges stay out), and stop there. After every norm is gathered, `apply()`
    makes the forwards use the statistics. Gathering one norm per pass matters on images whose tiles differ
    a lot (a gradient, a sky over a street): statistics gathered all in one pass, with the earlier norms
    still tile-local, were measured 50% off at the encoder's output.
    """

    def __init__(self, norms: list[nn.GroupNorm]):
        self.norms = norms  # in the order the tiled path runs them
        self.stats: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, inv_std) [B, groups]
        self.target: nn.GroupNorm | None = None
        self.sums: list = []
        self.region = (0.0, 1.0, 0.0, 1.0)  # (top, bottom, left, right)

    @contextmanager
    def installed(self) -> Iterator["_GlobalGroupNorm"]:
        for norm in self.norms:
            norm.forward = self._forward_for(norm)
        try:
            yield self
        finally:
            for norm in self.norms:
                del norm.forward

    def gather(self, norm: nn.GroupNorm) -> None:
        self.target, self.sums = norm, [0.0, 0.0, 0]

    def finish(self) -> None:
        total, squares, count = self.sums
        mean = total / count
        self.stats[self.target] = (mean, torch.rsqrt((squares / count - mean.square()).clamp(min=0) + self.target.eps))
        self.target = None

    def _collect(self, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        top, bottom, left, right = self.region
        height, width = x.shape[-2:]
        owned = x.detach()[..., round(top * height):round(bottom * height), round(left * width):round(right * width)]
        groups = owned.reshape(x.shape[0], norm.num_groups, -1).double()
        self.sums[0] = self.sums[0] + groups.sum(-1)
        self.sums[1] = self.sums[1] + groups.square().sum(-1)
        self.sums[2] += groups.shape[-1]

    def _forward_for(self, norm: nn.GroupNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if norm is self.target:
                self._collect(norm, x)
                raise _StopPass
            if norm not in self.stats:
                return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            mean, inv_std = self.stats[norm]
            groups = x.reshape(x.shape[0], norm.num_groups, -1).float()
            normed = ((groups - mean[..., None].float()) * inv_std[..., None].float()).reshape(x.shape)
            if norm.affine:
                normed = normed * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
            return normed.to(x.dtype)

        return forward


def _owned(starts: list[int], length: int, size: int) -> list[tuple[float, float]]:
    """Each tile's own part along one axis, cut at the middle of its overlaps, as fractions of the tile."""
    cuts = [0] + [(start + starts[i - 1] + length) // 2 for i, start in enumerate(starts) if i > 0] + [size]
    return [((cuts[i] - start) / length, (cuts[i + 1] - start) / length) for i, start in enumerate(starts)]


def _gather_statistics(norms: _GlobalGroupNorm, run: Callable[[torch.Tensor], torch.Tensor],
                       pieces: list[tuple[torch.Tensor, tuple[float, float, float, float]]]) -> None:
    """One pass over the tiles per norm, each stopping at that norm (see _GlobalGroupNorm)."""
    for norm in norms.norms:
        norms.gather(norm)
        for piece, region in pieces:
            norms.region = region
            try:
                run(piece)
            except _StopPass:
                pass
        norms.finish()


def _tiles(source: torch.Tensor, tile: int, overlap: int, scale_in: int):
    """(piece, owned region) for each tile of `source` (`scale_in` pixels per latent pixel), row by row."""
    latent_h, latent_w = source.shape[-2] // scale_in, source.shape[-1] // scale_in
    tile_h, tile_w = min(tile, latent_h), min(tile, latent_w)
    rows, cols = tile_starts(latent_h, tile, overlap), tile_starts(latent_w, tile, overlap)
    return [(source[..., row * scale_in:(row + tile_h) * scale_in, col * scale_in:(col + tile_w) * scale_in],
             (top, bottom, left, right))
            for row, (top, bottom) in zip(rows, _owned(rows, tile_h, latent_h))
            for col, (left, right) in zip(cols, _owned(cols, tile_w, latent_w))]


def _group_norms(*modules: nn.Module) -> list[nn.GroupNorm]:
    """The GroupNorms of `modules`, in the modules' order (within a level, registration order is run order)."""
    return [m for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm)]


def _with_global_norms(norm_list: list[nn.GroupNorm], run: Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor,
                       tile: int, overlap: int, scale_in: int, scale_out: int) -> torch.Tensor:
    """blend_tiles with the GroupNorms of `norm_list` (in run order) normalising by whole-image statistics."""
    latent_h, latent_w = source.shape[-2] // scale_in, source.shape[-1] // scale_in
    if latent_h <= tile and latent_w <= tile:
        return run(source)  # one tile: the plain pass is the untiled pass
    norms = _GlobalGroupNorm(norm_list)
    with norms.installed():
        _gather_statistics(norms, run, _tiles(source, tile, overlap, scale_in))
        return blend_tiles(run, source, tile, overlap, scale_in, scale_out)


def decode_tiled(ae: Autoencoder, latent: torch.Tensor, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """Scaled latent [B, 16, h, w] -> image [B, 3, 8h, 8w]; the upsampling path runs tile by tile.

    tile and overlap are in latent pixels.
    """
    decoder = ae.decoder
    h = decoder.body(ae.unscale(latent))  # [B, C, h, w]: small, and the attention sees the whole image
    norm_list = _group_norms(*reversed(decoder.up), decoder.norm_out)  # the up path runs the deepest level first
    return _with_global_norms(norm_list, decoder.upsampling, h, tile, overlap, 1, ae.config.downsample_factor)


def encode_tiled(ae: Autoencoder, image: torch.Tensor, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """Image [B, 3, H, W] in [-1, 1] -> scaled latent; the downsampling path runs tile by tile.

    H and W must be multiples of the AE's downsampling; tile and overlap are in latent pixels. The path runs
    level by level, keeping every tile's output of a level (downsampled, so small beside the full-resolution
    activations tiling avoids): a level's statistics passes then start from those instead of from the image.
    """
    factor = ae.config.downsample_factor
    if image.shape[-2] % factor or image.shape[-1] % factor:
        raise ValueError(f"tiled encoding needs image sides that are multiples of {factor}, "
                         f"got {list(image.shape[-2:])}")
    encoder = ae.encoder
    image = image.to(ae.dtype)
    if image.shape[-2] // factor <= tile and image.shape[-1] // factor <= tile:
        features = encoder.features(image)  # one tile: the plain pass is the untiled pass
    else:
        pieces = _tiles(image, tile, overlap, factor)
        for index, level in enumerate(encoder.down):
            stage = level if index else lambda h: encoder.down[0](encoder.conv_in(h))
            norms = _GlobalGroupNorm(_group_norms(level))
            with norms.installed():
                _gather_statistics(norms, stage, pieces)
                pieces = [(stage(piece), region) for piece, region in pieces]
        # blend_tiles visits tiles in _tiles' order (row by row), so it can take the finished pieces in turn.
        finished = iter([piece for piece, _ in pieces])
        features = blend_tiles(lambda _: next(finished), image, tile, overlap, factor, 1)  # [B, C, h, w]
    return ae.latent_from_moments(encoder.head(features))


# --- choosing ------------------------------------------------------------------------------------


def fits(required_bytes: int, device: torch.device | str) -> bool:
    """Whether `required_bytes` can be allocated on `device` now, after reclaimable caches made room."""
    free = make_room(device, required_bytes)
    return free is None or free >= required_bytes


def _element_bytes(ae: Autoencoder) -> int:
    return torch.finfo(ae.dtype).bits // 8


def decode(ae: Autoencoder, latent: torch.Tensor, tiling: str = "auto", tile: int | None = None,
           overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """ae.decode, tiled when asked ("always") or when the full decode would not fit ("auto")."""
    return _full_or_tiled(ae, latent, tuple(latent.shape[-2:]), ae_decode_bytes, ae.decode, decode_tiled,
                          tiling, tile, overlap)


def encode(ae: Autoencoder, image: torch.Tensor, tiling: str = "auto", tile: int | None = None,
           overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """ae.encode, tiled when asked ("always") or when the full encode would not fit ("auto")."""
    factor = ae.config.downsample_factor
    return _full_or_tiled(ae, image, (image.shape[-2] // factor, image.shape[-1] // factor), ae_encode_bytes,
                          ae.encode, encode_tiled, tiling, tile, overlap)


def _full_or_tiled(ae: Autoencoder, source: torch.Tensor, latent_size: tuple[int, int], bytes_for: Callable,
                   full: Callable, tiled: Callable, tiling: str, tile: int | None, overlap: int) -> torch.Tensor:
    _check_mode(tiling)
    factor, batch = ae.config.downsample_factor, source.shape[0]

    def need(h: int, w: int) -> int:
        return bytes_for(ae.config, h * factor, w * factor, _element_bytes(ae), batch)

    height, width = latent_size
    if tiling == "never" or (tiling == "auto" and fits(need(height, width), ae.device)):
        return full(source)
    if tile is None:
        tile = _fitting_tile(need, ae.device, max(height, width))
        overlap = min(overlap, tile // 4)
    return tiled(ae, source, tile, overlap)


def _fitting_tile(need: Callable[[int, int], int], device: torch.device, longest: int) -> int:
    """The largest of TILE_SIZES (latent pixels, below the latent's longest side) whose pass fits; else the smallest."""
    candidates = [t for t in TILE_SIZES if t < longest] or [TILE_SIZES[-1]]
    for tile in candidates:
        if fits(need(tile, tile), device):
            return tile
    return candidates[-1]


def _check_mode(tiling: str) -> None:
    if tiling not in TILING_MODES:
        raise ValueError(f"unknown AE tiling {tiling!r}; choose one of {', '.join(TILING_MODES)}")
