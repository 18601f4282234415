"""The sampler's per-step callback in ComfyUI: progress bar, latent preview, Cancel button."""

from __future__ import annotations

import torch

from kontext_core import unpack_tokens
from kontext_core.sampling import StepCallback, StepInfo

from . import comfy_adapter


def denoised_latent(info: StepInfo, height: int, width: int) -> torch.Tensor:
    """The model's current guess of the clean latent [B, 16, h, w] (what previews show).

    On the straight path x_t = (1 - t) x_0 + t * noise the velocity is noise - x_0, so
    x_0 = x_t - t * v; the step's latent sits at t_next.
    """
    return unpack_tokens(info.latent - info.t_next * info.velocity, height, width)


def step_callback(latent_hw: tuple[int, int], *, offset: int = 0, total: int | None = None) -> StepCallback:
    """A callback for `KontextPipeline.generate`: checks for Cancel, then advances the node's progress bar
    with a preview of the first image of the batch.

    A node that samples several times (the loop) passes `offset` (steps already done) and `total` (all
    its steps) so that one bar spans the whole run; otherwise the bar spans the steps the sampler
    actually runs (denoise < 1 runs fewer than `steps`).
    """
    height, width = latent_hw
    state: dict = {}

    def on_step(info: StepInfo) -> None:
        comfy_adapter.check_interrupted()
        span = total if total is not None else info.total
        if "bar" not in state:
            state["bar"] = comfy_adapter.progress_bar(span)
            state["preview"] = comfy_adapter.latent_previewer()
        preview = None
        if state["preview"] is not None:
            preview = state["preview"](denoised_latent(info, height, width)[:1].float())
        state["bar"].update_absolute(offset + info.step + 1, span, preview)

    return on_step
