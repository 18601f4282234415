"""How far an image is from a reference: shift, scale, colour (CIEDE2000), SSIM, PSNR, sharpness.

Images are Pillow images or float arrays [H, W, 3] of encoded sRGB in [0, 1]; both must have the same size.
A mask (same size; nonzero or > 0.5 = masked) marks the part that was allowed to change: every metric is
then measured only where the mask is 0.

- psnr: on 8-bit RGB (float images are rounded to 8 bits first). Images identical in 8 bits have an
  infinite PSNR: `psnr` returns math.inf and `compare_images` gives None (JSON null; JSON has no infinity).
  Masked: the mean squared error over the unmasked pixels.
- ssim: Wang et al. (2004) on luma (Rec. 601 weights), an 11-tap Gaussian window of sigma 1.5, K1 0.01,
  K2 0.03, over the pixels whose whole window lies in the image. Masked: the mean over the pixels whose
  whole window lies outside the mask, so a change inside it cannot leak into the score through the window.
- delta_e: mean CIEDE2000 difference in CIELAB (D65), per pixel; masked: over the unmasked pixels.
- sharpness_ratio: variance of the Laplacian of `other`'s luma over `reference`'s (below 1: blurrier).
  Masked: over the pixels whose 3x3 neighbourhood is outside the mask. Both flat: 1; only the reference
  flat: infinite (None in `compare_images`).
- shift_px, scale: registration.py's phase correlations on luma. Masked: the mask is applied as a window
  (zero on the mask, rising smoothly to 1 over a few pixels outside it), on both images alike.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from PIL import Image

from ..image import to_rgb_array
from .colour import ciede2000, srgb_to_lab
from .filters import gaussian_blur, laplacian, luminance, touched_by
from .registration import log_polar_scale, mask_window, phase_correlation

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps: the window of Wang et al.
SSIM_K1, SSIM_K2 = 0.01, 0.03
METRICS = ("shift_px", "scale", "delta_e", "ssim", "psnr", "sharpness_ratio")


def as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """float64 [H, W, 3] encoded sRGB in [0, 1] from a Pillow image (any mode) or such an array."""
    if isinstance(image, Image.Image):
        return to_rgb_array(image).astype(np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB array [H, W, 3], got shape {list(array.shape)}")
    return array


def as_mask(mask: Image.Image | np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """bool [H, W] (True: masked, may change) from a mask image (white = masked) or array; None stays None."""
    if mask is None:
        return None
    if isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
    else:
        array = np.asarray(mask, dtype=np.float64)
        array = array.max(axis=2) if array.ndim == 3 else array
    if array.shape != tuple(shape):
        raise ValueError(f"the mask is {array.shape[1]}x{array.shape[0]} and the images "
                         f"{shape[1]}x{shape[0]}; give a mask of the images' size")
    masked = array > 0.5
    if masked.all():
        raise ValueError("the mask covers the whole image: nothing is left to measure (the mask is white where "
                         "the image may change, black where it should not)")
    return masked


def _pair(reference, other) -> tuple[np.ndarray, np.ndarray]:
    reference, other = as_rgb(reference), as_rgb(other)
    if reference.shape != other.shape:
        raise ValueError(f"the images differ in size ({reference.shape[1]}x{reference.shape[0]} and "
                         f"{other.shape[1]}x{other.shape[0]}); resize one to the other's size to compare them")
    return reference, other


def _eight_bit(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0)


def psnr(reference, other, mask=None) -> float:
    """Peak signal-to-noise ratio in dB on 8-bit RGB; math.inf for images identical in 8 bits."""
    reference, other = _pair(reference, other)
    masked = as_mask(mask, reference.shape[:2])
    squared = (_eight_bit(reference) - _eight_bit(other)) ** 2
    mse = squared.mean() if masked is None else squared[~masked].mean()
    return math.inf if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim_map(reference_luma: np.ndarray, other_luma: np.ndarray) -> np.ndarray:
    """The SSIM of every window lying wholly in the image: [H - 10, W - 10] for [H, W] luma in [0, 1]."""
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # the data range is 1

    def local_mean(image):
        return gaussian_blur(image, SSIM_SIGMA, valid=True, radius=SSIM_RADIUS)

    mean_x, mean_y = local_mean(reference_luma), local_mean(other_luma)
    var_x = local_mean(reference_luma ** 2) - mean_x ** 2
    var_y = local_mean(other_luma ** 2) - mean_y ** 2
    covariance = local_mean(reference_luma * other_luma) - mean_x * mean_y
    return (((2 * mean_x * mean_y + c1) * (2 * covariance + c2))
            / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2)))


def ssim(reference, other, mask=None) -> float:
    reference, other = _pair(reference, other)
    height, width = reference.shape[:2]
    if min(height, width) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1} pixels, "
                         f"got {width}x{height}")
    scores = ssim_map(luminance(reference), luminance(other))
    masked = as_mask(mask, (height, width))
    if masked is None:
        return float(scores.mean())
    clear = ~touched_by(masked, SSIM_RADIUS)
    if not clear.any():
        raise ValueError(f"no {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1} window lies wholly outside the mask: "
                         "the masked SSIM has nothing to measure (shrink the mask)")
    return float(scores[clear].mean())


def mean_delta_e(reference, other, mask=None) -> float:
    """Mean CIEDE2000 difference per pixel."""
    reference, other = _pair(reference, other)
    differences = ciede2000(srgb_to_lab(reference), srgb_to_lab(other))
    masked = as_mask(mask, reference.shape[:2])
    return float(differences.mean() if masked is None else differences[~masked].mean())


def sharpness(image, mask=None) -> float:
    """Variance of the luma's Laplacian (over the pixels whose 3x3 neighbourhood is outside the mask)."""
    rgb = as_rgb(image)
    if min(rgb.shape[:2]) < 3:
        raise ValueError(f"sharpness needs images of at least 3x3 pixels, got {rgb.shape[1]}x{rgb.shape[0]}")
    response = laplacian(luminance(rgb))
    masked = as_mask(mask, rgb.shape[:2])
    if masked is not None:
        response = response[~touched_by(masked, 1)]
    return float(response.var()) if response.size else 0.0


def sharpness_ratio(reference, other, mask=None) -> float:
    reference, other = _pair(reference, other)
    reference_sharpness, other_sharpness = sharpness(reference, mask), sharpness(other, mask)
    if reference_sharpness == 0:
        return 1.0 if other_sharpness == 0 else math.inf
    return other_sharpness / reference_sharpness


def shift(reference, other, mask=None) -> tuple[float, float]:
    """(dx, dy) in pixels: where `other`'s content sits against `reference`'s (+x right, +y down)."""
    reference, other = _pair(reference, other)
    masked = as_mask(mask, reference.shape[:2])
    dy, dx, _ = phase_correlation(luminance(reference), luminance(other),
                                  keep=None if masked is None else mask_window(masked))
    return dx, dy


def scale(reference, other, mask=None) -> float:
    """How much larger `other`'s content is (1.02: 2% larger), whatever it shifted by."""
    reference, other = _pair(reference, other)
    masked = as_mask(mask, reference.shape[:2])
    return log_polar_scale(luminance(reference), luminance(other), None if masked is None else mask_window(masked))


def _finite_or_none(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


def compare_images(reference, other, mask=None, metrics: Iterable[str] = METRICS) -> dict:
    """The metrics named (default: all of METRICS) as a JSON-ready dict: infinities as None, numbers rounded
    to what they resolve. With a mask, "mask_fraction" says how much of the image it covers."""
    reference, other = _pair(reference, other)
    wanted = list(metrics)
    if unknown := [name for name in wanted if name not in METRICS]:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    masked = as_mask(mask, reference.shape[:2])
    result: dict = {}
    if "shift_px" in wanted:
        result["shift_px"] = [round(value, 3) for value in shift(reference, other, masked)]
    if "scale" in wanted:
        result["scale"] = round(scale(reference, other, masked), 5)
    if "delta_e" in wanted:
        result["delta_e"] = round(mean_delta_e(reference, other, masked), 4)
    if "ssim" in wanted:
        result["ssim"] = round(ssim(reference, other, masked), 6)
    if "psnr" in wanted:
        result["psnr"] = _finite_or_none(psnr(reference, other, masked), 3)
    if "sharpness_ratio" in wanted:
        result["sharpness_ratio"] = _finite_or_none(sharpness_ratio(reference, other, masked), 4)
    if masked is not None:
        result["mask_fraction"] = round(float(masked.mean()), 4)
    return result
