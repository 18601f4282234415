"""bench/bench_step.py's naming of rows and whole edits (--e2e): checked at parse time, so a misspelt run fails at
once instead of being skipped after the rows have run."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

bench_step = pytest.importorskip("bench_step")


def test_a_whole_edit_is_a_model_with_kernel_switches_and_edit_options():
    fast = bench_step.FAST_EDIT + "+paired+untunedplans+graphs"
    assert bench_step.e2e_run(fast) == fast
    for bad, named in (("int4", "'int4'"), ("int8+lora", "'int8+lora'"), ("int8+sage9", "'int8+sage9'")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(named) + ".*one of bf16, fp8, int8"):
            bench_step.e2e_run(bad)


def test_a_bare_e2e_times_what_the_rows_have():
    assert bench_step.default_e2e_runs(["ours-compiled"]) == ["bf16", "fp8", "int8"]
    runs = bench_step.default_e2e_runs(["ours-compiled+graphs", "ours-int8-compiled+graphs+sage8",
                                        "ours-fp8-compiled+fp8attention"])
    plain = ["bf16", "fp8", "int8", "fp8+fp8attention", bench_step.FAST_EDIT]
    assert runs == plain + [run + "+graphs" for run in plain]
    assert all(bench_step.e2e_run(run) == run for run in runs)


def test_our_rows_only_modifiers_are_modifiers_and_refused_on_reference_rows():
    assert bench_step.OURS_ONLY <= set(bench_step.MODIFIERS)
    assert bench_step.implementation("ours-int8-compiled+graphs+sage8+pairedrows")
    for modifier in sorted(bench_step.OURS_ONLY):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"+{modifier} applies to our rows only")):
            bench_step.implementation(f"diffusers+{modifier}")


def test_fast_names_the_fast_presets_step_row_with_any_modifiers():
    assert bench_step.implementation("fast") == bench_step.FAST_ROW
    assert bench_step.implementation("fast+untunedplans") == bench_step.FAST_ROW + "+untunedplans"
    with pytest.raises(argparse.ArgumentTypeError, match="'ours-int8-compiled.*\\+nosuch'"):
        bench_step.implementation("fast+nosuch")


def test_the_fast_row_and_edit_take_what_the_fast_preset_turns_on():
    from kontext_core.presets import PRESETS

    preset = PRESETS["fast"]
    base, *row = bench_step.FAST_ROW.split("+")
    _, *edit = bench_step.FAST_EDIT.split("+")
    assert base == f"ours-{preset.dtype}-compiled" and preset.compile
    for modifier, part in (("sage8", preset.attention == "sage8"), ("graphs", preset.cuda_graphs),
                           ("modtable", preset.batched_modulation),
                           ("frozenstats", preset.attention_statistics_refresh > 0)):
        assert (modifier in row) == part
    for modifier, part in (("compiledae", preset.compile_autoencoder), ("fusedae", preset.fused_autoencoder_attention),
                           ("modtable", preset.batched_modulation),
                           ("frozenstats", preset.attention_statistics_refresh > 0)):
        assert (modifier in edit) == part
