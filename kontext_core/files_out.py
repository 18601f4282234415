"""Writing results so that nothing is ever half-written: temporary file, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin


def _temporary_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_png_atomic(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Save a PNG with text chunks (e.g. the generation parameters) atomically."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    tmp = _temporary_beside(path)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(data: Any, path: str | Path) -> Path:
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
