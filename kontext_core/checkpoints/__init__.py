"""Every checkpoint format in, one canonical model out (and back out again)."""

from .files import CheckpointError
from .loading import inspect_model, load_autoencoder, load_transformer, resolve_dtype
from .saving import save_autoencoder, save_transformer

__all__ = [
    "CheckpointError",
    "inspect_model",
    "load_autoencoder",
    "load_transformer",
    "resolve_dtype",
    "save_autoencoder",
    "save_transformer",
]
