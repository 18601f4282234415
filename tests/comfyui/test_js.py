"""The frontend extension (js/kontext_turns.js) run by Node.js against stand-ins for ComfyUI's app and api
modules and a minimal DOM: the turn strip after a run, a click picking a turn, Image Prep's sizes.
Skipped when Node.js is not installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from node_pack import REPO, nodes_module

EXTENSION = REPO / "js" / "kontext_turns.js"
HARNESS = Path(__file__).parent / "js" / "turn_strip_harness.mjs"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the frontend extension")


@pytest.fixture
def page(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(
        "export const app = { extensions: [], graph: null, canvas: null,\n"
        "  registerExtension(extension) { this.extensions.push(extension); } };\n")
    (tmp_path / "scripts" / "api.js").write_text("export const api = { apiURL: (route) => '/api' + route };\n")
    (tmp_path / "extensions" / "kontext").mkdir(parents=True)
    shutil.copy(EXTENSION, tmp_path / "extensions" / "kontext" / "kontext_turns.js")
    # A package.json marking the copies as ES modules, as the browser loads them.
    (tmp_path / "package.json").write_text('{"type": "module"}')
    return tmp_path


@needs_node
def test_turn_strip_shows_every_turn_and_a_click_picks_it(page):
    run = subprocess.run([NODE, str(HARNESS), str(page)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout.strip().splitlines()[-1])
    assert shown["thumbnails"] == [f"/api/view?filename=t{i}.png&subfolder=&type=temp" for i in range(3)]
    assert shown["captions"] == ["0", "1", "2"] and shown["current"] == [False, False, True]
    assert shown["fromTurnNode"] == 1  # a click on Edit Turn's strip set the Pick Turn fed by it
    assert shown["fromPickNode"] == 2 and shown["callbacks"] == [1, 2]
    assert shown["sizes"] == "image: 40x24 -> 1328x800"


def test_extension_names_match_the_nodes_and_their_ui_keys():
    source = EXTENSION.read_text()
    named = set(re.findall(r'"(Kontext[A-Za-z]+)"', source))
    assert named <= {node.spec().node_id for node in nodes_module().NODES}
    session = (REPO / "nodes" / "session.py").read_text()
    for key in ("kontext_turns", "kontext_images"):
        assert key in source and f'"{key}"' in session
    turn = nodes_module().KontextPickTurn.spec().input("turn")
    assert turn.type == "INT" and 'w.name === "turn"' in source
