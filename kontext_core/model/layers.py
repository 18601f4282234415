"""Building blocks of the FLUX transformer: embeddings, RoPE, modulation, the two block kinds.

Parameter names follow the BFL checkpoint layout, so a BFL state dict loads with no renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compute import fused
from ..compute.attention import joint_attention
from ..compute.fused import apply_rope, layer_norm  # noqa: F401  (part of this module's vocabulary)
from ..compute.quant import QuantizedRows


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000): [B] -> [B, dim], cos half first.

    The angles are float32 whatever the input dtype: both references compute them so, and the
    golden vectors (even the float64 ones) carry that rounding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t)[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(position_ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotated pair, [B, 1, L, head_dim/2] each, from ids [B, L, n_axes]."""
    angles = []
    for axis, axis_dim in enumerate(axes_dim):
        exponent = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=position_ids.device) / axis_dim
        inv_freq = 1.0 / (theta**exponent)
        angles.append(position_ids[..., axis].to(torch.float64)[..., None] * inv_freq)
    angle = torch.cat(angles, dim=-1).unsqueeze(1)
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.linear(self.out_layer, F.silu(fused.linear(self.in_layer, x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least float32: bf16 squares lose too much precision.
        compute = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(compute)
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return normed.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


@dataclass
class ModulationParams:
    shift: torch.Tensor  # [B, 1, hidden]
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        return fused.modulate(x, self.shift, self.scale)

    def input_for(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | QuantizedRows:
        """modulate(x) as `layer`'s input (e4m3 rows with scales when layer is an fp8 layer)."""
        return fused.modulated_input(layer, x, self.shift, self.scale)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.count = 6 if double else 3
        self.lin = nn.Linear(dim, self.count * dim)

    def forward(self, vec: torch.Tensor) -> list[ModulationParams]:
        return self.params(fused.linear(self.lin, F.silu(vec)))

    def params(self, projected: torch.Tensor) -> list[ModulationParams]:
        """The shift, scale and gate sets of this layer's output [B, count * dim], computed here or ahead of
        the step (KontextTransformer.modulation_table)."""
        chunks = projected[:, None, :].chunk(self.count, dim=-1)
        return [ModulationParams(*chunks[i:i + 3]) for i in range(0, self.count, 3)]


class SelfAttention(nn.Module):
    """The projections of one stream; the attention itself is joint and runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class MLP(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear; indices 0 and 2 match the checkpoint's `img_mlp.0/2`."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


class RopeFrequencies:
    """cos/sin tables shared by every block of one forward."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin

    def part(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of positions start..end of the joint sequence (views, no copy)."""
        return self.cos[:, :, start:end], self.sin[:, :, start:end]


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over both."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_dim: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = MLP(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = MLP(hidden_size, mlp_hidden_dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor | None, rope: RopeFrequencies,
                modulation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`modulation`, when given, is this block's two modulation outputs [B, 2 * 6 * hidden] (image, then
        text) computed ahead of the step, and `vec` is not read."""
        if modulation is None:
            img_attn_mod, img_mlp_mod = self.img_mod(vec)
            txt_attn_mod, txt_mlp_mod = self.txt_mod(vec)
        else:
            img_part, txt_part = modulation.chunk(2, dim=-1)
            img_attn_mod, img_mlp_mod = self.img_mod.params(img_part)
            txt_attn_mod, txt_mlp_mod = self.txt_mod.params(txt_part)
        text_length = txt.shape[1]

        # Each op runs for both streams together (fused's pair forms: one launch for both where the kernels take
        # them). Text tokens come first in the joint sequence, as in the reference.
        txt_attn_input, img_attn_input = fused.modulated_input_pair(
            (self.txt_attn.qkv, txt, txt_attn_mod.shift, txt_attn_mod.scale),
            (self.img_attn.qkv, img, img_attn_mod.shift, img_attn_mod.scale))
        txt_qkv, img_qkv = fused.linear_pair((self.txt_attn.qkv, txt_attn_input), (self.img_attn.qkv, img_attn_input))
        streams = [(qkv, stream.norm.query_norm, stream.norm.key_norm)
                   for qkv, stream in ((txt_qkv, self.txt_attn), (img_qkv, self.img_attn))]
        joint = joint_attention(streams, rope.cos, rope.sin, self.num_heads)
        txt_out, img_out = joint[:, :text_length], joint[:, text_length:]

        txt, img = fused.gated_residual_pair((txt, txt_attn_mod.gate, txt_out, self.txt_attn.proj),
                                             (img, img_attn_mod.gate, img_out, self.img_attn.proj))
        txt_up, txt_down = self.txt_mlp[0], self.txt_mlp[2]
        img_up, img_down = self.img_mlp[0], self.img_mlp[2]
        txt_mlp_input, img_mlp_input = fused.modulated_input_pair((txt_up, txt, txt_mlp_mod.shift, txt_mlp_mod.scale),
                                                                  (img_up, img, img_mlp_mod.shift, img_mlp_mod.scale))
        txt_hidden, img_hidden = fused.mlp_hidden_pair((txt_mlp_input, txt_up, txt_down),
                                                       (img_mlp_input, img_up, img_down))
        txt, img = fused.gated_residual_pair((txt, txt_mlp_mod.gate, txt_hidden, txt_down),
                                             (img, img_mlp_mod.gate, img_hidden, img_down))
        return img, txt

    def image_attention_input(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """The image stream's modulated input to attention, (1 + scale) * LayerNorm(img) + shift, unquantized:
        what TeaCache watches from step to step (kontext_core/step_cache.py)."""
        img_attn_mod, _ = self.img_mod(vec)
        return fused.modulate(img, img_attn_mod.shift, img_attn_mod.scale)


class SingleStreamBlock(nn.Module):
    """One weight set over the joint sequence; attention and MLP run in parallel from one linear."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_dim: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = mlp_hidden_dim
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor | None, rope: RopeFrequencies,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        """`modulation`, when given, is this block's modulation output [B, 3 * hidden] computed ahead of the
        step, and `vec` is not read."""
        (mod,) = self.modulation(vec) if modulation is None else self.modulation.params(modulation)

        def attend(qkv: torch.Tensor) -> torch.Tensor:
            return joint_attention([(qkv, self.norm.query_norm, self.norm.key_norm)], rope.cos, rope.sin,
                                   self.num_heads)

        hidden = fused.parallel_attention_mlp(mod.input_for(self.linear1, x), self.linear1, self.linear2,
                                              3 * self.hidden_size, attend)
        return fused.gated_residual(x, mod.gate, hidden, self.linear2)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor | None,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        """`modulation`, when given, is the adaLN output [B, 2 * hidden] computed ahead of the step."""
        if modulation is None:
            modulation = fused.linear(self.adaLN_modulation[1], F.silu(vec))
        shift, scale = modulation.chunk(2, dim=1)
        return fused.linear(self.linear, fused.modulate(x, shift[:, None, :], scale[:, None, :]))
