"""Step caching: on a step whose input barely changed since the last computed one, skip the transformer's
blocks and reuse the change they made then. Opt-in and approximate; threshold 0 computes every step exactly.

Two ways to decide, both watching something cheap at the start of the step:

- "first-block" (First-Block Cache, as in para-attn's FBCache): run the first double block and compare the change
  it made to the image tokens with that change at the last computed step (relative L1). Below the threshold, the
  other 56 blocks are skipped and the change they made at the last computed step is added instead.
- "teacache" (TeaCache): compare the first double block's modulated image input, LayerNorm(img) * (1 + scale) +
  shift, with the previous step's, rescale the relative L1 by a polynomial fitted on FLUX and add it up over
  the steps; while the sum stays below the threshold every block is skipped and the change the whole block stack
  made at the last computed step is added to the input. A computed step resets the sum.

What is cached is defined on what reaches the final layer: the image tokens (target, then any context) after
the last single block. The text tokens leave the model there, so nothing of theirs is kept. Each mode keeps two
such tensors between steps ([B, L_img, hidden]: ~50 MB each for a 1024x1024 edit with one reference, in bf16).

The first and last steps are always computed. A run's state (`CacheRun`) is made when sampling starts and
dropped when it ends: a new seed, prompt, turn, batch size or LoRA starts from nothing, as it must.
With true CFG the positive and negative rows of one batched forward are separate branches: each is measured
(and, for TeaCache, accumulated) on its own, and a step is skipped only when every branch may skip.

Each decision reads one number per branch back to the host, a synchronisation per step, so a cached run is
never replayed from a CUDA graph (the pipeline runs it eagerly). Blocks are still called as modules: compiled
blocks and block offload work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model.layers import RopeFrequencies
    from .model.transformer import KontextTransformer

CACHE_MODES = ("first-block", "teacache")
OFF = "off"
# Community defaults for FLUX.1 [dev] text-to-image (para-attn's FBCache example; TeaCache4FLUX's ~1.8x setting),
# not measured on Kontext edits: judge them on your own weights and images.
DEFAULT_THRESHOLDS = {"first-block": 0.12, "teacache": 0.4}
_ALIASES = {"fbcache": "first-block", "first_block": "first-block", "tea": "teacache"}

# TeaCache's rescaling of the modulated input's relative L1 for FLUX (highest power first): the published
# coefficients of ali-vilab/TeaCache's TeaCache4FLUX, used as data. The polynomial is at least 0.18 for any
# distance, so a TeaCache threshold under 0.18 never skips a step.
TEACACHE_FLUX_POLYNOMIAL = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)


@dataclass
class CacheStats:
    """How many steps of a run computed the blocks and which ones reused the cache."""

    computed: int = 0
    skipped_steps: list[int] = field(default_factory=list)  # 0-based step indexes
    # What each judged step compared with the threshold (the largest over the branches): first-block's relative
    # L1, teacache's running sum. What thresholds would skip on a given model can be read from it.
    measures: dict[int, float] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return len(self.skipped_steps)

    @property
    def steps(self) -> int:
        return self.computed + self.skipped

    @property
    def skip_ratio(self) -> float:
        return self.skipped / self.steps if self.steps else 0.0

    def record(self, step: int, skipped: bool) -> None:
        if skipped:
            self.skipped_steps.append(step)
        else:
            self.computed += 1

    def __str__(self) -> str:
        return (f"{self.computed} of {self.steps} steps computed, {self.skipped} from the cache "
                f"({self.skip_ratio:.0%} skipped)")


@dataclass(frozen=True)
class StepCache:
    """Which cache and its threshold; `StepCache.parse("first-block:0.12")` reads the text form."""

    mode: str
    threshold: float | None = None  # None: the mode's default (DEFAULT_THRESHOLDS)

    def __post_init__(self) -> None:
        mode = _ALIASES.get(self.mode, self.mode)
        if mode not in CACHE_MODES:
            raise ValueError(f"unknown step cache {self.mode!r}; choose {' or '.join(CACHE_MODES)} (or {OFF!r})")
        threshold = DEFAULT_THRESHOLDS[mode] if self.threshold is None else float(self.threshold)
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"the step cache threshold must be a finite number >= 0 (0 computes every step), "
                             f"got {self.threshold}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "threshold", threshold)

    @classmethod
    def parse(cls, spec: "str | StepCache | None") -> "StepCache | None":
        """"first-block", "teacache:0.4", "off" (or "", None) -> a StepCache, or None for no caching."""
        if spec is None or isinstance(spec, StepCache):
            return spec
        text = str(spec).strip().lower()
        if text in ("", OFF, "none"):
            return None
        mode, colon, threshold = text.partition(":")
        if not colon:
            return cls(mode)
        try:
            value = float(threshold)
        except ValueError:
            raise ValueError(f"step cache {spec!r}: {threshold!r} is not a number; write e.g. "
                             f"'first-block:0.12' or 'teacache:0.4'") from None
        return cls(mode, value)

    def __str__(self) -> str:
        return f"{self.mode}:{self.threshold:g}"

    def start(self, steps: int, branches: int = 1, stats: CacheStats | None = None) -> "CacheRun":
        """A fresh state for one sampling run of `steps` steps, one forward per step whose batch holds `branches`
        equal parts (2 for batched true CFG); counts go to `stats`."""
        run_kind = FirstBlockRun if self.mode == "first-block" else TeaCacheRun
        return run_kind(self.threshold, steps, branches, stats if stats is not None else CacheStats())


def relative_l1(current: torch.Tensor, previous: torch.Tensor, branches: int = 1, layout=None) -> list[float]:
    """mean|current - previous| / mean|previous| of each branch (the batch cut into `branches` equal parts, in
    order), accumulated in float32. One read back to the host.

    With `layout` (a sequence_parallel.ShardLayout: the tensors hold this process's chunk of the image tokens),
    the sums run over every process's real tokens, so that all processes take the same decision."""
    if layout is not None:
        return _relative_l1_split(current, previous, branches, layout)
    current, previous = current.reshape(branches, -1), previous.reshape(branches, -1)
    change = (current - previous).abs().mean(dim=1, dtype=torch.float32)
    return (change / previous.abs().mean(dim=1, dtype=torch.float32)).tolist()


def _relative_l1_split(current: torch.Tensor, previous: torch.Tensor, branches: int, layout) -> list[float]:
    real = layout.image.real(layout.rank)  # the chunk's padding rows are not tokens
    current = current[:, :real].reshape(branches, -1)
    previous = previous[:, :real].reshape(branches, -1)
    sums = torch.stack(((current - previous).abs().sum(dim=1, dtype=torch.float32),
                        previous.abs().sum(dim=1, dtype=torch.float32)))
    layout.all_reduce_sum(sums)
    return (sums[0] / sums[1]).tolist()


def teacache_rescale(distance: float) -> float:
    value = 0.0
    for coefficient in TEACACHE_FLUX_POLYNOMIAL:
        value = value * distance + coefficient
    return value


class CacheRun:
    """One sampling run's cache: what the last computed step left behind, and the counts.

    The transformer's forward calls `run_blocks` in place of its own block stack, once per step.
    """

    def __init__(self, threshold: float, steps: int, branches: int, stats: CacheStats):
        self.threshold = threshold
        self.steps = steps
        self.branches = branches
        self.stats = stats
        self._step = 0

    def run_blocks(self, model: KontextTransformer, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                   rope: RopeFrequencies, layout=None) -> torch.Tensor:
        """The image tokens' hidden states for the final layer [B, L_img, hidden], computed or from the cache.
        `layout`: the forward's split over processes (sequence_parallel.ShardLayout), None in one process."""
        step = self._step
        self._step += 1
        must_compute = step == 0 or step >= self.steps - 1
        hidden, skipped = self._blocks_or_cache(model, img, txt, vec, rope, must_compute, layout)
        self.stats.record(step, skipped)
        return hidden

    def _blocks_or_cache(self, model, img, txt, vec, rope, must_compute: bool, layout) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def _may_skip(self, measures: list[float]) -> bool:
        self.stats.measures[self._step - 1] = max(measures)
        # NaN (a measure against an all-zero reference) compares False: the step is computed.
        return all(measure < self.threshold for measure in measures)


class FirstBlockRun(CacheRun):
    def __init__(self, *args):
        super().__init__(*args)
        self._first_change: torch.Tensor | None = None  # first block's change to img at the last computed step
        self._rest_change: torch.Tensor | None = None  # the other blocks' change to img then

    def _blocks_or_cache(self, model, img, txt, vec, rope, must_compute, layout):
        first_img, first_txt = model.double_blocks[0](img, txt, vec, rope)
        first_change = first_img - img
        if (not must_compute and self._first_change is not None
                and self._may_skip(relative_l1(first_change, self._first_change, self.branches, layout))):
            return first_img + self._rest_change, True
        hidden = model.run_blocks(first_img, first_txt, vec, rope, first=1)
        self._first_change, self._rest_change = first_change, hidden - first_img
        return hidden, False


class TeaCacheRun(CacheRun):
    def __init__(self, *args):
        super().__init__(*args)
        self._previous_input: torch.Tensor | None = None  # the modulated input of the step before
        self._accumulated = [0.0] * self.branches
        self._residual: torch.Tensor | None = None  # the block stack's change to img at the last computed step

    def _blocks_or_cache(self, model, img, txt, vec, rope, must_compute, layout):
        watched = _through_block_hooks(model.double_blocks[0], "image_attention_input", img, vec)
        previous, self._previous_input = self._previous_input, watched
        if not must_compute and previous is not None:
            distances = relative_l1(watched, previous, self.branches, layout)
            self._accumulated = [total + teacache_rescale(d) for total, d in zip(self._accumulated, distances)]
            if self._may_skip(self._accumulated):
                return img + self._residual, True
        self._accumulated = [0.0] * self.branches
        hidden = model.run_blocks(img, txt, vec, rope)
        self._residual = hidden - img
        return hidden, False


def _through_block_hooks(block: torch.nn.Module, method: str, *args) -> torch.Tensor:
    """`block.<method>(*args)` called as the block's forward, so that hooks around the block run as they do for
    the block itself: block offload puts the block's weights on the device in its pre-hook."""
    own_forward = block.__dict__.get("forward")  # compile_blocks' compiled forward: put back after
    block.forward = getattr(block, method)
    try:
        return block(*args)
    finally:
        if own_forward is None:
            del block.forward
        else:
            block.forward = own_forward
