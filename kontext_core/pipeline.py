"""The public API: edit an image with an instruction, generate from text, chain edits in a session.

Latents here are the autoencoder's scaled latents [B, 16, H/8, W/8] (what `Autoencoder.encode`
returns). Noise is drawn on the CPU from the seed, so a seed gives the same noise on any device.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from PIL import Image

from .placement import tiling
from .model.autoencoder import Autoencoder
from .compute.cuda_graph import GraphedVelocity
from .adapters.lora import apply_lora
from .image import (FIT_MODES, RESIZE_MODES, STITCH_DIRECTIONS, from_unit_images, pixels_to_unit, prepare_image,
                    stitch_images, target_size, to_pil, unit_images)
from .masks import DEFAULT_CONTEXT_MARGIN, LatentInpaint, MaskedEdit, as_mask, composite, fit_mask
from .sampling import SAMPLER_MODES, StepCallback, TextConditioning, denoise_schedule, noise_latent, sample_euler
from .text.text_encoders import check_text_encoders_fit
from .step_cache import OFF, CacheStats, StepCache
from .model.tokens import PLACEMENTS, context_tokens, pack_latent, position_ids, unpack_tokens
from .model.transformer import KontextTransformer

DEFAULT_GUIDANCE = 2.5  # Kontext [dev]'s recommended distilled guidance

LoraSpec = tuple[Any, float]  # (path or LoraWeights, strength)


class PromptEncoder(Protocol):
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def make_noise(seed: int, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """[B, C, H, W] float32 standard normal noise from the CPU generator (same stream as ComfyUI's)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float32)


@dataclass
class GenerationSettings:
    steps: int = 28
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    denoise: float = 1.0
    sampler: str = "dev"  # dev | distilled | true_cfg
    true_cfg: float = 1.0
    negative_prompt: str = ""
    placement: str = "kontext"
    # How the 'stitch' placement joins the images: "right" (side by side) or "down" (one below the other). Other
    # placements never read it; it stays in the settings so a record says how a stitched context was made.
    stitch_direction: str = "right"
    # Step caching (kontext_core/step_cache.py): "first-block:0.12", "teacache:0.4" or "off". A StepCache is
    # accepted too and kept as its text, so the settings stay plain data (metadata, session history).
    cache: str = OFF

    def __post_init__(self) -> None:
        step_cache = StepCache.parse(self.cache)
        self.cache = str(step_cache) if step_cache is not None else OFF
        if self.sampler not in SAMPLER_MODES:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_MODES)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.stitch_direction not in STITCH_DIRECTIONS:
            raise ValueError(f"unknown stitch direction {self.stitch_direction!r}; choose one of "
                             f"{', '.join(STITCH_DIRECTIONS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        for name in ("guidance", "true_cfg"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not -(2**63) <= int(self.seed) < 2**64:
            raise ValueError(f"seed must be an integer from 0 to 2^64 - 1 (or down to -2^63), got {self.seed}")


@dataclass
class EditResult:
    latents: torch.Tensor  # [B, 16, h, w] scaled latents
    images: list[Image.Image]  # at the working size; a masked edit's at the input's size
    settings: GenerationSettings
    prompt: str
    cache_stats: CacheStats | None = None  # steps computed and skipped, when settings.cache is on


def encode_image(ae: Any, image: Image.Image, resize: str = "preferred", size: tuple[int, int] | None = None,
                 fit: str = "stretch", ae_tiling: str = "auto") -> torch.Tensor:
    """One image -> its scaled latent [1, 16, h, w] at the working resolution, through `ae`: our Autoencoder
    (tiled as `ae_tiling` says) or any AE with `config.downsample_factor` and `encode` (ComfyUI's, in the nodes)."""
    if resize not in RESIZE_MODES or fit not in FIT_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES} and fit one of {FIT_MODES}")
    pixels = prepare_image(image, resize, size, fit, ae.config.downsample_factor * 2)
    pixels = pixels.to(device=ae.device, dtype=ae.dtype)
    with torch.no_grad():
        # Tiling knows our Autoencoder's memory needs; another AE runs as it is.
        latent = tiling.encode(ae, pixels, ae_tiling) if isinstance(ae, Autoencoder) else ae.encode(pixels)
    return latent.float()


class KontextPipeline:
    def __init__(self, transformer: KontextTransformer, autoencoder: Autoencoder,
                 text_encoders: PromptEncoder | None = None, cuda_graphs: bool = False,
                 process_group: Any = None):
        """`process_group`: a torch.distributed group (initialised) to split each transformer step over, one
        process per GPU, each holding the whole model (kontext_core/compute/sequence_parallel.py); "world" for the
        default group. Every process runs the same calls with the same arguments and gets the same result."""
        if text_encoders is not None:
            # A CLIP or T5 of another width would otherwise fail at the first step, deep in a matmul.
            check_text_encoders_fit(text_encoders, transformer.config)
        self.transformer = transformer
        self.autoencoder = autoencoder
        if process_group is not None:
            from .compute.sequence_parallel import SequenceParallel

            transformer.sequence_parallel = SequenceParallel(None if process_group == "world" else process_group)
            transformer.sequence_parallel.check_heads(transformer.config.num_heads)
        self.text_encoders = text_encoders
        # Steps replayed from a CUDA graph where the model allows (CUDA, no hooks): for launch-bound steps.
        self.cuda_graphs = cuda_graphs
        self.ae_tiling = "auto"  # auto: tiles only when a full-size AE pass would not fit; always; never
        # Every step's modulation vectors in one pass before sampling (sample_euler): the fast preset's.
        self.batched_modulation = False
        # sage8's K mean / V amax recorded every this-many steps and reused between (sample_euler): the fast preset's.
        self.attention_statistics_refresh = 0
        # Called with the transformer or the autoencoder right before it computes. A host that moves models out
        # of the GPU while they are idle (ComfyUI lends their memory to other models) moves them back here.
        self.before_use: Callable[[Any], None] | None = None

    def _use(self, model: Any) -> None:
        if self.before_use is not None:
            self.before_use(model)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def image_multiple(self) -> int:
        """Image sizes must be multiples of this: the AE's downsampling times the 2x2 patch."""
        return self.autoencoder.config.downsample_factor * 2

    def pixel_size(self, latent: torch.Tensor) -> tuple[int, int]:
        """(width, height) in pixels of the image a latent [..., h, w] decodes to."""
        factor = self.autoencoder.config.downsample_factor
        return latent.shape[-1] * factor, latent.shape[-2] * factor

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the latent for an output of about width x height pixels (snapped down)."""
        multiple, scale = self.image_multiple, self.autoencoder.config.downsample_factor
        if width < multiple or height < multiple:
            raise ValueError(f"the output must be at least {multiple}x{multiple} pixels, got {width}x{height}")
        return height // multiple * multiple // scale, width // multiple * multiple // scale

    # --- conditioning and images ---------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str]) -> TextConditioning:
        if self.text_encoders is None:
            raise RuntimeError(
                "this pipeline has no text encoders: load T5-XXL and CLIP-L (load_text_encoders) or pass "
                "conditioning= with precomputed embeddings"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        txt, y = self.text_encoders.encode(prompts)
        return TextConditioning(txt, y)

    def encode_image(self, image: Image.Image, resize: str = "preferred", size: tuple[int, int] | None = None,
                     fit: str = "stretch") -> torch.Tensor:
        """One image -> its scaled latent [1, 16, h, w] at the working resolution."""
        self._use(self.autoencoder)
        return encode_image(self.autoencoder, image, resize, size, fit, self.ae_tiling)

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        self._use(ae)
        latents = latents.to(device=ae.device, dtype=ae.dtype)
        with torch.no_grad():
            return tiling.decode(ae, latents, self.ae_tiling) if isinstance(ae, Autoencoder) else ae.decode(latents)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return to_pil(self._decode_pixels(latents))

    def decode_unit(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, H, W, 3] in [0, 1], float (not quantized to 8 bits)."""
        return pixels_to_unit(self._decode_pixels(latents))

    # --- sampling ------------------------------------------------------------------------------

    def generate(
        self,
        conditioning: TextConditioning,
        settings: GenerationSettings,
        *,
        context_latents: Sequence[torch.Tensor] = (),
        latent_size: tuple[int, int] | None = None,  # (h, w) of the target latent
        init_latent: torch.Tensor | None = None,  # the latent to start from when denoise < 1
        negative: TextConditioning | None = None,
        noise: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        loras: Sequence[LoraSpec] = (),
        cache_stats: CacheStats | None = None,
        inpaint: LatentInpaint | None = None,
    ) -> torch.Tensor:
        """The sampled target latent [B, 16, h, w]; batch size is the conditioning's.

        `loras` are applied on the fly for this call only and removed afterwards. With settings.cache on, the
        counts of computed and skipped steps are added to `cache_stats`. With `inpaint`, only the latent
        inside its mask is sampled: outside it the result is `inpaint.original`, exactly.
        """
        batch = conditioning.txt.shape[0]
        if latent_size is None:
            if not context_latents and init_latent is None:
                raise ValueError("give a target size (latent_size, or width/height) when there is no input image")
            latent_size = tuple((init_latent if init_latent is not None else context_latents[0]).shape[-2:])
        height, width = latent_size
        channels = self.transformer.config.latent_channels
        if noise is None:
            noise = make_noise(settings.seed, batch, channels, height, width)
        if noise.shape != (batch, channels, height, width):
            raise ValueError(f"noise has shape {list(noise.shape)}, expected {[batch, channels, height, width]}")

        tokens = (height + 1) // 2 * ((width + 1) // 2)
        timesteps = denoise_schedule(settings.steps, tokens, settings.denoise, shift=settings.sampler != "distilled")
        start = noise
        if settings.denoise < 1.0:
            if init_latent is None:
                raise ValueError("denoise < 1 needs a starting image (init_latent or a context image)")
            if tuple(init_latent.shape[-2:]) != (height, width):
                raise ValueError("denoise < 1 needs the target to have the starting image's size")
            start = noise_latent(init_latent.float().expand_as(noise), noise, timesteps[0])
        blend = None
        if inpaint is not None:
            for name, given in (("mask", inpaint.mask), ("original", inpaint.original)):
                if tuple(given.shape[-2:]) != (height, width) or given.shape[0] not in (1, batch):
                    raise ValueError(f"the inpaint {name} has shape {list(given.shape)}, the target latent "
                                     f"{[batch, channels, height, width]}: they must match (batch 1 is repeated)")
            blend = inpaint.step_blend(noise, self.device)

        device = self.device
        ctx = ctx_ids = None
        if context_latents:
            references = [c.to(device=device, dtype=torch.float32).expand(batch, -1, -1, -1) for c in context_latents]
            ctx, ctx_ids = context_tokens(references, (height, width), settings.placement)
        use_cfg = settings.sampler == "true_cfg"
        if use_cfg and negative is None:
            raise ValueError("the true_cfg sampler needs a negative conditioning (negative prompt)")
        self._use(self.transformer)
        with ExitStack() as applied:
            for lora, strength in loras:
                applied.enter_context(apply_lora(self.transformer, lora, strength, mode="on_the_fly"))
            out = self._sample(start, height, width, batch, conditioning, timesteps, settings, ctx, ctx_ids,
                               negative if use_cfg else None, callback, cache_stats, blend)
        if not bool(torch.isfinite(out).all()):  # one check per generation: a black image would say nothing
            raise FloatingPointError(
                f"sampling produced NaN or infinite values (transformer in {self.transformer.dtype}). fp16 overflows "
                "in FLUX's activations: load the model in bf16 or fp8; a LoRA at a very high strength does the same."
            )
        latents = unpack_tokens(out, height, width).float()
        return latents if inpaint is None else inpaint.composite(latents)

    def _sample(self, start, height, width, batch, conditioning, timesteps, settings, ctx, ctx_ids, negative,
                callback, cache_stats=None, blend=None) -> torch.Tensor:
        device = self.device
        step_cache = StepCache.parse(settings.cache)
        if step_cache is not None and self.cuda_graphs and device.type == "cuda":
            warnings.warn("CUDA graphs not used for this run: step caching decides on the host at every step "
                          "whether to run the blocks, which a graph replay cannot", stacklevel=3)
        return sample_euler(
            self.transformer, pack_latent(start).to(device), position_ids(height, width, batch=batch, device=device),
            conditioning, timesteps, guidance=settings.guidance, context=ctx, context_ids=ctx_ids,
            negative=negative, true_cfg=settings.true_cfg if negative is not None else 1.0, callback=callback,
            velocity_fn=self._graphed_velocity() if step_cache is None else None,
            step_cache=step_cache, cache_stats=cache_stats, blend=blend, batched_modulation=self.batched_modulation,
            attention_statistics_refresh=self.attention_statistics_refresh,
        )

    def _graphed_velocity(self) -> GraphedVelocity | None:
        if not self.cuda_graphs or self.device.type != "cuda":
            GraphedVelocity.release(self.transformer)  # frees the graph's memory
            return None
        graphed = GraphedVelocity.of(self.transformer)
        if (reason := graphed.prepare()) is not None:
            warnings.warn(f"CUDA graphs not used for this run: {reason}", stacklevel=3)
            return None
        return graphed

    def _conditioning(self, prompt: str | list[str], conditioning: TextConditioning | None,
                      settings: GenerationSettings, batch: int) -> tuple[TextConditioning, TextConditioning | None]:
        cond = conditioning or self.encode_prompt(prompt)
        if cond.txt.shape[0] not in (1, batch):
            raise ValueError(f"{cond.txt.shape[0]} prompts for a batch of {batch}; give one prompt or one per item")
        if cond.txt.shape[0] != batch:
            cond = TextConditioning(cond.txt.expand(batch, -1, -1), cond.y.expand(batch, -1))
        negative = None
        if settings.sampler == "true_cfg":
            negative = self.encode_prompt([settings.negative_prompt] * batch)
        return cond, negative

    def edit(
        self,
        images: Image.Image | Sequence[Image.Image] | None,
        prompt: str | list[str] = "",
        *,
        settings: GenerationSettings | None = None,
        context_latents: Sequence[torch.Tensor | Image.Image] | None = None,
        conditioning: TextConditioning | None = None,
        size: tuple[int, int] | None = None,  # (width, height) of the output in pixels
        resize: str = "preferred",
        fit: str = "stretch",
        batch_size: int = 1,
        callback: StepCallback | None = None,
        decode: bool = True,
        loras: Sequence[LoraSpec] = (),
        mask: Any = None,
        grow: int = 0,
        feather: int = 0,
        crop_to_mask: bool = False,
        context_margin: int = DEFAULT_CONTEXT_MARGIN,
        inpaint: LatentInpaint | None = None,
        **overrides: Any,
    ) -> EditResult:
        """Edit `images` (the first is the one edited; more are extra references) with `prompt`.

        Instead of images, `context_latents` may be given directly (multi-turn chaining; after the first, images
        are taken too, encoded as `resize` says, or joined as pixels by the stitch placement). Keyword
        overrides (steps, guidance, seed, denoise, sampler, true_cfg, negative_prompt, placement, stitch_direction,
        cache) update `settings`. placement="stitch" joins the images (or the decoded latents) into one context
        image, side by side (stitch_direction="right", the default) or one below the other ("down").
        cache="first-block:0.12" (or a StepCache) skips the blocks on steps whose input barely changed, and the
        result's cache_stats then counts the skipped steps.

        `mask` (1 / white = edit; [H, W], [B, H, W], a Pillow image; see masks.py) limits the edit to a region
        of the first image, grown by `grow` and feathered over `feather` pixels inside its border. The result
        keeps the input's size, and wherever the mask is 0 its pixels are the input's, exactly: the sampler
        keeps the latent outside the mask on the (noised) original and the decoded edit is resized back and
        composited through the feathered mask. With `crop_to_mask`, only the mask's box plus
        `context_margin` pixels is edited, at the working size `resize` picks for it (full detail for a small
        region). An all-0 mask returns the input without sampling; an all-1 mask is a plain edit. With
        `context_latents` instead of images, the mask applies in latent space only (no pixels to keep).
        `inpaint` is that latent form given directly: a latent mask and the latent kept outside it.
        """
        settings = _with_overrides(settings, overrides)
        batch_size = _batch(prompt, conditioning, batch_size)
        pictures = None
        if context_latents is None:
            if images is None:
                raise ValueError("edit needs images or context_latents")
            pictures = [images] if isinstance(images, Image.Image) else list(images)
        plan = None
        if mask is not None:
            plan = self._mask_plan(mask, pictures, context_latents, batch_size, size, fit, inpaint, grow=grow,
                                   feather=feather, crop_to_mask=crop_to_mask, context_margin=context_margin)
            if plan.full:
                plan = None
        if plan is not None and plan.empty and pictures is None:
            latent = context_latents[0].float().expand(batch_size, -1, -1, -1).clone()
            return EditResult(latent, self.decode(latent) if decode else [], settings, _prompt_text(prompt))
        cond, negative = self._conditioning(prompt, conditioning, settings, batch_size)
        cache_stats = CacheStats() if settings.cache != OFF else None
        if plan is not None and pictures is not None:
            latents, edited, settings = self.edit_region(unit_images(pictures[:1]), plan, cond, settings,
                                                         references=pictures[1:], resize=resize, negative=negative,
                                                         callback=callback, loras=loras, cache_stats=cache_stats)
            return EditResult(latents, from_unit_images(edited) if decode else [], settings, _prompt_text(prompt),
                              cache_stats)
        first, references = (pictures[0], pictures[1:]) if pictures is not None else (context_latents[0],
                                                                                        list(context_latents[1:]))
        first_latent, context, settings = self.context_latents(first, references, settings, resize, fit)
        if plan is not None:  # latents only: the mask applies in latent space
            inpaint = LatentInpaint(plan.latent_mask(tuple(first_latent.shape[-2:])), first_latent)
        latent_size = self.latent_size(*size) if size is not None else tuple(first_latent.shape[-2:])
        latents = self.generate(cond, settings, context_latents=context, latent_size=latent_size,
                                init_latent=first_latent if settings.denoise < 1 else None,
                                negative=negative, callback=callback, loras=loras, inpaint=inpaint,
                                cache_stats=cache_stats)
        return EditResult(latents, self.decode(latents) if decode else [], settings, _prompt_text(prompt),
                          cache_stats)

    def context_latents(self, first: Image.Image | torch.Tensor, references: Sequence[Image.Image | torch.Tensor],
                        settings: GenerationSettings, resize: str = "preferred", fit: str = "stretch"
                        ) -> tuple[torch.Tensor, list[torch.Tensor], GenerationSettings]:
        """(the edited image's latent, the context latents, the settings) for an edit of `first` with
        `references`, each an image or a latent. The stitch placement joins them in pixel space (latents
        decoded first) into one context image, in the settings' stitch_direction; several references under
        'kontext' are placed as 'offset'."""
        def encoded(item):
            return item if torch.is_tensor(item) else self.encode_image(item, resize, None, fit)

        first_latent = encoded(first)
        if settings.placement == "stitch" and references:
            pictures = [picture for item in (first, *references)
                        for picture in (self.decode(item) if torch.is_tensor(item) else [item])]
            context = [self.encode_image(stitch_images(pictures, settings.stitch_direction), resize, None, fit)]
        else:
            context = [first_latent, *(encoded(r) for r in references)]
        if len(context) > 1 and settings.placement == "kontext":
            settings = _with_overrides(settings, {"placement": "offset"})
        return first_latent, context, settings

    def working_latent_size(self, width: int, height: int, resize: str = "preferred") -> tuple[int, int]:
        """(h, w) of the latent an image of width x height is encoded to under `resize`."""
        factor = self.autoencoder.config.downsample_factor
        working_width, working_height = target_size(width, height, resize, None, self.image_multiple)
        return working_height // factor, working_width // factor

    def _mask_plan(self, mask: Any, pictures: list[Image.Image] | None, context_latents, batch: int,
                   size: tuple[int, int] | None, fit: str, inpaint: LatentInpaint | None, **options: Any) -> MaskedEdit:
        if inpaint is not None:
            raise ValueError("give mask= (pixels) or inpaint= (its latent form), not both")
        if size is not None:
            raise ValueError("a masked edit keeps the input's size; drop size= (resize= sets the size it is "
                             "sampled at)")
        if pictures is None and options["crop_to_mask"]:
            raise ValueError("crop_to_mask cuts the region out of the image's pixels: give images=, not "
                             "context_latents=")
        if pictures is not None and fit != "stretch":
            raise ValueError(f"a masked edit maps its result back onto the whole input; fit={fit!r} would cut the "
                             "input's edges off: use fit='stretch' (or crop_to_mask to edit a part)")
        edited_size = pictures[0].size if pictures is not None else self.pixel_size(context_latents[0])
        plan = MaskedEdit.prepare(mask, edited_size, **options)
        plan.check_batch(batch)
        return plan

    def edit_region(self, source: torch.Tensor, plan: MaskedEdit, conditioning: TextConditioning,
                    settings: GenerationSettings, *, references: Sequence[Image.Image | torch.Tensor] = (),
                    resize: str = "preferred", negative: TextConditioning | None = None,
                    callback: StepCallback | None = None, loras: Sequence[LoraSpec] = (),
                    cache_stats: CacheStats | None = None) -> tuple[torch.Tensor, torch.Tensor, GenerationSettings]:
        """A masked edit of `source` [1, H, W, 3] in [0, 1] (`references`: more images or latents) with
        `plan` (made for the source's size) -> (latents, images [B, H, W, 3], settings); B is the
        conditioning's batch.

        The images have the source's size and equal it wherever the plan's weights are 0 (the source's
        own float values). The region (or the plan's box) is sampled at its working size under `resize`;
        the latents are that sampling's, or with a box the whole result's, encoded from it. An empty plan
        samples nothing and returns the source; a full one is a plain edit (at the working size)."""
        batch = conditioning.txt.shape[0]
        plan.check_batch(batch)
        source = source[:1]
        picture = from_unit_images(source)[0]
        if plan.empty:
            latent = self.encode_image(picture, resize)
            return latent.expand(batch, -1, -1, -1).clone(), source.expand(batch, -1, -1, -1).clone(), settings
        work = from_unit_images(plan.cut(source))[0] if plan.cropped else picture
        original, context, settings = self.context_latents(work, references, settings, resize)
        inpaint = None if plan.full else LatentInpaint(plan.latent_mask(tuple(original.shape[-2:])), original)
        latents = self.generate(conditioning, settings, context_latents=context,
                                latent_size=tuple(original.shape[-2:]),
                                init_latent=original if settings.denoise < 1 else None, negative=negative,
                                callback=callback, loras=loras, inpaint=inpaint, cache_stats=cache_stats)
        if plan.full:
            return latents, self.decode_unit(latents), settings
        images = plan.paste(source, self.decode_unit(latents))
        if plan.cropped:
            latents = torch.cat([self.encode_image(image, resize) for image in from_unit_images(images)])
        return latents, images, settings

    def text_to_image(self, prompt: str = "", *, width: int = 1024, height: int = 1024,
                      settings: GenerationSettings | None = None, conditioning: TextConditioning | None = None,
                      batch_size: int = 1, callback: StepCallback | None = None, decode: bool = True,
                      loras: Sequence[LoraSpec] = (), **overrides: Any) -> EditResult:
        settings = _with_overrides(settings, overrides)
        latent_size = self.latent_size(width, height)
        batch_size = _batch(prompt, conditioning, batch_size)
        cond, negative = self._conditioning(prompt, conditioning, settings, batch_size)
        cache_stats = CacheStats() if settings.cache != OFF else None
        latents = self.generate(cond, settings, latent_size=latent_size, negative=negative, callback=callback,
                                loras=loras, cache_stats=cache_stats)
        return EditResult(latents, self.decode(latents) if decode else [], settings, _prompt_text(prompt),
                          cache_stats)

    def session(self, image: Image.Image | None = None, *, latent: torch.Tensor | None = None,
                resize: str = "preferred", settings: GenerationSettings | None = None) -> "EditSession":
        if latent is None:
            if image is None:
                raise ValueError("a session starts from an image or a latent")
            latent = self.encode_image(image, resize)
        return EditSession(self, latent, settings or GenerationSettings(), resize=resize,
                           source_size=image.size if image is not None else None)


def _batch(prompt: str | list[str], conditioning: TextConditioning | None, batch_size: int) -> int:
    """A list of prompts (or batched conditioning) sets the batch; one prompt is repeated batch_size times."""
    count = conditioning.txt.shape[0] if conditioning is not None else (
        len(prompt) if isinstance(prompt, list) else 1)
    if count > 1 and batch_size not in (1, count):
        raise ValueError(f"{count} prompts for a batch of {batch_size}; give one prompt or one per item")
    return max(count, batch_size)


def _prompt_text(prompt: str | list[str]) -> str:
    return prompt if isinstance(prompt, str) else " | ".join(prompt)


def _with_overrides(settings: GenerationSettings | None, overrides: dict[str, Any]) -> GenerationSettings:
    values = asdict(settings) if settings is not None else {}
    unknown = set(overrides) - set(GenerationSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values.update(overrides)
    return GenerationSettings(**values)


@dataclass
class Turn:
    index: int
    parent: int | None  # the turn this one edited (None for the starting image)
    prompt: str
    settings: GenerationSettings | None
    latent: torch.Tensor  # [1, 16, h, w]
    cache_stats: CacheStats | None = None
    # A masked turn's feathered mask [1, H, W] at the session's pixel size: its image is the parent's image with
    # the decoded latent composited through it. None: the turn's image is its decoded latent.
    mask: torch.Tensor | None = None


@dataclass
class EditSession:
    """Turn after turn of edits; each edit takes the previous turn's latent as its context directly.

    Skipping the decode/encode round trip keeps the AE from drifting the image a little more each
    turn; `roundtrip=True` on an edit re-encodes the decoded image instead, as a plain pipeline would.

    A masked turn changes only its region: outside the mask's latent (every latent pixel that covers no
    pixel of the region) its latent is the previous turn's, exactly, and its image (`image`, `export`) is
    the previous turn's image wherever the mask is 0, pixel for pixel.
    """

    pipeline: KontextPipeline
    start_latent: torch.Tensor
    settings: GenerationSettings
    turns: list[Turn] = field(default_factory=list)
    current: int = 0
    resize: str = "preferred"  # how an image joined into a stitched context is sized
    source_size: tuple[int, int] | None = None  # (W, H) of the image the session started from
    _images: dict[int, Image.Image] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.turns:
            self.turns.append(Turn(0, None, "", None, self.start_latent.float().cpu()))

    @property
    def latent(self) -> torch.Tensor:
        return self.turns[self.current].latent

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(width, height) of the session's images: what a turn's mask is drawn on."""
        return self.pipeline.pixel_size(self.start_latent)

    def edit(self, prompt: str, *, roundtrip: bool = False, conditioning: TextConditioning | None = None,
             extra_references: Sequence[torch.Tensor | Image.Image] = (), callback: StepCallback | None = None,
             mask: Any = None, grow: int = 0, feather: int = 0, **overrides: Any) -> Turn:
        """Edit the current turn; the result becomes a new turn and the current one.

        `mask`, `grow` and `feather` limit the turn to a region as `KontextPipeline.edit` does; an all-0 mask
        makes a turn equal to the current one. The mask is drawn on the session's images (`pixel_size`) or on
        the image the session started from (`source_size`, resized to fit); another size is resized with a
        warning. grow and feather count the session's pixels. `extra_references` are latents or images (images
        are encoded at the session's `resize`). With placement="stitch" the current turn and the
        `extra_references` (latents decoded) are joined into one context image (stitch_direction "right" or
        "down"), encoded at the session's `resize`."""
        settings = _with_overrides(self.settings, overrides)
        previous = self.latent
        plan = None
        if mask is not None:
            mask = as_mask(mask)
            if self.source_size is not None and (mask.shape[-1], mask.shape[-2]) == tuple(self.source_size):
                mask = fit_mask(mask, self.pixel_size, warn=False)  # the start image's mask: the same picture
            plan = MaskedEdit.prepare(mask, self.pixel_size, grow=grow, feather=feather)
            plan.check_batch(1)
            if plan.empty:
                return self._add(prompt, settings, previous.clone(), plan.weights)
            if plan.full:
                plan = None
        context = previous
        if roundtrip:
            context = self.pipeline.encode_image(self.pipeline.decode(context)[0], resize="keep")
        # The latent kept outside the mask is the current turn's own, even when the context is re-encoded.
        inpaint = LatentInpaint(plan.latent_mask(tuple(previous.shape[-2:])), previous) if plan else None
        result = self.pipeline.edit(None, prompt, settings=settings, context_latents=[context, *extra_references],
                                    conditioning=conditioning, callback=callback, decode=False, resize=self.resize,
                                    inpaint=inpaint)
        return self._add(prompt, result.settings, result.latents.cpu(), plan.weights if plan else None,
                         result.cache_stats)

    def _add(self, prompt: str, settings: GenerationSettings, latent: torch.Tensor,
             mask: torch.Tensor | None, cache_stats: CacheStats | None = None) -> Turn:
        turn = Turn(len(self.turns), self.current, prompt, settings, latent, cache_stats, mask)
        self.turns.append(turn)
        self.current = turn.index
        return turn

    def image(self, turn_index: int | None = None) -> Image.Image:
        """A turn's image (the current one's by default): its decoded latent, or for a masked turn the parent's
        image with the decoded edit composited through the turn's mask, so the parent's pixels stay where
        the mask is 0. The composite runs on the parent's 8-bit levels: those come back exactly.

        Each turn's image is made once and kept (turns never change): a chain of masked turns builds on its
        parents' images, which would otherwise be decoded again for every later turn."""
        index = self.current if turn_index is None else turn_index
        if index not in self._images:
            turn = self.turns[index]
            if turn.mask is None:
                self._images[index] = self.pipeline.decode(turn.latent)[0]
            else:
                parent = unit_images([self.image(turn.parent)])
                self._images[index] = from_unit_images(
                    composite(parent, self.pipeline.decode_unit(turn.latent), turn.mask))[0]
        return self._images[index]

    def branch(self, turn_index: int) -> Turn:
        """Make an earlier turn current: the next edit starts from it, later turns stay in the history."""
        if not 0 <= turn_index < len(self.turns):
            raise IndexError(f"no turn {turn_index}; this session has turns 0..{len(self.turns) - 1}")
        self.current = turn_index
        return self.turns[turn_index]

    def history(self) -> list[dict[str, Any]]:
        return [{"turn": t.index, "parent": t.parent, "prompt": t.prompt,
                 "settings": asdict(t.settings) if t.settings else None,
                 "latent_shape": list(t.latent.shape), "masked": t.mask is not None} for t in self.turns]

    def export(self, folder: str | Path) -> list[Path]:
        """Write every turn as turn_NN.png and the history as session.json (each file written atomically)."""
        from .files_out import write_json_atomic, write_png_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for turn in self.turns:
            image = self.image(turn.index)
            path = folder / f"turn_{turn.index:02d}.png"
            write_png_atomic(image, path, {"kontext": json.dumps(self.history()[turn.index])})
            paths.append(path)
        write_json_atomic({"turns": self.history(), "current": self.current}, folder / "session.json")
        return paths
