"""How the diffusers layout's tensors correspond to ours (the BFL layout), both ways.

Each `KeyLink` ties one of our tensors to the diffusers tensors it is made of. Diffusers splits
the fused projections (qkv, and the single blocks' qkv+mlp `linear1`) and stores the final
modulation as (scale, shift) where BFL has (shift, scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..model.config import AutoencoderConfig, TransformerConfig


@dataclass(frozen=True)
class KeyLink:
    ours: str
    theirs: tuple[str, ...]
    kind: str = "same"  # same | concat | swap_halves
    split: tuple[int, ...] = ()  # row counts of `theirs` for concat


def to_ours(link: KeyLink, tensors: list[torch.Tensor], our_shape: tuple[int, ...] | None) -> torch.Tensor:
    if link.kind == "concat":
        out = torch.cat(tensors, dim=0)
    elif link.kind == "swap_halves":
        scale, shift = tensors[0].chunk(2, dim=0)
        out = torch.cat((shift, scale), dim=0)
    else:
        out = tensors[0]
    # 1x1 convolutions are Linear weights in diffusers' AE attention.
    return out.reshape(our_shape) if our_shape is not None and tuple(out.shape) != tuple(our_shape) else out


def to_theirs(link: KeyLink, tensor: torch.Tensor,
              their_shape: Callable[[str, torch.Tensor], tuple[int, ...]]) -> dict[str, torch.Tensor]:
    if link.kind == "concat":
        parts = tensor.split(list(link.split), dim=0)
        return {name: part for name, part in zip(link.theirs, parts)}
    if link.kind == "swap_halves":
        shift, scale = tensor.chunk(2, dim=0)
        return {link.theirs[0]: torch.cat((scale, shift), dim=0)}
    name = link.theirs[0]
    return {name: tensor.reshape(their_shape(name, tensor))}


def _linear(ours: str, theirs: str, bias: bool = True) -> list[KeyLink]:
    links = [KeyLink(f"{ours}.weight", (f"{theirs}.weight",))]
    if bias:
        links.append(KeyLink(f"{ours}.bias", (f"{theirs}.bias",)))
    return links


def _fused(ours: str, theirs: list[str], split: tuple[int, ...], bias: bool = True) -> list[KeyLink]:
    links = [KeyLink(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), "concat", split)]
    if bias:
        links.append(KeyLink(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), "concat", split))
    return links


def transformer_links(config: TransformerConfig) -> list[KeyLink]:
    hidden = config.hidden_size
    links = _linear("img_in", "x_embedder") + _linear("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for ours, theirs in embedders:
        links += _linear(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        links += _linear(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")

    qkv_split = (hidden, hidden, hidden)
    for i in range(config.depth):
        ours, theirs = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, q, k, v, out, nq, nk, ff in (
            ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
            ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "norm_added_q", "norm_added_k", "ff_context"),
        ):
            links += _linear(f"{ours}.{stream}_mod.lin", f"{theirs}.{mod}.linear")
            links += _fused(f"{ours}.{stream}_attn.qkv", [f"{theirs}.attn.{n}" for n in (q, k, v)],
                            qkv_split, config.qkv_bias)
            links.append(KeyLink(f"{ours}.{stream}_attn.norm.query_norm.scale", (f"{theirs}.attn.{nq}.weight",)))
            links.append(KeyLink(f"{ours}.{stream}_attn.norm.key_norm.scale", (f"{theirs}.attn.{nk}.weight",)))
            links += _linear(f"{ours}.{stream}_attn.proj", f"{theirs}.attn.{out}")
            links += _linear(f"{ours}.{stream}_mlp.0", f"{theirs}.{ff}.net.0.proj")
            links += _linear(f"{ours}.{stream}_mlp.2", f"{theirs}.{ff}.net.2")

    linear1_split = (hidden, hidden, hidden, config.mlp_hidden_dim)
    for i in range(config.depth_single_blocks):
        ours, theirs = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        links += _fused(f"{ours}.linear1",
                        [f"{theirs}.attn.to_q", f"{theirs}.attn.to_k", f"{theirs}.attn.to_v", f"{theirs}.proj_mlp"],
                        linear1_split)
        links += _linear(f"{ours}.linear2", f"{theirs}.proj_out")
        links.append(KeyLink(f"{ours}.norm.query_norm.scale", (f"{theirs}.attn.norm_q.weight",)))
        links.append(KeyLink(f"{ours}.norm.key_norm.scale", (f"{theirs}.attn.norm_k.weight",)))
        links += _linear(f"{ours}.modulation.lin", f"{theirs}.norm.linear")

    links += _linear("final_layer.linear", "proj_out")
    links += [
        KeyLink("final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), "swap_halves"),
        KeyLink("final_layer.adaLN_modulation.1.bias", ("norm_out.linear.bias",), "swap_halves"),
    ]
    return links


def _affine(ours: str, theirs: str) -> list[KeyLink]:
    return [KeyLink(f"{ours}.weight", (f"{theirs}.weight",)), KeyLink(f"{ours}.bias", (f"{theirs}.bias",))]


def _resnet(ours: str, theirs: str, has_shortcut: bool) -> list[KeyLink]:
    links = []
    for name in ("norm1", "conv1", "norm2", "conv2"):
        links += _affine(f"{ours}.{name}", f"{theirs}.{name}")
    if has_shortcut:
        links += _affine(f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut")
    return links


def _mid(ours: str, theirs: str) -> list[KeyLink]:
    links = _resnet(f"{ours}.block_1", f"{theirs}.resnets.0", False)
    links += _affine(f"{ours}.attn_1.norm", f"{theirs}.attentions.0.group_norm")
    for name, their_name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        links += _affine(f"{ours}.attn_1.{name}", f"{theirs}.attentions.0.{their_name}")
    links += _resnet(f"{ours}.block_2", f"{theirs}.resnets.1", False)
    return links


def autoencoder_links(config: AutoencoderConfig) -> list[KeyLink]:
    ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
    links = _affine("encoder.conv_in", "encoder.conv_in")
    block_in = ch
    for level in range(levels):
        block_out = ch * mult[level]
        for j in range(config.num_res_blocks):
            links += _resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}",
                             block_in != block_out)
            block_in = block_out
        if level != levels - 1:
            links += _affine(f"encoder.down.{level}.downsample.conv",
                             f"encoder.down_blocks.{level}.downsamplers.0.conv")
    links += _mid("encoder.mid", "encoder.mid_block")
    links += _affine("encoder.norm_out", "encoder.conv_norm_out") + _affine("encoder.conv_out", "encoder.conv_out")

    links += _affine("decoder.conv_in", "decoder.conv_in")
    links += _mid("decoder.mid", "decoder.mid_block")
    block_in = ch * mult[-1]
    # diffusers numbers decoder levels from the coarsest; BFL by resolution (0 = full size).
    for up_index, level in enumerate(reversed(range(levels))):
        block_out = ch * mult[level]
        for j in range(config.num_res_blocks + 1):
            links += _resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up_index}.resnets.{j}",
                             block_in != block_out)
            block_in = block_out
        if level != 0:
            links += _affine(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up_index}.upsamplers.0.conv")
    links += _affine("decoder.norm_out", "decoder.conv_norm_out") + _affine("decoder.conv_out", "decoder.conv_out")
    return links
