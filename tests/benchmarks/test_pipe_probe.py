"""bench/pipeline/pipe_probe.py times loops of single instructions; these tests check, on the SASS of offline sm_90
builds, that each loop is made of the instruction `STEPS` names for it (ptxas folds or rewrites some PTX), so that a rate
the probe prints is that instruction's."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "pipeline"))

from conftest import sass_of, spills

triton = pytest.importorskip("triton")
pipe_probe = pytest.importorskip("pipe_probe")

STEPS_PER_TRIP = pipe_probe.CHAINS * pipe_probe.REPEATS


def count(opcode: str, sass: str) -> int:
    return len(re.findall(rf"\s{re.escape(opcode)}\s", sass))


@pytest.mark.parametrize("name", sorted(name for name, step in pipe_probe.STEPS.items() if step.sass))
def test_each_loop_is_made_of_its_instruction(name):
    step = pipe_probe.STEPS[name]
    sass = sass_of(pipe_probe.build_offline([name]))
    assert count(step.sass, sass) == STEPS_PER_TRIP * step.sass_per_step
    assert not spills(sass), "the chains spill: the loop would time local memory"


def test_a_mix_holds_both_instructions_half_and_half():
    sass = sass_of(pipe_probe.build_offline(["ex2.f32", "cvt.e4m3x2.f32"]))
    assert count("MUFU.EX2", sass) == STEPS_PER_TRIP // 2
    assert count("F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C", sass) == STEPS_PER_TRIP // 2


@pytest.mark.parametrize("steps", [[name] for name, step in pipe_probe.STEPS.items() if not step.sass]
                         + [list(mix) for mix in pipe_probe.MIXES], ids=str)
def test_every_other_row_builds(steps):
    # Rows ptxas splits between two instructions, and the mixes: their PTX assembles for sm_90, without spilling.
    sass = sass_of(pipe_probe.build_offline(steps))
    assert not spills(sass)
