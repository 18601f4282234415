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
from typing import Any, Protocol, Sequence

import torch
from PIL import Image

from . import tiling
from .autoencoder import Autoencoder
from .cuda_graph import GraphedVelocity
from .lora import apply_lora
from .image import FIT_MODES, RESIZE_MODES, prepare_image, to_pil
from .sampling import SAMPLER_MODES, StepCallback, TextConditioning, denoise_schedule, noise_latent, sample_euler
from .text_encoders import check_text_encoders_fit
from .step_cache import OFF, CacheStats, StepCache
from .tokens import PLACEMENTS, context_tokens, pack_latent, position_ids, unpack_tokens
from .transformer import KontextTransformer

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
    images: list[Image.Image]
    settings: GenerationSettings
    prompt: str
    cache_stats: CacheStats | None = None  # steps computed and skipped, when settings.cache is on


class KontextPipeline:
    def __init__(self, transformer: KontextTransformer, autoencoder: Autoencoder,
                 text_encoders: PromptEncoder | None = None, cuda_graphs: bool = False):
        if text_encoders is not None:
            # A CLIP or T5 of another width would otherwise fail at the first step, deep in a matmul.
            check_text_encoders_fit(text_encoders, transformer.config)
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_encoders = text_encoders
        # Steps replayed from a CUDA graph where the model allows (CUDA, no hooks): for launch-bound steps.
        self.cuda_graphs = cuda_graphs
        self.ae_tiling = "auto"  # auto: tiles only when a full-size AE pass would not fit; always; never

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def image_multiple(self) -> int:
        """Image sizes must be multiples of this: the AE's downsampling times the 2x2 patch."""
        return self.autoencoder.config.downsample_factor * 2

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
        if resize not in RESIZE_MODES or fit not in FIT_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES} and fit one of {FIT_MODES}")
        pixels = prepare_image(image, resize, size, fit, self.image_multiple)
        ae = self.autoencoder
        with torch.no_grad():
            return tiling.encode(ae, pixels.to(device=ae.device, dtype=ae.dtype), self.ae_tiling).float()

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        ae = self.autoencoder
        with torch.no_grad():
            return to_pil(tiling.decode(ae, latents.to(device=ae.device, dtype=ae.dtype), self.ae_tiling))

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
    ) -> torch.Tensor:
        """The sampled target latent [B, 16, h, w]; batch size is the conditioning's.

        `loras` are applied on the fly for this call only and removed afterwards. With settings.cache on, the
        counts of computed and skipped steps are added to `cache_stats`.
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

        device = self.device
        ctx = ctx_ids = None
        if context_latents:
            references = [c.to(device=device, dtype=torch.float32).expand(batch, -1, -1, -1) for c in context_latents]
            ctx, ctx_ids = context_tokens(references, (height, width), settings.placement)
        use_cfg = settings.sampler == "true_cfg"
        if use_cfg and negative is None:
            raise ValueError("the true_cfg sampler needs a negative conditioning (negative prompt)")
        with ExitStack() as applied:
            for lora, strength in loras:
                applied.enter_context(apply_lora(self.transformer, lora, strength, mode="on_the_fly"))
            out = self._sample(start, height, width, batch, conditioning, timesteps, settings, ctx, ctx_ids,
                               negative if use_cfg else None, callback, cache_stats)
        if not bool(torch.isfinite(out).all()):  # one check per generation: a black image would say nothing
            raise FloatingPointError(
                f"sampling produced NaN or infinite values (transformer in {self.transformer.dtype}). fp16 overflows "
                "in FLUX's activations: load the model in bf16 or fp8; a LoRA at a very high strength does the same."
            )
        return unpack_tokens(out, height, width).float()

    def _sample(self, start, height, width, batch, conditioning, timesteps, settings, ctx, ctx_ids, negative,
                callback, cache_stats=None) -> torch.Tensor:
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
            step_cache=step_cache, cache_stats=cache_stats,
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
        prompt: str = "",
        *,
        settings: GenerationSettings | None = None,
        context_latents: Sequence[torch.Tensor] | None = None,
        conditioning: TextConditioning | None = None,
        size: tuple[int, int] | None = None,  # (width, height) of the output in pixels
        resize: str = "preferred",
        fit: str = "stretch",
        batch_size: int = 1,
        callback: StepCallback | None = None,
        decode: bool = True,
        loras: Sequence[LoraSpec] = (),
        **overrides: Any,
    ) -> EditResult:
        """Edit `images` (the first is the one edited; more are extra references) with `prompt`.

        Instead of images, `context_latents` may be given directly (multi-turn chaining). Keyword
        overrides (steps, guidance, seed, denoise, sampler, true_cfg, negative_prompt, placement, cache)
        update `settings`; cache="first-block:0.12" (or a StepCache) skips the blocks on steps whose input
        barely changed, and the result's cache_stats then counts the skipped steps.
        """
        settings = _with_overrides(settings, overrides)
        batch_size = _batch(prompt, conditioning, batch_size)
        cond, negative = self._conditioning(prompt, conditioning, settings, batch_size)
        if context_latents is None:
            if images is None:
                raise ValueError("edit needs images or context_latents")
            pictures = [images] if isinstance(images, Image.Image) else list(images)
            context_latents = [self.encode_image(p, resize, None, fit) for p in pictures]
        context_latents = list(context_latents)
        if len(context_latents) > 1 and settings.placement == "kontext":
            settings = _with_overrides(settings, {"placement": "offset"})
        latent_size = self.latent_size(*size) if size is not None else None
        cache_stats = CacheStats() if settings.cache != OFF else None
        latents = self.generate(cond, settings, context_latents=context_latents, latent_size=latent_size,
                                init_latent=context_latents[0] if settings.denoise < 1 else None,
                                negative=negative, callback=callback, loras=loras, cache_stats=cache_stats)
        return EditResult(latents, self.decode(latents) if decode else [], settings, _prompt_text(prompt),
                          cache_stats)

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
        return EditSession(self, latent, settings or GenerationSettings())


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


@dataclass
class EditSession:
    """Turn after turn of edits; each edit takes the previous turn's latent as its context directly.

    Skipping the decode/encode round trip keeps the AE from drifting the image a little more each
    turn; `roundtrip=True` on an edit re-encodes the decoded image instead, as a plain pipeline would.
    """

    pipeline: KontextPipeline
    start_latent: torch.Tensor
    settings: GenerationSettings
    turns: list[Turn] = field(default_factory=list)
    current: int = 0

    def __post_init__(self) -> None:
        if not self.turns:
            self.turns.append(Turn(0, None, "", None, self.start_latent.float().cpu()))

    @property
    def latent(self) -> torch.Tensor:
        return self.turns[self.current].latent

    def edit(self, prompt: str, *, roundtrip: bool = False, conditioning: TextConditioning | None = None,
             extra_references: Sequence[torch.Tensor] = (), callback: StepCallback | None = None,
             **overrides: Any) -> Turn:
        """Edit the current turn; the result becomes a new turn and the current one."""
        settings = _with_overrides(self.settings, overrides)
        context = self.latent
        if roundtrip:
            context = self.pipeline.encode_image(self.pipeline.decode(context)[0], resize="keep")
        result = self.pipeline.edit(None, prompt, settings=settings, context_latents=[context, *extra_references],
                                    conditioning=conditioning, callback=callback, decode=False)
        turn = Turn(len(self.turns), self.current, prompt, result.settings, result.latents.cpu(),
                    result.cache_stats)
        self.turns.append(turn)
        self.current = turn.index
        return turn

    def branch(self, turn_index: int) -> Turn:
        """Make an earlier turn current: the next edit starts from it, later turns stay in the history."""
        if not 0 <= turn_index < len(self.turns):
            raise IndexError(f"no turn {turn_index}; this session has turns 0..{len(self.turns) - 1}")
        self.current = turn_index
        return self.turns[turn_index]

    def history(self) -> list[dict[str, Any]]:
        return [{"turn": t.index, "parent": t.parent, "prompt": t.prompt,
                 "settings": asdict(t.settings) if t.settings else None,
                 "latent_shape": list(t.latent.shape)} for t in self.turns]

    def export(self, folder: str | Path) -> list[Path]:
        """Write every turn as turn_NN.png and the history as session.json (each file written atomically)."""
        from .files_out import write_json_atomic, write_png_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for turn in self.turns:
            image = self.pipeline.decode(turn.latent)[0]
            path = folder / f"turn_{turn.index:02d}.png"
            write_png_atomic(image, path, {"kontext": json.dumps(self.history()[turn.index])})
            paths.append(path)
        write_json_atomic({"turns": self.history(), "current": self.current}, folder / "session.json")
        return paths
