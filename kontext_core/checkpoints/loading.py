"""Load the transformer and the autoencoder from the files users have, and save them back.

Models are built on the meta device and filled tensor by tensor, each read from the memory-mapped
file and converted straight to the target device and dtype, so a 24 GB file is never held twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


import torch
from torch import nn

from ..model.autoencoder import Autoencoder
from ..model.config import AutoencoderConfig, TransformerConfig
from ..compute.quant import FP8_DTYPES, quantize_weight, quantized_layers, replace_linears_with_quantized
from ..model.transformer import KontextTransformer
from .canonical import (
    CanonicalTensors,
    canonical_autoencoder,
    canonical_transformer,
    infer_autoencoder_config,
    infer_transformer_config,
)
from .files import CheckpointError, TensorSource, first_few, open_file, open_sharded, refuse_lone_shard
from .layouts import describe_file, find_autoencoder, find_transformer, is_whole_checkpoint, other_diffusion_model

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64,
}
EIGHT_BIT = {"fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
             "int8": torch.int8}


def resolve_dtype(dtype: str | torch.dtype | None) -> tuple[torch.dtype, torch.dtype | None]:
    """(compute dtype, 8-bit weight storage dtype or None) for a user's dtype choice."""
    if dtype is None:
        return torch.bfloat16, None
    if isinstance(dtype, torch.dtype):
        if dtype in EIGHT_BIT.values():
            return torch.bfloat16, dtype
        if dtype in _DTYPES.values():
            return dtype, None
    elif dtype in _DTYPES:
        return _DTYPES[dtype], None
    elif dtype in EIGHT_BIT:
        return torch.bfloat16, EIGHT_BIT[dtype]
    raise CheckpointError(
        f"unsupported dtype {dtype!r}; choose one of bf16, fp16, fp32, fp8 (float8 weights, bf16 compute) or int8 "
        "(int8 block weights and int8 GEMMs where the GPU has them, bf16 compute)"
    )


def _model_files(path: Path, component: str) -> TensorSource:
    """The safetensors source for `component` ('transformer' or 'vae') at a file or folder path."""
    if not path.exists():
        raise CheckpointError(f"model path not found: {path}")
    if path.is_file():
        return open_file(path)
    folder = path / component if (path / component).is_dir() else path
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return open_sharded(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return open_file(files[0])
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"no {component} weights in the folder {folder.name}: expected one .safetensors file or a sharded set "
        f"with its .safetensors.index.json (found: {found})"
    )


def _check_keys(view: CanonicalTensors, expected: set[str], what: str, optional: set[str]) -> None:
    missing = sorted((expected - view.keys()) | set(view.missing))
    unexpected = sorted(set(view.unused) | (view.keys() - expected - optional))
    if missing:
        refuse_lone_shard(view.name)
    if missing:
        raise CheckpointError(
            f"{view.name} is missing {len(missing)} tensors a {what} needs (first: {first_few(missing)}). "
            f"{describe_file(view.keys(), view.name)}; the file may be truncated or a different model. "
            "Download the file again or pick the right one."
        )
    if unexpected:
        raise CheckpointError(
            f"{view.name} has {len(unexpected)} tensors a {what} does not have (first: {first_few(unexpected)}); "
            "it is a different model variant. Pick a FLUX.1 Kontext [dev] or FLUX.1 [dev] file."
        )


def _convert(view: CanonicalTensors, model: nn.Module, compute_dtype: torch.dtype,
             device: torch.device, quantized_names: set[str]) -> dict[str, torch.Tensor]:
    """Read every tensor the model needs, converted for it; 8-bit layers get 8-bit weights and scales."""
    state: dict[str, torch.Tensor] = {}
    for key in model.state_dict().keys():
        layer, _, param = key.rpartition(".")
        if layer in quantized_names:
            if param == "weight_scale":
                continue  # written with the weight
            if param == "weight":
                weight, scale = _quantized_weight(view, layer, model.get_submodule(layer).weight.dtype)
                state[key] = _owned(weight, weight.to(device))
                state[f"{layer}.weight_scale"] = _owned(scale, scale.to(device))
                continue
        tensor = view.get(key)
        if tensor.dtype in FP8_DTYPES:
            scale = view.get(f"{layer}.weight_scale").float() if f"{layer}.weight_scale" in view.shapes else None
            tensor = tensor.float() * (_rows(scale) if scale is not None else 1.0)
        state[key] = _owned(tensor, tensor.to(device=device, dtype=compute_dtype))
    return state


def _owned(source: torch.Tensor, converted: torch.Tensor) -> torch.Tensor:
    """The reader's buffers are not 64-byte aligned, which changes CPU kernels' summation order
    (and speed); a tensor that needed no conversion gets its own aligned copy."""
    return converted.clone() if converted.data_ptr() == source.data_ptr() else converted


def _rows(scale: torch.Tensor) -> torch.Tensor:
    scale = scale.reshape(-1) if scale.numel() > 1 else scale.reshape(())
    return scale[:, None] if scale.ndim == 1 else scale


def _quantized_weight(view: CanonicalTensors, layer: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight in the 8-bit `dtype` with its scale: float8 weights as stored for float8 layers;
    anything else quantized (int8 per row, from float8 weights dequantized first)."""
    weight = view.get(f"{layer}.weight")
    if weight.dtype in FP8_DTYPES:
        scale_key = f"{layer}.weight_scale"
        scale = view.get(scale_key).float() if scale_key in view.shapes else torch.ones(())
        scale = scale.reshape(-1) if scale.numel() > 1 else scale.reshape(())
        if dtype != torch.int8:
            return weight, scale
        weight = weight.float() * _rows(scale)
    return quantize_weight(weight, dtype, per_row=dtype == torch.int8)


def _build(model_cls, config, storage: torch.dtype | None, quantized_names: set[str], view: CanonicalTensors,
           compute_dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(config)
    if storage is not None:
        dtypes = {name: view.dtypes.get(f"{name}.weight") for name in quantized_names}
        # A float8 file keeps its own float8 dtype in an fp8 model; an int8 model is int8 throughout.
        dtypes = {name: (d if d in FP8_DTYPES and storage != torch.int8 else storage) for name, d in dtypes.items()}
        replace_linears_with_quantized(model, quantized_names, dtypes, compute_dtype)
    return model


def _quantized_layers(model: nn.Module, view: CanonicalTensors, storage: torch.dtype) -> set[str]:
    """Linear layers to keep in 8 bits: the block linears `quant.quantized_layers` names for `storage`, plus,
    for fp8, any other layer the file stores in float8."""
    names = set(quantized_layers(model, storage))
    if storage != torch.int8:
        names |= {name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and view.dtypes.get(f"{name}.weight") in FP8_DTYPES}
    return names


def load_transformer(path: str | os.PathLike, *, config: TransformerConfig | None = None,
                     dtype: str | torch.dtype | None = "bf16",
                     device: str | torch.device = "cpu") -> KontextTransformer:
    """A FLUX.1 Kontext (or FLUX.1 [dev]) transformer from a BFL, ComfyUI (incl. fp8) or diffusers file/folder.

    dtype: bf16, fp16, fp32, fp8 (float8 weights kept; fp8 GEMMs on Ada/Hopper, else upcast per layer; bf16
    compute) or int8 (block linears but the modulation quantized to int8 per row; int8 GEMMs where our Triton
    kernel runs, Ampere and newer, else upcast per layer; bf16 compute).
    """
    path = Path(path)
    compute_dtype, storage = resolve_dtype(dtype)
    source = _model_files(path, "transformer")
    keys = set(source.keys())
    layout = find_transformer(keys)
    if layout is None:
        refuse_lone_shard(path.name)
        hint = ""
        if is_whole_checkpoint(keys):
            hint = " It goes in ComfyUI's models/checkpoints, for Load Checkpoint."
        elif other_diffusion_model(keys):
            hint = (" It does not run here: use a FLUX.1 Kontext transformer file instead (in ComfyUI, e.g. "
                    "flux1-dev-kontext_fp8_scaled.safetensors in models/diffusion_models, for Load Kontext Model).")
        elif find_autoencoder(keys):
            hint = " Load it with load_autoencoder (in ComfyUI it belongs in models/vae, for Load Kontext VAE)."
        raise CheckpointError(
            f"{describe_file(keys, path.name)}, not a FLUX transformer.{hint} "
            "Expected flux1-kontext-dev.safetensors (or an fp8 / diffusers version of it)."
        )
    view = canonical_transformer(source, layout, path.name, _transformer_shapes)
    config = config or infer_transformer_config(view.shapes, path.name)
    model = _load(KontextTransformer, config, view, compute_dtype, storage, torch.device(device), "FLUX transformer")
    return model


def _transformer_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in KontextTransformer(config).state_dict().items()}


def _autoencoder_shapes(config: AutoencoderConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Autoencoder(config).state_dict().items()}


def _load(model_cls, config, view: CanonicalTensors, compute_dtype: torch.dtype, storage: torch.dtype | None,
          device: torch.device, what: str) -> nn.Module:
    with torch.device("meta"):
        plain = model_cls(config)
    scales = {f"{name}.weight_scale" for name, m in plain.named_modules() if isinstance(m, nn.Linear)}
    _check_keys(view, set(plain.state_dict().keys()), what, optional=scales)
    quantized_names = _quantized_layers(plain, view, storage) if storage is not None else set()
    model = _build(model_cls, config, storage, quantized_names, view, compute_dtype)
    for name, shape in _shapes_of(model).items():
        stored = view.shapes.get(name)
        if stored is not None and tuple(stored) != shape and not name.endswith("weight_scale"):
            raise CheckpointError(
                f"{view.name}: tensor {name} has shape {list(stored)} but the config needs {list(shape)}; "
                "the explicit config does not match this file (leave config unset to infer it)."
            )
    state = _convert(view, model, compute_dtype, device, quantized_names)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def _shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_vae_factors(path: Path) -> tuple[float | None, float | None]:
    folder = path / "vae" if (path / "vae").is_dir() else path
    config_file = folder / "config.json" if folder.is_dir() else None
    if config_file is None or not config_file.exists():
        return None, None
    values = json.loads(config_file.read_text())
    return values.get("scaling_factor"), values.get("shift_factor")


def load_autoencoder(path: str | os.PathLike, *, config: AutoencoderConfig | None = None,
                     dtype: str | torch.dtype | None = "fp32", device: str | torch.device = "cpu") -> Autoencoder:
    """The FLUX autoencoder from `ae.safetensors`, a diffusers `vae/` folder, or a bundled checkpoint."""
    path = Path(path)
    compute_dtype, storage = resolve_dtype(dtype)
    if storage is not None:
        raise CheckpointError(f"the autoencoder does not run in {dtype}; choose bf16, fp16 or fp32")
    source = _model_files(path, "vae")
    keys = set(source.keys())
    layout = find_autoencoder(keys)
    if layout is None:
        refuse_lone_shard(path.name)
        hint = " Load it with load_transformer (in ComfyUI it belongs in models/diffusion_models)." \
            if find_transformer(keys) else ""
        raise CheckpointError(
            f"{describe_file(keys, path.name)}, not a FLUX autoencoder.{hint} Expected ae.safetensors "
            "(the FLUX VAE) or a diffusers vae/ folder."
        )
    view = canonical_autoencoder(source, layout, path.name, _autoencoder_shapes)
    if config is None:
        scale, shift = _diffusers_vae_factors(path) if path.is_dir() else (None, None)
        config = infer_autoencoder_config(view.shapes, path.name, scale, shift)
    if config.z_channels != 16:
        raise CheckpointError(
            f"{path.name} is an autoencoder with {config.z_channels} latent channels; FLUX needs the 16-channel "
            "FLUX VAE (ae.safetensors), not an SD/SDXL VAE."
        )
    return _load(Autoencoder, config, view, compute_dtype, None, torch.device(device), "FLUX autoencoder")




def inspect_model(path: str | os.PathLike) -> dict:
    """What a model file or folder holds, read from its headers only (nothing is loaded)."""
    path = Path(path)
    component = ("vae" if path.is_dir() and not (path / "transformer").is_dir() and (path / "vae").is_dir()
                 else "transformer")
    source = _model_files(path, component)
    keys = set(source.keys())
    storage: dict[str, int] = {}
    for info in source.tensors.values():
        storage[info.dtype] = storage.get(info.dtype, 0) + 1
    report = {"file": path.name, "tensors": len(keys), "storage_dtypes": storage,
              "what": describe_file(keys, path.name)}
    transformer, autoencoder = find_transformer(keys), find_autoencoder(keys)
    if transformer:
        view = canonical_transformer(source, transformer, path.name, _transformer_shapes)
        report.update(kind="transformer", layout=transformer.style, prefix=transformer.prefix,
                      config=infer_transformer_config(view.shapes, path.name).to_dict(),
                      scaled_fp8=any(k.endswith(".weight_scale") for k in view.keys()))
    if autoencoder and transformer:
        report.update(bundled_autoencoder=True)
    elif autoencoder:
        try:
            view = canonical_autoencoder(source, autoencoder, path.name, _autoencoder_shapes)
            report.update(kind="autoencoder", layout=autoencoder.style, prefix=autoencoder.prefix,
                          config=infer_autoencoder_config(view.shapes, path.name).to_dict())
        except CheckpointError as error:  # part of another kind of file (an SD checkpoint's VAE): say so, go on
            report.update(kind="unknown", problem=str(error))
    report["parameters"] = sum(int(torch.Size(i.shape).numel()) for i in source.tensors.values())
    return report
