"""Colour: sRGB to CIELAB (D65) and back, and the CIEDE2000 colour difference.

Arrays are float [..., 3]; sRGB values are the encoded (gamma) values in [0, 1]. The formulas are the IEC
61966-2-1 sRGB transfer function and primaries, CIE 1976 L*a*b* with the D65 white, and CIEDE2000 as written
out by Sharma, Wu and Dalal (2005), with the parametric factors kL = kC = kH = 1.
"""

from __future__ import annotations

import numpy as np

# Linear sRGB -> CIE XYZ for the D65 white (IEC 61966-2-1's primaries).
SRGB_TO_XYZ = np.array([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
XYZ_TO_SRGB = np.linalg.inv(SRGB_TO_XYZ)
D65_WHITE = SRGB_TO_XYZ.sum(axis=1)  # XYZ of sRGB (1, 1, 1): the white the Lab coordinates are taken against

_EPSILON = (6 / 29) ** 3  # where CIELAB's cube root gives way to its linear segment
_SLOPE = (29 / 6) ** 2 / 3
_25_TO_THE_7 = 25.0 ** 7


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    srgb = np.asarray(srgb, dtype=np.float64)
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    linear = np.asarray(linear, dtype=np.float64)
    # The power is taken of the clipped value only: negative light has no encoded value.
    curved = 1.055 * np.maximum(linear, 0.0031308) ** (1 / 2.4) - 0.055
    return np.where(linear <= 0.0031308, linear * 12.92, curved)


def srgb_to_lab(srgb: np.ndarray) -> np.ndarray:
    """[..., 3] encoded sRGB in [0, 1] -> [..., 3] (L*, a*, b*)."""
    xyz = srgb_to_linear(srgb) @ SRGB_TO_XYZ.T / D65_WHITE
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), xyz * _SLOPE + 4 / 29)
    lightness = 116 * f[..., 1] - 16
    return np.stack([lightness, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """[..., 3] (L*, a*, b*) -> encoded sRGB, unclipped (colours outside the sRGB gamut leave [0, 1])."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, (f - 4 / 29) / _SLOPE) * D65_WHITE
    return linear_to_srgb(xyz @ XYZ_TO_SRGB.T)


def _hue_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # A neutral colour has no hue; CIEDE2000 takes it as 0.
    return np.where((a == 0) & (b == 0), 0.0, np.degrees(np.arctan2(b, a)) % 360)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """ΔE00 between [..., 3] Lab arrays (broadcast against each other), per colour pair."""
    lab1, lab2 = np.broadcast_arrays(np.asarray(lab1, np.float64), np.asarray(lab2, np.float64))
    l1, a1, b1 = np.moveaxis(lab1, -1, 0)
    l2, a2, b2 = np.moveaxis(lab2, -1, 0)

    # a* is stretched for near-neutral colours, where the plain Lab hue circle is too tight.
    mean_chroma_7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    stretch = 1 + 0.5 * (1 - np.sqrt(mean_chroma_7 / (mean_chroma_7 + _25_TO_THE_7)))
    a1, a2 = a1 * stretch, a2 * stretch
    chroma1, chroma2 = np.hypot(a1, b1), np.hypot(a2, b2)
    hue1, hue2 = _hue_degrees(a1, b1), _hue_degrees(a2, b2)

    chromatic = chroma1 * chroma2 != 0
    hue_step = hue2 - hue1
    hue_step = np.where(hue_step > 180, hue_step - 360, np.where(hue_step < -180, hue_step + 360, hue_step))
    hue_step = np.where(chromatic, hue_step, 0.0)
    delta_lightness = l2 - l1
    delta_chroma = chroma2 - chroma1
    delta_hue = 2 * np.sqrt(chroma1 * chroma2) * np.sin(np.radians(hue_step) / 2)

    mean_lightness = (l1 + l2) / 2
    mean_chroma = (chroma1 + chroma2) / 2
    # The mean hue is taken the short way round the circle; with a neutral colour it is the other one's hue.
    hue_sum = hue1 + hue2
    far_apart = np.abs(hue1 - hue2) > 180
    mean_hue = np.where(far_apart, np.where(hue_sum < 360, hue_sum + 360, hue_sum - 360), hue_sum) / 2
    mean_hue = np.where(chromatic, mean_hue, hue_sum)

    hue_weight = (1 - 0.17 * np.cos(np.radians(mean_hue - 30)) + 0.24 * np.cos(np.radians(2 * mean_hue))
                  + 0.32 * np.cos(np.radians(3 * mean_hue + 6)) - 0.20 * np.cos(np.radians(4 * mean_hue - 63)))
    lightness_offset = (mean_lightness - 50) ** 2
    scale_lightness = 1 + 0.015 * lightness_offset / np.sqrt(20 + lightness_offset)
    scale_chroma = 1 + 0.045 * mean_chroma
    scale_hue = 1 + 0.015 * mean_chroma * hue_weight
    # The blue region's tilted ellipses: chroma and hue differences interact there.
    rotation_angle = 30 * np.exp(-(((mean_hue - 275) / 25) ** 2))
    mean_chroma_7 = mean_chroma ** 7
    rotation = -2 * np.sqrt(mean_chroma_7 / (mean_chroma_7 + _25_TO_THE_7)) * np.sin(np.radians(2 * rotation_angle))

    lightness_term = delta_lightness / scale_lightness
    chroma_term = delta_chroma / scale_chroma
    hue_term = delta_hue / scale_hue
    return np.sqrt(lightness_term ** 2 + chroma_term ** 2 + hue_term ** 2 + rotation * chroma_term * hue_term)
