"""Judging edits and settings: image metrics (shift, scale, CIEDE2000, SSIM, PSNR, sharpness, LPIPS when
installed), drift over a session's turns, presets compared on the same work, and KontextBench runs.

    from kontext_core.evaluation import compare_images
    compare_images(Image.open("before.png"), Image.open("after.png"), mask=Image.open("mask.png"))

The metrics need numpy and Pillow only; plots need matplotlib and LPIPS the lpips package (the `[eval]`
extra): without them the reports say what is missing and write the rest.
"""

from .bench import KNOWN_CATEGORIES, BenchEntry, download_dataset, read_entries, run_bench, select
from .colour import ciede2000, lab_to_srgb, srgb_to_lab
from .drift import DEFAULT_PROMPT, DriftRun, run_drift, write_drift_report
from .metrics import METRICS, compare_images, mean_delta_e, psnr, scale, sharpness, sharpness_ratio, shift, ssim
from .perceptual import load_lpips
from .presets import (PresetSpec, cases_for, for_each_preset, parse_presets, pipeline_loader, run_presets,
                      write_presets_report)
from .registration import log_polar_scale, phase_correlation

__all__ = [
    "BenchEntry", "DEFAULT_PROMPT", "DriftRun", "KNOWN_CATEGORIES", "METRICS", "PresetSpec", "cases_for",
    "ciede2000", "compare_images", "download_dataset", "for_each_preset", "lab_to_srgb", "load_lpips",
    "log_polar_scale", "mean_delta_e", "parse_presets", "phase_correlation", "pipeline_loader", "psnr",
    "read_entries", "run_bench", "run_drift", "run_presets", "scale", "select", "sharpness", "sharpness_ratio",
    "shift", "srgb_to_lab", "ssim", "write_drift_report", "write_presets_report",
]
