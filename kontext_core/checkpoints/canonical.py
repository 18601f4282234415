"""Any supported file, seen through our one key layout (BFL names), tensor by tensor.

A `CanonicalTensors` answers "shape, dtype and value of `double_blocks.3.img_attn.qkv.weight`"
whatever file it was read from; fp8 scales appear as `<layer>.weight_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.config import AutoencoderConfig, TransformerConfig
from .files import CheckpointError, TensorSource
from .key_maps import KeyLink, autoencoder_links, to_ours, transformer_links
from .layouts import QUANT_MARKERS, QUANT_SUFFIXES, Layout

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}

# ComfyUI's scaled-fp8 files name the weight scale `scale_weight`; newer files `weight_scale`.
_SCALE_ALIASES = (".scale_weight", ".weight_scale")


@dataclass
class CanonicalTensors:
    name: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    readers: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)  # source tensors nothing maps to
    missing: list[str] = field(default_factory=list)  # source tensors a mapping needed but the file lacks

    def keys(self) -> set[str]:
        return set(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        return self.readers[key]()

    def add(self, key: str, shape, dtype: torch.dtype, reader: Callable[[], torch.Tensor]) -> None:
        self.shapes[key], self.dtypes[key], self.readers[key] = tuple(shape), dtype, reader


def _is_quant_marker(key: str) -> bool:
    return key in QUANT_MARKERS or key.endswith(QUANT_SUFFIXES)


def _source_dtype(source: TensorSource, key: str) -> torch.dtype:
    name = source.tensors[key].dtype
    if name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{source.description}: tensor {key!r} has dtype {name}, which FLUX files never use")
    return SAFETENSORS_DTYPES[name]


def from_bfl_layout(source: TensorSource, name: str) -> CanonicalTensors:
    view = CanonicalTensors(name)
    for key in source.keys():
        if _is_quant_marker(key):
            continue
        canonical = key
        for alias in _SCALE_ALIASES:
            if key.endswith(alias):
                canonical = key[: -len(alias)] + ".weight_scale"
        view.add(canonical, source.shape(key), _source_dtype(source, key), lambda key=key: source.get(key))
    return view


def from_links(source: TensorSource, links: list[KeyLink], name: str,
               our_shapes: dict[str, tuple[int, ...]]) -> CanonicalTensors:
    view = CanonicalTensors(name)
    used: set[str] = set()
    for link in links:
        absent = [t for t in link.theirs if t not in source]
        if absent:
            view.missing += absent
            continue
        used.update(link.theirs)
        shape = our_shapes.get(link.ours)
        dtype = _source_dtype(source, link.theirs[0])

        def read(link=link, shape=shape) -> torch.Tensor:
            return to_ours(link, [source.get(t) for t in link.theirs], shape)

        view.add(link.ours, shape if shape is not None else source.shape(link.theirs[0]), dtype, read)
    view.unused = sorted(k for k in source.keys() if k not in used and not _is_quant_marker(k))
    return view


def _count(keys, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _shape(shapes: dict, key: str, name: str, kind: str = "FLUX transformer") -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(
            f"{name} lacks {key!r}, which every {kind} has; the file is incomplete or not a {kind}."
        )
    return shapes[key]


def _ae_shape(shapes: dict, key: str, name: str) -> tuple[int, ...]:
    return _shape(shapes, key, name, "FLUX autoencoder")


def _check_image_channels(config: TransformerConfig, name: str) -> TransformerConfig:
    # FLUX Fill, Depth and Canny take extra conditioning channels beside the latent's (384 / 128 in, 64 out).
    if config.in_channels != config.out_channels:
        raise CheckpointError(
            f"{name} is a FLUX model whose image input takes {config.in_channels} channels for {config.out_channels} "
            "out (FLUX.1 Fill, Depth or Canny, which condition on a mask or control image); Kontext needs "
            "flux1-kontext-dev (64 in, 64 out). Load that file instead."
        )
    return config


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX splits a head as 1/8 for the index axis and 7/16 for each spatial axis (16/56/56 at 128)."""
    return head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16


def infer_transformer_config(shapes: dict[str, tuple[int, ...]], name: str) -> TransformerConfig:
    """The config a BFL-layout state dict was built with, from its tensor shapes alone."""
    hidden, in_channels = _shape(shapes, "img_in.weight", name)
    head_dim = _shape(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", name)[0] \
        if "double_blocks.0.img_attn.norm.query_norm.scale" in shapes \
        else _shape(shapes, "single_blocks.0.norm.query_norm.scale", name)[0]
    mlp_hidden = _shape(shapes, "double_blocks.0.img_mlp.0.weight", name)[0] \
        if "double_blocks.0.img_mlp.0.weight" in shapes \
        else _shape(shapes, "single_blocks.0.linear1.weight", name)[0] - 3 * hidden
    return _check_image_channels(TransformerConfig(
        in_channels=in_channels,
        out_channels=_shape(shapes, "final_layer.linear.weight", name)[0],
        vec_in_dim=_shape(shapes, "vector_in.in_layer.weight", name)[1],
        context_in_dim=_shape(shapes, "txt_in.weight", name)[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=_count(shapes, "double_blocks."),
        depth_single_blocks=_count(shapes, "single_blocks."),
        axes_dim=default_axes_dim(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    ), name)


def _diffusers_transformer_config(source: TensorSource, name: str) -> TransformerConfig:
    shapes = {k: source.shape(k) for k in source.keys()}
    hidden, in_channels = _shape(shapes, "x_embedder.weight", name)
    head_dim = _shape(shapes, "transformer_blocks.0.attn.norm_q.weight", name)[0] \
        if "transformer_blocks.0.attn.norm_q.weight" in shapes \
        else _shape(shapes, "single_transformer_blocks.0.attn.norm_q.weight", name)[0]
    mlp_hidden = _shape(shapes, "single_transformer_blocks.0.proj_mlp.weight", name)[0] \
        if "single_transformer_blocks.0.proj_mlp.weight" in shapes \
        else _shape(shapes, "transformer_blocks.0.ff.net.0.proj.weight", name)[0]
    return _check_image_channels(TransformerConfig(
        in_channels=in_channels,
        out_channels=_shape(shapes, "proj_out.weight", name)[0],
        vec_in_dim=_shape(shapes, "time_text_embed.text_embedder.linear_1.weight", name)[1],
        context_in_dim=_shape(shapes, "context_embedder.weight", name)[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=_count(shapes, "transformer_blocks."),
        depth_single_blocks=_count(shapes, "single_transformer_blocks."),
        axes_dim=default_axes_dim(head_dim),
        qkv_bias=True,
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
    ), name)


def infer_autoencoder_config(shapes: dict[str, tuple[int, ...]], name: str,
                             scale_factor: float | None = None, shift_factor: float | None = None) -> AutoencoderConfig:
    ch, in_channels = _ae_shape(shapes, "encoder.conv_in.weight", name)[:2]
    levels = _count(shapes, "encoder.down.")
    mult = tuple(_ae_shape(shapes, f"encoder.down.{i}.block.0.conv1.weight", name)[0] // ch for i in range(levels))
    defaults = AutoencoderConfig()
    return AutoencoderConfig(
        in_channels=in_channels,
        ch=ch,
        out_ch=_ae_shape(shapes, "decoder.conv_out.weight", name)[0],
        ch_mult=mult,
        num_res_blocks=_count(shapes, "encoder.down.0.block."),
        z_channels=_ae_shape(shapes, "decoder.conv_in.weight", name)[1],
        scale_factor=defaults.scale_factor if scale_factor is None else scale_factor,
        shift_factor=defaults.shift_factor if shift_factor is None else shift_factor,
    )


def _diffusers_autoencoder_config(source: TensorSource, name: str) -> AutoencoderConfig:
    shapes = {k: source.shape(k) for k in source.keys()}
    ch, in_channels = _ae_shape(shapes, "encoder.conv_in.weight", name)[:2]
    levels = _count(shapes, "encoder.down_blocks.")
    mult = tuple(_ae_shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", name)[0] // ch
                 for i in range(levels))
    return AutoencoderConfig(
        in_channels=in_channels, ch=ch, out_ch=_ae_shape(shapes, "decoder.conv_out.weight", name)[0], ch_mult=mult,
        num_res_blocks=_count(shapes, "encoder.down_blocks.0.resnets."),
        z_channels=_ae_shape(shapes, "decoder.conv_in.weight", name)[1],
    )


def canonical_transformer(source: TensorSource, layout: Layout, name: str,
                          our_shapes_for: Callable[[TransformerConfig], dict]) -> CanonicalTensors:
    source = source.subset(layout.prefix) if layout.prefix else source
    if layout.style == "bfl":
        return from_bfl_layout(source, name)
    config = _diffusers_transformer_config(source, name)
    return from_links(source, transformer_links(config), name, our_shapes_for(config))


def canonical_autoencoder(source: TensorSource, layout: Layout, name: str,
                          our_shapes_for: Callable[[AutoencoderConfig], dict]) -> CanonicalTensors:
    source = source.subset(layout.prefix) if layout.prefix else source
    if layout.style == "bfl":
        return from_bfl_layout(source, name)
    config = _diffusers_autoencoder_config(source, name)
    return from_links(source, autoencoder_links(config), name, our_shapes_for(config))
