"""ComfyUI entry point of the comfyui-kontext node pack (ComfyUI's V3 node API).

ComfyUI imports this folder as a package and calls `comfy_entrypoint`. The nodes live in nodes/, the
model in kontext_core/ (which never imports ComfyUI). There is deliberately no NODE_CLASS_MAPPINGS:
ComfyUI would take that (even empty) over comfy_entrypoint.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./js"

# The nodes import kontext_core as a top-level package (one copy per process, whichever way it was
# found). A `pip install -e .` provides it; a plain clone into custom_nodes/ does not, so the pack's
# folder is appended to sys.path (appended, so that it shadows nothing ComfyUI already imports).
if importlib.util.find_spec("kontext_core") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))


async def comfy_entrypoint():
    from .nodes.v3 import extension

    return extension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
