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


# --- ComfyUI's memory manager --------------------------------------------------------------------
#
# Each loaded model is wrapped in a ComfyUI ModelPatcher (the way ComfyUI wraps its CLIP vision or
# upscale models), so it sits in `comfy.model_management.current_loaded_models` beside ComfyUI's
# own models: ComfyUI counts it, moves it to its offload device (the CPU) when another model needs
# the memory, and `load_models` brings it back before each use.

_OFFLOAD_DEVICES = {"transformer": "unet_offload_device", "autoencoder": "vae_offload_device",
                    "text_encoders": "text_encoder_offload_device"}


def storage_device(device: torch.device, kind: str) -> torch.device:
    """Where a model's weights are first loaded: ComfyUI's offload device for this kind of model (ComfyUI
    moves them to `device` when they are used), or `device` itself without ComfyUI."""
    mm = _module("comfy.model_management")
    if mm is None:
        return device
    return torch.device(getattr(mm, _OFFLOAD_DEVICES[kind])())


class _ManagedModel(torch.nn.Module):
    """The module ComfyUI's ModelPatcher moves: our model(s) as children, and the plain `device` attribute
    the patcher keeps up to date (our models' own `device` is a read-only property)."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.device = device


_managed_classes: dict[str, type] = {}


def _managed_class(name: str) -> type:
    """A subclass per model kind, so ComfyUI's log ("Requested to load KontextTransformer") says which."""
    if name not in _managed_classes:
        _managed_classes[name] = type(name, (_ManagedModel,), {"__module__": __name__})
    return _managed_classes[name]


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}  # shared weights once (T5)
    return sum(t.nbytes for t in tensors.values())


def manage(modules: dict[str, torch.nn.Module], device: torch.device, kind: str, name: str) -> Any | None:
    """Hand a loaded model (its nn.Modules, on `storage_device`) to ComfyUI's memory manager.

    Returns the handle that `load_models` and `forget` take (a ModelPatcher), or None without ComfyUI.
    """
    mm = _module("comfy.model_management")
    patching = _module("comfy.model_patcher")
    patcher_type = getattr(patching, "ModelPatcher", None)
    if mm is None or patcher_type is None or not modules:
        return None
    offload = storage_device(device, kind)
    wrapper = _managed_class(name)(modules, offload)
    patcher = patcher_type(wrapper, load_device=device, offload_device=offload, size=_weight_bytes(wrapper))

    def detached(patcher, unpatch_all=True):
        if unpatch_all:  # ComfyUI unloading it to free memory (not the patcher being garbage-collected)
            log.info("comfyui-kontext: ComfyUI unloaded %s (%.1f MB) to %s", name, patcher.model_size() / 2**20,
                     patcher.offload_device)

    callbacks = getattr(patching, "CallbacksMP", None)
    if callbacks is not None:
        patcher.add_callback(callbacks.ON_DETACH, detached)
    return patcher


def count_extra_bytes(handle: Any, extra: int) -> None:
    """Have ComfyUI count `extra` bytes beside the managed model's weights: on-the-fly LoRA factors, plain
    tensors (not parameters or buffers) that move with the model. Its memory manager then frees room for them
    when it loads the model and counts them when it unloads it. No-op without ComfyUI."""
    if handle is None or not hasattr(handle, "size"):
        return
    size = _weight_bytes(handle.model) + extra
    if handle.size == size:
        return
    model = handle.model
    fully_loaded = not getattr(model, "model_lowvram", False) and getattr(model, "model_loaded_weight_memory", 0) > 0
    handle.size = size
    if fully_loaded:  # the factors were made on the device: loaded with the rest, not to be loaded again
        model.model_loaded_weight_memory = size


def load_models(handles: list[Any], memory_required: int = 0) -> None:
    """Have ComfyUI put these models on their device now (together), freeing memory from other models
    first if needed; a model it already holds there is left as it is. Without ComfyUI, nothing to do.

    Fully loaded (`force_full_load`): our layers are plain torch layers, not ComfyUI's cast layers, so they
    cannot run with part of their weights left on the CPU.
    """
    handles = [h for h in handles if h is not None]
    mm = _module("comfy.model_management")
    if handles and mm is not None:
        mm.load_models_gpu(handles, memory_required=memory_required, force_full_load=True)


def forget(handle: Any) -> None:
    """Take a model out of ComfyUI's list of loaded models (before we drop it)."""
    mm = _module("comfy.model_management")
    if handle is None or mm is None:
        return
    loaded = mm.current_loaded_models
    for index in range(len(loaded) - 1, -1, -1):
        if loaded[index].model is handle:
            entry = loaded.pop(index)
            if entry.model_finalizer is not None:
                entry.model_finalizer.detach()


def loaded_handles() -> list[Any]:
    """The models ComfyUI holds loaded now ([] without ComfyUI)."""
    mm = _module("comfy.model_management")
    return list(mm.loaded_models()) if mm is not None else []


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
