"""The jobs of a batch: which image, which prompt (or list of turns), which seed and overrides.

Inputs are a folder of images (or image files) with prompts given on the command line, or a CSV / JSONL
file with one job per row. Rows are checked here, at the door, and a bad row names its file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import BatchError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif"}
# Row keys with a meaning of their own; any other key names a workflow input as NODE.INPUT.
NAMED_FIELDS = ("steps", "guidance")
ROW_KEYS = ("image", "prompt", "prompts", "seed") + NAMED_FIELDS


@dataclass(frozen=True)
class Job:
    image: Path | None
    prompts: tuple[str, ...]                   # one per turn; turn k edits turn k-1's output
    seed: int | None = None
    overrides: tuple[tuple[str, Any], ...] = ()  # ("steps", 20), ("Kontext Edit.denoise", 0.8), ...
    source: str = ""                           # where the job was written, for messages: "jobs.csv line 4"
    base_dir: Path = field(default=Path("."), compare=False)  # relative image paths in overrides start here

    @property
    def turns(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> str:
        """Stable identity across runs: what the manifest records and a re-run looks up."""
        identity = {"image": str(self.image) if self.image else None, "prompts": list(self.prompts),
                    "seed": self.seed, "overrides": [[k, v] for k, v in self.overrides]}
        return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return self.image.stem if self.image else "prompt"


def load_jobs(inputs: Iterable[Path | str], prompts: Iterable[str] = (), seed: int | None = None) -> list[Job]:
    """Jobs from folders / image files (each given `prompts` as its turns) and CSV / JSONL files.

    `prompts` also fills rows of a CSV/JSONL that have no prompt of their own; `seed` fills rows without
    a seed (None keeps the workflow's seed).
    """
    prompts = tuple(p for p in prompts)
    if any(not p.strip() for p in prompts):
        raise BatchError("an empty prompt was given; every --prompt / --turns line needs text")
    jobs: list[Job] = []
    images: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise BatchError(f"{path} does not exist; give a folder of images, image files, "
                             "or a .csv / .jsonl job list")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise BatchError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            images.extend(found)
        elif path.suffix.lower() == ".csv":
            jobs.extend(_rows_to_jobs(_csv_rows(path), path, prompts, seed))
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            jobs.extend(_rows_to_jobs(_jsonl_rows(path), path, prompts, seed))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            raise BatchError(f"{path}: not an image, a folder, a .csv or a .jsonl file")
    if images and not prompts:
        raise BatchError("images were given without a prompt: add --prompt TEXT (several --prompt, or --turns FILE, "
                         "for a multi-turn edit), or give a CSV / JSONL with a prompt per image")
    jobs[:0] = [Job(image=p.resolve(), prompts=prompts, seed=seed, source=str(p), base_dir=p.parent.resolve())
                for p in images]
    if not jobs:
        raise BatchError("no jobs: the inputs hold no images and no rows")
    return jobs


def read_turns_file(path: Path | str) -> list[str]:
    """One prompt per non-empty line (lines starting with # are comments)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise BatchError(f"cannot read the turns file {path}: {error.strerror}") from None
    turns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not turns:
        raise BatchError(f"the turns file {path} holds no prompts (one per line)")
    return turns


def _csv_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise BatchError(f"{path} is empty; its first line must name the columns (image,prompt,...)")
        for name in reader.fieldnames:
            _check_column(path, 1, name)
        for row in reader:
            if None in row:
                raise BatchError(f"{path} line {reader.line_num}: more cells than the header has columns "
                                 "(quote cells that contain commas)")
            cells = {k.strip(): v.strip() for k, v in row.items() if v is not None and v.strip() != ""}
            if cells:
                yield reader.line_num, cells


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BatchError(f"{path} line {number}: not valid JSON ({error.msg}); "
                                 "each line must be one object like "
                                 "{\"image\": \"a.png\", \"prompt\": \"...\"}") from None
            if not isinstance(row, dict):
                raise BatchError(f"{path} line {number}: each line must be a JSON object, found {type(row).__name__}")
            for name in row:
                _check_column(path, number, name)
            yield number, {k: v for k, v in row.items() if v is not None and v != ""}


def _check_column(path: Path, line: int, name: str) -> None:
    if name.strip() not in ROW_KEYS and "." not in name:
        raise BatchError(f"{path} line {line}: '{name}' is neither a known column ({', '.join(ROW_KEYS)}) nor a "
                         "workflow input written as NODE.INPUT (node title or id, a dot, the input's name)")


def _rows_to_jobs(rows, path: Path, default_prompts: tuple[str, ...], default_seed: int | None) -> list[Job]:
    base = path.parent.resolve()
    jobs = []
    for line, row in rows:
        where = f"{path} line {line}"
        image = None
        if "image" in row:
            image = Path(str(row["image"])).expanduser()
            image = (image if image.is_absolute() else base / image).resolve()
            if not image.is_file():
                raise BatchError(f"{where}: the image {row['image']} does not exist "
                                 f"(relative paths start at {path.parent})")
        prompts = _row_prompts(row, where) or default_prompts
        if not prompts:
            raise BatchError(f"{where}: no prompt; fill the prompt column or give --prompt for rows without one")
        seed = _integer(row["seed"], where, "seed", minimum=0) if "seed" in row else default_seed
        overrides = []
        if "steps" in row:
            overrides.append(("steps", _integer(row["steps"], where, "steps", minimum=1)))
        if "guidance" in row:
            overrides.append(("guidance", _number(row["guidance"], where, "guidance")))
        overrides += [(k, v) for k, v in row.items() if k not in ROW_KEYS]
        jobs.append(Job(image=image, prompts=prompts, seed=seed, overrides=tuple(overrides), source=where,
                        base_dir=base))
    return jobs


def _row_prompts(row: dict, where: str) -> tuple[str, ...]:
    if "prompt" in row and "prompts" in row:
        raise BatchError(f"{where}: both prompt and prompts are set; use prompt for one edit, prompts for turns")
    if "prompt" in row:
        return (str(row["prompt"]),)
    if "prompts" in row:
        turns = row["prompts"]
        # A CSV cell holds the turns one per line; JSONL gives a list.
        turns = turns.splitlines() if isinstance(turns, str) else turns
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise BatchError(f"{where}: prompts must be a list of strings (one per turn)")
        turns = tuple(t.strip() for t in turns if t.strip())
        if not turns:
            raise BatchError(f"{where}: prompts is empty")
        return turns
    return ()


def _integer(value: Any, where: str, name: str, minimum: int) -> int:
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise BatchError(f"{where}: {name} must be a whole number >= {minimum}, found {value!r}")
    return number


def _number(value: Any, where: str, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BatchError(f"{where}: {name} must be a number, found {value!r}") from None
