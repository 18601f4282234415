"""Loaded models kept across queue runs, and the small references that travel along the wires.

A loader node outputs a reference (file, dtype, device), not the model: ComfyUI keeps node outputs
in its own cache, so a wire holding the model itself would keep it in memory after a release. The
one strong reference to each loaded model lives in `CACHE`; releasing an entry frees it, and the
next run that needs it loads it again.

Inside ComfyUI each loaded transformer, autoencoder and text-encoder pair is also handed to ComfyUI's
memory manager (`comfy_adapter.manage`): ComfyUI counts it among its loaded models, may move it to
the CPU when its own models need the memory, and `ready` has it moved back before each use. Without
ComfyUI there is no manager: the models stay where they were loaded, and `ready` does nothing.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Hashable

import torch

from kontext_core import load_autoencoder, load_lora, load_text_encoders, load_transformer
from kontext_core.checkpoints import inspect_model

from . import comfy_adapter

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp8", "int8", "fp32")
AE_DTYPES = ("default", "bf16", "fp16", "fp32")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash-attn", "cudnn-fp8", "sage8", "sage8-fp16")


@dataclass(frozen=True)
class LoraRef:
    path: str
    strength: float


@dataclass(frozen=True)
class TransformerRef:
    """KONTEXT_MODEL: the transformer file as loaded, with the LoRAs its runs apply (resolve.set_loras)."""

    path: str
    dtype: str
    device: str
    attention: str = "auto"
    loras: tuple[LoraRef, ...] = ()
    compile: bool = False  # regional torch.compile of the blocks; not part of the key: the weights are shared
    cuda_graphs: bool = False  # steps replayed from a CUDA graph (the fast preset); not part of the key either
    batched_modulation: bool = False  # a run's modulation vectors computed ahead of it (the fast preset); nor this
    attention_statistics_refresh: int = 0  # sage8's statistics reused between recordings (the fast preset); nor this

    @property
    def key(self) -> tuple:
        return ("transformer", self.path, self.dtype, self.device)

    def with_lora(self, lora: LoraRef) -> "TransformerRef":
        return replace(self, loras=(*self.loras, lora))


@dataclass(frozen=True)
class AutoencoderRef:
    """KONTEXT_VAE: the FLUX autoencoder file."""

    path: str
    dtype: str
    device: str

    @property
    def key(self) -> tuple:
        return ("autoencoder", self.path, self.dtype, self.device)


@dataclass(frozen=True)
class TextEncodersRef:
    """KONTEXT_TEXT_ENCODERS: T5-XXL and CLIP-L files."""

    t5: str
    clip: str
    dtype: str
    device: str
    t5_tokenizer: str | None = None
    clip_tokenizer: str | None = None

    @property
    def key(self) -> tuple:
        return ("text_encoders", self.t5, self.clip, self.dtype, self.device)


@dataclass
class ModelCache:
    """Loaded models by key; `get` loads once, `release` lets go (of one key, or of all).

    `handles` holds, for the models handed to ComfyUI's memory manager, the manager's handle.
    """

    models: dict[Hashable, Any] = field(default_factory=dict)
    handles: dict[Hashable, Any] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def get(self, key: Hashable, load: Callable[[], Any], manage: Callable[[Any], Any] | None = None) -> Any:
        """The model under `key`, loaded by `load()` the first time; `manage(model)` then gives its handle."""
        with self._lock:
            if key not in self.models:
                model = load()
                handle = manage(model) if manage is not None else None
                self.models[key] = model
                if handle is not None:
                    self.handles[key] = handle
            return self.models[key]

    def put(self, key: Hashable, model: Any, handle: Any = None) -> None:
        with self._lock:
            self._forget(key)
            self.models[key] = model
            if handle is not None:
                self.handles[key] = handle

    def __contains__(self, key: Hashable) -> bool:
        return key in self.models

    def handle_of(self, model: Any) -> Any:
        """The memory manager's handle of a model in this cache, or None (not managed, or not ours)."""
        with self._lock:
            return next((self.handles.get(k) for k, m in self.models.items() if m is model), None)

    def _forget(self, key: Hashable) -> None:
        handle = self.handles.pop(key, None)
        if handle is not None:
            comfy_adapter.forget(handle)

    def release(self, key: Hashable | None = None) -> int:
        """Drop one entry (or every entry when `key` is None) and return the memory; the count dropped."""
        with self._lock:
            keys = list(self.models) if key is None else [key] if key in self.models else []
            for k in keys:
                self._forget(k)
                del self.models[k]
        if keys:
            comfy_adapter.empty_cache()
        return len(keys)


CACHE = ModelCache()


def _file_bytes(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*.safetensors"))
    return p.stat().st_size if p.exists() else 0


def resolve_weight_dtype(choice: str, path: str, device: torch.device) -> str:
    """'default': fp8 when the file stores fp8 weights (ComfyUI's fp8 files), else bf16 on a GPU, fp32 on the CPU."""
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight dtype {choice!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if choice != "default":
        return choice
    stored = inspect_model(path).get("storage_dtypes", {})
    if any(name.startswith("F8") for name in stored):
        return "fp8"
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_ae_dtype(choice: str, device: torch.device) -> str:
    if choice not in AE_DTYPES:
        raise ValueError(f"unknown VAE dtype {choice!r}; choose one of {', '.join(AE_DTYPES)}")
    if choice != "default":
        return choice
    return "bf16" if device.type == "cuda" else "fp32"


def _parts(model: Any) -> dict[str, torch.nn.Module]:
    """The nn.Modules that hold a model's weights: the model itself, or a TextEncoders' t5 and clip."""
    if isinstance(model, torch.nn.Module):
        return {"model": model}
    return {name: part for name in ("t5", "clip") if isinstance(part := getattr(model, name, None), torch.nn.Module)}


def _managed(device: torch.device, kind: str, name: str) -> Callable[[Any], Any]:
    return lambda model: comfy_adapter.manage(_parts(model), device, kind, name)


def _get(cache: ModelCache | None, key, device: torch.device, kind: str, name: str, paths: list,
         load_at: Callable[[torch.device], Any]):
    """The cached model, or load it where ComfyUI keeps models of this kind (room made first), managed."""

    def load():
        home = comfy_adapter.storage_device(device, kind)
        comfy_adapter.free_memory(sum(_file_bytes(p) for p in paths), home)
        return load_at(home)
    return (cache or CACHE).get(key, load, _managed(device, kind, name))


def transformer(ref: TransformerRef, cache: ModelCache | None = None):
    return _get(cache, ref.key, torch.device(ref.device), "transformer", "KontextTransformer", [ref.path],
                lambda home: load_transformer(ref.path, dtype=ref.dtype, device=home))


def autoencoder(ref: AutoencoderRef, cache: ModelCache | None = None):
    return _get(cache, ref.key, torch.device(ref.device), "autoencoder", "KontextAutoencoder", [ref.path],
                lambda home: load_autoencoder(ref.path, dtype=ref.dtype, device=home))


def text_encoders(ref: TextEncodersRef, cache: ModelCache | None = None):
    device = torch.device(ref.device)

    def load_at(home: torch.device):
        encoders = load_text_encoders(ref.t5, ref.clip, t5_tokenizer=ref.t5_tokenizer,
                                      clip_tokenizer=ref.clip_tokenizer, dtype=ref.dtype, device=home)
        if home != device:
            encoders.device = device  # they encode on `device`; ComfyUI moves the weights there first (`ready`)
        return encoders
    return _get(cache, ref.key, device, "text_encoders", "KontextTextEncoders", [ref.t5, ref.clip], load_at)


def ready(*models: Any, cache: ModelCache | None = None, memory_required: int = 0) -> None:
    """Before using cached models: ComfyUI's memory manager puts them (together) on their device, freeing
    memory from other models first (`memory_required` bytes more); it may have moved them to the CPU since.
    No-op for unmanaged models."""
    cache = cache or CACHE
    comfy_adapter.load_models([h for h in (cache.handle_of(m) for m in models) if h is not None],
                              memory_required=memory_required)


def is_managed(model: Any, cache: ModelCache | None = None) -> bool:
    return (cache or CACHE).handle_of(model) is not None


def lora(ref: LoraRef, cache: ModelCache | None = None):
    """The parsed LoRA file (strength is applied at sampling time, so one parse serves every strength)."""
    return (cache or CACHE).get(("lora", ref.path), lambda: load_lora(ref.path, name=os.path.basename(ref.path)))
