"""Building blocks of the FLUX transformer: embeddings, RoPE, modulation, the two block kinds.

Parameter names follow the BFL checkpoint layout, so a BFL state dict loads with no renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the head dim by the position angles."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


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

    def forward(self, q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(dtype), self.key_norm(k).to(dtype)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, eps 1e-6 as in every FLUX norm."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


@dataclass
class ModulationParams:
    shift: torch.Tensor  # [B, 1, hidden]
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.scale) * layer_norm(x) + self.shift


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.count = 6 if double else 3
        self.lin = nn.Linear(dim, self.count * dim)

    def forward(self, vec: torch.Tensor) -> list[ModulationParams]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.count, dim=-1)
        return [ModulationParams(*chunks[i:i + 3]) for i in range(0, self.count, 3)]


class SelfAttention(nn.Module):
    """The projections of one stream; the attention itself is joint and runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, 3*H*D] -> three [B, H, L, D] tensors."""
    batch, length, _ = qkv.shape
    q, k, v = qkv.view(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear; indices 0 and 2 match the checkpoint's `img_mlp.0/2`."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


class RopeFrequencies:
    """cos/sin tables shared by every block of one forward."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)


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

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                rope: RopeFrequencies) -> tuple[torch.Tensor, torch.Tensor]:
        img_attn_mod, img_mlp_mod = self.img_mod(vec)
        txt_attn_mod, txt_mlp_mod = self.txt_mod(vec)

        img_q, img_k, img_v = split_heads(self.img_attn.qkv(img_attn_mod.modulate(img)), self.num_heads)
        txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv(txt_attn_mod.modulate(txt)), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v.dtype)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v.dtype)

        # Text tokens come first in the joint sequence, as in the reference.
        q, k = rope.rotate(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2))
        joint = attention(q, k, torch.cat((txt_v, img_v), dim=2))
        txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1]:]

        img = img + img_attn_mod.gate * self.img_attn.proj(img_out)
        img = img + img_mlp_mod.gate * self.img_mlp(img_mlp_mod.modulate(img))
        txt = txt + txt_attn_mod.gate * self.txt_attn.proj(txt_out)
        txt = txt + txt_mlp_mod.gate * self.txt_mlp(txt_mlp_mod.modulate(txt))
        return img, txt


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

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: RopeFrequencies) -> torch.Tensor:
        (mod,) = self.modulation(vec)
        qkv, mlp = self.linear1(mod.modulate(x)).split([3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = rope.rotate(*self.norm(q, k, v.dtype))
        out = self.linear2(torch.cat((attention(q, k, v), gelu_tanh(mlp)), dim=2))
        return x + mod.gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * layer_norm(x) + shift[:, None, :])
