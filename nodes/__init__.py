"""ComfyUI nodes over kontext_core: each node converts ComfyUI's types and calls the core; nothing here
imports ComfyUI except `comfy_adapter` (lazily) and `v3` (which builds ComfyUI's node classes)."""

from .conditioning import KontextPrompt
from .edit import KontextEdit
from .images import KontextDecode, KontextEncode, KontextImagePrep
from .loaders import KontextLoRA, KontextModelLoader, KontextTextEncodersLoader, KontextVAELoader
from .session import KontextEditLoop, KontextEditTurn, KontextPickTurn, KontextStartSession
from .step_cache import KontextStepCache

# In the order of the Add Node menu.
NODES = [
    KontextModelLoader,
    KontextVAELoader,
    KontextTextEncodersLoader,
    KontextLoRA,
    KontextPrompt,
    KontextImagePrep,
    KontextEdit,
    KontextStepCache,
    KontextEncode,
    KontextDecode,
    KontextStartSession,
    KontextEditTurn,
    KontextPickTurn,
    KontextEditLoop,
]

__all__ = ["NODES", *(node.__name__ for node in NODES)]
