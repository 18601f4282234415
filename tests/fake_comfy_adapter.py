"""ComfyUI's side of the nodes, faked, for the node tests that run without ComfyUI: the `comfy` fixture replaces
the functions of nodes/comfy_adapter.py (model folders under tmp_path, a recording progress bar, Cancel,
previews), and `models` loads the tiny models through the loader nodes. conftest registers both, so the test
modules that share them need not import them from one another.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kontext_core import KontextPipeline, save_autoencoder, save_transformer, set_attention_backend
from node_pack import nodes_module


class Interrupted(Exception):
    """What the fake Cancel raises once `comfy.interrupt_at` checks have been made."""


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """ComfyUI as the nodes see it: model folders under tmp_path, a recording progress bar and previews."""
    adapter, model_cache = nodes_module("comfy_adapter"), nodes_module("model_cache")
    host = SimpleNamespace(root=tmp_path / "models", bars=[], checks=0, interrupt_at=None)
    for folder in ("diffusion_models", "vae", "text_encoders", "loras"):
        (host.root / folder).mkdir(parents=True)

    def full_path(folder, name):
        path = host.root / folder / name
        if not path.exists():
            raise FileNotFoundError(f"{name} is not in {folder}")
        return str(path)

    def check_interrupted():
        host.checks += 1
        if host.interrupt_at is not None and host.checks >= host.interrupt_at:
            raise Interrupted()

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            host.bars.append((value, total, preview))

    monkeypatch.setattr(adapter, "filenames", lambda folder: sorted(p.name for p in (host.root / folder).iterdir()))
    monkeypatch.setattr(adapter, "full_path", full_path)
    monkeypatch.setattr(adapter, "compute_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(adapter, "check_interrupted", check_interrupted)
    monkeypatch.setattr(adapter, "progress_bar", Bar)
    monkeypatch.setattr(adapter, "latent_previewer", lambda: (lambda latent: tuple(latent.shape)))
    monkeypatch.setattr(adapter, "preview_images",
                        lambda images: {"images": [f"preview_{i}" for i in range(images.shape[0])]})
    monkeypatch.setattr(adapter, "tokenizer_folders", lambda: (None, None))
    yield host
    model_cache.CACHE.release()
    set_attention_backend("auto")


@pytest.fixture
def models(comfy, tiny_transformer, tiny_autoencoder):
    """The tiny models saved as files in the model folders and loaded by the loader nodes."""
    from conftest import FakeEncoders  # here, not at the top: conftest imports this module for its fixtures

    nodes, model_cache, resolve = nodes_module(), nodes_module("model_cache"), nodes_module("resolve")
    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "kontext_tiny.safetensors")
    save_autoencoder(tiny_autoencoder, comfy.root / "vae" / "ae_tiny.safetensors")
    model = nodes.KontextModelLoader.run("kontext_tiny.safetensors").outputs[0]
    vae = nodes.KontextVAELoader.run("ae_tiny.safetensors").outputs[0]
    config = tiny_transformer.config
    encoders = FakeEncoders(config.context_in_dim, config.vec_in_dim)
    text = model_cache.TextEncodersRef("t5.safetensors", "clip.safetensors", "fp32", "cpu")
    model_cache.CACHE.put(text.key, encoders)
    pipeline = KontextPipeline(resolve.transformer(model), resolve.autoencoder(vae), encoders)
    return SimpleNamespace(model=model, vae=vae, text=text, encoders=encoders, pipeline=pipeline)
