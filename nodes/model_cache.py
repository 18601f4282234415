"""Loaded models kept across queue runs, and the small references that travel along the wires.

A loader node outputs a reference (file, dtype, device), not the model: ComfyUI keeps node outputs
in its own cache, so a wire holding the model itself would keep it in memory after a release. The
one strong reference to each loaded model lives in `CACHE`; releasing an entry frees it, and the
next run that needs it loads it again.
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

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp8", "fp32")
AE_DTYPES = ("default", "bf16", "fp16", "fp32")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash-attn")


@dataclass(frozen=True)
class LoraRef:
    path: str
    strength: float


@dataclass(frozen=True)
class TransformerRef:
    """KONTEXT_MODEL: the transformer file as loaded, with LoRAs applied on the fly at sampling time."""

    path: str
    dtype: str
    device: str
    attention: str = "auto"
    loras: tuple[LoraRef, ...] = ()

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
    """Loaded models by key; `get` loads once, `release` lets go (of one key, or of all)."""

    models: dict[Hashable, Any] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self.models:
                self.models[key] = load()
            return self.models[key]

    def put(self, key: Hashable, model: Any) -> None:
        with self._lock:
            self.models[key] = model

    def __contains__(self, key: Hashable) -> bool:
        return key in self.models

    def release(self, key: Hashable | None = None) -> int:
        """Drop one entry (or every entry when `key` is None) and return the memory; the count dropped."""
        with self._lock:
            keys = list(self.models) if key is None else [key] if key in self.models else []
            for k in keys:
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


def transformer(ref: TransformerRef, cache: ModelCache | None = None):
    def load():
        comfy_adapter.free_memory(_file_bytes(ref.path), torch.device(ref.device))
        return load_transformer(ref.path, dtype=ref.dtype, device=ref.device)
    return (cache or CACHE).get(ref.key, load)


def autoencoder(ref: AutoencoderRef, cache: ModelCache | None = None):
    def load():
        comfy_adapter.free_memory(_file_bytes(ref.path), torch.device(ref.device))
        return load_autoencoder(ref.path, dtype=ref.dtype, device=ref.device)
    return (cache or CACHE).get(ref.key, load)


def text_encoders(ref: TextEncodersRef, cache: ModelCache | None = None):
    def load():
        device = torch.device(ref.device)
        comfy_adapter.free_memory(_file_bytes(ref.t5) + _file_bytes(ref.clip), device)
        return load_text_encoders(ref.t5, ref.clip, t5_tokenizer=ref.t5_tokenizer,
                                  clip_tokenizer=ref.clip_tokenizer, dtype=ref.dtype, device=device)
    return (cache or CACHE).get(ref.key, load)


def lora(ref: LoraRef, cache: ModelCache | None = None):
    """The parsed LoRA file (strength is applied at sampling time, so one parse serves every strength)."""
    return (cache or CACHE).get(("lora", ref.path), lambda: load_lora(ref.path, name=os.path.basename(ref.path)))
