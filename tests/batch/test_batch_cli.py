"""The `kontext-batch` command without a server: exit codes and messages for an unreachable ComfyUI, bad
inputs, and the dry run's plan (against the in-process fake)."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

import kontext_batch.cli as cli
from fake_comfy import FakeComfy, object_info_for


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (8, 6)).save(folder / "a.png")
    return folder


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_server_is_named_with_the_fix(photos, tmp_path, capsys):
    port = _closed_port()
    code = cli.main([str(photos), "-o", str(tmp_path / "out"), "-p", "x", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach ComfyUI at http://127.0.0.1:{port}" in err and "--host/--port or --url" in err
    assert not (tmp_path / "out").exists()


def test_bad_csv_row_stops_before_contacting_the_server(photos, tmp_path, capsys):
    table = tmp_path / "jobs.csv"
    table.write_text("image,prompt,seed\nphotos/a.png,x,1\nphotos/a.png,y,lots\n")
    code = cli.main([str(table), "-o", str(tmp_path / "out"), "--port", str(_closed_port())])
    assert code == 2 and "jobs.csv line 3: seed must be a whole number" in capsys.readouterr().err


def test_prompt_and_turns_file_are_exclusive(photos, tmp_path, capsys):
    turns = tmp_path / "turns.txt"
    turns.write_text("a\nb\n")
    code = cli.main([str(photos), "-o", str(tmp_path / "out"), "-p", "x", "--turns", str(turns)])
    assert code == 2 and "either with --prompt or with --turns" in capsys.readouterr().err


def test_bad_set_is_explained(photos, tmp_path, capsys):
    code = cli.main([str(photos), "-o", str(tmp_path / "out"), "-p", "x", "--set", "denoise0.5"])
    assert code == 2 and "NODE.INPUT=VALUE" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_fields_and_queues_nothing(photos, tmp_path, capsys, monkeypatch):
    server = FakeComfy(object_info_for("kontext_edit"))
    monkeypatch.setattr(cli, "ComfyClient", lambda url, timeout: server)
    code = cli.main([str(photos), "-o", str(tmp_path / "out"), "-p", "x", "--seed", "3", "--set", "steps=8",
                     "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and server.queued == []
    assert "image     -> Load Image (node 5).image" in out and "prompt    -> Kontext Prompt (node 6).prompt" in out
    assert "steps     -> Kontext Edit (node 7).steps" in out and "outputs   <- Save Image (node 8)" in out
    assert "server    http://fake:8188: answers, has the workflow's nodes" in out


def test_full_run_through_the_command(photos, tmp_path, capsys, monkeypatch):
    server = FakeComfy(object_info_for("kontext_edit"))
    monkeypatch.setattr(cli, "ComfyClient", lambda url, timeout: server)
    code = cli.main([str(photos), "-o", str(tmp_path / "out"), "-p", "x", "--set", "Kontext Edit.denoise=0.75", "-q"])
    assert code == 0 and (tmp_path / "out" / "a.png").exists()
    assert server.queued[0][1]["7"]["inputs"]["denoise"] == 0.75  # typed as the server declares it (FLOAT)
    assert "1 turn(s) done, 0 job(s) failed" in capsys.readouterr().out
