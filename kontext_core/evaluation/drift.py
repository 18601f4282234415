"""Drift over turns: how far an N-turn session wanders from its starting image, chained two ways.

- "latent": each turn edits the previous turn's latent directly (EditSession's default);
- "roundtrip": each turn's latent is decoded to 8-bit pixels and encoded again before the next edit, as a
  pipeline that passes images between turns would do.

Both sessions start from the same latent and use the same prompt and seed at each turn, so what differs
between them is the chaining alone. Every turn is decoded and measured against the starting image at the
working resolution (turn 0 is the start latent decoded: the autoencoder's own loss, the floor of every
later turn). The default prompt asks for no change, so any change measured is drift.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..files_out import write_json_atomic, write_png_atomic
from ..image import prepare_image, to_pil
from ..pipeline import GenerationSettings, KontextPipeline
from ..sampling import StepCallback
from .metrics import METRICS, compare_images
from .report import HtmlReport, plot_lines

DEFAULT_PROMPT = "keep the image exactly the same"
CHAINS = {
    "latent": "latent chaining: each turn edits the previous turn's latent (the session's default)",
    "roundtrip": "AE round trip per turn: each turn's latent decoded to 8-bit pixels and encoded again",
}
PLOTTED = ("delta_e", "ssim", "psnr", "shift_distance_px", "scale", "sharpness_ratio")


@dataclass
class DriftTurn:
    turn: int
    prompt: str
    seed: int | None
    image: Image.Image
    metrics: dict
    seconds: float = 0.0  # the edit and its decode (0 for turn 0)


@dataclass
class DriftRun:
    reference: Image.Image  # the starting image at the working resolution, 8-bit
    settings: GenerationSettings
    prompts: list[str]
    chains: dict[str, list[DriftTurn]] = field(default_factory=dict)


def turn_prompts(turns: int, prompts: Sequence[str] | None = None) -> list[str]:
    """The prompt of each turn: the given ones in order, repeated from the start when there are fewer than
    turns; DEFAULT_PROMPT when none are given."""
    if turns < 1:
        raise ValueError(f"a drift run needs at least one turn, got {turns}")
    prompts = [p for p in (prompts or [DEFAULT_PROMPT]) if p.strip()]
    if not prompts:
        raise ValueError("no prompts: give at least one non-empty line")
    return [prompts[i % len(prompts)] for i in range(turns)]


def _with_distance(metrics: dict) -> dict:
    dx, dy = metrics["shift_px"]
    return {**metrics, "shift_distance_px": round(math.hypot(dx, dy), 3)}


def run_drift(pipeline: KontextPipeline, image: Image.Image, turns: int, prompts: Sequence[str] | None = None,
              *, settings: GenerationSettings | None = None, resize: str = "preferred", fit: str = "stretch",
              callback: Callable[[str, int], StepCallback | None] | None = None) -> DriftRun:
    """Run both chains for `turns` turns and measure every turn against the starting image.

    Turn k uses seed settings.seed + k - 1, as `kontext edit --turns` does. callback(chain, turn) may return
    a per-step callback (a progress bar)."""
    settings = settings or GenerationSettings()
    prompts = turn_prompts(turns, prompts)
    reference = to_pil(prepare_image(image, resize, None, fit, pipeline.image_multiple))[0]
    start = pipeline.encode_image(reference, resize="keep")
    start_image = pipeline.decode(start)[0]
    run = DriftRun(reference, settings, prompts)
    for chain in CHAINS:
        session = pipeline.session(latent=start, settings=settings)
        measured = [DriftTurn(0, "", None, start_image, _with_distance(compare_images(reference, start_image)))]
        for number, prompt in enumerate(prompts, start=1):
            began = time.perf_counter()
            turn = session.edit(prompt, roundtrip=chain == "roundtrip", seed=settings.seed + number - 1,
                                callback=callback(chain, number) if callback else None)
            picture = session.image(turn.index)
            seconds = time.perf_counter() - began
            measured.append(DriftTurn(number, prompt, turn.settings.seed, picture,
                                      _with_distance(compare_images(reference, picture)), round(seconds, 3)))
        run.chains[chain] = measured
    return run


def write_drift_report(run: DriftRun, folder: str | Path, settings: dict | None = None) -> dict[str, Path]:
    """Images (images/reference.png, images/<chain>/turn_NN.png), metrics.json, settings.json, the plot
    (metrics.png, when matplotlib is installed) and report.html into `folder`. `settings`: what else the report should
    record (model files, dtype, command line...). Returns the paths written, by name."""
    folder = Path(folder)
    written = {"reference": write_png_atomic(run.reference, folder / "images" / "reference.png")}
    record = {"settings": {**asdict(run.settings), **(settings or {})}, "prompts": run.prompts,
              "reference": "images/reference.png", "metrics_order": list(METRICS), "chains": {}}
    for chain, measured in run.chains.items():
        turns = []
        for turn in measured:
            path = write_png_atomic(turn.image, folder / "images" / chain / f"turn_{turn.turn:02d}.png")
            turns.append({"turn": turn.turn, "prompt": turn.prompt, "seed": turn.seed, "seconds": turn.seconds,
                          "image": path.relative_to(folder).as_posix(), **turn.metrics})
        record["chains"][chain] = {"description": CHAINS[chain], "turns": turns}

    numbers = {chain: {metric: [t[metric] for t in entry["turns"]] for metric in PLOTTED}
               for chain, entry in record["chains"].items()}
    turn_axis = [t["turn"] for t in next(iter(record["chains"].values()))["turns"]]
    plot_note = plot_lines(folder / "metrics.png", turn_axis, numbers, PLOTTED, "turn")
    record["plot"] = "metrics.png" if plot_note is None else None
    record["notes"] = [plot_note] if plot_note else []
    written["metrics"] = write_json_atomic(record, folder / "metrics.json")
    written["settings"] = write_json_atomic({"settings": record["settings"], "prompts": run.prompts},
                                            folder / "settings.json")
    if plot_note is None:
        written["plot"] = folder / "metrics.png"
    written["report"] = _html(record, plot_note).write(folder / "report.html")
    return written


def _html(record: dict, plot_note: str | None) -> HtmlReport:
    page = HtmlReport("Drift over turns")
    page.paragraph("Every turn against the starting image at the working resolution. Turn 0 is the start latent "
                   "decoded (the autoencoder's own loss). PSNR ∞: identical in 8 bits. shift_px is (dx, dy) in "
                   "pixels; scale 1 is the same size; sharpness_ratio below 1 is blurrier.")
    if plot_note:
        page.note(plot_note)
    else:
        page.image("metrics.png", "each metric against the turn, both chains")
    columns = ["shift_px", "scale", "delta_e", "ssim", "psnr", "sharpness_ratio"]
    for chain, entry in record["chains"].items():
        page.heading(entry["description"])
        page.table(["turn", "prompt", *columns, "seconds"],
                   [[t["turn"], t["prompt"], *(t[c] for c in columns), t["seconds"]] for t in entry["turns"]])
    page.heading("Images, turn by turn")
    page.figures([(record["reference"], "starting image")])
    chains = list(record["chains"].values())
    for position, turn in enumerate(chains[0]["turns"]):
        items = []
        for chain, entry in zip(record["chains"], chains):
            t = entry["turns"][position]
            items.append((t["image"], f"turn {t['turn']}, {chain}: ΔE {t['delta_e']:.2f}, SSIM {t['ssim']:.3f}"))
        page.figures(items)
    page.settings({"settings": record["settings"], "prompts": record["prompts"]})
    return page
