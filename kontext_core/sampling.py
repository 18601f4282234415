"""Flow-matching schedules and the Euler sampler (guidance-distilled [dev], few-step, true CFG).

The latent moves from noise (t = 1) to image (t = 0) along the model's velocity:
x <- x + (t_next - t) * v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .compute.attention import frozen_statistics
from .compute.fused import hooked
from .step_cache import CacheStats, StepCache
from .model.transformer import KontextTransformer

BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
SAMPLER_MODES = ("dev", "distilled", "true_cfg")


def shift_mu(image_seq_len: int, base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """The schedule shift, linear in the target's token count (256 tokens -> 0.5, 4096 -> 1.15).

    Only the target tokens count: context tokens do not move the schedule, as in the reference.
    """
    slope = (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return slope * image_seq_len + (base_shift - slope * BASE_SEQ_LEN)


def flux_schedule(steps: int, image_seq_len: int, *, shift: bool = True,
                  base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> list[float]:
    """steps + 1 timesteps from 1 to 0; with `shift`, bent towards 1 for larger images.

    Computed in float32 like the reference, so the values match it to the last bit.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    timesteps = torch.linspace(1, 0, steps + 1)
    if shift:
        mu = shift_mu(image_seq_len, base_shift, max_shift)
        timesteps = math.exp(mu) / (math.exp(mu) + (1 / timesteps - 1))
    return timesteps.tolist()


def denoise_schedule(steps: int, image_seq_len: int, denoise: float = 1.0, *, shift: bool = True) -> list[float]:
    """The last `steps` steps of the schedule that `steps / denoise` steps would take (ComfyUI's meaning).

    denoise 1 starts from pure noise; 0.6 starts at the point of a longer schedule where 60% of the
    way remains, so an edit keeps the structure of the starting image.
    """
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return flux_schedule(total, image_seq_len, shift=shift)[-(steps + 1):]


def noise_latent(latent: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """The point at time t on the straight path from `latent` (t = 0) to `noise` (t = 1)."""
    return (1.0 - t) * latent + t * noise


@dataclass
class TextConditioning:
    txt: torch.Tensor  # [B, L, 4096] T5 hidden states
    y: torch.Tensor  # [B, 768] CLIP pooled

    def batched_with(self, other: "TextConditioning") -> "TextConditioning":
        """One batch of [self, other]; the shorter text is zero-padded (its tokens attend nothing new)."""
        length = max(self.txt.shape[1], other.txt.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1]))

        return TextConditioning(torch.cat((pad(self.txt), pad(other.txt))), torch.cat((self.y, other.y)))


@dataclass
class StepInfo:
    step: int  # 0-based
    total: int
    t: float
    t_next: float
    latent: torch.Tensor  # tokens after this step, float32 (float64 for a float64 model)
    velocity: torch.Tensor


StepCallback = Callable[[StepInfo], None]


def sample_euler(
    model: KontextTransformer,
    x: torch.Tensor,  # [B, L, 64] starting tokens (noise, or a noised latent when denoise < 1)
    x_ids: torch.Tensor,  # [B, L, 3]
    cond: TextConditioning,
    timesteps: list[float],
    *,
    guidance: float | None = 2.5,
    context: torch.Tensor | None = None,
    context_ids: torch.Tensor | None = None,
    negative: TextConditioning | None = None,
    true_cfg: float = 1.0,
    callback: StepCallback | None = None,
    velocity_fn: Callable[..., torch.Tensor] | None = None,
    step_cache: StepCache | str | None = None,
    cache_stats: CacheStats | None = None,
    blend: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    batched_modulation: bool = False,
    attention_statistics_refresh: int = 0,
) -> torch.Tensor:
    """Euler integration of the flow; the latent is kept in float32 (or float64) between steps.

    With `negative` and true_cfg > 1, positive and negative predictions come from one batched forward
    and are combined as v_neg + true_cfg * (v_pos - v_neg). `velocity_fn` stands in for
    `model.velocity` (same arguments), e.g. a CUDA-graphed one. `step_cache` skips the blocks on steps
    whose input barely changed (kontext_core/step_cache.py); its counts are added to `cache_stats`.
    `blend(x, t_next)` rewrites the latent after each step (a masked edit puts back the noised original
    outside its mask: masks.LatentInpaint). `batched_modulation` computes every step's modulation vectors
    before the first step (`KontextTransformer.modulation_table`): ~3 ms a step less on an H200 at 1024², equal to
    the per-step values up to the GEMMs' rounding; not with step caching or a model with hooks (block
    offload), which then compute them each step. `attention_statistics_refresh` > 0: with the 'sage8' attention
    backend on a GPU with fp8 tensor cores, every that-many steps (the first included) records each layer's K mean and
    V amax, and the steps between quantize q, k and v with them in the QK-norm + RoPE pass
    (kontext_kernels/sage_qkv.py: one pass instead of five a layer; softmax does not depend on the mean taken off K,
    and V's scale keeps headroom for growth since the recording). 0: every step quantizes with its own statistics.
    """
    if attention_statistics_refresh < 0:
        raise ValueError(f"attention_statistics_refresh must be 0 (off) or a number of steps, not "
                         f"{attention_statistics_refresh}")
    step_cache = StepCache.parse(step_cache)
    if step_cache is not None and velocity_fn is not None:
        raise ValueError("step caching decides on the host at every step whether to run the blocks, which a "
                         "velocity_fn (a CUDA graph replay) cannot do; pass one or the other")
    batch = x.shape[0]
    device, dtype = model.device, model.dtype
    state_dtype = torch.promote_types(dtype, torch.float32)
    x = x.to(device=device, dtype=state_dtype)
    use_cfg = negative is not None and true_cfg != 1.0
    text = cond.batched_with(negative) if use_cfg else cond
    copies = 2 if use_cfg else 1
    txt = text.txt.to(device=device, dtype=dtype)
    y = text.y.to(device=device, dtype=dtype)
    txt_ids = torch.zeros(batch * copies, txt.shape[1], 3, device=device, dtype=x_ids.dtype)
    ids = x_ids.to(device).repeat(copies, 1, 1)
    ctx = context.to(device=device, dtype=dtype).repeat(copies, 1, 1) if context is not None else None
    ctx_ids = context_ids.to(device).repeat(copies, 1, 1) if context_ids is not None else None
    guidance_vec = (torch.full((batch * copies,), float(guidance), device=device)
                    if model.config.guidance_embed else None)
    velocity_of = velocity_fn or model.velocity
    if step_cache is not None:
        # The cache's state is made here and dropped on return: nothing cached outlives the run, whose seed,
        # prompt, batch and LoRAs are fixed.
        cache_run = step_cache.start(len(timesteps) - 1, branches=copies, stats=cache_stats)
        velocity_of = partial(model.velocity, step_cache=cache_run)
    table = None
    if batched_modulation and step_cache is None and not hooked(model):
        # Every step's t as the loop's torch.full makes it (float32), so each row equals that step's.
        step_times = torch.tensor(timesteps[:-1], dtype=torch.float32, device=device)
        with torch.no_grad():
            table = model.modulation_table(step_times, y, guidance_vec)

    for step, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((batch * copies,), t, device=device)
        model_in = x.to(dtype)
        if copies > 1:  # true CFG: positive and negative rows in one batch
            model_in = model_in.repeat(copies, 1, 1)
        extra = () if table is None else (table[step],)
        if attention_statistics_refresh == 0:
            statistics = "off"
        else:
            statistics = "record" if step % attention_statistics_refresh == 0 else "reuse"
        with frozen_statistics(statistics):
            velocity = velocity_of(model_in, ids, txt, txt_ids, t_vec, y, guidance_vec, ctx, ctx_ids,
                                   *extra).to(state_dtype)
        if use_cfg:
            positive, negative_v = velocity.chunk(2)
            velocity = negative_v + true_cfg * (positive - negative_v)
        x = x + (t_next - t) * velocity
        if blend is not None:
            x = blend(x, t_next)
        if callback is not None:
            callback(StepInfo(step, len(timesteps) - 1, t, t_next, x, velocity))
    return x
