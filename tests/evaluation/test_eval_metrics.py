"""kontext_core.evaluation's metrics on synthetic images whose answer is known: shifts made by rolling or by a
Fourier phase ramp, scales made by evaluating an analytic texture on magnified coordinates, colour offsets
made in CIELAB, and CIEDE2000 against Sharma, Wu and Dalal's published test pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kontext_core.evaluation import (ciede2000, compare_images, lab_to_srgb, mean_delta_e, psnr, scale,
                                     sharpness_ratio, shift, srgb_to_lab, ssim)
from kontext_core.evaluation.filters import gaussian_blur

# (Lab 1, Lab 2, ΔE00) from Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula:
# implementation notes, supplementary test data and mathematical observations", Table 1 (pair numbers).
SHARMA_PAIRS = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),  # 1: blue region, rotation term
    ((50.0, 3.1571, -77.2803), (50.0, 0.0, -82.7485), 2.8615),  # 2
    ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),  # 4
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),  # 7: one neutral colour
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0009), 7.1792),  # 13: hues about 180 degrees apart
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0011), 7.2195),  # 15: ... the mean hue taken the other way round
    ((50.0, -0.001, 2.49), (50.0, 0.0011, -2.49), 4.7461),  # 19
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),  # 21: large differences
    ((50.0, 2.5, 0.0), (56.0, -27.0, -3.0), 31.9030),  # 23
    ((50.0, 2.5, 0.0), (50.0, 3.1736, 0.5854), 1.0000),  # 25
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),  # 29
    ((22.7233, 20.0904, -46.694), (23.0331, 14.973, -42.5619), 2.0373),  # 33
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),  # 36: light
    ((2.0776, 0.0795, -1.135), (0.9033, -0.0636, -0.5514), 0.9082),  # 38: dark
]


def smooth_texture(size: int, seed: int, blur: float = 2.0) -> np.ndarray:
    """[size, size, 3] in about [0.15, 0.85]: white noise low-passed in the Fourier domain (periodic, so a
    phase ramp shifts it exactly)."""
    rng = np.random.default_rng(seed)
    freq = np.fft.fftfreq(size)
    low_pass = np.exp(-2 * (np.pi * blur) ** 2 * (freq[:, None] ** 2 + freq[None, :] ** 2))
    channels = [np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * low_pass).real for _ in range(3)]
    texture = np.stack(channels, axis=-1)
    return 0.5 + 0.35 * texture / np.abs(texture).max()


def fourier_shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The image's content moved by (dx, dy) pixels (circularly, by a phase ramp: exact for any fraction)."""
    freq_y, freq_x = np.fft.fftfreq(image.shape[0])[:, None], np.fft.fftfreq(image.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (freq_y * dy + freq_x * dx))
    return np.stack([np.fft.ifft2(np.fft.fft2(image[..., c]) * ramp).real for c in range(3)], axis=-1)


def cosine_texture(size: int, seed: int, magnification: float = 1.0) -> np.ndarray:
    """A sum of random plane waves evaluated on coordinates about the centre divided by `magnification`: the
    same texture exactly magnified, with no resampling. [size, size, 3] in about [0.1, 0.9]."""
    rng = np.random.default_rng(seed)
    count = 40
    frequency, angle = rng.uniform(0.03, 0.22, count), rng.uniform(0, 2 * np.pi, count)
    phase, weight = rng.uniform(0, 2 * np.pi, (3, count)), rng.uniform(0.5, 1.0, count)
    y, x = (np.mgrid[:size, :size] - (size - 1) / 2) / magnification
    along = frequency[:, None, None] * (np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y)
    channels = [(weight[:, None, None] * np.cos(2 * np.pi * along + phase[c][:, None, None])).sum(0)
                for c in range(3)]
    return 0.5 + 0.4 * np.stack(channels, axis=-1) / count ** 0.5 / 2.5


# --- CIEDE2000 and the colour conversions -------------------------------------------------------------

def test_ciede2000_matches_the_published_test_pairs():
    first = np.array([pair[0] for pair in SHARMA_PAIRS])
    second = np.array([pair[1] for pair in SHARMA_PAIRS])
    expected = np.array([pair[2] for pair in SHARMA_PAIRS])
    assert np.abs(ciede2000(first, second) - expected).max() < 5e-5  # the paper gives four decimals
    assert np.allclose(ciede2000(second, first), ciede2000(first, second))  # symmetric


def test_lab_conversion_white_red_and_round_trip():
    assert np.allclose(srgb_to_lab(np.array([1.0, 1.0, 1.0])), [100, 0, 0], atol=1e-6)
    # sRGB red in CIELAB (D65), the commonly tabulated value.
    assert np.allclose(srgb_to_lab(np.array([1.0, 0.0, 0.0])), [53.24, 80.09, 67.20], atol=0.01)
    colours = np.random.default_rng(0).uniform(0, 1, (200, 3))
    assert np.allclose(lab_to_srgb(srgb_to_lab(colours)), colours, atol=1e-10)


def test_a_uniform_lightness_offset_gives_its_ciede2000_mean():
    # With a* and b* unchanged, CIEDE2000 reduces to |ΔL| / S_L at the mean lightness: an independent formula.
    reference = smooth_texture(32, seed=3)
    lab = srgb_to_lab(reference)
    offset = np.array([3.0, 0.0, 0.0])
    other = lab_to_srgb(lab + offset)
    mean_lightness = lab[..., 0] + offset[0] / 2
    s_l = 1 + 0.015 * (mean_lightness - 50) ** 2 / np.sqrt(20 + (mean_lightness - 50) ** 2)
    assert mean_delta_e(reference, other) == pytest.approx(float(np.mean(offset[0] / s_l)), rel=1e-6)


def test_a_chroma_offset_matches_ciede2000_pixel_by_pixel():
    reference = smooth_texture(24, seed=4)
    other = lab_to_srgb(srgb_to_lab(reference) + np.array([0.0, 4.0, -2.0]))
    assert np.all((other > 0) & (other < 1))  # the offset stays in gamut: nothing clipped
    expected = ciede2000(srgb_to_lab(reference), srgb_to_lab(reference) + np.array([0.0, 4.0, -2.0])).mean()
    assert mean_delta_e(reference, other) == pytest.approx(expected, rel=1e-6)
    assert 1.0 < expected < 6.0


# --- shift --------------------------------------------------------------------------------------------

def test_an_integer_shift_is_found_within_a_tenth_of_a_pixel():
    reference = smooth_texture(64, seed=1)
    moved = np.roll(reference, shift=(2, 3), axis=(0, 1))  # 3 px right, 2 px down
    dx, dy = shift(reference, moved)
    assert abs(dx - 3) < 0.1 and abs(dy - 2) < 0.1


@pytest.mark.parametrize("dx, dy", [(2.4, -1.7), (-0.35, 0.6)])
def test_a_subpixel_shift_is_found_within_a_tenth_of_a_pixel(dx, dy):
    reference = smooth_texture(64, seed=2)
    found = shift(reference, fourier_shift(reference, dx, dy))
    assert abs(found[0] - dx) < 0.1 and abs(found[1] - dy) < 0.1


def test_a_shift_of_non_periodic_content_is_found():
    # Content entering at one edge and leaving at the other, as in a real edit.
    wide = cosine_texture(96, seed=5)
    reference, moved = wide[10:74, 12:76], wide[8:72, 15:79]  # the view moved 3 px right, 2 px down
    dx, dy = shift(reference, moved)
    assert abs(dx - -3) < 0.1 and abs(dy - 2) < 0.1


# --- scale --------------------------------------------------------------------------------------------

def test_a_known_scale_is_found_within_half_a_percent():
    reference = cosine_texture(96, seed=6)
    assert scale(reference, cosine_texture(96, seed=6, magnification=1.02)) == pytest.approx(1.02, abs=0.005)


def test_scale_ignores_a_shift():
    reference = cosine_texture(96, seed=7)
    assert scale(reference, np.roll(reference, (3, -2), axis=(0, 1))) == pytest.approx(1.0, abs=0.005)


# --- identity, PSNR, SSIM, sharpness --------------------------------------------------------------------

def test_identical_images_read_as_identity():
    image = smooth_texture(48, seed=8)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    assert psnr(image, image) == math.inf
    result = compare_images(image, image)
    assert result["psnr"] is None  # infinite: JSON has no infinity, so null (documented)
    assert result["ssim"] == 1.0 and result["delta_e"] == 0.0 and result["sharpness_ratio"] == 1.0
    assert result["scale"] == pytest.approx(1.0, abs=1e-3)
    assert max(abs(v) for v in result["shift_px"]) < 1e-3


def test_psnr_on_eight_bits():
    image = np.full((16, 16, 3), 100 / 255)
    assert psnr(image, image + 1 / 255) == pytest.approx(20 * math.log10(255), abs=1e-9)  # MSE 1
    assert psnr(image, image + 0.1 / 255) == math.inf  # the same 8-bit values


def test_blur_lowers_ssim_and_sharpness_ratio():
    image = smooth_texture(48, seed=9, blur=0.7)
    blurred = np.stack([gaussian_blur(image[..., c], 1.2) for c in range(3)], axis=-1)
    assert ssim(image, blurred) < 0.95
    assert sharpness_ratio(image, blurred) < 0.5
    assert sharpness_ratio(blurred, image) > 2


# --- masked -------------------------------------------------------------------------------------------

def _masked_change(size: int = 64):
    reference = smooth_texture(size, seed=10)
    mask = np.zeros((size, size))
    mask[20:40, 24:50] = 1
    other = reference.copy()
    other[20:40, 24:50] = np.random.default_rng(11).uniform(0, 1, (20, 26, 3))  # noise, inside the mask only
    return reference, other, mask


def test_a_change_confined_to_the_mask_leaves_the_masked_metrics_at_identity():
    reference, other, mask = _masked_change()
    result = compare_images(reference, other, mask=mask)
    assert result["psnr"] is None and result["ssim"] == 1.0 and result["delta_e"] == 0.0
    assert result["sharpness_ratio"] == 1.0
    assert max(abs(v) for v in result["shift_px"]) < 0.05 and result["scale"] == pytest.approx(1.0, abs=0.005)
    assert result["mask_fraction"] == pytest.approx(20 * 26 / 64 ** 2, abs=1e-4)
    unmasked = compare_images(reference, other, metrics=("psnr", "ssim", "delta_e", "sharpness_ratio"))
    assert unmasked["psnr"] < 30 and unmasked["ssim"] < 0.95 and unmasked["delta_e"] > 1
    assert unmasked["sharpness_ratio"] > 1.5


def test_a_shift_outside_the_mask_is_still_found_past_a_change_inside_it():
    reference, _, mask = _masked_change()
    moved = fourier_shift(reference, 1.6, -2.3)
    moved[20:40, 24:50] = 0.9  # a flat patch where the mask allows change, in both frames' mask area
    dx, dy = shift(reference, moved, mask=mask)
    assert abs(dx - 1.6) < 0.1 and abs(dy + 2.3) < 0.1


def test_errors_say_what_to_do():
    image = smooth_texture(32, seed=12)
    with pytest.raises(ValueError, match="resize one to the other's size"):
        compare_images(image, image[:16])
    with pytest.raises(ValueError, match="covers the whole image"):
        compare_images(image, image, mask=np.ones((32, 32)))
    with pytest.raises(ValueError, match="give a mask of the images' size"):
        compare_images(image, image, mask=np.zeros((16, 16)))
    with pytest.raises(ValueError, match="unknown metric"):
        compare_images(image, image, metrics=("sharpness",))
