"""ComfyUI's types <-> kontext_core's, and nothing else: no models, no ComfyUI import.

IMAGE: float [B, H, W, C] in [0, 1].  Core pixels: float [B, 3, H, W] in [-1, 1].
LATENT: {"samples": [B, 16, h, w], optionally "noise_mask": [B, 1, H, W] from Set Latent Noise Mask} in
ComfyUI's raw FLUX VAE space; the core works on the scaled latent the AE's `encode` returns. ComfyUI's
`latent_formats.Flux.process_in` maps raw to scaled as (raw - 0.1159) * 0.3611, so every LATENT crossing the
boundary goes through that formula.
MASK: float [B, H, W] or [H, W] in [0, 1] (1 = edit); the core's masks.py takes it as it is.
CONDITIONING: [[t5_embeddings [B, L, 4096], {"pooled_output": [B, 768], "guidance": float,
"reference_latents": [raw latents], "reference_latents_method": str}], ...].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from kontext_core import PLACEMENTS, TextConditioning

# ComfyUI's latent_formats.Flux (not the AE config: a LATENT wire always carries this convention).
COMFY_FLUX_SCALE = 0.3611
COMFY_FLUX_SHIFT = 0.1159
LATENT_CHANNELS = 16
# ComfyUI's FluxKontextMultiReferenceLatentMethod names -> our placements.
_METHOD_ALIASES = {"uxo/uno": "uxo", "uno": "uxo"}
COMFY_METHODS = ("offset", "index", "uxo")  # what Edit Model Reference Method sets (any of PLACEMENTS is read)


# --- IMAGE ---------------------------------------------------------------------------------------

def check_image(image: Any, what: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what}: expected a ComfyUI IMAGE [batch, height, width, channels] with 1, 3 or 4 "
                         f"channels, got {shape}")
    if image.numel() == 0:
        raise ValueError(f"{what} is empty ({list(image.shape)}): the node before it gave no image")
    if not image.is_floating_point():
        raise ValueError(f"{what} holds {image.dtype} values; ComfyUI images are floats from 0 to 1")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{what} holds NaN or infinite values: the node before it failed to make an image")
    if image.is_floating_point() and float(image.max()) > 1.5:
        raise ValueError(f"{what} has values up to {float(image.max()):.0f}; ComfyUI images hold 0..1 (not 0..255): "
                         "divide by 255 or load it with Load Image")
    return image


def image_to_pil(image: torch.Tensor, what: str = "image") -> list[Image.Image]:
    """Each item of an IMAGE batch as an 8-bit Pillow image (RGB, RGBA or L as its channels say).

    8-bit values (what Load Image produces) survive the trip exactly: round(255 * k / 255) = k.
    """
    check_image(image, what)
    array = (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], "L") for a in array]
    return [Image.fromarray(a, "RGBA" if a.shape[-1] == 4 else "RGB") for a in array]


def pil_to_image(images: list[Image.Image]) -> torch.Tensor:
    """Pillow images of one size -> IMAGE [B, H, W, 3]."""
    arrays = [np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("images of different sizes cannot share one IMAGE batch")
    return torch.from_numpy(np.stack(arrays))


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Core pixels [B, 3, H, W] in about [-1, 1] -> IMAGE [B, H, W, 3] in [0, 1] (float, not quantized)."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous()


def rgb_image(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> [B, H, W, 3], the values themselves (gray repeated, alpha dropped)."""
    check_image(image)
    return image[..., :3] if image.shape[-1] >= 3 else image.expand(-1, -1, -1, 3)


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> core pixels [B, 3, H, W] in [-1, 1] (gray repeated, alpha dropped)."""
    check_image(image)
    rgb = image[..., :3] if image.shape[-1] >= 3 else image.expand(-1, -1, -1, 3)
    return rgb.float().permute(0, 3, 1, 2) * 2.0 - 1.0


# --- LATENT --------------------------------------------------------------------------------------

def raw_to_scaled(raw: torch.Tensor) -> torch.Tensor:
    """ComfyUI's raw FLUX latent -> the core's scaled latent (ComfyUI's Flux.process_in)."""
    return (raw.float() - COMFY_FLUX_SHIFT) * COMFY_FLUX_SCALE


def scaled_to_raw(scaled: torch.Tensor) -> torch.Tensor:
    """The core's scaled latent -> ComfyUI's raw FLUX latent (ComfyUI's Flux.process_out)."""
    return scaled.float() / COMFY_FLUX_SCALE + COMFY_FLUX_SHIFT


def check_latent_tensor(samples: Any, what: str = "latent") -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.numel() == 0:
        shape = list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{what}: expected latents [batch, 16, height, width], none of them 0, got {shape}")
    if samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"{what} has {samples.shape[1]} channels; FLUX latents have 16. It comes from a node made for another "
            "model family (Empty Latent Image makes 4-channel SD latents): use Empty SD3 Latent Image, VAE Encode "
            "with the FLUX VAE, or Kontext Encode Image."
        )
    return samples


def latent_from_comfy(latent: Any, what: str = "latent", *, honors_mask: bool = False) -> torch.Tensor:
    """A LATENT dict -> scaled latents [B, 16, h, w] (float32, on the CPU).

    A noise mask on it is reported as ignored unless the caller `honors_mask` (and reads it with `noise_mask`)."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{what}: expected a ComfyUI LATENT (a dict with 'samples'), got {type(latent).__name__}")
    if latent.get("noise_mask") is not None and not honors_mask:
        logging.getLogger("comfyui-kontext").warning(
            "comfyui-kontext: the %s LATENT carries a noise mask (Set Latent Noise Mask), which is ignored here; "
            "connect the mask to the node's mask input, or the masked LATENT to Kontext Edit's target", what)
    return raw_to_scaled(check_latent_tensor(latent["samples"], what).detach().cpu())


def noise_mask(latent: Any) -> torch.Tensor | None:
    """A LATENT's noise mask [B, 1, H, W] (pixel-sized, as Set Latent Noise Mask stores it) or None."""
    return latent.get("noise_mask") if isinstance(latent, dict) else None


def latent_to_comfy(scaled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scaled latents -> a LATENT dict that ComfyUI's own VAE Decode and samplers read correctly."""
    return {"samples": scaled_to_raw(scaled.detach().cpu())}


def split_batch(latents: torch.Tensor) -> list[torch.Tensor]:
    """[B, ...] -> B tensors [1, ...]: each item of a batch is one more reference."""
    return [latents[i:i + 1] for i in range(latents.shape[0])]


# --- CONDITIONING --------------------------------------------------------------------------------

@dataclass
class Conditioning:
    """What the core needs from a CONDITIONING: text, and what ComfyUI's Flux nodes attach to it."""

    text: TextConditioning
    guidance: float | None = None  # set by FluxGuidance / CLIPTextEncodeFlux; None: the sampler's widget
    reference_latents: list[torch.Tensor] = field(default_factory=list)  # scaled, [1, 16, h, w] each
    reference_method: str | None = None  # a core placement name


def conditioning_from_comfy(conditioning: Any, what: str = "conditioning", text_features: int | None = None,
                            pooled_features: int | None = None) -> Conditioning:
    """ComfyUI CONDITIONING (from our prompt node or CLIPTextEncodeFlux / FluxGuidance / ReferenceLatent)."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{what}: expected a ComfyUI CONDITIONING (a non-empty list), "
                         f"got {type(conditioning).__name__}")
    if len(conditioning) > 1:
        raise ValueError(
            f"{what} holds {len(conditioning)} conditionings (Conditioning Combine or area nodes); Kontext nodes take "
            "one. Encode the prompts as one text instead."
        )
    entry = conditioning[0]
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
        raise ValueError(f"{what}: malformed CONDITIONING entry (expected [tensor, dict])")
    txt, extras = entry
    if "pooled_output" not in extras or extras["pooled_output"] is None:
        raise ValueError(
            f"{what} has no pooled CLIP output; FLUX needs T5-XXL and CLIP-L together. Encode with Kontext Prompt, "
            "or CLIP Text Encode (Flux) with a DualCLIPLoader of type flux."
        )
    if not isinstance(txt, torch.Tensor) or txt.ndim != 3 or txt.shape[1] == 0:
        shape = list(txt.shape) if isinstance(txt, torch.Tensor) else type(txt).__name__
        raise ValueError(f"{what}: expected text features [batch, tokens, width] with at least one token, got {shape}")
    if text_features is not None and txt.shape[-1] != text_features:
        raise ValueError(
            f"{what} has text features of width {txt.shape[-1]}, the model expects {text_features} (T5-XXL). "
            "It was encoded for another model: use a FLUX text encoder (t5xxl + clip_l)."
        )
    pooled = extras["pooled_output"]
    if pooled.ndim == 1:
        pooled = pooled[None]
    if pooled_features is not None and (pooled.ndim != 2 or pooled.shape[-1] != pooled_features):
        raise ValueError(
            f"{what} has a pooled CLIP output of shape {list(pooled.shape)}, the model expects width {pooled_features} "
            "(CLIP-L). It was encoded with another CLIP (CLIP-G, or SD3's triple loader): use clip_l with t5xxl."
        )
    if pooled.shape[0] not in (1, txt.shape[0]):
        raise ValueError(f"{what}: {pooled.shape[0]} pooled outputs for {txt.shape[0]} texts; they must match")
    guidance = extras.get("guidance")
    if guidance is not None and not math.isfinite(float(guidance)):
        raise ValueError(f"{what} carries guidance {guidance}; set a finite guidance (FluxGuidance)")
    if not (bool(torch.isfinite(txt).all()) and bool(torch.isfinite(pooled).all())):
        raise ValueError(f"{what} holds NaN or infinite values: the text encoder produced them (an fp16 overflow?); "
                         "encode the prompt again in bf16 or fp32")
    method = extras.get("reference_latents_method")
    if method is not None:
        method = _METHOD_ALIASES.get(method, method)
        if method not in PLACEMENTS:
            raise ValueError(
                f"{what}: reference method {extras['reference_latents_method']!r} is not supported here; choose "
                f"one of {', '.join(COMFY_METHODS)} in Edit Model Reference Method."
            )
    references = []
    for index, raw in enumerate(extras.get("reference_latents") or []):
        scaled = raw_to_scaled(check_latent_tensor(raw, f"{what}: reference latent {index + 1}").detach().cpu())
        references.extend(split_batch(scaled))
    return Conditioning(TextConditioning(txt.detach(), pooled.detach()),
                        None if guidance is None else float(guidance), references, method)


def conditioning_to_comfy(text: TextConditioning, guidance: float | None = None) -> list:
    """TextConditioning -> CONDITIONING that ComfyUI's own samplers also accept."""
    extras: dict[str, Any] = {"pooled_output": text.y.detach().cpu()}
    if guidance is not None:
        extras["guidance"] = float(guidance)
    return [[text.txt.detach().cpu(), extras]]
