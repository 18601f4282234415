"""Shared fixtures: tiny random models, the golden vectors, relative-error helper."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from kontext_core.autoencoder import Autoencoder
from kontext_core.config import AutoencoderConfig, TransformerConfig
from kontext_core.transformer import KontextTransformer

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("KONTEXT_GOLDEN_DIR", REPO.parent / "shared" / "reference" / "golden"))
REFERENCE = GOLDEN.parent


# Modules whose @triton.jit decorators read TRITON_INTERPRET when they run, i.e. at import; helpers first.
KERNEL_MODULES = ("kernels.e4m3", "kernels.modulation", "kernels.qk_norm_rope", "kernels.ffn", "kernels.fp8_qkv",
                  "kernels.fp8_rows")


def reload_kernel_modules() -> None:
    for name in KERNEL_MODULES:
        importlib.reload(importlib.import_module(name))


@contextlib.contextmanager
def kernels_built_for(mode: str):
    """The kernel modules rebuilt for Triton's CPU interpreter ("interpreter") or the GPU ("cuda"),
    switched on; put back as they were afterwards."""
    import kernels

    with pytest.MonkeyPatch.context() as patch:
        if mode == "interpreter":
            patch.setenv("TRITON_INTERPRET", "1")
        else:
            patch.delenv("TRITON_INTERPRET", raising=False)
        patch.delenv("KONTEXT_KERNELS", raising=False)
        reload_kernel_modules()
        kernels.set_enabled(True)
        try:
            yield
        finally:
            patch.undo()
            reload_kernel_modules()


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max|ours - reference| / max|reference|, the golden README's measure."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def tiny_edit_args(batch: int, dtype: torch.dtype, device: str) -> tuple:
    """Fresh random `velocity` arguments for TransformerConfig.tiny(): a 20x12 target, a 6x10 context and
    7 text tokens (sizes no tile divides)."""
    from kontext_core import context_tokens, pack_latent, position_ids

    generator = torch.Generator().manual_seed(torch.seed() % 2**31)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    img, ids = pack_latent(randn(batch, 16, 20, 12)), position_ids(20, 12, batch=batch, device=device)
    ctx, ctx_ids = context_tokens([randn(batch, 16, 6, 10)], (20, 12), "kontext")
    return (img, ids, randn(batch, 7, 48), torch.zeros(batch, 7, 3, device=device), torch.rand(batch, device=device),
            randn(batch, 32), torch.full((batch,), 2.5, device=device), ctx, ctx_ids)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial norms and biases, matrices at a scale that keeps activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim == 1 and ("scale" in name or "norm" in name) and name.endswith(("scale", "weight")):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.05 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in**0.5)
    return model


class FakeEncoders:
    """Deterministic embeddings per prompt, so tests need no T5/CLIP; counts calls."""

    def __init__(self, txt_dim: int, pooled_dim: int):
        self.txt_dim, self.pooled_dim, self.calls = txt_dim, pooled_dim, 0

    def encode(self, prompts):
        self.calls += 1
        txt, pooled = [], []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(sum(map(ord, prompt)) + 7)
            txt.append(torch.randn(1, 6, self.txt_dim, generator=generator))
            pooled.append(torch.randn(1, self.pooled_dim, generator=generator))
        return torch.cat(txt), torch.cat(pooled)


@pytest.fixture
def tiny_transformer() -> KontextTransformer:
    return randomize_(KontextTransformer(TransformerConfig.tiny()), seed=1).eval()


@pytest.fixture
def tiny_autoencoder() -> Autoencoder:
    return randomize_(Autoencoder(AutoencoderConfig.tiny()), seed=2).eval()


def golden_dir() -> Path:
    if not (GOLDEN / "meta.json").exists():
        pytest.skip(f"golden vectors not found at {GOLDEN} (set KONTEXT_GOLDEN_DIR)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((golden_dir() / "meta.json").read_text())


# The live ComfyUI server (skips without one), one per session for every live test module.
from comfyui_server import comfyui  # noqa: E402,F401
