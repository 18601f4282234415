"""The node pack imported the way ComfyUI imports it: the repository folder as a package under a name of
its own. (A plain `import nodes` would be ambiguous: ComfyUI has a top-level module of that name.)"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui_kontext_pack"
COMFYUI = Path(os.environ.get("COMFYUI_PATH") or os.environ.get("COMFYUI_DIR") or Path.home() / "ComfyUI")


def load_pack():
    """The pack's root module (what ComfyUI's load_custom_node executes)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def nodes_module(name: str = ""):
    """`nodes` or one of its modules (`nodes_module("convert")`)."""
    load_pack()
    return importlib.import_module(f"{PACK}.nodes" + (f".{name}" if name else ""))
