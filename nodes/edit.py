"""Kontext Edit: the sampler node (an edit with context images, or text-to-image)."""

from __future__ import annotations

from kontext_core import GenerationSettings, TextConditioning
from kontext_core.pipeline import DEFAULT_GUIDANCE
from kontext_core.sampling import SAMPLER_MODES
from kontext_core.step_cache import CacheStats

from . import convert, resolve
from .images import RESIZE_CHOICES, RESIZE_TOOLTIP, _vae_socket
from .step_cache import CACHE_TOOLTIP, report
from .progress import step_callback
from .schema import MODEL, STEP_CACHE, Combo, Float, Int, KontextNode, NodeResult, Output, Seed, Socket, node_spec

GUIDANCE_TOOLTIP = ("How strongly the result follows the prompt; 2.5 is Kontext [dev]'s. A FluxGuidance or CLIP Text "
                    "Encode (Flux) node upstream sets it on the conditioning instead, and then that value is used.")


def _batched(text: TextConditioning, batch: int, what: str) -> TextConditioning:
    if text.txt.shape[0] == batch:
        return text
    if text.txt.shape[0] != 1:
        raise ValueError(f"{what} has a batch of {text.txt.shape[0]} but the target a batch of {batch}; "
                         "make them equal or give one of them a batch of 1.")
    return TextConditioning(text.txt.expand(batch, -1, -1), text.y.expand(batch, -1))


class KontextEdit(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextEdit", "Kontext Edit",
            "Edits the image with the instruction in the conditioning (more images are references: a character, a "
            "style, an object). Without any image it generates from text at the target latent's size.",
            [
                Socket("model", MODEL),
                _vae_socket(),
                Socket("conditioning", "CONDITIONING",
                       tooltip="Kontext Prompt, or CLIP Text Encode (Flux) / FluxGuidance / ReferenceLatent."),
                Socket("image", "IMAGE", optional=True,
                       tooltip="The image to edit; the output has its size. (Each image of a batch is one more "
                               "reference, not one more edit.)"),
                Socket("image_2", "IMAGE", optional=True, tooltip="A further reference image."),
                Socket("image_3", "IMAGE", optional=True, tooltip="A further reference image."),
                Socket("context", "LATENT", optional=True,
                       tooltip="Reference latents (each item of the batch is one), after the images."),
                Socket("target", "LATENT", optional=True,
                       tooltip="Sets the output size (e.g. Empty SD3 Latent Image for text-to-image); with denoise "
                               "below 1 the sampler starts from it. Without it the output has the first image's size."),
                Socket("negative", "CONDITIONING", optional=True, tooltip="The negative prompt, for sampler true_cfg."),
                Socket("cache", STEP_CACHE, optional=True, tooltip=CACHE_TOOLTIP),
                Seed(),
                Int("steps", 28, 1, 10000, tooltip="28 for Kontext [dev]; 4-8 with a turbo LoRA and sampler distilled."),
                Float("guidance", DEFAULT_GUIDANCE, 0.0, 100.0, step=0.1, tooltip=GUIDANCE_TOOLTIP),
                Float("denoise", 1.0, 0.01, 1.0,
                      tooltip="Below 1 the sampler starts from the noised image instead of pure noise: keeps more "
                              "of its layout."),
                Combo("sampler", SAMPLER_MODES, "dev",
                      tooltip="dev: Kontext [dev]'s schedule; distilled: unshifted, for step-distilled models and "
                              "turbo LoRAs; true_cfg: real classifier-free guidance with the negative (twice the "
                              "work)."),
                Float("true_cfg", 4.0, 1.0, 30.0, step=0.1, tooltip="The CFG scale of sampler true_cfg."),
                Combo("resize", RESIZE_CHOICES, "preferred", tooltip=RESIZE_TOOLTIP),
            ],
            [Output("LATENT", "latent"), Output("IMAGE", "image")],
        )

    @classmethod
    def run(cls, model, vae, conditioning, seed: int = 0, steps: int = 28, guidance: float = DEFAULT_GUIDANCE,
            denoise: float = 1.0, sampler: str = "dev", true_cfg: float = 4.0, resize: str = "preferred",
            image=None, image_2=None, image_3=None, context=None, target=None, negative=None,
            cache=None) -> NodeResult:
        pipe = resolve.pipeline(model, vae)
        features = pipe.transformer.config.context_in_dim, pipe.transformer.config.vec_in_dim
        cond = convert.conditioning_from_comfy(conditioning, "conditioning", *features)

        references = resolve.encode_images(pipe.autoencoder, [i for i in (image, image_2, image_3) if i is not None],
                                           resize)
        if context is not None:
            references += convert.split_batch(convert.latent_from_comfy(context, "context"))
        references += cond.reference_latents

        if target is not None:
            start = convert.latent_from_comfy(target, "target")
        elif references:
            start = references[0]
        else:
            raise ValueError("nothing sets the output size: connect an image to edit, or a target LATENT (Empty SD3 "
                             "Latent Image) for text-to-image.")
        batch = max(start.shape[0], cond.text.txt.shape[0])
        text = _batched(cond.text, batch, "the conditioning")
        negative_text = None
        if sampler == "true_cfg":
            if negative is None:
                raise ValueError("sampler true_cfg needs a negative: connect a Kontext Prompt (its text may be empty) "
                                 "to negative, or choose sampler dev.")
            negative_text = _batched(convert.conditioning_from_comfy(negative, "negative", *features).text, batch,
                                     "the negative")

        placement = cond.reference_method or ("kontext" if len(references) <= 1 else "offset")
        settings = GenerationSettings(steps=steps, guidance=guidance if cond.guidance is None else cond.guidance,
                                      seed=seed, denoise=denoise, sampler=sampler, true_cfg=true_cfg,
                                      placement=placement, cache=cache)
        latent_size = tuple(start.shape[-2:])
        resolve.ready(pipe.transformer)  # encoding (with ComfyUI's VAE, say) may have moved it out
        resolve.set_loras(pipe.transformer, model)
        cache_stats = CacheStats() if cache is not None else None
        with resolve.compile_failures_explained(model):
            latents = pipe.generate(text, settings, context_latents=references, latent_size=latent_size,
                                    init_latent=start if denoise < 1 else None, negative=negative_text,
                                    callback=step_callback(latent_size), cache_stats=cache_stats)
        report(cache_stats, settings.cache, "Kontext Edit")
        return NodeResult((convert.latent_to_comfy(latents), resolve.decode_image(pipe.autoencoder, latents)))
