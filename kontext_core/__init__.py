"""kontext_core: FLUX.1 Kontext [dev] on a self-contained core (no ComfyUI import anywhere here)."""

from .compute.attention import get_attention_backend, set_attention_backend
from .model.autoencoder import Autoencoder
from .checkpoints import CheckpointError, load_autoencoder, load_transformer, save_autoencoder, save_transformer
from .model.config import AutoencoderConfig, TransformerConfig
from .model.tokens import (
    PLACEMENTS,
    context_tokens,
    pack_latent,
    position_ids,
    reference_placements,
    text_position_ids,
    unpack_tokens,
)
from .model.transformer import KontextTransformer
from .sampling import TextConditioning, flux_schedule, sample_euler
from .pipeline import EditResult, EditSession, GenerationSettings, KontextPipeline
from .step_cache import CacheStats, StepCache
from .checkpoints.model_files import ModelFiles, find_model_files
from .build import load_pipeline
from .text.text_encoders import TextEncoders, load_text_encoders
from .adapters.lora import apply_lora, load_lora

__all__ = [
    "CacheStats",
    "EditResult",
    "EditSession",
    "GenerationSettings",
    "KontextPipeline",
    "ModelFiles",
    "StepCache",
    "TextConditioning",
    "TextEncoders",
    "apply_lora",
    "find_model_files",
    "flux_schedule",
    "load_lora",
    "load_pipeline",
    "load_text_encoders",
    "sample_euler",
    "PLACEMENTS",
    "Autoencoder",
    "AutoencoderConfig",
    "CheckpointError",
    "KontextTransformer",
    "TransformerConfig",
    "context_tokens",
    "get_attention_backend",
    "load_autoencoder",
    "load_transformer",
    "pack_latent",
    "position_ids",
    "reference_placements",
    "save_autoencoder",
    "save_transformer",
    "set_attention_backend",
    "text_position_ids",
    "unpack_tokens",
]
