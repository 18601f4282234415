"""ComfyUI entry point of the comfyui-kontext node pack.

ComfyUI imports this folder as a package; the nodes themselves live in nodes/, the model in
kontext_core/ (which never imports ComfyUI).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
