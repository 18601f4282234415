"""What a set of tensor names is: which model, which layout, under which prefix.

Used to pick the converter and, when a file is not what was asked for, to say what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

# Prefixes under which ComfyUI and other tools store the FLUX transformer and its autoencoder.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
AUTOENCODER_PREFIXES = ("first_stage_model.", "vae.", "ae.")

# Keys ComfyUI's scaled-fp8 files carry beside the weights that the model itself has no use for.
QUANT_MARKERS = ("scaled_fp8",)
QUANT_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


@dataclass(frozen=True)
class Layout:
    kind: str  # flux-transformer | flux-autoencoder | anything else we can name
    style: str  # bfl | diffusers
    prefix: str = ""


def _has(keys: set[str], prefix: str, fragment: str) -> bool:
    return any(k.startswith(prefix) and fragment in k for k in keys)


def find_transformer(keys: set[str]) -> Layout | None:
    for prefix in ("",) + TRANSFORMER_PREFIXES:
        if f"{prefix}img_in.weight" in keys and _has(keys, prefix, "double_blocks."):
            return Layout("flux-transformer", "bfl", prefix)
        if f"{prefix}x_embedder.weight" in keys and _has(keys, prefix, "transformer_blocks."):
            return Layout("flux-transformer", "diffusers", prefix)
    return None


def find_autoencoder(keys: set[str]) -> Layout | None:
    for prefix in ("",) + AUTOENCODER_PREFIXES:
        if f"{prefix}decoder.conv_in.weight" in keys or f"{prefix}encoder.conv_in.weight" in keys:
            style = "diffusers" if _has(keys, prefix, "coder.mid_block.") else "bfl"
            return Layout("flux-autoencoder", style, prefix)
    return None


def describe(keys: set[str]) -> str:
    """A person's name for what these tensors most likely are."""
    if not keys:
        return "an empty file (no tensors)"
    if find_transformer(keys):
        return "a FLUX transformer"
    if any(".lora_" in k or k.startswith("lora_") or ".lora_A." in k for k in keys):
        return "a LoRA (load it with a LoRA loader, not as a model)"
    if _has(keys, "", "joint_blocks."):
        return "a Stable Diffusion 3 model"
    if _has(keys, "", "input_blocks.") and _has(keys, "", "output_blocks."):
        if _has(keys, "", "label_emb.") or _has(keys, "", "conditioner.embedders.1"):
            return "a Stable Diffusion XL model"
        return "a Stable Diffusion 1.x/2.x UNet"
    if _has(keys, "", "down_blocks.") and _has(keys, "", "up_blocks.") and _has(keys, "", "time_embedding."):
        return "a diffusers UNet (Stable Diffusion)"
    if _has(keys, "", "encoder.block.0.layer.0.SelfAttention") or "shared.weight" in keys:
        return "a T5 text encoder"
    if _has(keys, "", "text_model.encoder.layers."):
        return "a CLIP text encoder"
    layout = find_autoencoder(keys)
    if layout:
        return "an autoencoder (VAE) file"
    return "an unrecognised model (not FLUX)"


def describe_file(keys: set[str], name: str) -> str:
    return f"{name} looks like {describe(keys)}"
