"""`python -m kontext_core inspect` on files in the real layouts."""

from __future__ import annotations

import json

from kontext_core import save_autoencoder, save_transformer
from kontext_core.cli import main


def test_inspect_reports_layout_and_config_and_runs(tiny_transformer, capsys, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "k.safetensors", layout="comfy", weights="fp8_e4m3fn_scaled")
    assert main(["inspect", str(tmp_path / "k.safetensors"), "--run", "--dtype", "fp8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["kind"] == "transformer" and report["layout"] == "bfl"
    assert report["prefix"] == "model.diffusion_model." and report["scaled_fp8"] is True
    assert (report["config"]["hidden_size"] == 128
            and report["storage_dtypes"]["F8_E4M3"] == 26 + 1)  # block linears + the scaled_fp8 marker
    assert "finite=True" in out


def test_inspect_diffusers_vae_folder(tiny_autoencoder, capsys, tmp_path):
    save_autoencoder(tiny_autoencoder, tmp_path / "vae", layout="diffusers")
    assert main(["inspect", str(tmp_path), "--run", "--dtype", "fp32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert '"kind": "autoencoder"' in out and '"layout": "diffusers"' in out
    assert "encode [1, 3, 64, 64] -> [1, 16, 32, 32]" in out


def test_inspect_bad_file_exits_2_with_the_reason(tmp_path, capsys):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(32))
    assert main(["inspect", str(tmp_path / "x.gguf")]) == 2
    assert "GGUF file" in capsys.readouterr().err


# --- edit / t2i end to end on tiny models in a ComfyUI models tree ----------------------------------

import os  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import write_models_folder  # noqa: E402
from tiny_encoders import clip_tensors, tiny_clip  # noqa: E402

# models_tree, the fixture these tests run on, is conftest's: the presets and eval CLI tests run on it too.


def test_edit_end_to_end_writes_png_with_parameters_deterministically(models_tree, capsys):
    tmp_path, image, common = models_tree
    outputs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out in outputs:
        args = ["edit", str(image), "--prompt", "make the cat red", "-o", str(out), "--resize", "keep", "--seed", "7"]
        assert main(args + common) == 0
    first, second = (Image.open(p) for p in outputs)
    assert first.size == (40, 24)
    assert first.tobytes() == second.tobytes()
    parameters = json.loads(first.text["parameters"])
    assert parameters["prompt"] == "make the cat red" and parameters["seed"] == 7 and parameters["steps"] == 2


def test_the_progress_bar_shows_the_steps_before_the_first_one(models_tree, capsys):
    # Encoding the inputs comes before the first step (minutes on a CPU at full size): the bar says how many steps
    # will follow from the start, not "0step" with no total.
    tmp_path, image, common = models_tree
    assert main(["edit", str(image), "--prompt", "make the cat red", "-o", str(tmp_path / "a.png"), "--resize", "keep",
                 *common]) == 0
    shown = capsys.readouterr().err
    assert "edit:   0%" in shown and "0/2" in shown


def test_attention_backend_is_applied_for_the_run_and_restored(models_tree, monkeypatch):
    from kontext_core import get_attention_backend
    from kontext_core.compute import attention

    tmp_path, image, common = models_tree
    seen = []
    plain = attention.attention
    monkeypatch.setattr(attention, "attention", lambda q, k, v: seen.append(get_attention_backend()) or plain(q, k, v))
    assert main(["edit", str(image), "--prompt", "x", "-o", str(tmp_path / "m.png"), "--resize", "keep", "--attention",
                 "math", *common]) == 0
    assert seen and set(seen) == {"math"}
    assert get_attention_backend() == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines with no GPU")
@pytest.mark.parametrize("backend", ["cudnn-fp8", "sage8"])
def test_unavailable_attention_backend_is_refused_with_the_reason(models_tree, capsys, monkeypatch, backend):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # under the interpreter sage8 runs anywhere
    tmp_path, image, common = models_tree
    assert main(["edit", str(image), "--prompt", "x", "-o", str(tmp_path / "f.png"), "--resize", "keep", "--attention",
                 backend, *common]) == 2
    assert f"error: --attention {backend}: attention backend '{backend}' cannot run here" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()


def test_cuda_graphs_on_the_cpu_are_refused_with_the_fix(models_tree, capsys):
    tmp_path, image, common = models_tree
    assert main(["edit", str(image), "--prompt", "x", "-o", str(tmp_path / "c.png"), "--cuda-graphs", *common]) == 2
    assert "--cuda-graphs needs a CUDA device, not cpu; drop it" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_turns_file_saves_every_turn(models_tree):
    tmp_path, image, common = models_tree
    (tmp_path / "turns.txt").write_text("make it red\n\nadd a hat\nturn it into a painting\n")
    assert main(["edit", str(image), "--turns", str(tmp_path / "turns.txt"), "-o", str(tmp_path / "session"),
                 "--resize", "keep", *common]) == 0
    assert sorted(p.name for p in (tmp_path / "session").iterdir()) == [
        "session.json", "turn_01.png", "turn_02.png", "turn_03.png"]
    history = json.loads((tmp_path / "session" / "session.json").read_text())
    assert [t["prompt"] for t in history["turns"]] == ["", "make it red", "add a hat", "turn it into a painting"]


@pytest.mark.parametrize("content, message", [(None, "prompts file not found"), ("\n \n", "holds no prompts")])
def test_a_bad_turns_file_fails_before_the_models_load(tmp_path, monkeypatch, content, message):
    import kontext_core.cli as cli

    turns = tmp_path / "turns.txt"
    if content is not None:
        turns.write_text(content)
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 24)).save(image)
    monkeypatch.setattr(cli, "_pipeline", lambda args: pytest.fail("the models were loaded first"))
    with pytest.raises(SystemExit, match=message):
        main(["edit", str(image), "--turns", str(turns), "-o", str(tmp_path / "session"), "--models", str(tmp_path)])


def test_t2i_end_to_end(models_tree):
    tmp_path, _, common = models_tree
    assert main(["t2i", "--prompt", "a photo of a dog", "-o", str(tmp_path / "t.png"),
                 "--width", "32", "--height", "48", *common]) == 0
    assert Image.open(tmp_path / "t.png").size == (32, 48)


def test_missing_model_files_fail_clearly(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    code = main(["edit", str(tmp_path / "x.png"), "--prompt", "p", "-o", str(tmp_path / "o.png"),
                 "--models", str(tmp_path / "models")])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not find the transformer, autoencoder, t5, clip" in err and "flux1-kontext-dev.safetensors" in err
    assert "allow downloading (--download)" in err and "allow_download" not in err  # the command's flag, not Python's


def test_errors_name_the_commands_flags_not_python_arguments(models_tree, capsys):
    tmp_path, image, common = models_tree
    common[common.index("--t5-tokenizer") + 1] = "kontext-tests/no-such-tokenizer"  # a repo id, not cached
    assert main(["edit", str(image), "--prompt", "p", "-o", str(tmp_path / "o.png"), *common]) == 2
    err = capsys.readouterr().err
    assert "Allow downloads (--download)" in err and "leave --t5-tokenizer unset" in err
    assert "allow_download" not in err and "`" not in err


def test_a_clip_of_another_width_is_named_before_anything_runs(models_tree, tiny_transformer, capsys):
    tmp_path, image, common = models_tree
    wide = tiny_clip(hidden_size=2 * tiny_transformer.config.vec_in_dim)
    save_file(clip_tensors(wide), tmp_path / "ComfyUI" / "models" / "text_encoders" / "clip_l.safetensors")
    assert main(["edit", str(image), "--prompt", "p", "-o", str(tmp_path / "w.png"), *common]) == 2
    err = capsys.readouterr().err
    assert f"clip_l.safetensors: CLIP with hidden size {2 * tiny_transformer.config.vec_in_dim}" in err
    assert "mat1 and mat2" not in err and not (tmp_path / "w.png").exists()


def test_unreadable_input_image(models_tree):
    tmp_path, _, common = models_tree
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="bad.png is not a readable image"):
        main(["edit", str(tmp_path / "bad.png"), "--prompt", "p", "-o", str(tmp_path / "o.png"), *common])


@pytest.mark.parametrize("dtype, mode", [("fp32", "merge"), ("fp8", "on_the_fly"), ("int8", "on_the_fly")])
def test_lora_is_merged_except_into_8bit_weights(models_tree, tiny_transformer, monkeypatch, dtype, mode):
    # e4m3 or int8 would round most of a LoRA's delta away if merged: 8-bit weights get it on the fly.
    from conftest import random_block_lora_file
    from kontext_core import build

    tmp_path, image, common = models_tree
    save_file(random_block_lora_file(tiny_transformer, seed=2), tmp_path / "style.safetensors")
    applied = []
    real_apply = build.apply_lora
    monkeypatch.setattr(build, "apply_lora", lambda *args, **kwargs: applied.append(real_apply(*args, **kwargs))
                        or applied[-1])
    common = [*common[:common.index("--dtype")], "--dtype", dtype, "--device", "cpu"]
    assert main(["edit", str(image), "--prompt", "x", "-o", str(tmp_path / "l.png"), "--resize", "keep",
                 "--lora", f"{tmp_path / 'style.safetensors'}:0.8", *common]) == 0
    assert [(handle.mode, handle.strength) for handle in applied] == [(mode, 0.8)]


def test_lora_spec_reads_a_strength_only_after_the_last_colon():
    from kontext_core.cli import _lora_spec

    assert _lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert _lora_spec("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert _lora_spec("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    assert _lora_spec("C:/loras/style.safetensors:-1.5") == ("C:/loras/style.safetensors", -1.5)
    assert _lora_spec("runs/12:30/style.safetensors") == ("runs/12:30/style.safetensors", 1.0)
    for bad in ("nan", "inf"):
        with pytest.raises(SystemExit, match="strength must be a finite number"):
            _lora_spec(f"style.safetensors:{bad}")


@pytest.mark.skipif(os.name != "posix", reason="sets the child's umask (POSIX)")
def test_readme_command_from_a_comfyui_models_folder_with_an_empty_hugging_face_cache(
        tiny_transformer, tiny_autoencoder, tmp_path):
    """The README's main command as a user runs it: a ComfyUI models/ folder (the real file names and key
    layouts, tiny), no tokenizer flags, nothing in the Hugging Face cache and no network: the tokenizers that
    come with kontext_core are used, and the PNG gets the permissions the umask gives any new file."""
    models = tmp_path / "ComfyUI" / "models"
    write_models_folder(models, tiny_transformer, tiny_autoencoder, real_vocabularies=True)
    Image.new("RGB", (40, 24), (200, 30, 90)).save(tmp_path / "photo.png")
    (tmp_path / "hf-empty").mkdir()
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    environment.update(HF_HOME=str(tmp_path / "hf-empty"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "kontext_core", "edit", str(tmp_path / "photo.png"), "--prompt",
               "make it a snowy night", "-o", str(tmp_path / "night.png"), "--models", str(models),
               "--steps", "2", "--resize", "keep", "--dtype", "fp32", "--device", "cpu"]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=environment,
                            preexec_fn=lambda: os.umask(0o027), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "night.png")
    assert stat.S_IMODE((tmp_path / "night.png").stat().st_mode) == 0o640  # 0o666 less the umask 027
    with Image.open(tmp_path / "night.png") as night:
        assert night.size == (40, 24) and json.loads(night.text["parameters"])["prompt"] == "make it a snowy night"
    assert not any((tmp_path / "hf-empty").rglob("*.json"))  # nothing was fetched into the cache


def test_step_cache_flags(models_tree, capsys):
    # At threshold 0 the cache computes every step: the same bytes as the uncached run, the counts on stderr.
    tmp_path, image, common = models_tree
    common = [*common[:common.index("--steps")], "--steps", "3", *common[common.index("--steps") + 2:]]
    edit = ["edit", str(image), "--prompt", "x", "--resize", "keep", *common]
    assert main([*edit, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*edit, "-o", str(tmp_path / "cached.png"), "--cache", "teacache", "--cache-threshold", "0"]) == 0
    assert Image.open(tmp_path / "plain.png").tobytes() == Image.open(tmp_path / "cached.png").tobytes()
    assert "step cache: 3 of 3 steps computed, 0 from the cache" in capsys.readouterr().err
    assert json.loads(Image.open(tmp_path / "cached.png").text["parameters"])["cache"] == "teacache:0"
    assert main([*edit, "-o", str(tmp_path / "fb.png"), "--cache", "first-block", "--cache-threshold", "1e9"]) == 0
    assert "step cache: 2 of 3 steps computed, 1 from the cache (33% skipped)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--cache-threshold", "0.1"], "--cache-threshold needs a cache: add --cache first-block or --cache teacache"),
    (["--cache", "first-block", "--cache-threshold", "-1"], "--cache-threshold -1.0: the step cache threshold must"),
])
def test_bad_step_cache_flags_fail_before_loading(tmp_path, flags, message):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit, match=message):  # no models anywhere: the flags are read first
        main(["edit", str(tmp_path / "x.png"), "--prompt", "p", "-o", str(tmp_path / "o.png"),
              "--models", str(tmp_path), *flags])


# --- masked edits ----------------------------------------------------------------------------------

def _masked_inputs(tmp_path, size=(41, 35)):
    import numpy as np

    photo = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(photo)
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, 18, 14))  # white = edit, at the top-left corner
    mask.save(tmp_path / "mask.png")
    return photo, tmp_path / "mask.png"


@pytest.mark.parametrize("extra", [[], ["--crop-to-mask", "--context-margin", "6"]], ids=["whole", "crop"])
def test_masked_edit_keeps_the_input_outside_the_mask(models_tree, extra):
    import numpy as np

    tmp_path, _, common = models_tree
    photo, mask = _masked_inputs(tmp_path)
    out = tmp_path / "masked.png"
    assert main(["edit", str(photo), "--prompt", "make it red", "-o", str(out), "--resize", "keep", "--mask", str(mask),
                 "--grow", "1", "--feather", "2", *extra, *common]) == 0
    result, source = np.asarray(Image.open(out)), np.asarray(Image.open(photo))
    assert result.shape == source.shape  # the input's size (41x35), not the working size
    from kontext_core.masks import MaskedEdit

    outside = (MaskedEdit.prepare(Image.open(mask), (41, 35), grow=1, feather=2).weights[0] == 0).numpy()
    assert np.array_equal(result[outside], source[outside]) and not np.array_equal(result[~outside], source[~outside])
    parameters = json.loads(Image.open(out).text["parameters"])
    assert parameters["mask"] == str(mask) and parameters["feather"] == 2


def test_masked_turns_keep_the_previous_turn_outside_the_mask(models_tree):
    import numpy as np

    tmp_path, _, common = models_tree
    photo, mask = _masked_inputs(tmp_path, size=(40, 24))
    (tmp_path / "turns.txt").write_text("make it red\nadd a hat\n")
    assert main(["edit", str(photo), "--turns", str(tmp_path / "turns.txt"), "-o", str(tmp_path / "session"),
                 "--resize", "keep", "--mask", str(mask), *common]) == 0
    first, second = (np.asarray(Image.open(tmp_path / "session" / f"turn_0{i}.png")) for i in (1, 2))
    outside = ~(np.asarray(Image.open(mask)) >= 128)
    assert outside.any() and np.array_equal(first[outside], second[outside])
    assert not np.array_equal(first[~outside], second[~outside])


@pytest.mark.parametrize("arguments, message", [
    (["--grow", "3"], "--grow shape a mask: give --mask"),
    (["--mask", "MASK", "--width", "32", "--height", "32"], "keeps the input's size: drop --width/--height"),
    (["--mask", "MASK", "--fit", "crop"], "drop --fit crop"),
    (["--mask", "MASK", "--feather", "-1"], "--feather is a number of pixels"),
])
def test_mask_options_are_checked_before_loading(tmp_path, arguments, message):
    photo, mask = _masked_inputs(tmp_path)
    arguments = [str(mask) if a == "MASK" else a for a in arguments]
    with pytest.raises(SystemExit, match=message):
        main(["edit", str(photo), "--prompt", "x", "-o", str(tmp_path / "o.png"), *arguments,
              "--models", str(tmp_path / "nowhere")])


# --- stitched references --------------------------------------------------------------------------

def _random_png(path: Path, seed: int, size: tuple[int, int]) -> Path:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_stitched_references_joined_downward_equal_the_core_edit(models_tree, monkeypatch):
    import kontext_core.cli as cli

    tmp_path, _, common = models_tree
    photo = _random_png(tmp_path / "photo_noise.png", 40, (40, 24))
    references = [_random_png(tmp_path / "ref_a.png", 41, (24, 32)), _random_png(tmp_path / "ref_b.png", 42, (32, 16))]
    loaded = []
    load = cli._pipeline
    monkeypatch.setattr(cli, "_pipeline", lambda args, **kw: loaded.append(load(args, **kw)) or loaded[-1])
    out = tmp_path / "stitched.png"
    assert main(["edit", str(photo), *map(str, references), "--prompt", "in these styles", "-o", str(out),
                 "--resize", "keep", "--seed", "9", "--placement", "stitch", "--stitch-direction", "down",
                 *common]) == 0

    # The same edit through the core, on the models the command loaded.
    pipeline = loaded[0][0]
    pictures = [Image.open(p).convert("RGB") for p in (photo, *references)]
    core = {direction: pipeline.edit(pictures, "in these styles", seed=9, steps=2, resize="keep",
                                     placement="stitch", stitch_direction=direction).images[0]
            for direction in ("down", "right")}
    with Image.open(out) as written:
        assert written.size == core["down"].size and written.tobytes() == core["down"].tobytes()
        parameters = json.loads(written.text["parameters"])
    assert written.tobytes() != core["right"].tobytes()  # the direction is what made it
    assert (parameters["placement"], parameters["stitch_direction"]) == ("stitch", "down")


@pytest.mark.parametrize("placement", [None, "offset"])
def test_a_stitch_direction_without_the_stitch_placement_is_refused_before_loading(tmp_path, monkeypatch,
                                                                                   placement):
    import kontext_core.cli as cli

    photo, reference = _random_png(tmp_path / "a.png", 43, (16, 16)), _random_png(tmp_path / "b.png", 44, (16, 16))
    monkeypatch.setattr(cli, "_pipeline", lambda *a, **k: pytest.fail("the models were loaded first"))
    chosen = ["--placement", placement] if placement else []  # none: the default, kontext
    with pytest.raises(SystemExit, match=f"--stitch-direction only applies to --placement stitch \\(the placement is "
                                         f"{placement or 'kontext'}\\)"):
        main(["edit", str(photo), str(reference), "--prompt", "x", "-o", str(tmp_path / "o.png"), *chosen,
              "--stitch-direction", "down", "--models", str(tmp_path / "nowhere")])
    assert not (tmp_path / "o.png").exists()


def test_compile_flag_reaches_load_pipeline_and_compiles_once(models_tree, monkeypatch):
    from kontext_core import KontextTransformer

    tmp_path, image, common = models_tree
    calls = []
    monkeypatch.setattr(KontextTransformer, "compile_blocks", lambda self, **options: calls.append(self) or self)
    assert main(["edit", str(image), "--prompt", "red", "-o", str(tmp_path / "c.png"), "--resize", "keep",
                 "--compile", *common]) == 0
    assert len(calls) == 1
