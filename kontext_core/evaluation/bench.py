"""KontextBench as Black Forest Labs publish it: the Hugging Face dataset black-forest-labs/kontext-bench, an
image folder whose test/metadata.jsonl lists each pair as {"file_name", "key", "category", "instruction"}
with the images under test/images/ (1,026 pairs in five categories).

A run edits every selected pair under every preset: outputs go to OUT/<category>/<key>__<preset>.png (both
names made file-safe: lower case, other characters as "-"), and one line per output to OUT/records.jsonl
(settings, seconds, and for every preset after the first its PSNR / SSIM / ΔE / LPIPS against the first
preset's output of the same pair). The run resumes: an output whose file exists and whose record was made
with the same settings is not redone; a deleted output, or one made with other settings, is. Images are
written atomically and each record is one appended line, written after its image, so a run killed at any
point leaves no record of a missing or half-written image (a torn last line is skipped when read).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import UnidentifiedImageError

from ..files_out import write_json_atomic, write_png_atomic
from ..pipeline import GenerationSettings, KontextPipeline
from .metrics import compare_images
from .perceptual import load_lpips
from .presets import COMPARED, PipelineLoader, PresetSpec, for_each_preset, read_image, timed_edit

REPO_ID = "black-forest-labs/kontext-bench"
# The categories as the published metadata spells them (as third-party loaders of the dataset list them);
# whatever metadata.jsonl holds is accepted, these only help match a short --category.
KNOWN_CATEGORIES = ("Character Reference", "Instruction Editing - Global", "Instruction Editing - Local",
                    "Style Reference", "Text Editing")
RECORDS = "records.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class BenchEntry:
    key: str
    category: str
    instruction: str
    image: Path
    file_name: str


def slug(text: str) -> str:
    """A file-safe name: "Instruction Editing - Local" -> "instruction-editing-local"."""
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-") or "unnamed"


def metadata_path(folder: str | Path) -> Path:
    """The metadata.jsonl of a KontextBench folder: FOLDER/test/metadata.jsonl, or FOLDER/metadata.jsonl when
    FOLDER is the test/ split itself."""
    folder = Path(folder)
    for candidate in (folder / "test" / "metadata.jsonl", folder / "metadata.jsonl"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no KontextBench metadata in {folder}: expected test/metadata.jsonl (the layout of the Hugging Face "
        f"dataset {REPO_ID}). Point at the dataset's folder, or fetch it there first (`download_dataset(folder)`)")


def download_dataset(folder: str | Path) -> Path:
    """Fetch the dataset into `folder` through huggingface-hub (files already there are kept); returns folder."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=REPO_ID, repo_type="dataset", local_dir=str(folder))
    return Path(folder)


def read_entries(folder: str | Path) -> list[BenchEntry]:
    """Every pair listed in the folder's metadata.jsonl, in file order."""
    path = metadata_path(folder)
    entries, keys = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        missing = [name for name in ("file_name", "category", "instruction") if not row.get(name)]
        if missing:
            raise ValueError(f"{path}, line {number}: no {', '.join(missing)}; each line needs file_name, key, "
                             "category and instruction")
        key = str(row.get("key") or Path(row["file_name"]).stem)
        if key in keys:
            raise ValueError(f"{path}, line {number}: key {key!r} is listed twice; keys name the outputs, so "
                             "each must be unique")
        keys.add(key)
        entries.append(BenchEntry(key, str(row["category"]), str(row["instruction"]),
                                  path.parent / row["file_name"], str(row["file_name"])))
    if not entries:
        raise ValueError(f"{path} lists no pairs")
    return entries


def select(entries: Sequence[BenchEntry], categories: Sequence[str] = (), limit: int | None = None
           ) -> list[BenchEntry]:
    """The entries of the named categories (all when none named), at most `limit` per category (the first
    ones in file order). A category is named by its text or file-safe name in any case, or by a word or
    phrase only one category holds ("local", "style")."""
    present = list(dict.fromkeys(entry.category for entry in entries))
    chosen = set(present)
    if categories:
        chosen = {_match_category(name, present) for name in categories}
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    picked, counts = [], dict.fromkeys(present, 0)
    for entry in entries:
        if entry.category in chosen and (limit is None or counts[entry.category] < limit):
            picked.append(entry)
            counts[entry.category] += 1
    return picked


def _match_category(name: str, present: Sequence[str]) -> str:
    wanted = name.strip().lower()
    exact = [c for c in present if wanted in (c.lower(), slug(c))]
    partial = [c for c in present if wanted in c.lower() or slug(wanted) in slug(c)]
    if exact or len(partial) == 1:
        return (exact or partial)[0]
    listed = "; ".join(present)
    if partial:
        raise ValueError(f"category {name!r} matches several ({'; '.join(partial)}); name one of them")
    raise ValueError(f"no category {name!r} in this dataset; it holds: {listed}")


def output_path(out: Path, entry: BenchEntry, spec: PresetSpec) -> Path:
    return out / slug(entry.category) / f"{slug(entry.key)}__{spec.slug}.png"


def settings_record(spec: PresetSpec, settings: GenerationSettings, resize: str, fit: str,
                    identity: dict | None) -> tuple[dict, str]:
    """(what makes an output what it is, its short id): generation settings, the preset, the image handling
    and what the caller names (model files...)."""
    record = {**asdict(spec.settings(settings)), "preset": spec.describe(), "resize": resize, "fit": fit,
              **(identity or {})}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return record, digest


def read_records(out: Path) -> list[dict]:
    """The records written so far; a torn last line (a run killed mid-write) is skipped."""
    path = out / RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(out: Path, record: dict) -> None:
    with open(out / RECORDS, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def run_bench(loader: PipelineLoader, specs: Sequence[PresetSpec], entries: Sequence[BenchEntry],
              out: str | Path, *, settings: GenerationSettings | None = None, resize: str = "preferred",
              fit: str = "stretch", identity: dict | None = None, lpips_device: str = "cpu",
              callback: Callable[[PresetSpec, BenchEntry], Any] | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Edit every entry under every preset, resuming what an earlier run with the same settings left.
    Returns {"made": outputs made now, "kept": outputs already there, "failed": entries whose image could
    not be read, "summary": per category and preset}; summary.json holds the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or GenerationSettings()
    first = specs[0]
    ids = {spec.name: settings_record(spec, settings, resize, fit, identity) for spec in specs}

    def finished(entry: BenchEntry, spec: PresetSpec, records: dict) -> bool:
        record = records.get((entry.key, spec.name))
        return (record is not None and record.get("settings_id") == ids[spec.name][1] and "error" not in record
                and (out / record["output"]).is_file())

    latest = {(r["key"], r["preset"]): r for r in read_records(out)}
    todo = {spec.name: [e for e in entries if not finished(e, spec, latest)] for spec in specs}
    kept = sum(len(entries) - len(todo[spec.name]) for spec in specs)
    meter, lpips_note = (load_lpips(lpips_device) if len(specs) > 1 and any(todo[s.name] for s in specs[1:])
                         else (None, None))
    if lpips_note and log:
        log(lpips_note)
    counts = {"made": 0, "failed": 0}

    def work(spec: PresetSpec, pipeline: KontextPipeline) -> None:
        record_settings, settings_id = ids[spec.name]
        for entry in todo[spec.name]:
            base = {"key": entry.key, "category": entry.category, "instruction": entry.instruction,
                    "file_name": entry.file_name, "preset": spec.name, "settings_id": settings_id,
                    "settings": record_settings}
            try:
                source = read_image(entry.image)
            except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
                _append(out, {**base, "error": f"{entry.image} could not be read: {error}"})
                counts["failed"] += 1
                continue
            image, seconds, stats = timed_edit(pipeline, source, entry.instruction, spec.settings(settings), resize,
                                               fit, callback(spec, entry) if callback else None)
            path = write_png_atomic(image, output_path(out, entry, spec),
                                    {"parameters": json.dumps({"instruction": entry.instruction, **record_settings})})
            record = {**base, "output": path.relative_to(out).as_posix(), "seconds": round(seconds, 3),
                      "cache": str(stats) if stats is not None else None, "vs": first.name, "vs_first": None}
            reference = output_path(out, entry, first)
            if spec is not first and reference.is_file():
                reference_image = read_image(reference)
                record["vs_first"] = compare_images(reference_image, image, metrics=COMPARED)
                if meter is not None:
                    record["vs_first"]["lpips"] = round(meter(reference_image, image), 5)
            _append(out, record)
            counts["made"] += 1

    for_each_preset(loader, specs, work, needed=lambda spec: bool(todo[spec.name]))
    summary = summarize(read_records(out), specs, ids, lpips_note)
    write_json_atomic(summary, out / SUMMARY)
    return {"made": counts["made"], "kept": kept, "failed": counts["failed"], "summary": summary}


def summarize(records: Sequence[dict], specs: Sequence[PresetSpec], ids: dict, lpips_note: str | None = None
              ) -> dict:
    """Per category and preset: outputs, mean seconds, and the mean of each comparison (the latest record of
    each output made with the current settings)."""
    latest = {}
    for record in records:
        if "error" not in record and record.get("settings_id") == ids.get(record.get("preset"), (None, None))[1]:
            latest[(record["key"], record["preset"])] = record
    table: dict[str, dict[str, Any]] = {}
    for (key, preset), record in latest.items():
        cell = table.setdefault(record["category"], {}).setdefault(
            preset, {"outputs": 0, "identical_to_first": 0, "seconds": [], "vs_first": {}})
        cell["outputs"] += 1
        cell["seconds"].append(record["seconds"])
        versus = record.get("vs_first") or {}
        if "psnr" in versus and versus["psnr"] is None:
            cell["identical_to_first"] += 1  # infinite PSNR: counted here, left out of the mean PSNR
        for metric, value in versus.items():
            if value is not None:
                cell["vs_first"].setdefault(metric, []).append(value)
    for presets in table.values():
        for cell in presets.values():
            cell["mean_seconds"] = round(sum(cell["seconds"]) / len(cell["seconds"]), 3)
            del cell["seconds"]
            cell["mean_vs_first"] = {m: round(sum(v) / len(v), 5) for m, v in cell.pop("vs_first").items()}
    return {"reference_preset": specs[0].name, "presets": [s.name for s in specs], "categories": table,
            "notes": [lpips_note] if lpips_note else []}
