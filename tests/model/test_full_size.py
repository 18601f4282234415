"""The real [dev] configuration, built on the meta device, against the real release's structure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE
from kontext_core import Autoencoder, AutoencoderConfig, KontextTransformer, TransformerConfig
from kontext_core.checkpoints.canonical import (
    _diffusers_transformer_config,
    infer_autoencoder_config,
    infer_transformer_config,
)
from kontext_core.checkpoints.files import TensorInfo, TensorSource
from kontext_core.checkpoints.key_maps import autoencoder_links, transformer_links

DATA = Path(__file__).parent / "data"
# Public tensor names of the BFL release (flux1-kontext-dev.safetensors / flux1-dev.safetensors).
PUBLIC_NAMES = {
    "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
    "double_blocks.18.txt_mlp.2.weight": [3072, 12288],
    "single_blocks.37.linear1.weight": [21504, 3072],
    "single_blocks.0.norm.key_norm.scale": [128],
    "guidance_in.in_layer.weight": [3072, 256],
    "final_layer.adaLN_modulation.1.weight": [6144, 3072],
    "txt_in.weight": [3072, 4096],
    "vector_in.in_layer.weight": [3072, 768],
}


def _meta_shapes(model_cls) -> dict[str, list[int]]:
    with torch.device("meta"):
        return {k: list(v.shape) for k, v in model_cls().state_dict().items()}


def _data(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _manifest(name: str) -> dict:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference manifest {name} not found beside the repo ({REFERENCE})")
    return json.loads(path.read_text())


def test_full_transformer_matches_our_shape_file():
    recorded = _data("flux1_kontext_dev_transformer_shapes.json")
    shapes = _meta_shapes(KontextTransformer)
    assert shapes == recorded["shapes"]
    assert recorded["tensors"] == 780
    assert sum(torch.Size(s).numel() for s in shapes.values()) == recorded["parameters"] == 11_901_408_320


def test_full_transformer_has_the_public_bfl_names():
    shapes = _meta_shapes(KontextTransformer)
    for name, shape in PUBLIC_NAMES.items():
        assert shapes[name] == shape, name


def test_full_transformer_equals_the_release_manifest():
    manifest = _manifest("manifest_bfl_transformer.json")
    assert _meta_shapes(KontextTransformer) == manifest["shapes"]
    assert manifest["parameters"] == 11_901_408_320


def test_config_inferred_from_release_shapes_is_the_default():
    shapes = {k: tuple(v) for k, v in _data("flux1_kontext_dev_transformer_shapes.json")["shapes"].items()}
    assert infer_transformer_config(shapes, "flux1-kontext-dev.safetensors") == TransformerConfig()
    ae_shapes = {k: tuple(v) for k, v in _data("flux_ae_shapes.json")["shapes"].items()}
    assert infer_autoencoder_config(ae_shapes, "ae.safetensors") == AutoencoderConfig()


def _their_shapes(links, ours: dict[str, list[int]]) -> dict[str, list[int]]:
    """Diffusers shapes our converter would write for tensors of these shapes."""
    from kontext_core.checkpoints.key_maps import to_theirs

    out = {}
    for link in links:
        fake = torch.empty(ours[link.ours], device="meta")
        converted = to_theirs(link, fake, lambda n, t: tuple(t.shape[:2]) if t.ndim == 4 and "attentions" in n
                              else tuple(t.shape))
        out.update({k: list(v.shape) for k, v in converted.items()})
    return out


def test_diffusers_key_map_covers_the_diffusers_release():
    manifest = _manifest("manifest_diffusers_transformer.json")
    ours = _meta_shapes(KontextTransformer)
    links = transformer_links(TransformerConfig())
    assert {link.ours for link in links} == set(ours)
    assert _their_shapes(links, ours) == manifest["shapes"]
    source = TensorSource({k: TensorInfo("BF16", tuple(v), Path("x"), k) for k, v in manifest["shapes"].items()})
    assert _diffusers_transformer_config(source, "transformer/") == TransformerConfig()


def test_autoencoder_matches_both_release_manifests():
    ours = _meta_shapes(Autoencoder)
    assert ours == _data("flux_ae_shapes.json")["shapes"]
    assert ours == _manifest("manifest_bfl_ae.json")["shapes"]
    links = autoencoder_links(AutoencoderConfig())
    assert {link.ours for link in links} == set(ours)
    assert _their_shapes(links, ours) == _manifest("manifest_diffusers_vae.json")["shapes"]
