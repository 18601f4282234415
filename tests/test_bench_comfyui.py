"""The bench's "ComfyUI native" twin (bench/comfyui_native.py) computes our model's velocity.

ComfyUI's FLUX model, built and called as the bench does, on a tiny random float32 model on the CPU, with
and without a context image: relative error (max |diff| / max |ours|) < 1e-4 (seen: ~5e-7).

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
    run = subprocess.run([str(python), str(REPO / "bench" / "comfyui_native.py"), "--comfyui", str(COMFYUI)],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode == 3:
        pytest.skip(f"ComfyUI cannot be imported by {python}: {json.loads(run.stdout)['import_error']}")
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["operations"] == "comfy.ops.disable_weight_init"
    for case, error in result["rel_err"].items():
        assert error < TOLERANCE, f"{case}: ComfyUI vs ours rel. error {error:.2e} ({result})"
