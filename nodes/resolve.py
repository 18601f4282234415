"""Wire values -> ready core objects: references to loaded models, ComfyUI's VAE, prompts to conditioning."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from kontext_core import KontextPipeline, TextConditioning, apply_lora, set_attention_backend
from kontext_core.pipeline import encode_image
from kontext_core.adapters.lora import active_loras, factor_bytes, on_the_fly_bytes, preferred_mode, remove_all_loras
from kontext_core.text.text_encoders import check_text_encoders_fit

from . import comfy_adapter, convert, model_cache
from .model_cache import AutoencoderRef, TextEncodersRef, TransformerRef


class ComfyVae:
    """ComfyUI's own VAE seen through the core Autoencoder's interface (pixels in [-1, 1], scaled latents),
    so `KontextPipeline` encodes and decodes with it unchanged."""

    dtype = torch.float32
    device = torch.device("cpu")  # ComfyUI's VAE moves its inputs to its own device

    def __init__(self, vae: Any):
        channels = getattr(vae, "latent_channels", None)
        if channels != convert.LATENT_CHANNELS:
            raise ValueError(
                f"this VAE makes {channels}-channel latents; Kontext needs the FLUX VAE (ae.safetensors, 16 channels). "
                "Load it with Load VAE or Load Kontext VAE."
            )
        ratio = getattr(vae, "downscale_ratio", 8)
        if not isinstance(ratio, int):
            raise ValueError(f"this VAE has a downscale ratio of {ratio!r}; Kontext needs the FLUX VAE (8x).")
        self.vae = vae
        self.config = SimpleNamespace(downsample_factor=ratio)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return convert.raw_to_scaled(self.vae.encode(convert.pixels_to_image(pixels)).float().cpu())

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return convert.image_to_pixels(self.decode_image(latent))

    def decode_image(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> IMAGE, without a detour through [-1, 1]."""
        return self.vae.decode(convert.scaled_to_raw(latent))[..., :3].float().cpu()


def autoencoder(vae: Any):
    """A KONTEXT_VAE reference or a ComfyUI VAE -> something with the core Autoencoder's interface."""
    if isinstance(vae, AutoencoderRef):
        return model_cache.autoencoder(vae)
    if isinstance(vae, ComfyVae):
        return vae
    if all(hasattr(vae, name) for name in ("encode", "decode", "latent_channels")):
        return ComfyVae(vae)
    raise TypeError(f"expected a Kontext VAE or a ComfyUI VAE, got {type(vae).__name__}")


def transformer(ref: TransformerRef):
    if not isinstance(ref, TransformerRef):
        raise TypeError(
            f"expected a model from Load Kontext Model, got {type(ref).__name__}. ComfyUI's MODEL (Load Diffusion "
            "Model) runs on ComfyUI's own samplers; Kontext nodes load the transformer themselves."
        )
    set_attention_backend(ref.attention)
    model = model_cache.transformer(ref)
    # The cached model serves loaders with either setting.
    if ref.compile and not model.blocks_compiled:
        model.compile_blocks()
    elif not ref.compile and model.blocks_compiled:
        model.uncompile_blocks()
    return model


@contextmanager
def compile_failures_explained(ref: TransformerRef):
    """A model loaded with compile=on whose blocks torch.compile cannot build: say so and how to go on,
    instead of the compiler's traceback alone."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as error:
        if not ref.compile:
            raise
        cause = getattr(error, "inner_exception", None) or error
        raise RuntimeError(
            f"torch.compile could not build the Kontext blocks ({type(cause).__name__}: {str(cause)[:300]}); "
            "set compile to off on Load Kontext Model (the model then runs uncompiled, steps 4-20% slower)"
        ) from error


def ready(*models: Any) -> None:
    """Right before a model computes: ComfyUI moves it back to its device if it lent the memory to another
    model since (ComfyUI's own VAE, another checkpoint). Only our cached models; others pass through."""
    model_cache.ready(*models)


def loras(ref: TransformerRef) -> list[tuple[Any, float]]:
    return [(model_cache.lora(lora), lora.strength) for lora in ref.loras]


def _keep(model: torch.nn.Module, wanted: list[tuple[Any, float]], mode: str) -> None:
    """Make the LoRAs on `model` exactly `wanted`, applied in `mode` (LoRA files are parsed once by model_cache,
    so the same file is the same object): kept as they are when they already are, strengths changed in place."""
    applied = active_loras(model)
    if len(applied) == len(wanted) and all(handle.mode == mode and handle.lora is weights
                                           for handle, (weights, _) in zip(applied, wanted)):
        for handle, (_, strength) in zip(applied, wanted):
            if handle.strength != strength:
                handle.set_strength(strength)  # merged: re-merged from the originals already kept
        return
    remove_all_loras(model)
    for weights, strength in wanted:
        apply_lora(model, weights, strength, mode=mode)


def _keep_counted(model: torch.nn.Module, wanted: list[tuple[Any, float]], mode: str) -> None:
    """`_keep`, with ComfyUI told about the GPU memory on-the-fly factors take (~0.3 GB for a rank-32 LoRA on
    every layer): room is made for them before they are made, and the model is counted with them after."""
    if mode == "on_the_fly":
        needed = on_the_fly_bytes(model, [weights for weights, _ in wanted]) - factor_bytes(model)
        if needed > 0:
            model_cache.ready(model, memory_required=needed)
    try:
        _keep(model, wanted, mode)
    finally:
        comfy_adapter.count_extra_bytes(model_cache.CACHE.handle_of(model), factor_bytes(model))


def set_loras(model: torch.nn.Module, ref: TransformerRef) -> None:
    """Give the model `ref`'s LoRAs (and no others) before a run; every node that samples calls this.

    They stay applied after the run, until a run asks for other LoRAs, other strengths or none, so a change is
    paid once, not per run. bf16/fp16/fp32 weights get them merged: the fused GEMM forms (GELU in cuBLAS's
    epilogue) stay in use and a LoRA costs nothing per step; the merge (the touched layers' originals copied
    to the CPU, the deltas added in float64) takes seconds, and removing the LoRAs restores the original
    weights bit for bit. fp8 or int8 weights (which would round a LoRA's delta away), or no memory for the merge's
    copies: on the fly, traced into compiled blocks like the rest of the model (fp8 layers take them as extra
    columns of their own fp8 GEMM, kontext_core/adapters/wide_lora.py: ~7% a step for a rank-32 LoRA on every layer;
    others as two thin GEMMs more, ~13-15%).
    """
    wanted = loras(ref)
    mode = preferred_mode(model)
    try:
        _keep_counted(model, wanted, mode)
    except (MemoryError, RuntimeError) as error:  # torch's allocators raise RuntimeErrors naming the memory
        if mode != "merge" or (not isinstance(error, MemoryError) and "memory" not in str(error).lower()):
            raise
        remove_all_loras(model)
        comfy_adapter.log.warning("comfyui-kontext: no memory to merge the LoRAs (%s); they run on the fly for "
                                  "now, ~13%% slower a step. Free CPU memory to have them merged.", error)
        _keep_counted(model, wanted, "on_the_fly")


def pipeline(model: TransformerRef, vae: Any, text: TextEncodersRef | None = None) -> KontextPipeline:
    """The core pipeline on the loaded models. Right before the transformer or the AE computes (encoding,
    sampling, decoding, in whatever order a core call does them) it is loaded again, ComfyUI having perhaps lent
    its memory to another model since; the transformer gets the loader's LoRAs then too."""
    encoders = model_cache.text_encoders(text) if text is not None else None
    pipe = KontextPipeline(transformer(model), autoencoder(vae), encoders, cuda_graphs=model.cuda_graphs)
    pipe.batched_modulation = model.batched_modulation
    pipe.attention_statistics_refresh = model.attention_statistics_refresh

    def before_use(module: Any) -> None:
        ready(module)
        if module is pipe.transformer:
            set_loras(module, model)

    pipe.before_use = before_use
    return pipe


def encode_prompts(text: TextEncodersRef, prompts: Sequence[str], transformer_config=None) -> TextConditioning:
    """Prompts -> T5 / CLIP conditioning; on a GPU the encoders make room for the transformer afterwards (ComfyUI
    moves them out when it needs the memory; without ComfyUI they leave at once). `transformer_config`: the
    model the conditioning is for, when known; encoders of other widths are refused before they run."""
    if not isinstance(text, TextEncodersRef):
        raise TypeError(f"expected text encoders from Load Kontext Text Encoders, got {type(text).__name__}")
    encoders = model_cache.text_encoders(text)
    if transformer_config is not None:
        check_text_encoders_fit(encoders, transformer_config)
    ready(encoders)
    txt, pooled = encoders.encode(list(prompts))
    # ComfyUI moves managed encoders out when the memory is needed; unmanaged ones (no ComfyUI) leave now.
    managed = model_cache.is_managed(encoders)
    if torch.device(text.device).type == "cuda" and hasattr(encoders, "offload") and not managed:
        encoders.offload("cpu")
    return TextConditioning(txt, pooled)


def decode_image(ae: Any, scaled: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> IMAGE [B, H, W, 3]."""
    if isinstance(ae, ComfyVae):
        return ae.decode_image(scaled)
    ready(ae)
    with torch.no_grad():
        return convert.pixels_to_image(ae.decode(scaled.to(device=ae.device, dtype=ae.dtype)))


def encode_images(ae: Any, images: Sequence[torch.Tensor], resize: str) -> list[torch.Tensor]:
    """Every item of every IMAGE -> its scaled latent [1, 16, h, w], as `KontextPipeline.encode_image` encodes a
    file (so a node and the CLI given the same picture encode the same latent, tiled where the core would)."""
    if images:
        ready(ae)
    return [encode_image(ae, picture, resize).cpu() for image in images for picture in convert.image_to_pil(image)]
