"""Write our models in the layouts users exchange: BFL, ComfyUI (plain or fp8), diffusers folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..model.autoencoder import Autoencoder
from ..compute.quant import FP8_DTYPES, QuantizedLinear, quantize_weight
from ..model.transformer import KontextTransformer
from .files import CheckpointError, save_atomic, save_sharded, write_text_atomic
from .key_maps import autoencoder_links, to_theirs, transformer_links

TRANSFORMER_LAYOUTS = ("bfl", "comfy", "diffusers")
WEIGHT_FORMATS = (None, "fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_e5m2")
_COMFY_PREFIX = "model.diffusion_model."


def _block_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantizedLinear)) and name.startswith(("double_blocks.", "single_blocks."))]


def _plain_state(model: nn.Module, keep: tuple[torch.dtype, ...] = ()) -> dict[str, torch.Tensor]:
    """Our state dict with 8-bit layers dequantized to their compute dtype, except those stored in `keep`."""
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith(".weight_scale")}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and module.weight.dtype not in keep:
            state[f"{name}.weight"] = module.dequantized_weight()
    return state


def _fp8_state(model: nn.Module, weights: str | None) -> dict[str, torch.Tensor]:
    """The BFL-named state with block linears in float8 as ComfyUI stores them."""
    if weights is None:
        # float8 layers stay as they are; int8 ones are written dequantized: no file format users exchange
        # holds int8 FLUX weights, and loading quantizes them again (dtype="int8").
        state = _plain_state(model, keep=FP8_DTYPES)
        fp8_layers = [n for n, m in model.named_modules()
                      if isinstance(m, QuantizedLinear) and m.weight.dtype in FP8_DTYPES]
        for name in fp8_layers:
            state[f"{name}.scale_weight"] = model.get_submodule(name).weight_scale.detach().float()
        if fp8_layers:
            state["scaled_fp8"] = torch.empty(0, dtype=model.get_submodule(fp8_layers[0]).weight.dtype)
        return state
    state = _plain_state(model)
    fp8_dtype = torch.float8_e5m2 if weights == "fp8_e5m2" else torch.float8_e4m3fn
    scaled = weights.endswith("_scaled")
    for name in _block_linears(model):
        weight = state[f"{name}.weight"]
        if scaled:
            state[f"{name}.weight"], state[f"{name}.scale_weight"] = quantize_weight(weight, fp8_dtype)
        else:
            limit = torch.finfo(fp8_dtype).max
            state[f"{name}.weight"] = weight.float().clamp(-limit, limit).to(fp8_dtype)
    if scaled:
        state["scaled_fp8"] = torch.empty(0, dtype=fp8_dtype)
    return state


def _diffusers_transformer_config(model: KontextTransformer) -> dict:
    c = model.config
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "num_layers": c.depth,
        "num_single_layers": c.depth_single_blocks,
        "attention_head_dim": c.head_dim,
        "num_attention_heads": c.num_heads,
        "joint_attention_dim": c.context_in_dim,
        "pooled_projection_dim": c.vec_in_dim,
        "guidance_embeds": c.guidance_embed,
        "axes_dims_rope": list(c.axes_dim),
    }


def _diffusers_state(links, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for link in links:
        tensor = state[link.ours]
        out.update(to_theirs(link, tensor, lambda name, t: tuple(t.shape[:2]) if t.ndim == 4 and "attentions" in name
                             else tuple(t.shape)))
    return out


def transformer_file_state(model: KontextTransformer, *, layout: str = "bfl",
                           weights: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_transformer` writes in a single-file layout ('bfl', or 'comfy' with ComfyUI's prefix),
    without writing them: what a reader of that file gets (the bench hands ComfyUI's loader this state)."""
    if layout not in ("bfl", "comfy"):
        raise CheckpointError(f"{layout!r} is not a single-file layout; choose 'bfl' or 'comfy'")
    if weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"unknown weight format {weights!r}; choose one of {WEIGHT_FORMATS}")
    prefix = _COMFY_PREFIX if layout == "comfy" else ""
    return {prefix + k: v for k, v in _fp8_state(model, weights).items()}


def save_transformer(model: KontextTransformer, path: str | os.PathLike, *, layout: str = "bfl",
                     weights: str | None = None, max_shard_bytes: int = 10 * 1024**3) -> None:
    """Save in `layout` ('bfl' file, 'comfy' file with ComfyUI's prefix, 'diffusers' folder).

    weights: None keeps the model's own storage (fp8 layers as scaled fp8; int8 layers dequantized to the compute
    dtype); 'fp8_e4m3fn' / 'fp8_e5m2' cast the block linears, 'fp8_e4m3fn_scaled' stores them with per-tensor
    scales (ComfyUI scaled fp8).
    """
    if layout not in TRANSFORMER_LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose one of {', '.join(TRANSFORMER_LAYOUTS)}")
    if weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"unknown weight format {weights!r}; choose one of {WEIGHT_FORMATS}")
    path = Path(path)
    if layout == "diffusers":
        if weights is not None:
            raise CheckpointError("the diffusers layout is written in the model's compute dtype, without fp8")
        path.mkdir(parents=True, exist_ok=True)
        state = _diffusers_state(transformer_links(model.config), _plain_state(model))
        save_sharded(state, path, "diffusion_pytorch_model", max_shard_bytes)
        write_text_atomic(json.dumps(_diffusers_transformer_config(model), indent=2), path / "config.json")
        return
    metadata = {"kontext_core.config": json.dumps(model.config.to_dict())}
    save_atomic(transformer_file_state(model, layout=layout, weights=weights), path, metadata)


def save_autoencoder(model: Autoencoder, path: str | os.PathLike, *, layout: str = "bfl") -> None:
    """Save as BFL's `ae.safetensors` layout, or as a diffusers `vae/` folder (`layout='diffusers'`)."""
    path = Path(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "bfl":
        save_atomic(state, path)
        return
    if layout != "diffusers":
        raise CheckpointError(f"unknown layout {layout!r}; choose 'bfl' or 'diffusers'")
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    save_atomic(_diffusers_state(autoencoder_links(c), state), path / "diffusion_pytorch_model.safetensors")
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": c.in_channels,
        "out_channels": c.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * len(c.ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(c.ch_mult),
        "block_out_channels": [c.ch * m for m in c.ch_mult],
        "layers_per_block": c.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": c.z_channels,
        "norm_num_groups": 32,
        "sample_size": c.resolution,
        "scaling_factor": c.scale_factor,
        "shift_factor": c.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "force_upcast": True,
    }
    write_text_atomic(json.dumps(config, indent=2), path / "config.json")
