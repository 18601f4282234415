"""Images in and out: mode conversion, Kontext's preferred resolutions, tensors in [-1, 1].

Conversion rule for odd modes: transparency (RGBA, LA, palette with transparency) is composited
over white; grayscale is repeated to three channels; 16- and 32-bit images are scaled from their
full range without first dropping to 8 bits; CMYK and others go through Pillow's RGB conversion.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# (width, height) pairs Kontext was trained at; the reference picks the nearest aspect ratio.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)
MULTIPLE = 16  # 8x autoencoder downsampling times the 2x2 patch
RESIZE_MODES = ("preferred", "keep", "exact")
FIT_MODES = ("stretch", "crop")
STITCH_DIRECTIONS = ("right", "down")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """float32 [H, W, 3] in [0, 1] from any Pillow mode, by the rule in the module docstring."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or data.max() > 255 else 255.0
        gray = np.clip(data / peak, 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def to_rgb_image(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image the pipeline works from (by the rule in the module docstring); RGB images as they are."""
    if image.mode == "RGB":
        return image
    return Image.fromarray((to_rgb_array(image) * 255.0 + 0.5).astype(np.uint8))


def unit_images(images: list[Image.Image]) -> torch.Tensor:
    """Images of one size -> float [B, H, W, 3] in [0, 1], each value an 8-bit level / 255."""
    arrays = [np.asarray(to_rgb_image(i), dtype=np.float32) / 255.0 for i in images]
    return torch.from_numpy(np.stack(arrays))


def from_unit_images(images: torch.Tensor) -> list[Image.Image]:
    """[B, H, W, 3] in [0, 1] -> 8-bit RGB images (rounded: k / 255 comes back as k)."""
    array = (images.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in array]


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """The autoencoder's [B, 3, H, W] in about [-1, 1] -> [B, H, W, 3] in [0, 1] (float, not quantized)."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous()


def stitch_images(images: list[Image.Image], direction: str = "right") -> Image.Image:
    """Images joined into one, side by side ("right") or one below the other ("down"), the first as it is and
    each other resized (aspect kept) to the first's height (right) or width (down), as ComfyUI's Image Stitch
    node with match_image_size does; how its Kontext template puts several references into one context."""
    if direction not in STITCH_DIRECTIONS:
        raise ValueError(f"unknown stitch direction {direction!r}; choose one of {', '.join(STITCH_DIRECTIONS)}")
    pictures = [to_rgb_image(i) for i in images]
    first = pictures[0]
    placed = [first]
    for picture in pictures[1:]:
        if direction == "right":
            size = (max(1, round(picture.width * first.height / picture.height)), first.height)
        else:
            size = (first.width, max(1, round(picture.height * first.width / picture.width)))
        placed.append(picture if picture.size == size else picture.resize(size, Image.Resampling.LANCZOS))
    if direction == "right":
        canvas = Image.new("RGB", (sum(p.width for p in placed), first.height))
        offsets = np.cumsum([0] + [p.width for p in placed[:-1]])
        for picture, offset in zip(placed, offsets):
            canvas.paste(picture, (int(offset), 0))
    else:
        canvas = Image.new("RGB", (first.width, sum(p.height for p in placed)))
        offsets = np.cumsum([0] + [p.height for p in placed[:-1]])
        for picture, offset in zip(placed, offsets):
            canvas.paste(picture, (0, int(offset)))
    return canvas


def preferred_size(width: int, height: int, multiple: int = MULTIPLE) -> tuple[int, int]:
    """The trained (width, height) whose aspect ratio is nearest, snapped to multiples of 16."""
    ratio = width / height
    _, best_w, best_h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return best_w // multiple * multiple, best_h // multiple * multiple


def snap(value: int, multiple: int = MULTIPLE) -> int:
    return max(multiple, value // multiple * multiple)


def target_size(width: int, height: int, mode: str = "preferred", size: tuple[int, int] | None = None,
                multiple: int = MULTIPLE) -> tuple[int, int]:
    """Working size for an input: 'preferred' (Kontext's list), 'keep' (snapped), 'exact' (given, snapped)."""
    if mode == "preferred":
        return preferred_size(width, height, multiple)
    if mode == "keep":
        return snap(width, multiple), snap(height, multiple)
    if mode == "exact":
        if size is None:
            raise ValueError("resize mode 'exact' needs a (width, height)")
        return snap(size[0], multiple), snap(size[1], multiple)
    raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")


def _center_crop_to_ratio(image: Image.Image, width: int, height: int) -> Image.Image:
    src_w, src_h = image.size
    if src_w * height > src_h * width:
        new_w = round(src_h * width / height)
        left = (src_w - new_w) // 2
        return image.crop((left, 0, left + new_w, src_h))
    new_h = round(src_w * height / width)
    top = (src_h - new_h) // 2
    return image.crop((0, top, src_w, top + new_h))


def prepare_image(image: Image.Image, mode: str = "preferred", size: tuple[int, int] | None = None,
                  fit: str = "stretch", multiple: int = MULTIPLE) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] at the working size.

    fit 'stretch' resizes straight to the size (BFL and diffusers); 'crop' first center-crops to its
    aspect ratio (ComfyUI's FluxKontextImageScale).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if fit not in FIT_MODES:
        raise ValueError(f"unknown fit {fit!r}; choose one of {', '.join(FIT_MODES)}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"the image is empty ({image.width}x{image.height})")
    width, height = target_size(image.width, image.height, mode, size, multiple)
    rgb = to_rgb_image(image)
    if fit == "crop":
        rgb = _center_crop_to_ratio(rgb, width, height)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in about [-1, 1] -> 8-bit RGB images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
