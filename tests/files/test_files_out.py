"""Atomic writes (kontext_core.files_out and kontext-batch's twin): the permissions a plain open() would give.

mkstemp makes 0o600 files; a result must instead come out as `open(path, "w")` leaves it: 0o666 less the
umask when new, its old mode when it replaces a file. Checked under two umasks, for every atomic writer.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from kontext_batch import runner
from kontext_core import files_out
from kontext_core.checkpoints.files import save_atomic, write_text_atomic

WRITERS = {
    "png": lambda path: files_out.write_png_atomic(Image.new("RGB", (4, 4)), path, {"parameters": "{}"}),
    "json": lambda path: files_out.write_json_atomic({"turns": []}, path),
    "safetensors": lambda path: save_atomic({"weight": torch.zeros(2)}, path),
    "text": lambda path: write_text_atomic("{}", path),
    "batch download": lambda path: runner.write_atomic(path, b"\x89PNG..."),
}


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(folder: Path) -> int:
    with open(folder / "plain", "w"):
        pass
    return mode_of(folder / "plain")


@pytest.mark.parametrize("writer", WRITERS)
def test_new_file_gets_the_mode_a_plain_open_gives(tmp_path, umask, writer):
    target = tmp_path / "out" / "result"
    WRITERS[writer](target)
    assert mode_of(target) == 0o666 & ~umask == plain_open_mode(tmp_path)
    assert sorted(p.name for p in target.parent.iterdir()) == ["result"]  # no temporary left behind


@pytest.mark.parametrize("writer", WRITERS)
def test_replaced_file_keeps_its_mode(tmp_path, umask, writer):
    target = tmp_path / "result"
    target.write_bytes(b"old")
    target.chmod(0o640)
    WRITERS[writer](target)
    assert mode_of(target) == 0o640 and target.read_bytes() != b"old"


def test_umask_read_by_setting_it_where_proc_does_not_tell(tmp_path, umask, monkeypatch):
    # Not Linux: the umask is read once by setting it and setting it back, and stays as it was.
    monkeypatch.setattr(files_out, "_umask_from_proc", lambda: None)
    monkeypatch.setattr(files_out, "_umask_by_setting", None)
    files_out.write_json_atomic({}, tmp_path / "a.json")
    assert mode_of(tmp_path / "a.json") == 0o666 & ~umask
    assert os.umask(umask) == umask


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        files_out.write_json_atomic({"not json": object()}, target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
