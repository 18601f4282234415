"""The bench's "ComfyUI native" twins (bench/peers/comfyui_native.py) compute our model's velocity.

ComfyUI's FLUX model, built and called as the bench does, on a tiny random float32 model on the CPU, with
and without a context image: relative error (max |diff| / max |ours|) < 1e-4 (seen: ~5e-7).

The fp8-scaled twin (ComfyUI 0.8 loading our weights as flux1-dev-kontext_fp8_scaled.safetensors) against
our loader's float32 upcast of the same file: < 1e-4 where ComfyUI dequantizes the weights (a CPU; the
file's full-precision marker), < 0.1 where it casts activations to e4m3 for fp8 GEMMs (`--supports-fp8-
compute`, the H200's default path; seen 3.7e-2); `--fast fp8_matrix_mult` changes nothing for that file.
Where comfy.sd imports (ComfyUI's venv), ComfyUI's own loader builds the same model, bit for bit.

The comparison runs in a fresh interpreter (ComfyUI's `comfy` package must not meet this session's
modules): once with ComfyUI's own venv (<COMFYUI_PATH>/.venv/bin/python, with comfy_kitchen's RoPE) and
once with this interpreter (ComfyUI's fallback RoPE where comfy_kitchen is absent). Skips without a ComfyUI
at COMFYUI_PATH (default ~/ComfyUI), or naming the package ComfyUI lacks in that interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

COMFYUI = Path(os.environ.get("COMFYUI_PATH", "~/ComfyUI")).expanduser()
TOLERANCE = 1e-4


def _pythons():
    venv = Path(os.environ.get("COMFYUI_PYTHON", COMFYUI / ".venv" / "bin" / "python"))
    return [pytest.param(venv, id="comfyui-venv"), pytest.param(Path(sys.executable), id="this-python")]


@pytest.mark.parametrize("python", _pythons())
def test_comfyui_twin_matches_ours(python):
    if not (COMFYUI / "comfy" / "ldm" / "flux" / "model.py").is_file():
        pytest.skip(f"no ComfyUI at {COMFYUI} (set COMFYUI_PATH)")
    if not python.exists():
        pytest.skip(f"no Python at {python} (set COMFYUI_PYTHON)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([str(python), str(REPO / "bench" / "peers" / "comfyui_native.py"), "--comfyui", str(COMFYUI)],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode == 3:
        pytest.skip(f"ComfyUI cannot be imported by {python}: {json.loads(run.stdout)['import_error']}")
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["operations"] == "comfy.ops.disable_weight_init"
    for case, error in result["rel_err"].items():
        assert error < TOLERANCE, f"{case}: ComfyUI vs ours rel. error {error:.2e} ({result})"

    fp8 = result["fp8_scaled"]
    block_linears = 2 * 2 * 5 + 2 * 3  # the tiny model's double (2 streams x 5) and single (3) block linears
    for check, outcome in fp8.items():
        assert "MixedPrecisionOps" in outcome["operations"], (check, outcome)
        for case, error in outcome["rel_err"].items():
            assert error < outcome["tolerance"], f"fp8 {check} {case}: rel. error {error:.2e} ({outcome})"
    for check in ("as_here", "fp8_compute+full_precision_marker"):
        assert fp8[check]["linear_paths"]["dequantized"] == block_linears, fp8[check]
    for check in ("fp8_compute", "fp8_compute+fast_fp8_matrix_mult", "fp8_compute+fast"):
        assert fp8[check]["linear_paths"]["fp8_gemm"] == block_linears, fp8[check]
        assert not fp8[check]["comfy_kitchen_warnings"], fp8[check]
    assert fp8["fp8_compute+fast_fp8_matrix_mult"]["rel_err"] == fp8["fp8_compute"]["rel_err"]
    loader = result["fp8_scaled_loader_check"]
    if "skipped" not in loader:
        assert loader["same_build"] and loader["max_abs_diff"] == 0.0, loader
