"""Assemble a ready pipeline from located model files."""

from __future__ import annotations

import torch

from .checkpoints import load_autoencoder, load_transformer
from .model_files import ModelFiles
from .pipeline import KontextPipeline
from .text_encoders import load_text_encoders


def load_pipeline(files: ModelFiles, *, dtype: str = "bf16", device: str | torch.device = "cpu",
                  text_dtype: str | None = None, ae_dtype: str | None = None,
                  allow_download: bool = False) -> KontextPipeline:
    """Transformer, autoencoder and (when their files are known) the text encoders, on `device`.

    The AE runs in bf16 on CUDA and float32 on the CPU unless told otherwise; the text encoders use
    the transformer's dtype (fp8 weights are upcast to bf16 there).
    """
    device = torch.device(device)
    transformer = load_transformer(files.transformer, dtype=dtype, device=device)
    ae_dtype = ae_dtype or ("bf16" if device.type == "cuda" else "fp32")
    autoencoder = load_autoencoder(files.autoencoder, dtype=ae_dtype, device=device)
    encoders = None
    if files.t5 is not None:
        encoders = load_text_encoders(files.t5, files.clip, t5_tokenizer=files.t5_tokenizer,
                                      clip_tokenizer=files.clip_tokenizer,
                                      dtype=text_dtype or ("bf16" if dtype == "fp8" else dtype),
                                      device=device, allow_download=allow_download)
    return KontextPipeline(transformer, autoencoder, encoders)
