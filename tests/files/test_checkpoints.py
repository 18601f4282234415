"""Every checkpoint format users have: round trips, fp8 files, bundles, and one clear error per bad file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize_, rel_error
from kontext_core import (
    Autoencoder,
    AutoencoderConfig,
    CheckpointError,
    KontextTransformer,
    TransformerConfig,
    load_autoencoder,
    load_transformer,
    pack_latent,
    position_ids,
    save_autoencoder,
    save_transformer,
)
from kontext_core.checkpoints.saving import transformer_file_state
from kontext_core.compute.quant import QuantizedLinear


def _velocity(model: KontextTransformer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    dtype = model.dtype
    img = pack_latent(torch.randn(1, 16, 4, 6, generator=generator)).to(dtype)
    txt = torch.randn(1, 5, config.context_in_dim, generator=generator).to(dtype)
    y = torch.randn(1, config.vec_in_dim, generator=generator).to(dtype)
    with torch.no_grad():
        return model(img, position_ids(4, 6), txt, torch.zeros(1, 5, 3), torch.tensor([0.6]), y,
                     torch.tensor([2.5]) if config.guidance_embed else None).float()


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_transformer_round_trip_is_exact(tiny_transformer, tmp_path, layout):
    path = tmp_path / ("model" if layout == "diffusers" else "model.safetensors")
    save_transformer(tiny_transformer, path, layout=layout, max_shard_bytes=200_000)
    if layout == "diffusers":
        assert len(list(path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
        assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = load_transformer(path, dtype="fp32")
    assert loaded.config == tiny_transformer.config
    assert torch.equal(_velocity(loaded), _velocity(tiny_transformer))


def test_diffusers_root_folder_with_transformer_and_vae(tiny_transformer, tiny_autoencoder, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "transformer", layout="diffusers")
    save_autoencoder(tiny_autoencoder, tmp_path / "vae", layout="diffusers")
    assert torch.equal(_velocity(load_transformer(tmp_path, dtype="fp32")), _velocity(tiny_transformer))
    ae = load_autoencoder(tmp_path)
    assert ae.config == tiny_autoencoder.config
    for ours, theirs in zip(ae.state_dict().values(), tiny_autoencoder.state_dict().values()):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_autoencoder_round_trip_is_exact(tiny_autoencoder, tmp_path, layout):
    path = tmp_path / ("ae.safetensors" if layout == "bfl" else "vae")
    save_autoencoder(tiny_autoencoder, path, layout=layout)
    loaded = load_autoencoder(path)
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(image), tiny_autoencoder(image))


def test_comfyui_full_checkpoint_bundle(tiny_transformer, tiny_autoencoder, tmp_path):
    """A ComfyUI checkpoint: transformer, AE and text encoders in one file under their prefixes."""
    bundle = {f"model.diffusion_model.{k}": v for k, v in tiny_transformer.state_dict().items()}
    bundle.update({f"vae.{k}": v for k, v in tiny_autoencoder.state_dict().items()})
    bundle["text_encoders.t5xxl.transformer.shared.weight"] = torch.randn(8, 4)
    save_file(bundle, tmp_path / "kontext_full.safetensors")
    model = load_transformer(tmp_path / "kontext_full.safetensors", dtype="fp32")
    assert torch.equal(_velocity(model), _velocity(tiny_transformer))
    ae = load_autoencoder(tmp_path / "kontext_full.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), tiny_autoencoder.state_dict().values()))


def test_loads_in_bf16_on_request(tiny_transformer, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "m.safetensors")
    model = load_transformer(tmp_path / "m.safetensors", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert rel_error(_velocity(model), _velocity(tiny_transformer)) < 2e-2


# --- fp8 -----------------------------------------------------------------------------------------

FP8_FORMATS = ["fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_e5m2"]
# e4m3 keeps 3 mantissa bits, e5m2 two: their rounding alone moves the tiny model's output this much.
FP8_TOLERANCE = {"fp8_e4m3fn": 0.08, "fp8_e4m3fn_scaled": 0.08, "fp8_e5m2": 0.15}


@pytest.mark.parametrize("weights", FP8_FORMATS)
def test_comfyui_fp8_file_layout(tiny_transformer, tmp_path, weights):
    path = tmp_path / "flux1-kontext-dev-fp8.safetensors"
    save_transformer(tiny_transformer, path, layout="comfy", weights=weights)
    stored = load_file(path)
    qkv = stored["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert qkv.dtype == (torch.float8_e5m2 if weights == "fp8_e5m2" else torch.float8_e4m3fn)
    assert ("model.diffusion_model.scaled_fp8" in stored) == weights.endswith("scaled")
    assert ("model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight" in stored) == weights.endswith("scaled")
    assert stored["model.diffusion_model.double_blocks.0.img_attn.qkv.bias"].dtype == torch.float32


def test_file_state_is_what_the_saver_writes(tiny_transformer, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "m.safetensors", layout="comfy", weights="fp8_e4m3fn_scaled")
    stored = load_file(tmp_path / "m.safetensors")
    state = transformer_file_state(tiny_transformer, layout="comfy", weights="fp8_e4m3fn_scaled")
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[k].float(), state[k].float()) and stored[k].dtype == state[k].dtype for k in state)
    with pytest.raises(CheckpointError, match="single-file"):
        transformer_file_state(tiny_transformer, layout="diffusers")


@pytest.mark.parametrize("weights", FP8_FORMATS)
def test_fp8_file_dequantizes_close_to_fp32_model(tiny_transformer, tmp_path, weights):
    path = tmp_path / "fp8.safetensors"
    save_transformer(tiny_transformer, path, layout="comfy", weights=weights)
    upcast = load_transformer(path, dtype="fp32")
    assert not any(isinstance(m, QuantizedLinear) for m in upcast.modules())
    assert rel_error(_velocity(upcast), _velocity(tiny_transformer)) < FP8_TOLERANCE[weights]


@pytest.mark.parametrize("weights", FP8_FORMATS)
def test_fp8_kept_in_memory_matches_upcast_load(tiny_transformer, tmp_path, weights):
    path = tmp_path / "fp8.safetensors"
    save_transformer(tiny_transformer, path, layout="comfy", weights=weights)
    kept = load_transformer(path, dtype="fp8")
    qkv = kept.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, QuantizedLinear) and qkv.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    assert kept.img_in.weight.dtype == torch.bfloat16
    upcast = load_transformer(path, dtype="bf16")
    # Both compute in bf16 from the same fp8 values; only the order of bf16 roundings differs.
    assert rel_error(_velocity(kept), _velocity(upcast)) < 2e-2
    assert rel_error(_velocity(kept), _velocity(tiny_transformer)) < FP8_TOLERANCE[weights]


def test_comfyui_mixed_precision_quant_format(tiny_transformer, tmp_path):
    """ComfyUI 0.8's newer layout: `<layer>.weight_scale`, `<layer>.input_scale` and a `<layer>.comfy_quant` JSON."""
    state = {k: v.clone() for k, v in tiny_transformer.state_dict().items()}
    quant_json = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for name, module in tiny_transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("single_blocks."):
            scale = module.weight.abs().max() / 448
            state[f"{name}.weight"] = (module.weight / scale).to(torch.float8_e4m3fn)
            state[f"{name}.weight_scale"] = scale.float()
            state[f"{name}.input_scale"] = torch.tensor(1.0)
            state[f"{name}.comfy_quant"] = quant_json.clone()
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, tmp_path / "mixed.safetensors")
    upcast = load_transformer(tmp_path / "mixed.safetensors", dtype="fp32")
    assert rel_error(_velocity(upcast), _velocity(tiny_transformer)) < FP8_TOLERANCE["fp8_e4m3fn"]
    kept = load_transformer(tmp_path / "mixed.safetensors", dtype="fp8")
    assert isinstance(kept.single_blocks[0].linear1, QuantizedLinear)
    assert torch.equal(kept.single_blocks[0].linear1.weight_scale, state["single_blocks.0.linear1.weight_scale"])


def test_bf16_file_quantized_to_fp8_on_load_and_saved_as_scaled(tiny_transformer, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "m.safetensors")
    kept = load_transformer(tmp_path / "m.safetensors", dtype="fp8")
    linears = [m for m in kept.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 2 * 10 + 2 * 3  # every block linear, modulation included
    assert rel_error(_velocity(kept), _velocity(tiny_transformer)) < FP8_TOLERANCE["fp8_e4m3fn"]
    save_transformer(kept, tmp_path / "again.safetensors", layout="comfy")
    again = load_transformer(tmp_path / "again.safetensors", dtype="fp8")
    assert torch.equal(_velocity(again), _velocity(kept))


# --- variants and configs ------------------------------------------------------------------------

def test_flux_dev_t2i_and_guidance_free_files_load(tmp_path):
    for guidance in (True, False):
        model = randomize_(KontextTransformer(TransformerConfig.tiny(guidance_embed=guidance, qkv_bias=guidance)), 3)
        save_transformer(model, tmp_path / f"g{guidance}.safetensors")
        loaded = load_transformer(tmp_path / f"g{guidance}.safetensors", dtype="fp32")
        assert loaded.config.guidance_embed is guidance and loaded.config.qkv_bias is guidance
        assert torch.equal(_velocity(loaded), _velocity(model))


def test_explicit_config_overrides_and_mismatch_is_explained(tiny_transformer, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "m.safetensors")
    custom = TransformerConfig.tiny(axes_dim=(16, 24, 24))
    assert load_transformer(tmp_path / "m.safetensors", config=custom, dtype="fp32").config.axes_dim == (16, 24, 24)
    with pytest.raises(CheckpointError, match="config does not match this file"):
        load_transformer(tmp_path / "m.safetensors", config=TransformerConfig.tiny(hidden_size=192, num_heads=3))


# --- bad files: one clear error each ---------------------------------------------------------

def _expect(path, pattern, loader=load_transformer, **kwargs):
    with pytest.raises(CheckpointError, match=pattern):
        loader(path, **kwargs)


def test_refuses_gguf_and_pickles(tmp_path):
    (tmp_path / "flux1-dev-Q4.gguf").write_bytes(b"GGUF" + bytes(64))
    _expect(tmp_path / "flux1-dev-Q4.gguf", "GGUF file; this loader reads .safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04" + bytes(64))
    _expect(tmp_path / "model.ckpt", "pickled PyTorch file")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02" + bytes(64))
    _expect(tmp_path / "model.pt", "only .safetensors files are loaded")


def test_truncated_and_corrupt_files(tiny_transformer, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _expect(tmp_path / "cut.safetensors", "truncated.*download it again")
    (tmp_path / "header.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    _expect(tmp_path / "header.safetensors", "corrupt safetensors header")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _expect(tmp_path / "empty.safetensors", "empty or truncated")
    (tmp_path / "garbage.safetensors").write_bytes(bytes(range(256)) * 4)
    _expect(tmp_path / "garbage.safetensors", "not a valid safetensors file")
    _expect(tmp_path / "absent.safetensors", "not found")


def test_wrong_model_kinds_are_named(tiny_transformer, tiny_autoencoder, tmp_path):
    save_autoencoder(tiny_autoencoder, tmp_path / "ae.safetensors")
    _expect(tmp_path / "ae.safetensors", "autoencoder \\(VAE\\).*load_autoencoder")
    save_transformer(tiny_transformer, tmp_path / "t.safetensors")
    _expect(tmp_path / "t.safetensors", "FLUX transformer.*not a FLUX autoencoder.*load_transformer", load_autoencoder)
    fakes = {
        "sdxl.safetensors": (["model.diffusion_model.input_blocks.0.0.weight",
                              "model.diffusion_model.output_blocks.0.0.weight",
                              "model.diffusion_model.label_emb.0.0.weight"], "Stable Diffusion XL"),
        "sd3.safetensors": (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
        "t5xxl_fp16.safetensors": (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"],
                                   "T5 text encoder"),
        "clip_l.safetensors": (["text_model.encoder.layers.0.mlp.fc1.weight"], "CLIP text encoder"),
        "lora.safetensors": (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "LoRA"),
    }
    for name, (keys, what) in fakes.items():
        save_file({k: torch.randn(2, 2) for k in keys}, tmp_path / name)
        _expect(tmp_path / name, f"{name} looks like .*{what}")
    sd_vae = Autoencoder(AutoencoderConfig.tiny(z_channels=4))
    save_autoencoder(sd_vae, tmp_path / "sd_vae.safetensors")
    _expect(tmp_path / "sd_vae.safetensors", "4 latent channels.*16-channel FLUX VAE", load_autoencoder)


# Key layouts of Stable Diffusion files users have (a few real names each; tiny tensors).
_LDM_UNET = ["input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight", "middle_block.1.proj_in.weight",
             "output_blocks.0.0.in_layers.2.weight", "time_embed.0.weight", "out.2.weight"]
_SDXL_UNET = _LDM_UNET + ["label_emb.0.0.weight", "label_emb.0.2.weight"]
_DIFFUSERS_UNET = ["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
                   "mid_block.resnets.0.conv1.weight", "up_blocks.0.resnets.0.conv1.weight", "conv_out.weight"]
_SD_VAE = ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight",
           "first_stage_model.quant_conv.weight"]
_SDXL_TEXT = ["conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
              "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"]
_LONE_UNET = "a UNet of another model \\({}{}[a-z_/]*; no VAE or text encoders\\), not a FLUX transformer.*Kontext"


@pytest.mark.parametrize("keys, what", [
    (_SDXL_UNET, _LONE_UNET.format("Stable Diffusion XL", ": input_blocks")),
    ([f"model.diffusion_model.{k}" for k in _SDXL_UNET], _LONE_UNET.format("Stable Diffusion XL", ": input_blocks")),
    (_LDM_UNET, _LONE_UNET.format("Stable Diffusion 1.x/2.x", ": input_blocks")),
    (_DIFFUSERS_UNET + ["add_embedding.linear_1.weight"],
     _LONE_UNET.format("Stable Diffusion XL", ", diffusers layout: down_blocks")),
    (_DIFFUSERS_UNET, _LONE_UNET.format("Stable Diffusion 1.x/2.x", ", diffusers layout: down_blocks")),
], ids=["sdxl-unet", "sdxl-unet-prefixed", "sd1-unet", "sdxl-diffusers-unet", "sd1-diffusers-unet"])
def test_lone_unet_of_another_model_is_not_called_a_whole_checkpoint(tmp_path, keys, what):
    """A UNet saved on its own (ComfyUI's diffusion_models/ or unet/) is named as one, with what to use instead."""
    save_file({k: torch.randn(2, 2) for k in keys}, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match=what) as error:
        load_transformer(tmp_path / "unet.safetensors")
    assert "whole" not in str(error.value) and "models/checkpoints" not in str(error.value)
    assert "flux1-dev-kontext" in str(error.value) and "diffusion_models" in str(error.value)


def test_whole_sd_checkpoint_is_still_called_whole(tmp_path):
    keys = [f"model.diffusion_model.{k}" for k in _SDXL_UNET] + _SD_VAE + _SDXL_TEXT
    save_file({k: torch.randn(2, 2) for k in keys}, tmp_path / "sd_xl_base_1.0.safetensors")
    with pytest.raises(CheckpointError, match="a whole Stable Diffusion XL checkpoint \\(UNet, VAE and text "
                       "encoders in one file\\), not a FLUX transformer. It goes in ComfyUI's "
                       "models/checkpoints") as error:
        load_transformer(tmp_path / "sd_xl_base_1.0.safetensors")
    assert "UNet of another model" not in str(error.value)
    sd1 = [f"model.diffusion_model.{k}" for k in _LDM_UNET] + _SD_VAE + \
        ["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    save_file({k: torch.randn(2, 2) for k in sd1}, tmp_path / "v1-5-pruned-emaonly.safetensors")
    _expect(tmp_path / "v1-5-pruned-emaonly.safetensors",
            "a whole Stable Diffusion 1.x/2.x checkpoint \\(UNet, VAE and text encoders in one file\\)")


def test_missing_and_unexpected_keys_are_listed(tiny_transformer, tmp_path):
    state = tiny_transformer.state_dict()
    save_file({k: v for k, v in state.items() if k != "single_blocks.1.linear2.weight"},
              tmp_path / "missing.safetensors")
    _expect(tmp_path / "missing.safetensors", "missing 1 tensors .*single_blocks.1.linear2.weight")
    save_file({**state, "double_blocks.0.img_attn.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    _expect(tmp_path / "extra.safetensors", "1 tensors a FLUX transformer does not have .*img_attn.extra.weight")


def test_diffusers_shard_given_as_single_file(tiny_transformer, tmp_path):
    save_transformer(tiny_transformer, tmp_path / "transformer", layout="diffusers", max_shard_bytes=200_000)
    shard = sorted((tmp_path / "transformer").glob("*-of-*.safetensors"))[0]
    _expect(shard, "one shard of a sharded diffusers model.*Pass the folder")
    index = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    sorted((tmp_path / "transformer").glob("*-of-*.safetensors"))[-1].unlink()
    _expect(tmp_path / "transformer", "missing from .*download the whole folder again")
    assert weight_map


def test_folder_without_weights_and_bad_dtype(tiny_transformer, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("x")
    _expect(tmp_path / "empty", "no transformer weights in the folder.*README.md")
    save_transformer(tiny_transformer, tmp_path / "m.safetensors")
    _expect(tmp_path / "m.safetensors", "unsupported dtype 'int4'.*bf16, fp16, fp32, fp8.*int8", dtype="int4")


def test_quantize_model_fp8_per_row(tiny_transformer):
    import copy

    from kontext_core.compute.quant import quantize_model

    quantized = quantize_model(copy.deepcopy(tiny_transformer))
    qkv = quantized.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, QuantizedLinear) and qkv.weight_scale.shape == (qkv.out_features,)
    assert rel_error(qkv.dequantized_weight(torch.float32),
                     tiny_transformer.double_blocks[0].img_attn.qkv.weight) < 0.07
    assert rel_error(_velocity(quantized), _velocity(tiny_transformer)) < FP8_TOLERANCE["fp8_e4m3fn"]
