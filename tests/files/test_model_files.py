"""Finding model files in a folder, a ComfyUI models tree, a diffusers repo and the HF cache."""

from __future__ import annotations

import pytest

from kontext_core.checkpoints.model_files import ModelFilesNotFound, find_model_files


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_comfyui_models_tree(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    t = _touch(models / "diffusion_models" / "flux1-kontext-dev.safetensors")
    ae = _touch(models / "vae" / "ae.safetensors")
    t5 = _touch(models / "text_encoders" / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    clip = _touch(models / "clip" / "clip_l.safetensors")
    found = find_model_files(tmp_path / "ComfyUI", use_hf_cache=False)
    assert (found.transformer, found.autoencoder, found.t5, found.clip) == (t, ae, t5, clip)


def test_preference_order_and_unet_folder(tmp_path):
    _touch(tmp_path / "unet" / "flux1-kontext-dev-fp8.safetensors")
    best = _touch(tmp_path / "unet" / "flux1-kontext-dev.safetensors")
    _touch(tmp_path / "vae" / "ae.safetensors")
    found = find_model_files(tmp_path, use_hf_cache=False, need_text_encoders=False)
    assert found.transformer == best and found.t5 is None


def test_diffusers_repo_layout_and_hf_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-Kontext-dev" / "snapshots" / "abc123"
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _touch(snapshot / part / "model.safetensors")
    (snapshot / "tokenizer").mkdir()
    (snapshot / "tokenizer_2").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    found = find_model_files()
    assert found.transformer == snapshot / "transformer" and found.t5 == snapshot / "text_encoder_2"
    assert found.clip_tokenizer == snapshot / "tokenizer" and found.t5_tokenizer == snapshot / "tokenizer_2"


def test_missing_files_list_what_and_where(tmp_path):
    _touch(tmp_path / "vae" / "ae.safetensors")
    with pytest.raises(ModelFilesNotFound) as error:
        find_model_files(tmp_path, use_hf_cache=False)
    message = str(error.value)
    assert "transformer, t5, clip" in message and "flux1-kontext-dev.safetensors" in message
    assert "t5xxl_fp16.safetensors" in message and str(tmp_path) in message and "`allow_download=True`" in message
    assert "in their diffusion_models/, unet/, models/, models/diffusion_models/" in message  # the ComfyUI folders
