"""Latents as token sequences: 2x2 patchify, position ids, and where context images sit in RoPE space.

A latent [B, 16, H, W] becomes (H/2)*(W/2) tokens of 64 features (channel-major within a patch,
tokens row-major); each token's position id is (index, row, col). The target image has index 0.
Context (reference) images are appended after the target tokens; how their ids are chosen is the
placement method:

- 'kontext' (BFL's reference, one context image): index 1, rows and columns from 0.
- 'offset' (ComfyUI's default for several references): index 1 for every reference, each placed
  beside or below the ones before it, so together they tile one larger image.
- 'index': each reference gets its own index (1, 2, ...), rows and columns from 0.
- 'uxo': index 0 like the target, each reference shifted diagonally past the target and the
  references before it.
- 'stitch': the images are joined side by side or one below the other (the settings' stitch_direction)
  into one context image before encoding (image.stitch_images, as ComfyUI's Kontext template does with Image
  Stitch); that one image then sits where 'kontext' puts its reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PATCH = 2
PLACEMENTS = ("offset", "index", "uxo", "kontext", "stitch")


def pad_to_patch(latent: torch.Tensor) -> torch.Tensor:
    """Odd latent sizes are padded to even by wrapping around (circular), as ComfyUI does."""
    height, width = latent.shape[-2:]
    pad_h, pad_w = (-height) % PATCH, (-width) % PATCH
    if pad_h or pad_w:
        latent = F.pad(latent, (0, pad_w, 0, pad_h), mode="circular")
    return latent


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Token rows and columns of a latent of this size (odd sizes round up)."""
    return (height + 1) // PATCH, (width + 1) // PATCH


def pack_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, ceil(H/2)*ceil(W/2), C*4]."""
    latent = pad_to_patch(latent)
    batch, channels, height, width = latent.shape
    patches = latent.reshape(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // PATCH) * (width // PATCH), channels * PATCH**2)


def unpack_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, L, C*4] -> [B, C, height, width] for a latent of that (possibly odd) size."""
    rows, cols = token_grid(height, width)
    batch, _, features = tokens.shape
    channels = features // PATCH**2
    latent = tokens.reshape(batch, rows, cols, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return latent.reshape(batch, channels, rows * PATCH, cols * PATCH)[:, :, :height, :width]


def position_ids(height: int, width: int, *, index: float = 0, row_offset: int = 0, col_offset: int = 0,
                 batch: int = 1, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ids [B, L, 3] = (index, row, col) of a latent's tokens; offsets are in tokens."""
    rows, cols = token_grid(height, width)
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None] + row_offset
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :] + col_offset
    return ids.reshape(1, rows * cols, 3).expand(batch, -1, -1)


def text_position_ids(batch: int, length: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Text tokens all sit at (0, 0, 0): RoPE leaves them unrotated."""
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)


@dataclass(frozen=True)
class Placement:
    index: int
    row_offset: int  # in latent pixels, as ComfyUI counts
    col_offset: int


def _pixels_to_tokens(offset: int) -> int:
    return (offset + PATCH // 2) // PATCH


def reference_placements(target_hw: tuple[int, int], reference_hws: list[tuple[int, int]],
                         method: str = "offset") -> list[Placement]:
    """Index and offsets of each reference (latent sizes in, latent-pixel offsets out)."""
    if method not in PLACEMENTS:
        raise ValueError(f"unknown reference placement {method!r}; choose one of {', '.join(PLACEMENTS)}")
    if method == "kontext" and len(reference_hws) > 1:
        raise ValueError("the 'kontext' placement takes one reference image; use 'offset' or 'index' for several")
    if method == "stitch" and len(reference_hws) > 1:
        raise ValueError("the 'stitch' placement joins the images before encoding: pass the one stitched latent "
                         "(KontextPipeline.edit stitches them), or place several latents with 'offset' or 'index'")
    placements = []
    used_h = used_w = 0  # extent already covered by earlier references
    for number, (height, width) in enumerate(reference_hws, start=1):
        if method in ("kontext", "index", "stitch"):
            placements.append(Placement(number, 0, 0))
        elif method == "uxo":
            rows, cols = token_grid(*target_hw)
            placements.append(Placement(0, rows * PATCH + used_h, cols * PATCH + used_w))
            used_h += height
            used_w += width
        else:
            # Grow the tiled canvas along its shorter side: beside if that keeps it squarer, else below.
            if height + used_h > width + used_w:
                row_offset, col_offset = 0, used_w
            else:
                row_offset, col_offset = used_h, 0
            placements.append(Placement(1, row_offset, col_offset))
            used_h = max(used_h, height + row_offset)
            used_w = max(used_w, width + col_offset)
    return placements


def context_tokens(references: list[torch.Tensor], target_hw: tuple[int, int], method: str = "offset",
                   id_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, L_ctx, 64] and ids [B, L_ctx, 3] of every reference latent, in order."""
    if not references:
        raise ValueError("context_tokens needs at least one reference latent")
    batch = references[0].shape[0]
    placements = reference_placements(target_hw, [tuple(r.shape[-2:]) for r in references], method)
    tokens, ids = [], []
    for latent, place in zip(references, placements):
        if latent.shape[0] != batch:
            raise ValueError(f"reference latents have different batch sizes ({latent.shape[0]} vs {batch})")
        tokens.append(pack_latent(latent))
        ids.append(position_ids(*latent.shape[-2:], index=place.index, row_offset=_pixels_to_tokens(place.row_offset),
                                col_offset=_pixels_to_tokens(place.col_offset), batch=batch,
                                device=latent.device, dtype=id_dtype))
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)
