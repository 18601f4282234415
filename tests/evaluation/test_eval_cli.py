"""`kontext eval` end to end on tiny models in a ComfyUI models tree (conftest's `models_tree`): compare, a 2-turn
drift report, a presets report, and KontextBench on a fixture folder in the published layout (resume
included). Runs use 2 steps on 48x32 images."""

from __future__ import annotations

import builtins
import json
import weakref

import numpy as np
import pytest
from PIL import Image

from kontext_core.cli import main
from kontext_core.evaluation import bench, parse_presets, presets
from kontext_core.evaluation.drift import DEFAULT_PROMPT, turn_prompts
from kontext_core.evaluation.presets import PresetSpec, for_each_preset
from kontext_core.evaluation.report import PLOTS_MISSING, plot_lines

from test_eval_metrics import smooth_texture

CATEGORIES = ("Character Reference", "Instruction Editing - Global", "Instruction Editing - Local",
              "Style Reference", "Text Editing")


def textured_png(path, width: int = 48, height: int = 32, seed: int = 0):
    texture = smooth_texture(max(width, height), seed=seed, blur=1.0)[:height, :width]
    Image.fromarray(np.round(texture * 255).astype(np.uint8)).save(path)
    return path


def with_args(common: list[str], **changes: str) -> list[str]:
    """models_tree's common options with some values replaced."""
    common = list(common)
    for flag, value in changes.items():
        common[common.index(f"--{flag}") + 1] = value
    return common


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable, as on a machine without the [eval] extra."""
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


# --- compare ------------------------------------------------------------------------------------------

def test_compare_prints_one_json_object(tmp_path, capsys):
    texture = smooth_texture(64, seed=1)
    reference = np.round(texture * 255).astype(np.uint8)
    Image.fromarray(reference).save(tmp_path / "ref.png")
    Image.fromarray(np.roll(reference, (2, 3), axis=(0, 1))).save(tmp_path / "moved.png")
    assert main(["eval", "compare", str(tmp_path / "ref.png"), str(tmp_path / "moved.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"shift_px", "scale", "delta_e", "ssim", "psnr", "sharpness_ratio"}
    assert result["shift_px"] == pytest.approx([3, 2], abs=0.1)
    assert result["scale"] == pytest.approx(1.0, abs=0.005)

    assert main(["eval", "compare", str(tmp_path / "ref.png"), str(tmp_path / "ref.png")]) == 0
    identical = json.loads(capsys.readouterr().out)
    assert identical["psnr"] is None and identical["ssim"] == 1.0 and identical["delta_e"] == 0.0


def test_compare_with_a_mask_measures_only_outside_it(tmp_path, capsys):
    reference = np.round(smooth_texture(48, seed=2) * 255).astype(np.uint8)
    edited = reference.copy()
    edited[10:30, 12:40] = (250, 20, 20)
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 12:40] = 255
    for name, array in (("ref", reference), ("edited", edited), ("mask", mask)):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
    assert main(["eval", "compare", str(tmp_path / "ref.png"), str(tmp_path / "edited.png"),
                 "--mask", str(tmp_path / "mask.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["psnr"] is None and result["ssim"] == 1.0 and result["delta_e"] == 0.0
    assert result["mask_fraction"] == pytest.approx(20 * 28 / 48 ** 2, abs=1e-4)


def test_compare_refuses_images_of_different_sizes(tmp_path):
    textured_png(tmp_path / "a.png", 48, 32)
    textured_png(tmp_path / "b.png", 32, 32)
    with pytest.raises(SystemExit, match="differ in size .*resize one"):
        main(["eval", "compare", str(tmp_path / "a.png"), str(tmp_path / "b.png")])


# --- drift --------------------------------------------------------------------------------------------

def test_drift_of_two_turns_writes_the_report(models_tree, no_matplotlib, capsys):
    tmp_path, _, common = models_tree
    image = textured_png(tmp_path / "start.png")
    report = tmp_path / "drift"
    assert main(["eval", "drift", str(image), "--turns", "2", "--report", str(report), "--resize", "keep",
                 *common]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(report / "metrics.json"), str(report / "report.html")]  # no plot without matplotlib
    metrics = json.loads((report / "metrics.json").read_text())
    assert json.loads((report / "settings.json").read_text())["settings"] == metrics["settings"]
    assert set(metrics["chains"]) == {"latent", "roundtrip"}
    for chain in metrics["chains"].values():
        assert [t["turn"] for t in chain["turns"]] == [0, 1, 2]
        assert chain["turns"][1]["prompt"] == "keep the image exactly the same"
        for turn in chain["turns"]:
            assert {"shift_px", "scale", "delta_e", "ssim", "psnr", "sharpness_ratio"} <= set(turn)
            assert (report / turn["image"]).is_file()
    # Turn 0 is the same decoded start latent in both; the seeds match turn by turn, only the chaining differs.
    latent, roundtrip = metrics["chains"]["latent"]["turns"], metrics["chains"]["roundtrip"]["turns"]
    assert latent[0]["delta_e"] == roundtrip[0]["delta_e"] and latent[1]["seed"] == roundtrip[1]["seed"] == 0
    assert latent[2]["seed"] == 1
    assert metrics["settings"]["steps"] == 2 and metrics["settings"]["transformer"] == "flux1-kontext-dev.safetensors"
    # The backend in effect is recorded beside the one asked for.
    from kontext_core.compute.attention import get_attention_backend

    assert metrics["settings"]["attention_asked"] == "auto"
    assert metrics["settings"]["attention"] == get_attention_backend()
    page = (report / "report.html").read_text()
    assert "matplotlib is not installed" in page and "images/roundtrip/turn_02.png" in page
    assert Image.open(report / "images" / "reference.png").size == (48, 32)


def test_drift_report_with_matplotlib_plots_every_metric(models_tree, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the [eval] extra)")
    tmp_path, _, common = models_tree
    image = textured_png(tmp_path / "start.png")
    report = tmp_path / "drift"
    assert main(["eval", "drift", str(image), "--turns", "2", "--report", str(report), "--resize", "keep",
                 *common]) == 0
    printed = capsys.readouterr().out.split()
    assert str(report / "metrics.png") in printed
    plot = Image.open(report / "metrics.png")
    assert plot.format == "PNG" and min(plot.size) > 100
    # More than one colour: the lines were drawn, not an empty canvas.
    assert len(set(plot.convert("RGB").getdata())) > 10
    page = (report / "report.html").read_text()
    assert "metrics.png" in page and "matplotlib is not installed" not in page


def test_drift_prompts_repeat_in_turn():
    assert turn_prompts(3, ["make it red", " ", "add a hat"]) == ["make it red", "add a hat", "make it red"]
    assert turn_prompts(2) == [DEFAULT_PROMPT] * 2
    with pytest.raises(ValueError, match="at least one turn"):
        turn_prompts(0)


def test_plots_are_drawn_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the [eval] extra)")
    series = {"latent": {"ssim": [1.0, 0.9, 0.8], "psnr": [None, 30.0, 28.0]},
              "roundtrip": {"ssim": [1.0, 0.85, 0.7], "psnr": [None, 29.0, 25.0]}}
    assert plot_lines(tmp_path / "m.png", [0, 1, 2], series, ["ssim", "psnr"], "turn") is None
    assert Image.open(tmp_path / "m.png").format == "PNG"


def test_without_matplotlib_the_plot_says_why(tmp_path, no_matplotlib):
    assert plot_lines(tmp_path / "m.png", [0], {"a": {"ssim": [1.0]}}, ["ssim"], "turn") == PLOTS_MISSING
    assert not (tmp_path / "m.png").exists()


# --- presets ------------------------------------------------------------------------------------------

def test_presets_run_writes_outputs_timings_and_comparisons(models_tree, no_matplotlib, capsys):
    tmp_path, _, common = models_tree
    image = textured_png(tmp_path / "cat.png")
    report = tmp_path / "presets"
    assert main(["eval", "presets", str(image), "--prompt", "make it blue", "--prompt", "add a hat",
                 "--presets", "fp32,exact", "--report", str(report), "--resize", "keep", *common]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert [p["name"] for p in metrics["presets"]] == ["fp32", "exact"]
    assert metrics["reference_preset"] == "fp32" and metrics["cases"] == ["cat__p0", "cat__p1"]
    fp32, exact = metrics["presets"]
    # exact brings its own weights choice (the memory plan's: bf16), not the base --dtype fp32.
    assert fp32["dtype_loaded"] == "float32" and exact["dtype_loaded"] == "bfloat16"
    for preset in metrics["presets"]:
        assert preset["seconds_per_image"] > 0
        for output in preset["outputs"]:
            assert (report / output["output"]).is_file() and output["seed"] == 0
    assert all("vs_first" not in output for output in fp32["outputs"])
    for output in exact["outputs"]:
        assert {"psnr", "ssim", "delta_e"} <= set(output["vs_first"]) and output["vs_first"]["psnr"] < 100
    try:
        import lpips  # noqa: F401
    except ImportError:  # said in the report, the rest written
        assert any("lpips package is not installed" in note for note in metrics["notes"])
        assert "lpips package is not installed" in (report / "report.html").read_text()
    assert capsys.readouterr().out.split() == [str(report / "metrics.json"), str(report / "report.html")]


def test_lpips_is_measured_when_a_meter_loads(models_tree, no_matplotlib, monkeypatch):
    tmp_path, _, common = models_tree
    monkeypatch.setattr(presets, "load_lpips", lambda device: (lambda reference, other: 0.125, None))
    image = textured_png(tmp_path / "cat.png")
    assert main(["eval", "presets", str(image), "--prompt", "make it blue", "--presets", "fp32,cache=0.5",
                 "--report", str(tmp_path / "r"), "--resize", "keep", *common]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["compared"] == ["psnr", "ssim", "delta_e", "lpips"] and metrics["notes"] == [PLOTS_MISSING]
    cached = metrics["presets"][1]
    # The base --dtype fp32 stays: a cache preset changes only the cache. 2 steps: the first and last are
    # always computed.
    assert cached["dtype_loaded"] == "float32" and cached["settings"]["cache"] == "first-block:0.5"
    assert cached["outputs"][0]["cache"].startswith("2 of 2 steps computed")
    assert metrics["presets"][1]["outputs"][0]["vs_first"]["lpips"] == 0.125
    assert metrics["presets"][1]["mean_vs_first"]["lpips"] == 0.125


def test_preset_lists_parse_into_their_parts():
    specs = parse_presets("bf16, int8,fp8 ,fast,cache=0.1,cache=teacache:0.4,fp8+cache=first-block:0.2")
    assert [s.name for s in specs] == ["bf16", "int8", "fp8", "fast", "cache=0.1", "cache=teacache:0.4",
                                       "fp8+cache=first-block:0.2"]
    assert specs[3] == PresetSpec("fast", runtime="fast")
    assert specs[4].cache == "first-block:0.1" and specs[5].cache == "teacache:0.4"
    assert specs[6].dtype == "fp8" and specs[6].cache == "first-block:0.2"
    assert specs[4].slug == "cache-0.1" and specs[6].slug == "fp8+cache-first-block-0.2"
    # Base options fill what a preset does not name; a runtime preset brings its own weights choice.
    assert specs[4].load_options("fp32", None) == {"dtype": "fp32", "preset": None}
    assert specs[3].load_options("fp32", None) == {"dtype": None, "preset": "fast"}
    assert specs[0].load_options("fp32", "exact") == {"dtype": "bf16", "preset": "exact"}
    for bad, message in (("fp4", "is not a dtype"), ("bf16+fp8", "names its dtype twice"),
                         ("cache=lots", "not a number|unknown"), ("bf16,bf16", "listed twice"), ("", "no presets")):
        with pytest.raises(ValueError, match=message):
            parse_presets(bad)


def test_a_refresh_part_sets_sage8s_statistics_period_over_the_base(monkeypatch):
    # "fast+refresh=0,fast": the fast preset with and without its reused attention statistics.
    from kontext_core import build
    from kontext_core.evaluation import pipeline_loader

    specs = parse_presets("fast+refresh=0,fast,int8+refresh=7")
    assert [s.refresh for s in specs] == [0, None, 7] and specs[0].slug == "fast+refresh-0"
    assert specs[0].load_options(None, None) == {"dtype": None, "preset": "fast", "attention_refresh": 0}
    assert "refresh" not in specs[1].describe() and specs[2].describe()["refresh"] == 7
    asked = []
    monkeypatch.setattr(build, "load_pipeline", lambda files, **options: asked.append(options))
    load = pipeline_loader("files", dtype="bf16", attention_refresh=3, device="cpu")
    for spec in specs:
        load(spec)
    assert [options["attention_refresh"] for options in asked] == [0, 3, 7]  # the base fills what is not named
    assert asked[2]["dtype"] == "int8" and asked[1]["preset"] == "fast" and asked[1]["device"] == "cpu"
    for bad in ("fast+refresh=-1", "fast+refresh=often", "refresh=1+refresh=2"):
        with pytest.raises(ValueError, match="refresh"):
            parse_presets(bad)


def test_one_model_at_a_time():
    # Each preset's pipeline is gone before the next one loads.
    class Pipeline:
        pass

    alive = []

    def loader(spec):
        alive.append(sum(ref() is not None for ref in made))
        pipeline = Pipeline()
        made.append(weakref.ref(pipeline))
        return pipeline

    made: list = []
    for_each_preset(loader, parse_presets("bf16,fp8,int8"), lambda spec, pipeline: spec.name)
    assert alive == [0, 0, 0]


# --- KontextBench -------------------------------------------------------------------------------------

def kontext_bench_folder(root, per_category: int = 1):
    """A dataset folder in the published layout: test/metadata.jsonl and test/images/, all five categories."""
    images = root / "test" / "images"
    images.mkdir(parents=True)
    lines = []
    for number, category in enumerate(CATEGORIES * per_category):
        key = f"{number:04d}"
        textured_png(images / f"{key}.png", seed=number)
        lines.append(json.dumps({"file_name": f"images/{key}.png", "key": key, "category": category,
                                 "instruction": f"make it {['red', 'blue', 'green', 'old', 'new'][number % 5]}"}))
    (root / "test" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_kontext_bench_run_and_resume(models_tree, monkeypatch):
    tmp_path, _, common = models_tree
    dataset = kontext_bench_folder(tmp_path / "kontext-bench")
    out = tmp_path / "bench"
    command = ["eval", "bench", str(dataset), "--presets", "fp32,cache=0.5", "--out", str(out), "--resize", "keep",
               *common]
    assert main(command) == 0
    first_run = records(out)
    assert len(first_run) == 10  # five pairs, two presets
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [bench.slug(c) for c in sorted(CATEGORIES)]
    local = out / "instruction-editing-local" / "0002__cache-0.5.png"
    assert local.is_file()
    for record in first_run:
        assert (out / record["output"]).is_file() and record["seconds"] > 0
        assert record["settings"]["steps"] == 2 and record["settings"]["transformer"] == "flux1-kontext-dev.safetensors"
        if record["preset"] == "fp32":
            assert record["vs_first"] is None
        else:
            assert {"psnr", "ssim", "delta_e"} <= set(record["vs_first"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["categories"]["Text Editing"]["cache=0.5"]["outputs"] == 1

    # A second run makes nothing: no model is even loaded.
    import kontext_core.evaluation as evaluation

    loads = []
    real_loader = evaluation.pipeline_loader

    def counting_loader(*args, **kwargs):
        load = real_loader(*args, **kwargs)
        return lambda spec: loads.append(spec.name) or load(spec)

    monkeypatch.setattr(evaluation, "pipeline_loader", counting_loader)
    assert main(command) == 0
    assert len(records(out)) == 10 and loads == []
    # A deleted output is made again, and only it.
    local.unlink()
    assert main(command) == 0
    again = records(out)
    assert len(again) == 11 and again[-1]["key"] == "0002" and again[-1]["preset"] == "cache=0.5"
    assert local.is_file() and loads == ["cache=0.5"]


def test_kontext_bench_download_goes_through_huggingface_hub(models_tree, monkeypatch):
    import huggingface_hub

    tmp_path, _, common = models_tree
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        kontext_bench_folder(tmp_path / "fetched-source")
        import shutil
        shutil.copytree(tmp_path / "fetched-source", kwargs["local_dir"], dirs_exist_ok=True)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    target = tmp_path / "kontext-bench"
    assert main(["eval", "bench", str(target), "--download", "--limit", "1", "--category", "text",
                 "--presets", "fp32", "--out", str(tmp_path / "o"), "--resize", "keep", *common]) == 0
    assert calls == [{"repo_id": "black-forest-labs/kontext-bench", "repo_type": "dataset", "local_dir": str(target)}]
    assert [r["category"] for r in records(tmp_path / "o")] == ["Text Editing"]


def test_kontext_bench_without_the_dataset_says_to_download(tmp_path, models_tree):
    _, _, common = models_tree
    with pytest.raises(SystemExit, match=r"test/metadata.jsonl .* fetch it there first \(--download\)"):
        main(["eval", "bench", str(tmp_path / "nothing"), "--presets", "fp32", "--out", str(tmp_path / "o"),
              *common])


def test_kontext_bench_names_the_categories_it_holds(tmp_path):
    entries = bench.read_entries(kontext_bench_folder(tmp_path / "kb"))
    assert [e.category for e in bench.select(entries, ["GLOBAL"])] == ["Instruction Editing - Global"]
    assert len(bench.select(entries, ["instruction-editing-local", "character"])) == 2
    with pytest.raises(ValueError, match="matches several"):
        bench.select(entries, ["reference"])
    with pytest.raises(ValueError, match="no category 'portrait'.*it holds: Character Reference"):
        bench.select(entries, ["portrait"])
    twice = bench.read_entries(kontext_bench_folder(tmp_path / "kb2", per_category=3))
    picked = bench.select(twice, ["local", "Style Reference"], limit=2)
    assert [(e.category, e.key) for e in picked] == [
        ("Instruction Editing - Local", "0002"), ("Style Reference", "0003"),
        ("Instruction Editing - Local", "0007"), ("Style Reference", "0008")]


def test_kontext_bench_download_failure_says_what_to_do(models_tree, monkeypatch):
    import huggingface_hub

    tmp_path, _, common = models_tree

    def offline(**kwargs):
        raise OSError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SystemExit, match="could not fetch black-forest-labs/kontext-bench .*no route.*drop --download"):
        main(["eval", "bench", str(tmp_path / "kb"), "--download", "--presets", "fp32", "--out", str(tmp_path / "o"),
              *common])
