"""How far one image moved against another: translation by phase correlation (refined to a fraction of a
pixel by a locally upsampled inverse DFT), scale by phase correlation of log-polar Fourier magnitudes.

Both take [H, W] float arrays (luminance) and optionally `keep`, a weight of the same shape: 0 where a pixel
must not count (the part of an edit allowed to change, which sits at the same place in both images), 1 where
it counts, smooth in between (`mask_window`). Weights are applied after the weighted mean is subtracted, so a
cut-out region reads as flat grey and its tapered edge adds no sharp structure of its own.

A weight that stays put while the content moves under it pulls the estimate towards no motion (both weighted
images then share the weight's own structure). So both functions estimate, then weight the two images as the
same picture in the content's coordinates (the edge taper carried along with the content, the cut-out region
of either image cut from both) and measure again, until the estimate settles.
"""

from __future__ import annotations

import numpy as np

from .filters import gaussian_blur

# Frequencies whose cross-power magnitude is above this share of the largest are whitened (phase only); weaker
# ones keep weights in proportion to their magnitude. Where the images hold next to no energy, what the FFT
# finds there is mostly leakage of strong low frequencies through the window, carrying their phase, not the
# shift's: fully whitened, it would pull the peak towards 0 (measured: up to 0.2 px on smooth 64 px textures).
_WHITENING_FLOOR = 1e-2
_UPSAMPLE = 50  # the refined peak is searched on a 1/50-pixel grid, then fitted between grid points
_SEARCH_RADIUS = 0.75  # pixels either side of the integer peak searched on the fine grid


def edge_taper(shape: tuple[int, int], fraction: float = 0.25) -> np.ndarray:
    """A window that is 1 inside and falls to 0 at the border with a raised cosine over `fraction` of each
    side (a Tukey window per axis). It keeps the FFT's wrap-around seam out of the correlation."""
    def axis(length: int) -> np.ndarray:
        ramp = max(1, int(round(fraction * length)))
        window = np.ones(length)
        rising = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        window[:ramp] = rising
        window[length - ramp:] = rising[::-1]
        return window

    return np.outer(axis(shape[0]), axis(shape[1]))


def mask_window(mask: np.ndarray, taper_px: float = 4.0) -> np.ndarray:
    """The weight for registering only the unmasked part: 0 on the mask (mask > 0.5) and rising smoothly to 1
    over about 2 * taper_px pixels outside it. The ramp lies outside the mask, so nothing inside it counts."""
    masked = np.asarray(mask) > 0.5
    spread = gaussian_blur(masked.astype(np.float64), taper_px)
    return np.where(masked, 0.0, np.clip(1.0 - 2.0 * spread, 0.0, 1.0))


def _prepared(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    mean = (image * window).sum() / max(window.sum(), 1e-12)
    return (image - mean) * window


def _whitened_cross_power(reference_spectrum: np.ndarray, moved_spectrum: np.ndarray) -> np.ndarray:
    cross = moved_spectrum * np.conj(reference_spectrum)
    magnitude = np.abs(cross)
    floor = max(_WHITENING_FLOOR * magnitude.max(), np.finfo(np.float64).tiny)
    return cross / np.maximum(magnitude, floor)


def _upsampled_correlation(cross_power: np.ndarray, centre: tuple[float, float], upsample: int,
                           radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse DFT of `cross_power` evaluated only on a fine grid (spacing 1/upsample) of +-radius pixels
    around `centre` (row, col): two small matrix products instead of an FFT of an upsample-times larger
    array. Returns (values [m, n], row offsets, col offsets)."""
    rows, cols = cross_power.shape
    offsets = np.arange(-int(np.ceil(radius * upsample)), int(np.ceil(radius * upsample)) + 1) / upsample
    row_positions, col_positions = centre[0] + offsets, centre[1] + offsets
    row_freq = np.fft.fftfreq(rows)  # cycles per pixel, signed: the phase ramp of a shift is linear in these
    col_freq = np.fft.fftfreq(cols)
    row_kernel = np.exp(2j * np.pi * np.outer(row_positions, row_freq))  # [m, rows]
    col_kernel = np.exp(2j * np.pi * np.outer(col_freq, col_positions))  # [cols, n]
    return (row_kernel @ cross_power @ col_kernel).real, offsets, offsets


def _parabola_vertex(below: float, at: float, above: float) -> float:
    """Offset (in grid steps, within +-0.5) of the vertex of the parabola through three equally spaced
    samples whose middle one is the largest."""
    curvature = below - 2 * at + above
    if curvature >= 0:
        return 0.0
    return float(np.clip(0.5 * (below - above) / curvature, -0.5, 0.5))


def _correlate_once(reference: np.ndarray, moved: np.ndarray, reference_window: np.ndarray,
                    moved_window: np.ndarray, upsample: int) -> tuple[float, float, float]:
    cross_power = _whitened_cross_power(np.fft.fft2(_prepared(reference, reference_window)),
                                        np.fft.fft2(_prepared(moved, moved_window)))
    correlation = np.fft.ifft2(cross_power).real
    peak_row, peak_col = np.unravel_index(np.argmax(correlation), correlation.shape)
    rows, cols = correlation.shape
    # Past half the size a peak is a shift the other way round the FFT's circle.
    coarse = (peak_row - rows if peak_row > rows // 2 else peak_row,
              peak_col - cols if peak_col > cols // 2 else peak_col)
    fine, row_offsets, col_offsets = _upsampled_correlation(cross_power, coarse, upsample, _SEARCH_RADIUS)
    i, j = np.unravel_index(np.argmax(fine), fine.shape)
    dy, dx = coarse[0] + row_offsets[i], coarse[1] + col_offsets[j]
    if 0 < i < fine.shape[0] - 1:
        dy += _parabola_vertex(fine[i - 1, j], fine[i, j], fine[i + 1, j]) / upsample
    if 0 < j < fine.shape[1] - 1:
        dx += _parabola_vertex(fine[i, j - 1], fine[i, j], fine[i, j + 1]) / upsample
    return float(dy), float(dx), float(fine[i, j]) / cross_power.size


def _shifted(weight: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """`weight` with its content moved by (dy, dx); what comes in from outside reads as 0."""
    rows, cols = np.mgrid[:weight.shape[0], :weight.shape[1]].astype(np.float64)
    return _bilinear(weight, rows - dy, cols - dx)


def phase_correlation(reference: np.ndarray, moved: np.ndarray, keep: np.ndarray | None = None,
                      taper: np.ndarray | None = None, upsample: int = _UPSAMPLE,
                      rounds: int = 4) -> tuple[float, float, float]:
    """(dy, dx, peak): the translation taking `reference` onto `moved` (moved(y, x) ~ reference(y - dy, x - dx):
    positive dx is content moved right, positive dy moved down), and the correlation peak's height (at most 1;
    near 0 when nothing matches).

    taper: the window against the FFT's wrap-around (default `edge_taper`), carried along with the content.
    keep: the fixed weight of the module docstring. With an estimate d, the reference is weighted by
    taper(x) keep(x) keep(x + d) and `moved` by the same moved by d, so at the true shift both weighted images
    are one picture, shifted, and neither's cut-out region shows in the other. At most `rounds` measurements.
    """
    reference, moved = np.asarray(reference, np.float64), np.asarray(moved, np.float64)
    if reference.shape != moved.shape:
        raise ValueError(f"images of different sizes ({reference.shape} and {moved.shape}) cannot be registered")
    taper = edge_taper(reference.shape) if taper is None else np.asarray(taper, np.float64)
    keep = np.ones(reference.shape) if keep is None else np.asarray(keep, np.float64)
    content_window = taper * keep
    dy, dx, peak = _correlate_once(reference, moved, content_window, content_window, upsample)
    for _ in range(rounds - 1):
        content_window = taper * keep * _shifted(keep, -dy, -dx)
        step_dy, step_dx, peak = _correlate_once(reference, moved, content_window,
                                                 _shifted(content_window, dy, dx), upsample)
        settled = abs(step_dy - dy) < 0.2 / upsample and abs(step_dx - dx) < 0.2 / upsample
        dy, dx = step_dy, step_dx
        if settled:
            break
    return dy, dx, peak


def _bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """image sampled at fractional (rows, cols); positions outside read as 0."""
    height, width = image.shape
    row0, col0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    row_frac, col_frac = rows - row0, cols - col0
    out = np.zeros(rows.shape)
    for dr, dc, weight in ((0, 0, (1 - row_frac) * (1 - col_frac)), (0, 1, (1 - row_frac) * col_frac),
                           (1, 0, row_frac * (1 - col_frac)), (1, 1, row_frac * col_frac)):
        r, c = row0 + dr, col0 + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        out[inside] += weight[inside] * image[r[inside], c[inside]]
    return out


def _log_polar_magnitude(image: np.ndarray, window: np.ndarray, size: int, radii: np.ndarray,
                         angles: int) -> np.ndarray:
    """The centred log Fourier magnitude of the windowed image (zero-padded to size x size, so the frequency
    grid is the same along both axes) resampled at `radii` (pixels of that grid) and `angles` over half a turn
    (a real image's magnitude is point-symmetric): [angles, len(radii)]."""
    padded = np.zeros((size, size))
    padded[:image.shape[0], :image.shape[1]] = _prepared(image, window)
    # log1p: the magnitude falls by orders of magnitude from the centre out; unflattened, the few lowest
    # frequencies would decide the match alone.
    magnitude = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(padded))))
    theta = np.pi * np.arange(angles) / angles
    rows = size // 2 + np.outer(np.sin(theta), radii)
    cols = size // 2 + np.outer(np.cos(theta), radii)
    return _bilinear(magnitude, rows, cols)


def _scaled(weight: np.ndarray, scale: float) -> np.ndarray:
    """`weight` magnified by `scale` about the image centre; what comes in from outside reads as 0."""
    rows, cols = np.mgrid[:weight.shape[0], :weight.shape[1]].astype(np.float64)
    centre_row, centre_col = (weight.shape[0] - 1) / 2, (weight.shape[1] - 1) / 2
    return _bilinear(weight, centre_row + (rows - centre_row) / scale, centre_col + (cols - centre_col) / scale)


def log_polar_scale(reference: np.ndarray, moved: np.ndarray, keep: np.ndarray | None = None,
                    rounds: int = 4) -> float:
    """How much larger `moved`'s content is than `reference`'s (1.02: magnified 2%), translation-independent.

    Scaling an image by s scales its Fourier magnitude by 1/s; in log-polar coordinates that is a shift of
    -log(s) along the log-radius axis, which phase correlation measures. Radii from 2% to 45% of the sampling
    rate are used: the lowest few frequencies carry the window's shape more than the image's. The weights
    follow the content as in `phase_correlation`, magnified about the centre instead of shifted (at most
    `rounds` measurements).
    """
    reference, moved = np.asarray(reference, np.float64), np.asarray(moved, np.float64)
    if reference.shape != moved.shape:
        raise ValueError(f"images of different sizes ({reference.shape} and {moved.shape}) cannot be compared")
    # A Hann-like taper over the whole frame: the magnitude must not carry the frame's edges as a cross.
    taper = edge_taper(reference.shape, 0.5)
    masked = keep is not None
    keep = np.ones(reference.shape) if keep is None else np.asarray(keep, np.float64)
    # Zero-padded to twice the size: the magnitude is then sampled at half-bin spacing, which the bilinear
    # resampling below needs (at one sample per bin it biases the scale towards 1 by ~0.005 on 64 px images).
    size = 2 * int(2 ** np.ceil(np.log2(max(reference.shape))))
    # Log-radius samples: 1024 at most (0.3% of scale apart, which the peak refinement divides by 50); the
    # angles need less, the scale lies along the radius.
    samples = min(size, 1024)
    angles = min(size // 2, 512)
    inner, outer = 0.02 * size, 0.45 * size
    log_step = np.log(outer / inner) / (samples - 1)
    radii = inner * np.exp(log_step * np.arange(samples))
    # The angle axis wraps round (half a turn is the whole circle of a symmetric magnitude); the log-radius
    # one does not, so only it is tapered.
    radial_taper = np.broadcast_to(edge_taper((1, samples), 0.15), (angles, samples))
    scale, polar_reference = 1.0, None
    for _ in range(rounds):
        content_window = taper * keep * _scaled(keep, 1 / scale)
        if polar_reference is None or masked:  # unmasked, the reference's weight never changes
            polar_reference = _log_polar_magnitude(reference, content_window, size, radii, angles)
        polar_moved = _log_polar_magnitude(moved, _scaled(content_window, scale), size, radii, angles)
        _, radius_shift, _ = phase_correlation(polar_reference, polar_moved, taper=radial_taper)
        # Each round measures the whole scale again (the content has not moved), now under a fitting window.
        estimate = float(np.exp(-radius_shift * log_step))
        settled = abs(estimate - scale) < 1e-4
        scale = estimate
        if settled:
            break
    return scale
