"""The bench's "BFL reference" twin (bench/peers/bfl_native.py) computes our model's velocity.

BFL's FLUX transformer, built and called as the bench does, on a tiny random float32 model on the CPU, with
and without a context image: relative error (max |diff| / max |ours|) < 1e-4 (seen: ~4e-7). Runs in a fresh
interpreter (BFL's top-level `flux` package must not meet this session's modules). Skips without BFL's code
staged at KONTEXT_BFL_PATH (default build/bfl: `bench/peers/stage_bfl.sh BFL_CHECKOUT build/bfl`), or naming the
package it lacks (einops).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BFL = Path(os.environ.get("KONTEXT_BFL_PATH", REPO / "build" / "bfl")).expanduser()
TOLERANCE = 1e-4


def test_bfl_twin_matches_ours():
    if not (BFL / "flux" / "model.py").is_file():
        pytest.skip(f"no BFL code staged at {BFL} (bench/peers/stage_bfl.sh, or set KONTEXT_BFL_PATH)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(REPO / "bench" / "peers" / "bfl_native.py"), "--bfl", str(BFL)],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode == 3:
        pytest.skip(f"BFL's code cannot be imported here: {json.loads(run.stdout)['import_error']}")
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(result["rel_err"]) == {"edit", "t2i"}
    for case, error in result["rel_err"].items():
        assert error < TOLERANCE, f"{case}: BFL vs ours rel. error {error:.2e} ({result})"
