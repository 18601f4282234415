"""Kontext Edit: the sampler node (an edit with context images, or text-to-image)."""

from __future__ import annotations

from kontext_core import PLACEMENTS, GenerationSettings, TextConditioning
from kontext_core.image import STITCH_DIRECTIONS
from kontext_core.masks import DEFAULT_CONTEXT_MARGIN, LatentInpaint, MaskedEdit
from kontext_core.pipeline import DEFAULT_GUIDANCE
from kontext_core.sampling import SAMPLER_MODES
from kontext_core.step_cache import CacheStats

from . import comfy_adapter, convert, resolve
from .images import RESIZE_CHOICES, RESIZE_TOOLTIP, _vae_socket
from .step_cache import CACHE_TOOLTIP, report
from .progress import step_callback
from .schema import (MODEL, STEP_CACHE, Boolean, Combo, Float, Int, KontextNode, NodeResult, Output, Seed, Socket,
                     node_spec)

GUIDANCE_TOOLTIP = ("How strongly the result follows the prompt; 2.5 is Kontext [dev]'s. A FluxGuidance or CLIP Text "
                    "Encode (Flux) node upstream sets it on the conditioning instead, and then that value is used.")
PLACEMENT_CHOICES = ("auto", *PLACEMENTS)
PLACEMENT_TOOLTIP = ("Where the reference images sit in the model's context. auto: the conditioning's reference method "
                     "(Edit Model Reference Method) if set, else kontext for one image and offset for several. "
                     "stitch: the images joined into one context image (as ComfyUI's Kontext template does with "
                     "Image Stitch), in the direction stitch_direction says.")
STITCH_DIRECTION_TOOLTIP = ("With placement stitch (ignored with any other): right joins the images side by side, the "
                            "others resized to the first's height; down joins them one below the other, the others "
                            "resized to the first's width.")
MASK_TOOLTIP = ("Where to edit (white = edit): from Load Image's mask (paint it in the Mask Editor) or any mask node. "
                "Wherever it is 0 the output is the input, pixel for pixel. A mask of another size is resized.")
GROW_TOOLTIP = "Pixels the mask is grown by before use."
FEATHER_TOOLTIP = ("Pixels over which the edit fades in, inside the mask's border (outside the mask nothing ever "
                   "changes).")


def mask_widgets() -> list:
    return [Int("grow", 0, 0, 1024, tooltip=GROW_TOOLTIP), Int("feather", 0, 0, 1024, tooltip=FEATHER_TOOLTIP)]


def placement_widgets() -> list:
    """The placement and, read only by its stitch choice, the stitch direction: one pair wherever references are
    placed, so every node offers the same choices."""
    return [Combo("placement", PLACEMENT_CHOICES, "auto", tooltip=PLACEMENT_TOOLTIP),
            Combo("stitch_direction", STITCH_DIRECTIONS, STITCH_DIRECTIONS[0], tooltip=STITCH_DIRECTION_TOOLTIP)]


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
            "style, an object). Without any image it generates from text at the target latent's size. With a mask "
            "only the masked region changes.",
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
                               "below 1 the sampler starts from it. Without it the output has the first image's size. "
                               "Its noise mask (Set Latent Noise Mask) is used as the mask when mask is not "
                               "connected."),
                Socket("negative", "CONDITIONING", optional=True, tooltip="The negative prompt, for sampler true_cfg."),
                Socket("cache", STEP_CACHE, optional=True, tooltip=CACHE_TOOLTIP),
                Socket("mask", "MASK", optional=True,
                       tooltip=MASK_TOOLTIP + " With an image the output keeps the image's size; without one the "
                               "mask applies in latent space to target (or the first context)."),
                Seed(),
                Int("steps", 28, 1, 10000,
                    tooltip="28 for Kontext [dev]; 4-8 with a turbo LoRA and sampler distilled."),
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
                *placement_widgets(),
                *mask_widgets(),
                Boolean("crop_to_mask", False,
                        tooltip="Edit only the mask's box (plus context_margin) at the size resize picks for it, then "
                                "paste it back: a small region gets full detail."),
                Int("context_margin", DEFAULT_CONTEXT_MARGIN, 0, 4096,
                    tooltip="With crop_to_mask: pixels of surroundings kept around the mask's box (clamped at the "
                            "image's edges) so the edit fits its neighbourhood."),
            ],
            [Output("LATENT", "latent"), Output("IMAGE", "image")],
        )

    @classmethod
    def run(cls, model, vae, conditioning, seed: int = 0, steps: int = 28, guidance: float = DEFAULT_GUIDANCE,
            denoise: float = 1.0, sampler: str = "dev", true_cfg: float = 4.0, resize: str = "preferred",
            placement: str = "auto", stitch_direction: str = "right", grow: int = 0, feather: int = 0,
            crop_to_mask: bool = False, context_margin: int = DEFAULT_CONTEXT_MARGIN, image=None, image_2=None,
            image_3=None, context=None, target=None, negative=None, mask=None, cache=None) -> NodeResult:
        pipe = resolve.pipeline(model, vae)
        features = pipe.transformer.config.context_in_dim, pipe.transformer.config.vec_in_dim
        cond = convert.conditioning_from_comfy(conditioning, "conditioning", *features)

        # Every item of every image, then the latents: the first is the image edited, the rest references.
        items = [picture for name, given in (("image", image), ("image_2", image_2), ("image_3", image_3))
                 if given is not None for picture in convert.image_to_pil(given, name)]
        if context is not None:
            items += convert.split_batch(convert.latent_from_comfy(context, "context"))
        items += cond.reference_latents
        start = None
        if target is not None:
            start = convert.latent_from_comfy(target, "target", honors_mask=True)
            mask = mask if mask is not None else convert.noise_mask(target)
        if start is None and not items:
            raise ValueError("nothing sets the output size: connect an image to edit, or a target LATENT (Empty SD3 "
                             "Latent Image) for text-to-image.")
        batch = max(start.shape[0] if start is not None else 1, cond.text.txt.shape[0])
        text = _batched(cond.text, batch, "the conditioning")
        negative_text = None
        if sampler == "true_cfg":
            if negative is None:
                raise ValueError("sampler true_cfg needs a negative: connect a Kontext Prompt (its text may be empty) "
                                 "to negative, or choose sampler dev.")
            negative_text = _batched(convert.conditioning_from_comfy(negative, "negative", *features).text, batch,
                                     "the negative")
        if placement == "auto":
            placement = cond.reference_method or ("kontext" if len(items) <= 1 else "offset")
        settings = GenerationSettings(steps=steps, guidance=guidance if cond.guidance is None else cond.guidance,
                                      seed=seed, denoise=denoise, sampler=sampler, true_cfg=true_cfg,
                                      placement=placement, stitch_direction=stitch_direction, cache=cache)
        cache_stats = CacheStats() if cache is not None else None
        with resolve.compile_failures_explained(model):  # the pipeline loads each model right before it runs
            if mask is not None and image is not None:
                source = convert.rgb_image(image[:1])
                plan = MaskedEdit.prepare(mask, (source.shape[2], source.shape[1]), grow=grow, feather=feather,
                                          crop_to_mask=crop_to_mask, context_margin=context_margin)
                if plan.empty:  # Load Image without a painted mask gives an all-0 one
                    _warn_empty_mask("the image")
                latent_size = pipe.working_latent_size(plan.box.width, plan.box.height, resize)
                latents, images, _ = pipe.edit_region(source, plan, text, settings, references=items[1:],
                                                      resize=resize, negative=negative_text,
                                                      callback=step_callback(latent_size), cache_stats=cache_stats)
                report(cache_stats, settings.cache, "Kontext Edit")
                return NodeResult((convert.latent_to_comfy(latents), images))

            first, context_latents, settings = pipe.context_latents(items[0], items[1:], settings, resize) \
                if items else (None, [], settings)
            start = start if start is not None else first
            latent_size = tuple(start.shape[-2:])
            inpaint = None
            if mask is not None:  # no image: the mask applies to the latent sampled
                if crop_to_mask:
                    raise ValueError("crop_to_mask cuts the masked region out of the image: connect the image to edit "
                                     "to image, or turn crop_to_mask off.")
                plan = MaskedEdit.prepare(mask, pipe.pixel_size(start), grow=grow, feather=feather)
                plan.check_batch(batch)
                if plan.empty:
                    _warn_empty_mask("the target latent")
                    kept = start.expand(batch, -1, -1, -1)
                    return NodeResult((convert.latent_to_comfy(kept), resolve.decode_image(pipe.autoencoder, kept)))
                if not plan.full:
                    inpaint = LatentInpaint(plan.latent_mask(latent_size), start)
            latents = pipe.generate(text, settings, context_latents=context_latents, latent_size=latent_size,
                                    init_latent=start if denoise < 1 else None, negative=negative_text,
                                    callback=step_callback(latent_size), cache_stats=cache_stats,
                                    inpaint=inpaint)
        report(cache_stats, settings.cache, "Kontext Edit")
        return NodeResult((convert.latent_to_comfy(latents), resolve.decode_image(pipe.autoencoder, latents)))


def _warn_empty_mask(kept: str) -> None:
    comfy_adapter.log.warning("comfyui-kontext: the mask is empty, so nothing is edited and %s passes through; paint "
                              "the region to edit in Load Image's Mask Editor (or connect another mask: white = edit)",
                              kept)
