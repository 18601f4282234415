"""The tiny random pipeline the step-cache and sequence-parallel tests run, and one short edit on it: the same
weights every call, so two runs differ only by what the test changes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from conftest import FakeEncoders, randomize_
from kontext_core import Autoencoder, AutoencoderConfig, KontextTransformer, TransformerConfig
from kontext_core.pipeline import KontextPipeline

STEPS = 6  # an edit's steps unless the test says otherwise


def make_pipeline(depth: int = 2, single: int = 2) -> KontextPipeline:
    """The same tiny pipeline each call (fixed seeds), so a fresh one is a run with no history."""
    config = TransformerConfig.tiny(depth=depth, depth_single_blocks=single)
    transformer = randomize_(KontextTransformer(config), seed=1).eval()
    autoencoder = randomize_(Autoencoder(AutoencoderConfig.tiny()), seed=2).eval()
    return KontextPipeline(transformer, autoencoder, FakeEncoders(config.context_in_dim, config.vec_in_dim))


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))


def edit(pipeline: KontextPipeline, cache="off", **overrides):
    """picture() edited at a fixed seed, latents only (not decoded); `cache` and `overrides` are what a test varies."""
    options = dict(steps=STEPS, resize="keep", decode=False, seed=3)
    options.update(overrides)
    prompt = options.pop("prompt", "make it red")
    with torch.no_grad():
        return pipeline.edit(picture(), prompt, cache=cache, **options)
