"""Image nodes: Kontext's preferred sizes, IMAGE -> LATENT and back."""

from __future__ import annotations

import torch

from kontext_core.image import FIT_MODES, prepare_image

from . import convert, resolve
from .schema import VAE, Combo, KontextNode, NodeResult, Output, Socket, node_spec

RESIZE_CHOICES = ("preferred", "keep")
RESIZE_TOOLTIP = ("preferred: the size Kontext was trained at nearest the image's aspect ratio (about 1 megapixel); "
                  "keep: the image's own size, rounded down to a multiple of 16.")


def _vae_socket() -> Socket:
    return Socket("vae", VAE, also=("VAE",), tooltip="Load Kontext VAE, or ComfyUI's Load VAE with the FLUX VAE.")


def _prepare(image: torch.Tensor, resize: str, fit: str, what: str = "image") -> torch.Tensor:
    prepared = [prepare_image(p, resize, None, fit) for p in convert.image_to_pil(image, what)]
    return convert.pixels_to_image(torch.cat(prepared))


class KontextImagePrep(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextImagePrep", "Kontext Image Prep",
            "Resizes up to three images to the sizes Kontext works at and shows the size chosen. Kontext Edit does "
            "the same by itself; use this node to see the size, to crop instead of stretch, or to feed other nodes.",
            [
                Socket("image", "IMAGE"),
                Socket("image_2", "IMAGE", optional=True, tooltip="A further reference (style, character, object)."),
                Socket("image_3", "IMAGE", optional=True),
                Combo("resize", RESIZE_CHOICES, "preferred", tooltip=RESIZE_TOOLTIP),
                Combo("fit", FIT_MODES, "crop",
                      tooltip="crop: cut the image to the new aspect ratio (nothing is squashed); stretch: resize it "
                              "whole (the reference pipeline's way)."),
            ],
            [Output("IMAGE", "image"), Output("IMAGE", "image_2"), Output("IMAGE", "image_3"),
             Output("INT", "width"), Output("INT", "height")],
        )

    @classmethod
    def run(cls, image, resize: str = "preferred", fit: str = "crop", image_2=None, image_3=None) -> NodeResult:
        outputs, sizes = [], []
        for name, given in (("image", image), ("image_2", image_2), ("image_3", image_3)):
            if given is None:
                outputs.append(None)
                continue
            prepared = _prepare(given, resize, fit, name)
            outputs.append(prepared)
            sizes.append(f"{name}: {given.shape[2]}x{given.shape[1]} -> {prepared.shape[2]}x{prepared.shape[1]}")
        first = outputs[0]
        return NodeResult((*outputs, int(first.shape[2]), int(first.shape[1])), ui={"text": ["\n".join(sizes)]})


class KontextEncode(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextEncode", "Kontext Encode Image",
            "Encodes an image to a FLUX LATENT at a Kontext size (ComfyUI's VAE Decode reads it too).",
            [_vae_socket(), Socket("image", "IMAGE"),
             Combo("resize", RESIZE_CHOICES, "preferred", tooltip=RESIZE_TOOLTIP)],
            [Output("LATENT", "latent")],
        )

    @classmethod
    def run(cls, vae, image, resize: str = "preferred") -> NodeResult:
        latents = resolve.encode_images(resolve.autoencoder(vae), [image], resize)
        return NodeResult((convert.latent_to_comfy(torch.cat(latents)),))


class KontextDecode(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextDecode", "Kontext Decode Latent",
            "Decodes a FLUX LATENT to an image.",
            [_vae_socket(), Socket("latent", "LATENT")],
            [Output("IMAGE", "image")],
        )

    @classmethod
    def run(cls, vae, latent) -> NodeResult:
        return NodeResult((resolve.decode_image(resolve.autoencoder(vae), convert.latent_from_comfy(latent)),))
