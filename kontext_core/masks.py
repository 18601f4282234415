"""Masked edits: a mask fitted to its image, grown and feathered, brought down to the latent, the cut-out
around it, and the edited pixels put back.

A mask says where the image may change: 1 edits, 0 keeps (white = edit in a mask image, as in ComfyUI's
MASK). Masks here are float tensors [B, H, W] in [0, 1]; images are float tensors [B, H, W, C] in [0, 1]
(the layout of Pillow / numpy arrays and of ComfyUI's IMAGE), so either side converts without arithmetic.

What happens to a mask, in order:
1. fitted: a mask of another size than its image is resized bilinearly, as ComfyUI resizes a MASK applied
   to a latent or an image (comfy.utils.reshape_mask), with a warning naming both sizes;
2. binarized at 0.5 (diffusers' inpaint pipelines binarize the same way) and grown by `grow` pixels
   (Euclidean distance): the *region*;
3. feathered inside the region's border, never outside it: the weights rise with the distance to the
   nearest pixel outside the region, 1/(feather+1) per pixel, up to 1; they are 0 wherever the region is,
   never above it. The image's own edges are no border: a region touching them stays 1 there;
4. brought to the latent grid: a latent pixel is sampled where any pixel it covers lies in the region,
   so every pixel with a weight above 0 comes from freshly sampled latents; elsewhere the sampler puts
   back the noised original after every step (`LatentInpaint`) and the original itself at the end;
5. put back: the decoded edit, resized to the region's box, is composited through the weights. Where a
   weight is 0 the output is the input, bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .sampling import noise_latent
from .model.tokens import pack_latent

THRESHOLD = 0.5  # mask values from here up are inside the region
DEFAULT_CONTEXT_MARGIN = 64  # pixels of surroundings kept around the region when cropping to it


# --- the mask as given ----------------------------------------------------------------------------

def mask_from_image(image: Image.Image) -> torch.Tensor:
    """A mask image (white = edit, black = keep; gray levels are fractions) -> [1, H, W] in [0, 1].

    Colors count by their luminance; transparency is ignored (a mask file is read for its gray levels)."""
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(gray.copy())[None]


def as_mask(mask: Any, what: str = "mask") -> torch.Tensor:
    """A mask in any usual form -> float32 [B, H, W] on the CPU.

    Takes a Pillow image, a numpy array or a tensor shaped [H, W], [B, H, W] or [B, 1, H, W] (ComfyUI's MASK
    and a LATENT's noise_mask) with values from 0 to 1.
    """
    if isinstance(mask, Image.Image):
        return mask_from_image(mask)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: expected a mask (tensor, numpy array or image), got {type(mask).__name__}")
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.numel() == 0:
        raise ValueError(f"{what}: expected a mask [height, width] or [batch, height, width] with no side 0, "
                         f"got shape {list(mask.shape)}")
    mask = mask.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(mask).all()):
        raise ValueError(f"{what} holds NaN or infinite values: the node or file that made it failed")
    low, high = float(mask.min()), float(mask.max())
    if low < 0.0 or high > 1.0:
        hint = " (0..255? divide by 255)" if high > 1.5 else ""
        raise ValueError(f"{what} has values from {low:g} to {high:g}; masks hold 0 (keep) to 1 (edit){hint}")
    return mask


def fit_mask(mask: torch.Tensor, size: tuple[int, int], warn: bool = True) -> torch.Tensor:
    """[B, h, w] -> [B, H, W] for an image of `size` = (W, H): bilinear, as ComfyUI resizes masks; with a
    warning unless the caller knows the mask belongs to the image at another size (`warn=False`)."""
    width, height = size
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    if warn:
        warnings.warn(
            f"the mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the image {width}x{height}: the mask is "
            "resized bilinearly to the image (as ComfyUI does). Make it at the image's size to place it exactly.",
            stacklevel=3,
        )
    fitted = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)
    return fitted[:, 0].clamp(0.0, 1.0)


# --- region, grow, feather ------------------------------------------------------------------------

def distance_to(targets: torch.Tensor, cap: int) -> torch.Tensor:
    """Euclidean distance [B, H, W] from every pixel to the nearest True pixel of `targets` [B, H, W].

    Exact up to `cap`; beyond it the value is only known to exceed `cap` (inf where no target exists).
    Rows first (the nearest target left and right of each pixel, from running maxima of their columns),
    then columns: d^2 = min over |dy| <= cap of row_distance(y + dy)^2 + dy^2.
    """
    width = targets.shape[-1]
    columns = torch.arange(width, dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    left = torch.where(targets, columns, -inf).cummax(dim=-1).values
    right = torch.where(targets, columns, inf).flip(-1).cummin(dim=-1).values.flip(-1)
    squared = torch.minimum(columns - left, right - columns).square()
    best = squared.clone()
    for dy in range(1, min(cap, targets.shape[-2] - 1) + 1):
        best[:, dy:] = torch.minimum(best[:, dy:], squared[:, :-dy] + dy * dy)
        best[:, :-dy] = torch.minimum(best[:, :-dy], squared[:, dy:] + dy * dy)
    return best.sqrt()


def grow_region(region: torch.Tensor, pixels: int) -> torch.Tensor:
    """The region [B, H, W] bool with every pixel within `pixels` (Euclidean) of it added."""
    if pixels <= 0 or not bool(region.any()):
        return region
    return distance_to(region, pixels) <= pixels


def feather_weights(region: torch.Tensor, pixels: int) -> torch.Tensor:
    """Weights [B, H, W] in [0, 1]: 0 outside the region, rising by 1/(pixels+1) per pixel of distance from
    its border, 1 from `pixels + 1` pixels in. Monotone in that distance and never above the region."""
    if pixels <= 0:
        return region.float()
    ramp = pixels + 1
    return (distance_to(~region, ramp) / ramp).clamp(max=1.0)


# --- boxes ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Box:
    """A pixel rectangle: columns left..right-1, rows top..bottom-1."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) for indexing an [..., H, W] or, with `[:, rows, columns]`, a [B, H, W, C] array."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), as Pillow's crop takes it."""
        return self.left, self.top, self.right, self.bottom


def crop_box(region: torch.Tensor, margin: int) -> Box:
    """The box around every region pixel of the batch [B, H, W], `margin` pixels wider on each side and
    clamped to the image. The region must not be empty."""
    height, width = region.shape[-2:]
    rows = torch.nonzero(region.any(dim=0).any(dim=1)).flatten()
    columns = torch.nonzero(region.any(dim=0).any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("an empty mask has no box: nothing to crop to")
    margin = max(0, int(margin))
    return Box(max(0, int(columns[0]) - margin), max(0, int(rows[0]) - margin),
               min(width, int(columns[-1]) + 1 + margin), min(height, int(rows[-1]) + 1 + margin))


# --- compositing ----------------------------------------------------------------------------------

def composite(original: torch.Tensor, edited: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """original * (1 - w) + edited * w for images [B, H, W, C] and weights [B, H, W] (batch 1 broadcasts).

    This form is exact at both ends: a weight of 0 gives the original's value bit for bit, 1 the edit's
    (a lerp, original + w * (edited - original), rounds at 1)."""
    w = weights[..., None].to(edited.dtype)
    return original.to(edited.dtype) * (1.0 - w) + edited * w


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w, C] in [0, 1] -> [B, H, W, C] for size (W, H): bicubic with antialiasing, clamped."""
    width, height = size
    if tuple(images.shape[1:3]) == (height, width):
        return images
    channels_first = images.permute(0, 3, 1, 2).float()
    resized = F.interpolate(channels_first, size=(height, width), mode="bicubic", antialias=True,
                            align_corners=False)
    return resized.clamp(0.0, 1.0).permute(0, 2, 3, 1)


# --- the plan for one masked edit -----------------------------------------------------------------

@dataclass
class MaskedEdit:
    """A mask made ready for one image of `size`: where to sample, how to blend back, which box to edit."""

    region: torch.Tensor  # [B, H, W] bool: binarized and grown
    weights: torch.Tensor  # [B, H, W] float: feathered, <= region
    box: Box  # the part of the image that is edited: all of it, or the cut-out around the region

    @classmethod
    def prepare(cls, mask: Any, size: tuple[int, int], *, grow: int = 0, feather: int = 0,
                crop_to_mask: bool = False, context_margin: int = DEFAULT_CONTEXT_MARGIN) -> "MaskedEdit":
        """`mask` (any form `as_mask` takes) for an image of `size` = (W, H); grow, feather and
        context_margin in that image's pixels."""
        for name, value in (("grow", grow), ("feather", feather), ("context_margin", context_margin)):
            if int(value) != value or value < 0:
                raise ValueError(f"{name} is a number of pixels, 0 or more; got {value}")
        fitted = fit_mask(as_mask(mask), size)
        region = grow_region(fitted >= THRESHOLD, int(grow))
        weights = feather_weights(region, int(feather))
        width, height = size
        box = Box(0, 0, width, height)
        if crop_to_mask and bool(region.any()):
            box = crop_box(region, int(context_margin))
        return cls(region, weights, box)

    @property
    def batch(self) -> int:
        return self.region.shape[0]

    @property
    def empty(self) -> bool:
        """Nothing to edit: the output is the input."""
        return not bool(self.region.any())

    @property
    def full(self) -> bool:
        """Everything is edited with full weight: the same as an edit without a mask."""
        return bool(self.region.all())

    @property
    def cropped(self) -> bool:
        return (self.box.width, self.box.height) != tuple(reversed(self.region.shape[-2:]))

    def check_batch(self, batch: int) -> None:
        if self.batch not in (1, batch):
            raise ValueError(f"the mask has a batch of {self.batch} but the edit a batch of {batch}; give one mask "
                             "for all, or one per prompt")

    def cut(self, images: torch.Tensor) -> torch.Tensor:
        """The box of images [B, H, W, C]."""
        rows, columns = self.box.slices()
        return images[:, rows, columns]

    def latent_mask(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """[B, 1, h, w] in {0, 1} for the box's latent: 1 wherever a covered pixel lies in the region.

        Adaptive max pooling covers every pixel whatever the ratio of the sizes (odd sizes, a box resized
        to another working size)."""
        rows, columns = self.box.slices()
        inside = self.region[:, rows, columns].float()[:, None]
        return F.adaptive_max_pool2d(inside, tuple(latent_hw))

    def paste(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        """The edit put back: `edited` [B, h, w, C] (the box, at any size) resized to the box and composited
        into `source` [1 or B, H, W, C] through the weights. Outside the region the result is `source`."""
        batch = max(source.shape[0], edited.shape[0], self.batch)
        placed = source.to(edited.dtype).expand(batch, -1, -1, -1).clone()
        rows, columns = self.box.slices()
        placed[:, rows, columns] = resize_images(edited, (self.box.width, self.box.height)).to(placed.dtype)
        return composite(source.expand(batch, -1, -1, -1), placed, self.weights)


@dataclass
class LatentInpaint:
    """A sampling run that may change its latent only inside `mask`: `original` is kept everywhere else."""

    mask: torch.Tensor  # [B or 1, 1, h, w] in {0, 1}: 1 sampled, 0 kept
    original: torch.Tensor  # [B or 1, 16, h, w] scaled latent

    def step_blend(self, noise: torch.Tensor, device: torch.device) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """For `sample_euler(blend=)`: after each step, the original noised to the step's t_next (with the
        run's own `noise` [B, C, h, w]) replaces the latent outside the mask, so the sampled part is made to
        fit surroundings that move toward the original at the schedule's pace (diffusers'
        FluxKontextInpaintPipeline does the same). t_next = 0 at the last step leaves the original itself."""
        shape = noise.shape
        keep = pack_latent(1.0 - self.mask.float().expand(shape)).to(device)
        sampled = pack_latent(self.mask.float().expand(shape)).to(device)
        original = pack_latent(self.original.float().expand(shape)).to(device)
        noise = pack_latent(noise.float()).to(device)

        def blend(tokens: torch.Tensor, t_next: float) -> torch.Tensor:
            return keep * noise_latent(original, noise, t_next) + sampled * tokens

        return blend

    def composite(self, latent: torch.Tensor) -> torch.Tensor:
        """The sampled latent with the original put back outside the mask, exactly (whatever rounding or a
        non-finite value did in the blend)."""
        original = self.original.to(latent.device, latent.dtype).expand_as(latent)
        return torch.where(self.mask.to(latent.device).expand_as(latent) > 0, latent, original)
