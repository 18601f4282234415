"""Writing results so that nothing is ever half-written: temporary file, then rename.

The file that takes the name gets the permissions a plain `open(path, "w")` would have left: an existing
file's mode, else 0o666 less the process umask. (mkstemp creates its files 0o600, which would make every
image unreadable to the user's other accounts, web servers and shared folders.)
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, PngImagePlugin

_umask_lock = threading.Lock()
_umask_by_setting: int | None = None


def _umask_from_proc() -> int | None:
    # Linux 4.7+ reports the umask without changing it.
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_umask() -> int:
    """The process umask. Elsewhere than Linux it can only be read by setting it and setting it back, which
    for that instant gives files other threads create a umask of 0o077; so that is done once, under a lock,
    and remembered (a program that changes its umask later is not followed there)."""
    global _umask_by_setting
    found = _umask_from_proc()
    if found is not None:
        return found
    with _umask_lock:
        if _umask_by_setting is None:
            _umask_by_setting = os.umask(0o077)
            os.umask(_umask_by_setting)
        return _umask_by_setting


def mode_for_replacing(path: Path) -> int:
    """The mode `open(path, "w")` would leave: an existing file keeps its own, a new one gets 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write; when the block ends without an error it takes `path`'s place
    (with `mode_for_replacing`'s mode), otherwise it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so that os.replace is a rename within one file system: atomic.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        # After the writing: some writers (safetensors') create the file anew, with their own mode.
        os.chmod(temporary, mode_for_replacing(path))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_png_atomic(image: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Save a PNG with text chunks (e.g. the generation parameters) atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    with replacing(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)
    return Path(path)


def write_json_atomic(data: Any, path: str | Path) -> Path:
    with replacing(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2))
    return Path(path)
