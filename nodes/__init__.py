"""ComfyUI nodes over kontext_core. No nodes are registered yet (see the node-pack issue)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
