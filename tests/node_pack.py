"""The node pack imported the way ComfyUI imports it (example_workflows/build.py's `load_pack`, one place for
both): the repository folder as a package under a name of its own."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH") or os.environ.get("COMFYUI_DIR") or Path.home() / "ComfyUI")


def module_from_file(name: str, path: Path):
    """The Python file at `path` (a tool or script outside any package) imported once, as module `name`."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # registered before it runs: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def workflow_builder():
    return module_from_file("example_workflows_build", REPO / "example_workflows" / "build.py")


PACK = workflow_builder().PACK


def load_pack():
    """The pack's root module (what ComfyUI's load_custom_node executes)."""
    return workflow_builder().load_pack()


def nodes_module(name: str = ""):
    """`nodes` or one of its modules (`nodes_module("convert")`)."""
    load_pack()
    return importlib.import_module(f"{PACK}.nodes" + (f".{name}" if name else ""))
