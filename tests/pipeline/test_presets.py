"""Runtime presets (kontext_core/presets.py): what `fast` turns on, what falls back where, and that explicit
settings win over a preset's parts, through the core, the CLI and the loader node."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from kontext_core import presets
from kontext_core.presets import PRESETS, apply_preset_options, attention_refresh_for, resolve_preset


def test_fast_on_the_cpu_falls_back_to_the_exact_path_part_by_part():
    preset, notes = resolve_preset("fast", "cpu")
    exact = PRESETS["exact"]
    assert (preset.dtype, preset.attention, preset.compile, preset.cuda_graphs, preset.compile_autoencoder,
            preset.fused_autoencoder_attention) == \
        (exact.dtype, exact.attention, exact.compile, exact.cuda_graphs, exact.compile_autoencoder, False)
    assert len(notes) == 4
    assert any("int8" in note for note in notes) and any("CUDA graphs" in note for note in notes)


def test_fast_where_every_part_runs_keeps_every_part(monkeypatch):
    monkeypatch.setattr(presets, "_int8_gemm_reason", lambda device: None)
    monkeypatch.setattr(presets, "_attention_reason", lambda backend, device: None)
    monkeypatch.setattr(presets, "_triton_available", lambda: True)
    preset, notes = resolve_preset("fast", torch.device("cuda", 0))
    assert preset == PRESETS["fast"] and notes == []


def test_fast_without_8_bit_attention_keeps_the_rest(monkeypatch):
    monkeypatch.setattr(presets, "_int8_gemm_reason", lambda device: None)
    monkeypatch.setattr(presets, "_attention_reason", lambda backend, device: "no Triton")
    monkeypatch.setattr(presets, "_triton_available", lambda: True)
    preset, notes = resolve_preset("fast", torch.device("cuda", 0))
    assert preset.dtype == "int8" and preset.compile and preset.cuda_graphs and preset.attention == "auto"
    assert notes == [f"{PRESETS['fast'].attention} attention: no Triton; exact attention instead"]


def test_explicit_settings_win_over_the_preset(monkeypatch):
    monkeypatch.setattr(presets, "_int8_gemm_reason", lambda device: None)
    monkeypatch.setattr(presets, "_attention_reason", lambda backend, device: None)
    monkeypatch.setattr(presets, "_triton_available", lambda: True)
    chosen, _ = apply_preset_options("fast", "cuda", dtype="fp8", attention="sdpa", compile=False, cuda_graphs=False)
    # The frozen attention statistics are sage8's: with the caller's sdpa they are off.
    assert chosen == dict(dtype="fp8", attention="sdpa", compile=True, cuda_graphs=True, batched_modulation=True,
                          compile_autoencoder=True, fused_autoencoder_attention=True, attention_statistics_refresh=0)
    chosen, _ = apply_preset_options("fast", "cuda", dtype=None, attention="auto", compile=False, cuda_graphs=False)
    assert chosen["attention"] == "sage8" and chosen["attention_statistics_refresh"] == 7


def test_an_asked_attention_refresh_wins_over_the_preset_where_sage8_runs(monkeypatch):
    monkeypatch.setattr(presets, "_int8_gemm_reason", lambda device: None)
    monkeypatch.setattr(presets, "_attention_reason", lambda backend, device: None)
    monkeypatch.setattr(presets, "_triton_available", lambda: True)
    options = dict(dtype=None, compile=False, cuda_graphs=False)
    for asked, expected in ((None, PRESETS["fast"].attention_statistics_refresh), (0, 0), (3, 3)):
        chosen, notes = apply_preset_options("fast", "cuda", attention="auto", attention_refresh=asked, **options)
        assert chosen["attention_statistics_refresh"] == expected and notes == []
    # The caller's sdpa has no statistics: an asked period is dropped and said; an asked 0 needs no line.
    chosen, notes = apply_preset_options("fast", "cuda", attention="sdpa", attention_refresh=3, **options)
    assert chosen["attention_statistics_refresh"] == 0
    assert notes == ["attention refresh 3: only sage8 attention has statistics to reuse, not sdpa; off"]
    assert apply_preset_options("fast", "cuda", attention="sdpa", attention_refresh=0, **options)[1] == []
    assert attention_refresh_for("sage8", None) == (0, None)  # no preset: off unless asked
    for bad in (-1, 2.5, True, "7"):
        with pytest.raises(ValueError, match="attention refresh .*number of steps"):
            attention_refresh_for("sage8", bad)


def test_fallbacks_of_parts_the_caller_set_are_not_reported():
    # On a CPU every part of fast falls back; a caller who chose the weights and the attention backend gets the
    # lines about the compiled blocks and CUDA graphs only.
    chosen, notes = apply_preset_options("fast", "cpu", dtype="bf16", attention="sdpa", compile=False,
                                         cuda_graphs=False)
    assert chosen["dtype"] == "bf16" and chosen["attention"] == "sdpa"
    assert len(notes) == 2 and not any("int8" in note or "attention" in note for note in notes)
    everything, all_notes = apply_preset_options("fast", "cpu", dtype=None, attention="auto", compile=False,
                                                 cuda_graphs=False)
    assert everything["attention_statistics_refresh"] == 0  # sage8 fell back: no statistics to keep
    assert all_notes == resolve_preset("fast", "cpu")[1] and len(all_notes) == 4


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="exact, fast"):
        resolve_preset("fastest", "cpu")


def test_cli_fast_preset_on_the_cpu_says_what_fell_back_and_equals_the_exact_run(models_tree, capsys):
    from kontext_core.cli import main

    tmp_path, image, common = models_tree
    outputs = {}
    for preset in ("exact", "fast"):
        out = tmp_path / f"{preset}.png"
        assert main(["edit", str(image), "--prompt", "a red hat", "-o", str(out), "--resize", "keep",
                     "--preset", preset, *common]) == 0
        outputs[preset] = Image.open(out).tobytes()
    printed = capsys.readouterr().out
    # --dtype fp32 (the fixture's) was chosen over the preset's int8: no line about int8's fallback.
    assert "preset fast: compiled blocks and AE: need a CUDA GPU" in printed and "int8" not in printed
    assert "preset exact:" not in printed
    assert outputs["fast"] == outputs["exact"]


def test_cli_attention_refresh_reaches_the_sampler_with_sage8(models_tree, capsys, monkeypatch):
    from kontext_core import build, pipeline
    from kontext_core.cli import main

    tmp_path, image, common = models_tree
    edit = ["edit", str(image), "--prompt", "a red hat", "-o", str(tmp_path / "out.png"), "--resize", "keep"]
    with pytest.raises(SystemExit) as refused:
        main([*edit, "--attention-refresh", "-2", *common])
    assert refused.value.code == 2 and "--attention-refresh: '-2': give 0" in capsys.readouterr().err
    periods = []
    real_sample = pipeline.sample_euler

    def sample(*args, attention_statistics_refresh, **kwargs):
        periods.append(attention_statistics_refresh)
        return real_sample(*args, attention_statistics_refresh=attention_statistics_refresh, **kwargs)

    monkeypatch.setattr(pipeline, "sample_euler", sample)
    assert main([*edit, "--attention-refresh", "3", *common]) == 0  # the CPU's exact attention: off, and said
    assert "attention refresh 3: only sage8 attention has statistics to reuse" in capsys.readouterr().out
    # With sage8 in effect (faked: the sampler's attention on the CPU stays exact, so the run completes).
    monkeypatch.setattr(build, "get_attention_backend", lambda: "sage8")
    assert main([*edit, "--attention-refresh", "3", *common]) == 0
    assert periods == [0, 3]
