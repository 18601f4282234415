"""Step caching (kontext_core/step_cache.py) on tiny random models: exactness at threshold 0, skipping, a state
that lives for one run only, true-CFG branches, block offload and compiled blocks.

Reference: the uncached run of the same pipeline (torch.equal where the cache computes every step). On random
weights a skip count says nothing about quality; these tests check the mechanism.
"""

from __future__ import annotations

import gc
import math
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import compiled_graphs, randomize_, random_block_lora, rel_error
from kontext_core import KontextTransformer, TransformerConfig
from kontext_core.placement.offload import BlockOffloader
from kontext_core.pipeline import GenerationSettings
from kontext_core.sampling import TextConditioning, flux_schedule, sample_euler
from kontext_core.step_cache import (CacheStats, StepCache, TEACACHE_FLUX_POLYNOMIAL, relative_l1,
                                     teacache_rescale)
from kontext_core.model.tokens import pack_latent, position_ids
from tiny_pipeline import STEPS, edit, make_pipeline, picture

MODES = ("first-block", "teacache")
# Thresholds at which the tiny model skips some steps but not all (its measures: first-block 0.55-0.85,
# teacache's rescaled distance 0.3-0.5 a step).
SOME = {"first-block": 0.75, "teacache": 0.6}
EVERY = 1e9  # every step may skip: only the first and last are computed


# --- exactness and skipping ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_threshold_zero_is_the_uncached_run_bit_for_bit(mode):
    pipeline = make_pipeline()
    uncached = edit(pipeline)
    cached = edit(pipeline, f"{mode}:0")
    assert torch.equal(cached.latents, uncached.latents)
    assert cached.cache_stats.computed == STEPS and cached.cache_stats.skipped == 0
    assert uncached.cache_stats is None and uncached.settings.cache == "off"


@pytest.mark.parametrize("mode", MODES)
def test_text_to_image_threshold_zero_is_exact_and_a_high_one_skips(mode):
    pipeline = make_pipeline()
    with torch.no_grad():
        uncached = pipeline.text_to_image("a fox", width=32, height=24, steps=STEPS, decode=False)
        exact = pipeline.text_to_image("a fox", width=32, height=24, steps=STEPS, decode=False, cache=f"{mode}:0")
        skipping = pipeline.text_to_image("a fox", width=32, height=24, steps=STEPS, decode=False,
                                          cache=StepCache(mode, EVERY))
    assert torch.equal(exact.latents, uncached.latents)
    assert skipping.cache_stats.skipped == STEPS - 2


@pytest.mark.parametrize("mode", MODES)
def test_a_high_threshold_skips_every_step_but_the_first_and_last(mode):
    pipeline = make_pipeline()
    uncached = edit(pipeline)
    cached = edit(pipeline, StepCache(mode, EVERY))
    stats = cached.cache_stats
    assert stats.computed == 2 and stats.skipped_steps == list(range(1, STEPS - 1))
    assert sorted(stats.measures) == stats.skipped_steps  # every step but the first and last was judged
    assert stats.skip_ratio == pytest.approx((STEPS - 2) / STEPS)
    assert bool(torch.isfinite(cached.latents).all())
    assert 1e-3 < rel_error(cached.latents, uncached.latents) < 1.0  # approximate, not garbage


@pytest.mark.parametrize("mode", MODES)
def test_a_middle_threshold_skips_some_steps(mode):
    stats = edit(make_pipeline(), f"{mode}:{SOME[mode]}").cache_stats
    assert 0 < stats.skipped < STEPS - 2 and stats.steps == STEPS


def test_a_teacache_threshold_under_the_polynomials_floor_never_skips():
    distances = np.linspace(0, 3, 30001)
    assert min(teacache_rescale(d) for d in distances) > 0.18
    assert teacache_rescale(0.0) == TEACACHE_FLUX_POLYNOMIAL[-1]
    assert edit(make_pipeline(), "teacache:0.18").cache_stats.skipped == 0


# --- the state lives for one run ------------------------------------------------------------------

def _change_seed(pipeline, cache):
    return edit(pipeline, cache, seed=4)


def _change_prompt(pipeline, cache):
    return edit(pipeline, cache, prompt="add a hat")


def _change_batch(pipeline, cache):
    return edit(pipeline, cache, batch_size=2)


def _change_lora(pipeline, cache):  # a LoRA appears (on the fly, for this run)
    return edit(pipeline, cache, loras=[(random_block_lora(pipeline.transformer, seed=5), 0.8)])


def _change_lora_strength(pipeline, cache):
    return edit(pipeline, cache, loras=[(random_block_lora(pipeline.transformer, seed=5), 0.3)])


def _new_turn(pipeline, cache):
    with torch.no_grad():
        session = pipeline.session(picture(), resize="keep", settings=GenerationSettings(steps=STEPS, cache=cache))
        first = session.edit("make it red", seed=3)
        second = session.edit("add a hat", seed=4)
    return SimpleNamespace(latents=second.latent, cache_stats=second.cache_stats, first=first)


CHANGES = {"seed": _change_seed, "prompt": _change_prompt, "batch": _change_batch, "lora": _change_lora,
           "lora-strength": _change_lora_strength, "turn": _new_turn}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("change", CHANGES)
def test_a_run_after_a_change_equals_a_fresh_run(mode, change):
    """Whatever ran before (here a cached run at the same threshold, with a LoRA for the strength change), the
    next run equals the same run on a pipeline that never ran: no cached state crosses runs."""
    cache = f"{mode}:{SOME[mode]}"
    pipeline = make_pipeline()
    before = [(random_block_lora(pipeline.transformer, seed=5), 0.8)] if change == "lora-strength" else ()
    earlier = edit(pipeline, cache, loras=before)
    after = CHANGES[change](pipeline, cache)
    fresh = CHANGES[change](make_pipeline(), cache)
    assert torch.equal(after.latents, fresh.latents)
    assert after.cache_stats == fresh.cache_stats and after.cache_stats.skipped > 0  # the cache was at work
    if change != "batch":  # (a batch of two is a different tensor altogether)
        assert not torch.equal(after.latents, earlier.latents)


def test_a_turn_counts_its_own_steps():
    turn = _new_turn(make_pipeline(), StepCache("first-block", EVERY))
    assert turn.first.cache_stats.skipped == turn.cache_stats.skipped == STEPS - 2
    assert turn.first.settings.cache == f"first-block:{EVERY:g}"


def test_no_cache_state_outlives_its_run(monkeypatch):
    runs = []
    start = StepCache.start

    def recording_start(self, *args, **kwargs):
        run = start(self, *args, **kwargs)
        runs.append(weakref.ref(run))
        return run

    monkeypatch.setattr(StepCache, "start", recording_start)
    pipeline = make_pipeline()
    result = edit(pipeline, "teacache:0.6")
    gc.collect()
    assert len(runs) == 1 and runs[0]() is None
    assert result.cache_stats.steps == STEPS


# --- true CFG: one branch per half of the batch ----------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_true_cfg_threshold_zero_is_exact_and_a_high_one_skips(mode):
    pipeline = make_pipeline()
    cfg = dict(sampler="true_cfg", true_cfg=3.0, negative_prompt="blurry")
    uncached = edit(pipeline, **cfg)
    assert torch.equal(edit(pipeline, f"{mode}:0", **cfg).latents, uncached.latents)
    skipping = edit(pipeline, StepCache(mode, EVERY), **cfg)
    assert skipping.cache_stats.skipped == STEPS - 2 and bool(torch.isfinite(skipping.latents).all())


class _FirstBlockOnly(torch.nn.Module):
    """A stand-in model whose first block adds `vec` to the image tokens and whose other blocks add 1."""

    def __init__(self):
        super().__init__()
        self.double_blocks = [lambda img, txt, vec, rope: (img + vec[:, None, :], txt)]

    def run_blocks(self, img, txt, vec, rope, first=0):
        return img + 1.0


def test_each_cfg_branch_is_judged_on_its_own():
    """The positive row's first-block change is large and steady, the negative row's small and doubling each
    step: over the whole batch the change looks small, but the negative branch must not skip."""
    model, img, txt = _FirstBlockOnly(), torch.zeros(2, 3, 4), torch.zeros(2, 1, 4)

    def skipped(branches: int) -> int:
        run = StepCache("first-block", 0.1).start(steps=5, branches=branches)
        for step in range(5):
            vec = torch.tensor([[1000.0] * 4, [2.0**step] * 4])
            run.run_blocks(model, img, txt, vec, None)
        return run.stats.skipped

    assert skipped(branches=1) == 3  # the batch as one: the negative row's change drowns in the positive one's
    assert skipped(branches=2) == 0
    assert relative_l1(torch.tensor([[1.0, 1.0], [4.0, 4.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]), 2) == [0, 1]


# --- with the rest of the runtime ------------------------------------------------------------------

def test_teacache_reads_the_first_block_through_its_offload_hooks():
    """TeaCache reads the first block's modulation before the block runs: under block offload it must run inside
    the block's hooks (which bring the weights), and the run equals the resident model's."""
    resident = make_pipeline(depth=3, single=3)
    expected = edit(resident, "teacache:0.6")
    offloaded = make_pipeline(depth=3, single=3)
    offloader = BlockOffloader(offloaded.transformer, "cpu", prefetch=1, trace=True)
    result = edit(offloaded, "teacache:0.6")
    assert torch.equal(result.latents, expected.latents)
    first_block_runs = sum(event == ("compute", 0) for event in offloader.events)
    assert first_block_runs == STEPS + result.cache_stats.computed  # the reading, then the block on computed steps
    assert offloader.blocks[0].module.__dict__.get("forward") is None  # the block's own forward is back


@pytest.mark.parametrize("mode", MODES)
def test_compiled_blocks_run_the_cache_unchanged(mode):
    """Regional compilation traced with "aot_eager" on the CPU: the cached run skips the same steps and computes
    what the eager cached run does, with no graph beyond one per block class."""
    eager = edit(make_pipeline(), f"{mode}:{SOME[mode]}")
    pipeline = make_pipeline()
    torch._dynamo.reset()
    before = compiled_graphs()
    try:
        pipeline.transformer.compile_blocks(backend="aot_eager")
        compiled = edit(pipeline, f"{mode}:{SOME[mode]}")
        assert compiled_graphs() - before == 2
        assert pipeline.transformer.blocks_compiled
    finally:
        torch._dynamo.reset()
    assert compiled.cache_stats == eager.cache_stats
    assert rel_error(compiled.latents, eager.latents) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_cached_run_is_not_graphed_and_says_so():
    pipeline = make_pipeline()
    pipeline.transformer.cuda()
    pipeline.autoencoder.cuda()
    eager = edit(pipeline, "first-block:0")
    pipeline.cuda_graphs = True
    with pytest.warns(UserWarning, match="step caching"):
        graphed = edit(pipeline, "first-block:0")
    assert torch.equal(graphed.latents, eager.latents)


def test_sample_euler_takes_a_cache_or_a_velocity_fn_not_both():
    model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=1).eval()
    x, ids = pack_latent(torch.randn(1, 16, 4, 4)), position_ids(4, 4)
    cond = TextConditioning(torch.randn(1, 3, 48), torch.randn(1, 32))
    with pytest.raises(ValueError, match="velocity_fn"):
        sample_euler(model, x, ids, cond, flux_schedule(2, 4), velocity_fn=model.velocity, step_cache="teacache")
    stats = CacheStats()
    with torch.no_grad():
        sample_euler(model, x, ids, cond, flux_schedule(3, 4), step_cache="teacache", cache_stats=stats)
    assert stats.steps == 3


# --- settings ---------------------------------------------------------------------------------------

def test_cache_specs_read_and_written():
    assert StepCache.parse("first-block:0.12") == StepCache("first-block", 0.12)
    assert StepCache.parse("FBCache") == StepCache("first-block", 0.12)  # the mode's default threshold
    assert StepCache.parse(" teacache ").threshold == 0.4
    assert StepCache.parse("off") is StepCache.parse("") is StepCache.parse(None) is None
    assert str(StepCache("teacache", 0.25)) == "teacache:0.25"
    assert GenerationSettings(cache=StepCache("teacache", 0.25)).cache == "teacache:0.25"
    assert GenerationSettings(cache="fbcache").cache == "first-block:0.12"
    assert GenerationSettings().cache == "off"
    assert str(CacheStats(computed=3, skipped_steps=[1])) == "3 of 4 steps computed, 1 from the cache (25% skipped)"


@pytest.mark.parametrize("spec, message", [
    ("magic:0.1", "unknown step cache 'magic'; choose first-block or teacache"),
    ("teacache:lots", "'lots' is not a number"),
    ("first-block:-1", "finite number >= 0"),
    ("first-block:nan", "finite number >= 0"),
])
def test_bad_cache_specs_say_what_to_write(spec, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(cache=spec)
    with pytest.raises(ValueError, match="finite number >= 0"):
        StepCache("teacache", math.inf)  # the dataclass checks its own fields, not only the text form
