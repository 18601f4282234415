"""Kontext Step Cache: the step cache's settings as a wire for the sampler nodes' optional `cache` input."""

from __future__ import annotations

from kontext_core.step_cache import CACHE_MODES, DEFAULT_THRESHOLDS, CacheStats, StepCache

from . import comfy_adapter
from .schema import STEP_CACHE, Combo, Float, KontextNode, NodeResult, Output, node_spec

CACHE_TOOLTIP = ("A Kontext Step Cache: skips the transformer on steps whose input barely changed (faster, "
                 "approximate). Not connected: every step computed.")


class KontextStepCache(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextStepCache", "Kontext Step Cache",
            "Skips the transformer's blocks on steps where its input barely changed and reuses what they computed "
            "at the last full step: fewer full steps, an approximate image. Compare with an uncached run of your "
            "own weights and images before relying on a threshold. Connect it to the cache input of Kontext Edit, "
            "Edit Turn or Edit Loop; the console reports how many steps were skipped.",
            [
                Combo("mode", CACHE_MODES, "first-block",
                      tooltip="first-block: runs the first block and compares its change with the last full step's "
                              "(First-Block Cache). teacache: compares the first block's modulated input step to "
                              "step, rescaled by TeaCache's FLUX polynomial, and skips every block."),
                Float("threshold", DEFAULT_THRESHOLDS["first-block"], 0.0, 10.0, step=0.01,
                      tooltip="Higher skips more steps. first-block: 0.05-0.2 (0.12 is the usual FLUX choice). "
                              f"teacache: 0.25-0.8 ({DEFAULT_THRESHOLDS['teacache']} about 1.8x on FLUX [dev]); it "
                              "never skips below 0.18. 0 computes every step."),
            ],
            [Output(STEP_CACHE, "cache")],
        )

    @classmethod
    def run(cls, mode: str = "first-block", threshold: float = DEFAULT_THRESHOLDS["first-block"]) -> NodeResult:
        return NodeResult((StepCache(mode, threshold),))


def report(stats: CacheStats | None, cache: str, where: str) -> None:
    if stats is not None:
        comfy_adapter.log.info("comfyui-kontext: %s, step cache %s: %s", where, cache, stats)
