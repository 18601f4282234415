"""Multi-turn editing: start a session from an image, edit turn after turn, go back to any turn, loop prompts.

A KONTEXT_SESSION wire carries a `SessionState`: the core's turns (latents), which turn is current,
the decoded image of each turn, and references to the models (never the models themselves, so a
model release is not held up by ComfyUI's output cache). Nodes never change a state they receive:
ComfyUI may hand the same output to several nodes (branches), so each edit returns a new state.
Each edit runs through the core's `EditSession`, so a chain of nodes equals a chain of `.edit` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from kontext_core import EditSession, GenerationSettings
from kontext_core.masks import composite
from kontext_core.pipeline import DEFAULT_GUIDANCE, Turn
from kontext_core.step_cache import StepCache

from . import comfy_adapter, convert, resolve
from .edit import GUIDANCE_TOOLTIP, mask_widgets, placement_widgets
from .images import RESIZE_CHOICES, RESIZE_TOOLTIP, _vae_socket
from .model_cache import TextEncodersRef, TransformerRef
from .step_cache import CACHE_TOOLTIP, report
from .progress import step_callback
from .schema import (MODEL, SESSION, STEP_CACHE, TEXT_ENCODERS, Combo, Float, Int, KontextNode, NodeResult, Output,
                     Seed, Socket, String, node_spec)

SESSION_SAMPLERS = ("dev", "distilled")


@dataclass(frozen=True)
class SessionState:
    model: TransformerRef
    vae: Any  # AutoencoderRef, or ComfyUI's VAE
    text_encoders: TextEncodersRef | None
    settings: GenerationSettings
    turns: tuple[Turn, ...]
    current: int
    images: tuple[torch.Tensor, ...]  # IMAGE [1, H, W, 3] of each turn
    resize: str = "preferred"  # the start's; also how images joined into a stitched context are sized
    source_size: tuple[int, int] | None = None  # (W, H) of the start image: masks drawn on it fit quietly

    @property
    def image(self) -> torch.Tensor:
        return self.images[self.current]

    def all_images(self) -> torch.Tensor:
        return torch.cat(self.images)


def _check_state(session: Any) -> SessionState:
    if not isinstance(session, SessionState):
        raise TypeError(f"expected a session from Kontext Start Session, got {type(session).__name__}")
    return session


def start(model: TransformerRef, vae: Any, image: torch.Tensor, *, text_encoders: TextEncodersRef | None = None,
          resize: str = "preferred", sampler: str = "dev") -> SessionState:
    pipe = resolve.pipeline(model, vae)
    image = convert.check_image(image)[:1]
    latent = resolve.encode_images(pipe.autoencoder, [image], resize)[0]
    session = pipe.session(latent=latent, settings=GenerationSettings(sampler=sampler))
    first = session.turns[0]
    return SessionState(model, vae, text_encoders, session.settings, (first,), 0,
                        (resolve.decode_image(pipe.autoencoder, first.latent),), resize,
                        (image.shape[2], image.shape[1]))


def edit(state: SessionState, prompt: str = "", *, seed: int = 0, steps: int = 28, guidance: float = DEFAULT_GUIDANCE,
         conditioning: Any = None, text_encoders: TextEncodersRef | None = None,
         references: Sequence[torch.Tensor] = (), progress: tuple[int, int] | None = None, mask: Any = None,
         grow: int = 0, feather: int = 0, placement: str = "auto", stitch_direction: str = "right",
         cache: StepCache | None = None) -> SessionState:
    """One more turn from the current one; `references` are extra IMAGEs (a style, a character). With `mask`
    only its region changes: the turn's image is the previous one's wherever the mask is 0. With placement
    stitch the current turn's image and the references are joined into one context image, as `stitch_direction`
    says."""
    state = _check_state(state)
    pipe = resolve.pipeline(state.model, state.vae)
    overrides: dict[str, Any] = dict(seed=seed, steps=steps, guidance=guidance, stitch_direction=stitch_direction,
                                     cache=cache)
    reference_latents: list[torch.Tensor] = []
    if conditioning is not None:
        config = pipe.transformer.config
        cond = convert.conditioning_from_comfy(conditioning, "conditioning", config.context_in_dim, config.vec_in_dim)
        text = cond.text
        reference_latents = cond.reference_latents
        if cond.guidance is not None:
            overrides["guidance"] = cond.guidance
        if cond.reference_method is not None:
            overrides["placement"] = cond.reference_method
    else:
        encoders = text_encoders or state.text_encoders
        if encoders is None:
            raise ValueError("no way to read the prompt: connect Load Kontext Text Encoders to this node or to Kontext "
                             "Start Session, or connect a CONDITIONING.")
        text = resolve.encode_prompts(encoders, [prompt], pipe.transformer.config)
    if placement != "auto":
        overrides["placement"] = placement
    if overrides.get("placement", state.settings.placement) == "stitch":
        # Joined in pixels with the turn's image: encoding them first would only mean decoding them again.
        extra = [picture for image in references for picture in convert.image_to_pil(image, "reference")]
    else:
        extra = resolve.encode_images(pipe.autoencoder, references, "preferred")
    extra += reference_latents

    session = EditSession(pipe, state.turns[0].latent, state.settings, turns=list(state.turns), current=state.current,
                          resize=state.resize, source_size=state.source_size)
    offset, total = progress if progress is not None else (0, None)
    callback = step_callback(tuple(state.turns[state.current].latent.shape[-2:]), offset=offset, total=total)
    with resolve.compile_failures_explained(state.model):
        turn = session.edit(prompt, conditioning=text, extra_references=extra, callback=callback, mask=mask,
                            grow=grow, feather=feather, **overrides)
    report(turn.cache_stats, turn.settings.cache, f"turn {turn.index}")
    image = resolve.decode_image(pipe.autoencoder, turn.latent)
    if turn.mask is not None:  # the previous turn's pixels, exactly, wherever the mask is 0
        image = composite(state.images[turn.parent], image, turn.mask)
    return replace(state, turns=(*state.turns, turn), current=turn.index, images=(*state.images, image))


def pick(state: SessionState, turn: int) -> SessionState:
    state = _check_state(state)
    if not 0 <= turn < len(state.turns):
        raise ValueError(f"there is no turn {turn}: this session has turns 0 to {len(state.turns) - 1}.")
    return replace(state, current=turn)


def loop(state: SessionState, prompts: str, *, seed: int = 0, steps: int = 28, guidance: float = DEFAULT_GUIDANCE,
         text_encoders: TextEncodersRef | None = None, mask: Any = None, grow: int = 0,
         feather: int = 0, cache: StepCache | None = None) -> SessionState:
    """One turn per non-empty line, each editing the one before; turn i uses seed + i; `mask` limits every turn."""
    lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no prompts: write one instruction per line.")
    for number, line in enumerate(lines):
        state = edit(state, line, seed=(seed + number) % 2**64, steps=steps, guidance=guidance,
                     text_encoders=text_encoders, progress=(number * steps, len(lines) * steps), mask=mask, grow=grow,
                     feather=feather, cache=cache)
    return state


def turns_ui(state: SessionState) -> dict:
    """What the page shows after the node ran: every turn's image, and for the thumbnail strip which turn is which."""
    ui: dict = {"kontext_turns": [{"turn": t.index, "parent": t.parent, "prompt": t.prompt,
                                   "current": t.index == state.current} for t in state.turns]}
    previews = comfy_adapter.preview_images(state.all_images())
    if previews is not None:
        ui["kontext_images"] = previews["images"]
    return ui


def _outputs(state: SessionState) -> NodeResult:
    latent = convert.latent_to_comfy(state.turns[state.current].latent)
    return NodeResult((state, state.image, latent), ui=turns_ui(state))


_SESSION_OUTPUTS = [Output(SESSION, "session"), Output("IMAGE", "image"), Output("LATENT", "latent")]


def _turn_widgets() -> list:
    return [Seed(), Int("steps", 28, 1, 10000), Float("guidance", DEFAULT_GUIDANCE, 0.0, 100.0, step=0.1,
                                                    tooltip=GUIDANCE_TOOLTIP)]


class KontextStartSession(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextStartSession", "Kontext Start Session",
            "Starts a multi-turn edit from an image. Each Kontext Edit Turn after it edits the previous turn directly "
            "in latent space (no VAE round trip, so the image does not degrade turn after turn).",
            [
                Socket("model", MODEL),
                _vae_socket(),
                Socket("image", "IMAGE", tooltip="The starting image (the first of a batch)."),
                Socket("text_encoders", TEXT_ENCODERS, optional=True,
                       tooltip="Lets the turn nodes read their prompts without their own text encoders."),
                Combo("resize", RESIZE_CHOICES, "preferred", tooltip=RESIZE_TOOLTIP),
                Combo("sampler", SESSION_SAMPLERS, "dev",
                      tooltip="distilled for step-distilled models and turbo LoRAs."),
            ],
            _SESSION_OUTPUTS,
        )

    @classmethod
    def run(cls, model, vae, image, resize: str = "preferred", sampler: str = "dev",
            text_encoders=None) -> NodeResult:
        return _outputs(start(model, vae, image, text_encoders=text_encoders, resize=resize, sampler=sampler))


class KontextEditTurn(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextEditTurn", "Kontext Edit Turn",
            "Edits the session's current turn with an instruction; the result becomes a new turn. Chain these for a "
            "conversation of edits, or branch with Kontext Pick Turn.",
            [
                Socket("session", SESSION),
                String("prompt", multiline=True, tooltip="The instruction for this turn."),
                Socket("text_encoders", TEXT_ENCODERS, optional=True,
                       tooltip="Needed unless Kontext Start Session has them or conditioning is connected."),
                Socket("conditioning", "CONDITIONING", optional=True, tooltip="Used instead of the prompt."),
                Socket("reference", "IMAGE", optional=True,
                       tooltip="Extra reference images for this turn (a style, a character, an object)."),
                Socket("cache", STEP_CACHE, optional=True, tooltip=CACHE_TOOLTIP),
                Socket("mask", "MASK", optional=True,
                       tooltip="Where this turn edits (white = edit), drawn on the start image (Load Image's mask) or "
                               "on the session's images. Wherever it is 0 the turn's image is the previous turn's, "
                               "pixel for pixel."),
                *_turn_widgets(),
                *mask_widgets(),
                *placement_widgets(),
            ],
            _SESSION_OUTPUTS,
        )

    @classmethod
    def run(cls, session, prompt: str = "", seed: int = 0, steps: int = 28, guidance: float = DEFAULT_GUIDANCE,
            grow: int = 0, feather: int = 0, placement: str = "auto", stitch_direction: str = "right",
            text_encoders=None, conditioning=None, reference=None, mask=None, cache=None) -> NodeResult:
        return _outputs(edit(session, prompt, seed=seed, steps=steps, guidance=guidance, conditioning=conditioning,
                             text_encoders=text_encoders, references=[reference] if reference is not None else [],
                             mask=mask, grow=grow, feather=feather, placement=placement,
                             stitch_direction=stitch_direction, cache=cache))


class KontextPickTurn(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextPickTurn", "Kontext Pick Turn",
            "Goes back to an earlier turn: the next edit starts from it, and the later turns stay in the history. "
            "After a run, click a thumbnail to pick its turn.",
            [Socket("session", SESSION), Int("turn", 0, 0, 9999, tooltip="0 is the starting image.")],
            _SESSION_OUTPUTS,
        )

    @classmethod
    def run(cls, session, turn: int = 0) -> NodeResult:
        return _outputs(pick(session, turn))


class KontextEditLoop(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextEditLoop", "Kontext Edit Loop",
            "Runs one edit turn per line of the prompt box, each on the result of the one before. Outputs every turn "
            "of the session as an image batch (turn 0, the start, first).",
            [
                Socket("session", SESSION),
                String("prompts", multiline=True, tooltip="One instruction per line; empty lines are skipped."),
                Socket("text_encoders", TEXT_ENCODERS, optional=True,
                       tooltip="Needed unless Kontext Start Session has them."),
                Socket("cache", STEP_CACHE, optional=True, tooltip=CACHE_TOOLTIP),
                Socket("mask", "MASK", optional=True,
                       tooltip="Limits every turn to this region (white = edit); elsewhere each turn keeps the one "
                               "before, pixel for pixel."),
                *_turn_widgets(),
                *mask_widgets(),
            ],
            [Output(SESSION, "session"), Output("IMAGE", "images")],
        )

    @classmethod
    def run(cls, session, prompts: str = "", seed: int = 0, steps: int = 28, guidance: float = DEFAULT_GUIDANCE,
            grow: int = 0, feather: int = 0, text_encoders=None, mask=None, cache=None) -> NodeResult:
        state = loop(session, prompts, seed=seed, steps=steps, guidance=guidance, text_encoders=text_encoders,
                     mask=mask, grow=grow, feather=feather, cache=cache)
        return NodeResult((state, state.all_images()), ui=turns_ui(state))
