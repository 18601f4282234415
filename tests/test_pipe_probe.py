"""bench/pipe_probe.py times loops of single instructions; these tests check, on the SASS of offline sm_90 builds,
that each loop is made of the instruction its row names (ptxas folds or rewrites some PTX), so that a rate the
probe prints is that instruction's."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from conftest import sass_of  # noqa: E402

triton = pytest.importorskip("triton")
pipe_probe = pytest.importorskip("pipe_probe")

STEPS_PER_TRIP = pipe_probe.CHAINS * pipe_probe.REPEATS
# name -> (the SASS instruction a step becomes, how many a step gives)
EXPECTED = {
    "ffma": ("FFMA", 1),
    "ex2.f32": ("MUFU.EX2", 1),
    # sm_90 has no packed exp2: ex2.approx.f16x2 is two MUFU operations (this is why sage8 does not use it)
    "ex2.f16x2": ("MUFU.EX2.F16", 2),
    "cvt.f16x2.f32": ("F2FP.F16.F32.PACK_AB", 1),
    "cvt.e4m3x2.f32": ("F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C", 1),
    "cvt.f32.s32": ("I2FP.F32.S32", 1),
    "fmax": ("FMNMX", 1),
    "prmt": ("PRMT", 1),
}


def opcode_counts(sass: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        match = re.match(r"\s+/\*[0-9a-f]{4,5}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if match:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_loop_is_made_of_its_instruction(name):
    opcode, per_step = EXPECTED[name]
    counts = opcode_counts(sass_of(pipe_probe.build_offline([name])))
    assert counts.get(opcode, 0) == STEPS_PER_TRIP * per_step, counts


def test_a_mix_holds_both_instructions_half_and_half():
    counts = opcode_counts(sass_of(pipe_probe.build_offline(["ex2.f32", "cvt.e4m3x2.f32"])))
    assert counts.get("MUFU.EX2", 0) == STEPS_PER_TRIP // 2
    assert counts.get("F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C", 0) == STEPS_PER_TRIP // 2
