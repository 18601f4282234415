"""The few image filters the metrics need, in numpy: luminance, Gaussian blur, Laplacian, and the mask's
reach (which pixels a filter's footprint lets the masked region touch)."""

from __future__ import annotations

import numpy as np

# Rec. 601 luma weights on the encoded values: the luminance SSIM is usually computed on.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def luminance(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] encoded RGB in [0, 1] -> [H, W] luma in [0, 1]."""
    return np.asarray(rgb, dtype=np.float64) @ LUMA_WEIGHTS


def gaussian_kernel(sigma: float, radius: int | None = None) -> np.ndarray:
    """1-D Gaussian taps summing to 1; radius 3.5 sigma rounded up unless given (sigma 1.5: 11 taps, Wang et
    al.'s window)."""
    radius = int(np.ceil(3.5 * sigma)) if radius is None else radius
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _correlate_axis(image: np.ndarray, taps: np.ndarray, axis: int, valid: bool) -> np.ndarray:
    radius = len(taps) // 2
    if not valid:  # same size: the edge mirrored (without repeating the edge pixel)
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        image = np.pad(image, pad, mode="reflect" if image.shape[axis] > radius else "symmetric")
    length = image.shape[axis] - 2 * radius
    if length < 1:
        raise ValueError(f"the image is {image.shape[axis]} pixels along an axis; this filter needs at least "
                         f"{2 * radius + 1}")
    out = np.zeros(image.shape[:axis] + (length,) + image.shape[axis + 1:], dtype=np.float64)
    for offset, tap in enumerate(taps):
        out += tap * np.take(image, np.arange(offset, offset + length), axis=axis)
    return out


def gaussian_blur(image: np.ndarray, sigma: float, valid: bool = False, radius: int | None = None) -> np.ndarray:
    """Separable Gaussian over the first two axes. valid=True keeps only the pixels whose whole window lies in
    the image (each side shrinks by the radius); otherwise the edges are mirrored and the size kept."""
    taps = gaussian_kernel(sigma, radius)
    image = np.asarray(image, dtype=np.float64)
    return _correlate_axis(_correlate_axis(image, taps, 0, valid), taps, 1, valid)


def laplacian(image: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian of [H, W] on the interior pixels ([H-2, W-2]): no edge rule to bias it."""
    return (image[:-2, 1:-1] + image[2:, 1:-1] + image[1:-1, :-2] + image[1:-1, 2:]) - 4 * image[1:-1, 1:-1]


def touched_by(mask: np.ndarray, radius: int, valid: bool = True) -> np.ndarray:
    """Pixels whose (2 radius + 1)-square footprint holds any masked pixel: the mask dilated by `radius`.
    valid=True gives it on the interior a `valid` filter of that radius keeps ([H - 2r, W - 2r])."""
    mask = np.asarray(mask, dtype=bool)
    if not valid:
        mask = np.pad(mask, radius, mode="edge")
    height, width = mask.shape[0] - 2 * radius, mask.shape[1] - 2 * radius
    # A box sum from the summed-area table: any masked pixel in the footprint makes it positive.
    table = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    size = 2 * radius + 1
    box = (table[size:size + height, size:size + width] - table[:height, size:size + width]
           - table[size:size + height, :width] + table[:height, :width])
    return box > 0
