"""Golden vectors computed by BFL's reference and ComfyUI 0.8 on a tiny model (see golden/README.md).

Tolerances (relative error, max|ours - golden| / max|golden|) are the README's: float64 <= 1e-6,
float32 <= 1e-4, bf16 <= 3e-2.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_dir, rel_error
from kontext_core import (
    AutoencoderConfig,
    TransformerConfig,
    context_tokens,
    load_autoencoder,
    load_transformer,
    pack_latent,
    position_ids,
    unpack_tokens,
)

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)


@pytest.fixture(scope="module")
def forward_io() -> dict[str, torch.Tensor]:
    return load_file(golden_dir() / "forward.safetensors")


def _transformer(dtype: torch.dtype):
    return load_transformer(golden_dir() / "transformer_tiny.safetensors", dtype=dtype)


def test_config_is_inferred_from_the_golden_file(golden_meta):
    model = _transformer(torch.float32)
    assert model.config == TransformerConfig.from_dict(golden_meta["transformer_config"])


def test_tokens_and_ids_match_the_reference(forward_io):
    assert torch.equal(pack_latent(forward_io["latent"]), forward_io["img"])
    assert torch.equal(position_ids(8, 12, dtype=torch.float64), forward_io["img_ids"])
    tokens, ids = context_tokens([forward_io["context_latent"]], (8, 12), "kontext", torch.float64)
    assert torch.equal(tokens, forward_io["context_img"])
    assert torch.equal(ids, forward_io["context_img_ids"])
    assert torch.equal(unpack_tokens(forward_io["img"], 8, 12), forward_io["latent"])


def _inputs(io, dtype):
    return [io[k] if k.endswith("ids") else io[k].to(dtype) for k in ("img", "img_ids", "txt", "txt_ids")] + [
        io["timesteps"], io["y"].to(dtype), io["guidance"]]


@DTYPES
def test_text_to_image_velocity(forward_io, dtype):
    with torch.no_grad():
        out = _transformer(dtype)(*_inputs(forward_io, dtype))
    assert rel_error(out, forward_io["out_t2i"]) <= TOLERANCE[dtype]


@DTYPES
def test_edit_velocity_with_context_tokens(forward_io, dtype):
    img, img_ids, txt, txt_ids, t, y, g = _inputs(forward_io, dtype)
    with torch.no_grad():
        out = _transformer(dtype).velocity(img, img_ids, txt, txt_ids, t, y, g,
                                           forward_io["context_img"].to(dtype), forward_io["context_img_ids"])
    assert out.shape == forward_io["out_edit"].shape
    assert rel_error(out, forward_io["out_edit"]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("method", ["offset", "index", "uxo"])
def test_comfyui_multi_reference_placements(forward_io, method):
    model = _transformer(torch.float64)
    img, img_ids, txt, txt_ids, t, y, g = _inputs(forward_io, torch.float64)
    refs = [forward_io["context_latent"], forward_io["context_latent_2"]]
    ctx, ctx_ids = context_tokens(refs, (8, 12), method, torch.float64)
    with torch.no_grad():
        out = unpack_tokens(model.velocity(img, img_ids, txt, txt_ids, t, y, g, ctx, ctx_ids), 8, 12)
    assert rel_error(out, forward_io[f"comfy_out_multi_{method}_unpacked"]) <= TOLERANCE[torch.float64]


def test_comfyui_single_reference_equals_reference_edit(forward_io):
    model = _transformer(torch.float64)
    img, img_ids, txt, txt_ids, t, y, g = _inputs(forward_io, torch.float64)
    ctx, ctx_ids = context_tokens([forward_io["context_latent"]], (8, 12), "offset", torch.float64)
    with torch.no_grad():
        out = unpack_tokens(model.velocity(img, img_ids, txt, txt_ids, t, y, g, ctx, ctx_ids), 8, 12)
    assert rel_error(out, forward_io["comfy_out_edit_unpacked"]) <= TOLERANCE[torch.float64]


@pytest.fixture(scope="module")
def ae_io() -> dict[str, torch.Tensor]:
    return load_file(golden_dir() / "ae_io.safetensors")


@DTYPES
def test_autoencoder_encode_and_decode(ae_io, golden_meta, dtype):
    ae = load_autoencoder(golden_dir() / "ae_tiny.safetensors", dtype=dtype,
                          config=AutoencoderConfig.from_dict(golden_meta["ae_config"]))
    with torch.no_grad():
        latent = ae.encode(ae_io["image"].to(dtype))
        decoded = ae.decode(ae_io["latent"].to(dtype))
    assert rel_error(latent, ae_io["latent"]) <= TOLERANCE[dtype]
    assert rel_error(decoded, ae_io["decoded"]) <= TOLERANCE[dtype]


def test_autoencoder_config_is_inferred(golden_meta):
    ae = load_autoencoder(golden_dir() / "ae_tiny.safetensors")
    assert ae.config == AutoencoderConfig.from_dict(golden_meta["ae_config"])
