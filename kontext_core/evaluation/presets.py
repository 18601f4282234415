"""Comparing settings on the same work: the preset list ("bf16,int8,fp8,fast,cache=0.1"), loading one model per
preset in turn, and the comparison run (every preset's outputs measured against the first preset's).

A preset is one or more parts joined by "+", each replacing the matching part of the base options (the
command's --dtype, --preset, --cache):
- a weight dtype: bf16, fp16, fp32, fp8, int8 (load_pipeline's dtype);
- a runtime preset of kontext_core.presets: exact, fast (its own weights choice, attention backend, compiled
  blocks, CUDA graphs; parts the device cannot run fall back, said in the log); a dtype part beside it wins;
- a step cache: cache=T (First-Block Cache at threshold T), cache=first-block:T, cache=teacache:T, cache=off;
- sage8's statistics period: refresh=N (load_pipeline's attention_refresh; refresh=0 is the exact sage8 path).
So "fp8+cache=teacache:0.4" is fp8 weights with TeaCache, and "fast+refresh=0,fast" judges the fast preset's
reused attention statistics. Every preset gets the same prompts and seeds.
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from PIL import Image

from ..compute.attention import get_attention_backend, set_attention_backend
from ..files_out import write_json_atomic, write_png_atomic
from ..pipeline import GenerationSettings, KontextPipeline
from ..presets import PRESETS
from ..step_cache import CACHE_MODES, OFF, StepCache
from .metrics import compare_images
from .perceptual import load_lpips
from .report import HtmlReport, plot_bars

DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8")
COMPARED = ("psnr", "ssim", "delta_e")  # per image, against the first preset's output (plus lpips when present)


@dataclass(frozen=True)
class PresetSpec:
    name: str  # as written in the list
    dtype: str | None = None
    runtime: str | None = None  # "exact" | "fast"
    cache: str | None = None  # a StepCache's text, or "off"
    refresh: int | None = None  # sage8's statistics recorded every this-many steps (0: every step)

    @property
    def slug(self) -> str:
        """The name as a file name part: "cache=first-block:0.1" -> "cache-first-block-0.1"."""
        return re.sub(r"[^A-Za-z0-9.+_-]+", "-", self.name).strip("-")

    def load_options(self, base_dtype: str | None = None, base_runtime: str | None = None) -> dict[str, Any]:
        """load_pipeline's dtype and preset for this preset over the base options. A runtime preset brings its
        own weights choice, so the base dtype does not apply to it; a dtype part of this preset always wins."""
        refresh = {} if self.refresh is None else {"attention_refresh": self.refresh}
        if self.runtime is not None:
            return {"dtype": self.dtype, "preset": self.runtime, **refresh}
        return {"dtype": self.dtype or base_dtype, "preset": base_runtime, **refresh}

    def settings(self, base: GenerationSettings) -> GenerationSettings:
        return base if self.cache is None else replace(base, cache=self.cache)

    def describe(self) -> dict[str, Any]:
        described = {"name": self.name, "dtype": self.dtype, "runtime": self.runtime, "cache": self.cache}
        # Only where given: bench records written before this part existed keep their ids.
        return described if self.refresh is None else described | {"refresh": self.refresh}


def _cache_part(value: str, preset: str) -> str:
    try:
        float(value)
    except ValueError:
        spec = value
    else:
        spec = f"{CACHE_MODES[0]}:{value}"  # a bare threshold: the first mode, First-Block Cache
    try:
        step_cache = StepCache.parse(spec)
    except ValueError as error:
        raise ValueError(f"preset {preset!r}: {error}") from None
    return str(step_cache) if step_cache is not None else OFF


def _refresh_part(value: str, preset: str) -> int:
    if not value.isdigit():
        raise ValueError(f"preset {preset!r}: refresh={value} is not a number of steps; give 0 (every step) or "
                         "e.g. refresh=7")
    return int(value)


def parse_presets(text: str | Sequence[str]) -> list[PresetSpec]:
    """"bf16,int8,fast,cache=0.1" (or a list of such names) -> the presets, in order; the first is the one the
    others are measured against."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise ValueError("no presets given: list at least one, e.g. bf16,fp8,fast,cache=0.1")
    specs = []
    for name in names:
        parts: dict[str, str] = {}
        for part in name.split("+"):
            part = part.strip()
            lowered = part.lower()
            if lowered in DTYPES:
                kind, value = "dtype", lowered
            elif lowered in PRESETS:
                kind, value = "runtime", lowered
            elif lowered.startswith("cache="):
                kind, value = "cache", _cache_part(lowered.partition("=")[2], name)
            elif lowered.startswith("refresh="):
                kind, value = "refresh", _refresh_part(lowered.partition("=")[2], name)
            else:
                raise ValueError(
                    f"preset {name!r}: {part!r} is not a dtype ({', '.join(DTYPES)}), a runtime preset "
                    f"({', '.join(PRESETS)}), a step cache (cache=0.1, cache=first-block:0.1, "
                    f"cache=teacache:0.4) or sage8's statistics period (refresh=7); join parts with '+', e.g. "
                    f"fp8+cache=0.1")
            if kind in parts:
                raise ValueError(f"preset {name!r} names its {kind} twice; give one {kind} per preset")
            parts[kind] = value
        specs.append(PresetSpec(name, **parts))
    slugs = [spec.slug for spec in specs]
    if duplicates := sorted({s for s in slugs if slugs.count(s) > 1}):
        raise ValueError(f"preset(s) listed twice: {', '.join(duplicates)}; each preset once")
    return specs


PipelineLoader = Callable[[PresetSpec], KontextPipeline]
Result = TypeVar("Result")


def pipeline_loader(files, *, dtype: str | None = None, preset: str | None = None, compile: bool = False,
                    **load_kwargs: Any) -> PipelineLoader:
    """A loader building each preset's pipeline from `files` (ModelFiles) with load_pipeline; dtype and preset
    (and an attention_refresh among load_kwargs) are the base options a preset's parts replace; the other
    load_kwargs go to load_pipeline as they are (device, memory, loras, log...). compile: compile the blocks where
    the preset has not already."""
    from ..build import load_pipeline

    def load(spec: PresetSpec) -> KontextPipeline:
        options = spec.load_options(dtype, preset)
        return load_pipeline(files, compile=compile, **(load_kwargs | options))

    return load


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def for_each_preset(loader: PipelineLoader, specs: Sequence[PresetSpec],
                    work: Callable[[PresetSpec, KontextPipeline], Result],
                    needed: Callable[[PresetSpec], bool] = lambda spec: True) -> list[Result | None]:
    """work(spec, pipeline) for each preset in turn, one model in memory at a time: each is freed before the
    next loads (a preset may change the process's attention backend; it is put back after each). Presets
    for which needed(spec) is false are not loaded (their result is None)."""
    results: list[Result | None] = []
    for spec in specs:
        if not needed(spec):
            results.append(None)
            continue
        backend = get_attention_backend()
        pipeline = None
        try:
            pipeline = loader(spec)
            results.append(work(spec, pipeline))
        finally:
            pipeline = None  # the last reference: the weights go before the next preset's load
            set_attention_backend(backend)
            release_memory()
    return results


def timed_edit(pipeline: KontextPipeline, image: Image.Image, prompt: str, settings: GenerationSettings,
               resize: str, fit: str, callback=None) -> tuple[Image.Image, float, Any]:
    """(output image, seconds for the edit and its decode, cache stats)."""
    synchronize = torch.cuda.synchronize if pipeline.device.type == "cuda" else (lambda: None)
    synchronize()
    began = time.perf_counter()
    result = pipeline.edit(image, prompt, settings=settings, resize=resize, fit=fit, callback=callback)
    synchronize()
    return result.images[0], time.perf_counter() - began, result.cache_stats


def read_image(path: str | Path) -> Image.Image:
    """An image read whole (the file closed again), as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


@dataclass
class Case:
    name: str  # image stem, made unique
    image: Image.Image
    prompt_index: int
    prompt: str

    @property
    def stem(self) -> str:
        return f"{self.name}__p{self.prompt_index}"


def cases_for(images: dict[str, Image.Image], prompts: Sequence[str]) -> list[Case]:
    return [Case(name, image, index, prompt) for name, image in images.items() for index, prompt in enumerate(prompts)]


def run_presets(loader: PipelineLoader, specs: Sequence[PresetSpec], cases: Sequence[Case], folder: str | Path,
                *, settings: GenerationSettings | None = None, resize: str = "preferred", fit: str = "stretch",
                lpips_device: str | torch.device = "cpu", callback=None) -> dict:
    """Every case under every preset (outputs in folder/<preset>/<image>__p<prompt>.png), each output measured
    against the first preset's output of the same case. Returns the record metrics.json holds."""
    folder = Path(folder)
    settings = settings or GenerationSettings()
    # One preset has nothing to be compared with: no LPIPS network to load.
    meter, lpips_note = load_lpips(lpips_device) if len(specs) > 1 else (None, None)
    first = specs[0]

    def work(spec: PresetSpec, pipeline: KontextPipeline) -> dict:
        preset_settings = spec.settings(settings)
        outputs = []
        for case in cases:
            image, seconds, stats = timed_edit(pipeline, case.image, case.prompt, preset_settings, resize, fit,
                                               callback(spec, case) if callback else None)
            path = write_png_atomic(image, folder / spec.slug / f"{case.stem}.png")
            entry = {"case": case.stem, "image": case.name, "prompt": case.prompt, "seed": preset_settings.seed,
                     "output": path.relative_to(folder).as_posix(), "seconds": round(seconds, 3),
                     "cache": str(stats) if stats is not None else None}
            if spec is not first:
                reference = read_image(folder / first.slug / f"{case.stem}.png")
                entry["vs_first"] = compare_images(reference, image, metrics=COMPARED)
                if meter is not None:
                    entry["vs_first"]["lpips"] = round(meter(reference, image), 5)
            outputs.append(entry)
        seconds = [o["seconds"] for o in outputs]
        return {**spec.describe(), "settings": asdict(preset_settings), "attention": get_attention_backend(),
                "dtype_loaded": str(pipeline.transformer.dtype).replace("torch.", ""),
                "seconds_per_image": round(sum(seconds) / len(seconds), 3), "outputs": outputs,
                "mean_vs_first": _means([o.get("vs_first") for o in outputs])}

    presets = for_each_preset(loader, specs, work)
    return {"reference_preset": first.name, "compared": [*COMPARED, *(["lpips"] if meter else [])],
            "notes": [lpips_note] if lpips_note else [], "cases": [c.stem for c in cases], "presets": presets}


def _means(comparisons: list[dict | None]) -> dict | None:
    """The mean of each metric over the cases; an infinite PSNR (None: identical) counts as such, so the mean
    of a preset identical on every case is None too, and one identical case is left out of a finite mean."""
    present = [c for c in comparisons if c]
    if not present:
        return None
    means = {}
    for metric in present[0]:
        values = [c[metric] for c in present if c.get(metric) is not None]
        means[metric] = round(sum(values) / len(values), 5) if values else None
    return means


def write_presets_report(record: dict, folder: str | Path, settings: dict | None = None) -> dict[str, Path]:
    """metrics.json, report.html and the bar plot (metrics.png, with matplotlib) into `folder`, beside the
    outputs run_presets wrote there."""
    folder = Path(folder)
    record = {**record, "settings": settings or {}}
    labels = [p["name"] for p in record["presets"]]
    bars = {"seconds per image": [p["seconds_per_image"] for p in record["presets"]]}
    for metric in record["compared"]:
        bars[f"{metric} vs {record['reference_preset']}"] = [
            (p["mean_vs_first"] or {}).get(metric) for p in record["presets"]]
    plot_note = plot_bars(folder / "metrics.png", labels, bars)
    record["plot"] = "metrics.png" if plot_note is None else None
    record["notes"] = [*record["notes"], *([plot_note] if plot_note else [])]
    written = {"metrics": write_json_atomic(record, folder / "metrics.json")}
    if plot_note is None:
        written["plot"] = folder / "metrics.png"
    written["report"] = _html(record).write(folder / "report.html")
    return written


def _html(record: dict) -> HtmlReport:
    page = HtmlReport("Presets compared")
    reference = record["reference_preset"]
    page.paragraph(f"The same prompts and seeds under every preset; each output measured against {reference}'s "
                   "output of the same image and prompt (PSNR ∞: identical in 8 bits). Seconds: the edit and its "
                   "decode, per image (the first image of a preset includes any warm-up).")
    for note in record["notes"]:
        page.note(note)
    if record.get("plot"):
        page.image(record["plot"], f"time per image and mean difference from {reference}")
    metrics = record["compared"]
    page.table(["preset", "weights", "attention", "cache", "seconds per image", *metrics],
               [[p["name"], p["dtype_loaded"], p["attention"], p["settings"]["cache"], p["seconds_per_image"],
                 *((p["mean_vs_first"] or {}).get(m, "-") if p["name"] != reference else "reference"
                   for m in metrics)] for p in record["presets"]])
    page.heading("Outputs")
    for position, case in enumerate(record["cases"]):
        items = []
        for preset in record["presets"]:
            output = preset["outputs"][position]
            versus = output.get("vs_first")
            caption = f"{preset['name']}: {output['seconds']:.2f} s" + (
                "" if versus is None else
                f", PSNR {'∞' if versus['psnr'] is None else format(versus['psnr'], '.1f')}, "
                f"SSIM {versus['ssim']:.3f}, ΔE {versus['delta_e']:.2f}")
            items.append((output["output"], caption))
        page.paragraph(f"{case}: {record['presets'][0]['outputs'][position]['prompt']}")
        page.figures(items)
    page.settings(record["settings"])
    return page
