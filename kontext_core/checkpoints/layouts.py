"""What a set of tensor names is: which model, which layout, under which prefix.

Used to pick the converter and, when a file is not what was asked for, to say what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

# Prefixes under which ComfyUI and other tools store the FLUX transformer and its autoencoder.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")
AUTOENCODER_PREFIXES = ("first_stage_model.", "vae.", "ae.")

# A whole checkpoint (ComfyUI's models/checkpoints) keeps its diffusion model under `model.diffusion_model.` and
# carries its VAE and text encoders beside it: SD 1.x/2.x `cond_stage_model.`, SDXL `conditioner.embedders.`,
# SD3 / FLUX `text_encoders.`. A UNet on its own (models/diffusion_models or models/unet) has none of these.
WHOLE_CHECKPOINT_MODEL_PREFIX = "model.diffusion_model."
BUNDLED_VAE_PREFIXES = ("first_stage_model.", "vae.")
BUNDLED_TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.embedders.", "text_encoders.")
# Where a diffusers-layout UNet's own tensors start (no prefix in diffusion_models/ or a unet/ folder).
_DIFFUSERS_UNET_PREFIXES = ("", "unet.", "model.diffusion_model.")

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


def bundled_parts(keys: set[str]) -> list[str]:
    """What a whole checkpoint carries beside its diffusion model that these keys hold: "VAE", "text encoders"."""
    parts = []
    if any(k.startswith(BUNDLED_VAE_PREFIXES) for k in keys):
        parts.append("VAE")
    if any(k.startswith(BUNDLED_TEXT_ENCODER_PREFIXES) for k in keys):
        parts.append("text encoders")
    return parts


def is_whole_checkpoint(keys: set[str]) -> bool:
    """A diffusion model under `model.diffusion_model.` with its VAE or text encoders in the same file; a UNet
    saved on its own (with or without that prefix) is not one."""
    return any(k.startswith(WHOLE_CHECKPOINT_MODEL_PREFIX) for k in keys) and bool(bundled_parts(keys))


def _diffusers_unet(keys: set[str]) -> bool:
    def top(name: str) -> bool:
        return any(k.startswith(p + name) for p in _DIFFUSERS_UNET_PREFIXES for k in keys)
    # `conv_in`/`down_blocks` at the top: a diffusers VAE has them only under encoder./decoder.
    return top("down_blocks.") and top("up_blocks.") and (top("time_embedding.") or top("conv_in."))


def _listed(parts: list[str]) -> str:
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def other_diffusion_model(keys: set[str]) -> str | None:
    """A person's name for another model's diffusion model (SD 1.x/2.x, SDXL, SD3), saying whether the file is a
    whole checkpoint (with its VAE / text encoders) or the UNet alone; None when the keys are none of these."""
    if _has(keys, "", "joint_blocks."):
        family, part, layout = "Stable Diffusion 3", "transformer", ": joint_blocks"
    elif _has(keys, "", "input_blocks.") and _has(keys, "", "output_blocks."):
        sdxl = _has(keys, "", "label_emb.") or _has(keys, "", "conditioner.embedders.")
        family, part, layout = ("Stable Diffusion XL" if sdxl else "Stable Diffusion 1.x/2.x"), "UNet", \
            ": input_blocks/middle_block/output_blocks"
    elif _diffusers_unet(keys):
        sdxl = _has(keys, "", "add_embedding.")
        family, part, layout = ("Stable Diffusion XL" if sdxl else "Stable Diffusion 1.x/2.x"), "UNet", \
            ", diffusers layout: down_blocks/mid_block/up_blocks"
    elif is_whole_checkpoint(keys):
        return f"a whole checkpoint of another model ({_listed(['diffusion model'] + bundled_parts(keys))} in one file)"
    else:
        return None
    if is_whole_checkpoint(keys):
        return f"a whole {family} checkpoint ({_listed([part] + bundled_parts(keys))} in one file)"
    return f"a {part} of another model ({family}{layout}; no VAE or text encoders)"


def describe(keys: set[str]) -> str:
    """A person's name for what these tensors most likely are."""
    if not keys:
        return "an empty file (no tensors)"
    if find_transformer(keys):
        return "a FLUX transformer"
    if any(".lora_" in k or k.startswith("lora_") or ".lora_A." in k for k in keys):
        return "a LoRA (load it with a LoRA loader, not as a model)"
    other = other_diffusion_model(keys)
    if other:
        return other
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
