"""Everything the nodes need from ComfyUI, behind plain functions; ComfyUI is imported only here, lazily.

Without ComfyUI (the tests, a script) each function falls back to something sensible: file names are
paths, progress goes nowhere, nothing is ever interrupted. Tests replace these functions with
monkeypatch to watch what the nodes ask for.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("comfyui-kontext")


def _module(name: str):
    """A ComfyUI module, or None when ComfyUI is not what is running."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def available() -> bool:
    return _module("comfy.model_management") is not None and _module("folder_paths") is not None


# --- devices and memory --------------------------------------------------------------------------

def compute_device() -> torch.device:
    """ComfyUI's device (honours --cpu, --directml ...), else CUDA when present, else the CPU."""
    mm = _module("comfy.model_management")
    if mm is not None:
        return torch.device(mm.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory(bytes_needed: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until `bytes_needed` fit on `device`."""
    mm = _module("comfy.model_management")
    if mm is not None and device.type != "cpu":
        mm.free_memory(bytes_needed, device)


def empty_cache() -> None:
    gc.collect()
    mm = _module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


_unload_callbacks: list[Callable[[], None]] = []


def on_unload_models(callback: Callable[[], None]) -> None:
    """Run `callback` whenever ComfyUI unloads all models ("Unload Models" in the menu, after an OOM).

    ComfyUI has no hook for this, so `comfy.model_management.unload_all_models` is wrapped once; main.py
    and execution.py call it through the module, so they reach the wrapper.
    """
    _unload_callbacks.append(callback)
    mm = _module("comfy.model_management")
    if mm is None or getattr(mm.unload_all_models, "_kontext_wrapped", False):
        return
    original = mm.unload_all_models

    def unload_all_models(*args, **kwargs):
        result = original(*args, **kwargs)
        for release in list(_unload_callbacks):
            try:
                release()
            except Exception:  # one failing release must not break ComfyUI's own unloading
                log.exception("comfyui-kontext: releasing models failed")
        return result

    unload_all_models._kontext_wrapped = True
    mm.unload_all_models = unload_all_models


# --- model files ---------------------------------------------------------------------------------

def filenames(folder: str) -> list[str]:
    """The model files ComfyUI lists in one of its model folders ([] without ComfyUI)."""
    fp = _module("folder_paths")
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(folder))
    except KeyError:
        return []


def full_path(folder: str, name: str) -> str:
    """The path of `name` in ComfyUI's `folder`; without ComfyUI, `name` itself must be a path."""
    fp = _module("folder_paths")
    if fp is not None:
        found = fp.get_full_path(folder, name)
        if found is not None:
            return found
        roots = ", ".join(fp.get_folder_paths(folder))
    else:
        if Path(name).exists():
            return str(name)
        roots = "(ComfyUI is not loaded, so the name must be a path)"
    raise FileNotFoundError(
        f"'{name}' is not in the {folder} folder ({roots}). Put the file there and press R (refresh) in ComfyUI, "
        "or pick another file."
    )


def tokenizer_folders() -> tuple[Path | None, Path | None]:
    """The T5 and CLIP-L tokenizers ComfyUI ships with (used when no tokenizer sits beside the weights)."""
    comfy = _module("comfy")
    folders = list(getattr(comfy, "__path__", []))  # a namespace package: no __file__
    if not folders:
        return None, None
    root = Path(folders[0])
    t5, clip = root / "text_encoders" / "t5_tokenizer", root / "sd1_tokenizer"
    return (t5 if t5.is_dir() else None), (clip if clip.is_dir() else None)


# --- progress, previews, interruption ------------------------------------------------------------

def check_interrupted() -> None:
    """Raise ComfyUI's interruption exception when the user pressed Cancel."""
    mm = _module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class _NoProgress:
    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        pass


def progress_bar(total: int):
    utils = _module("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _NoProgress()


def latent_previewer() -> Callable[[torch.Tensor], Any] | None:
    """scaled latent [B, 16, h, w] -> a preview for ProgressBar, by the user's --preview-method; None if off.

    ComfyUI's FLUX previewers (latent-to-RGB factors, or TAESD when installed) work on the scaled
    latent, the same space as the core's.
    """
    preview = _module("latent_preview")
    formats = _module("comfy.latent_formats")
    if preview is None or formats is None:
        return None
    try:
        previewer = preview.get_previewer(compute_device(), formats.Flux())
    except Exception:  # previews are a nicety; a broken TAESD file must not stop sampling
        log.exception("comfyui-kontext: no latent previews")
        return None
    if previewer is None:
        return None
    return lambda latent: previewer.decode_latent_to_preview_image("JPEG", latent)


def preview_images(images: torch.Tensor) -> dict | None:
    """Save an IMAGE batch as temporary previews; the UI dict shows them on the node (None without ComfyUI)."""
    ui = _module("comfy_api.latest")
    if ui is None:
        return None
    return ui.ui.PreviewImage(images).as_dict()
