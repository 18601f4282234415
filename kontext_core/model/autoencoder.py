"""The FLUX autoencoder: 16 latent channels, 8x downsampling; names follow BFL's `ae.safetensors`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


# Scores held at once by the AE's attention, over the whole batch. Its single 512-wide head is beyond the fused SDPA
# kernels, so PyTorch runs it as plain matmuls: unchunked, a 1024x1024 image's 16384x16384 scores took ~2.3 GiB, more
# than the rest of the AE, tiled or not (measured on an H100).
ATTENTION_SCORE_BUDGET = 1 << 24


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections.

    `fused_attention` (off: the exact path) hands SDPA contiguous q/k/v. The transposed views it gets otherwise have
    a strided last dimension, which every fused kernel refuses, so PyTorch runs its math path: float32 matmuls
    without tensor cores. Contiguous, the memory-efficient kernel takes the 512-wide head in bf16 with float32
    scores, ~3.6 instead of ~13.6 ms at 1024x1024 on an H200 and the same error against float64
    (bench/RESULTS.md), and holds no score matrix, so it needs no query chunks."""

    def __init__(self, channels: int):
        super().__init__()
        self.fused_attention = False
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def as_sequence(t: torch.Tensor) -> torch.Tensor:  # [B, 1, H*W, C]
            return t.reshape(batch, 1, channels, height * width).transpose(-1, -2)

        out = self.attend(as_sequence(self.q(h)), as_sequence(self.k(h)), as_sequence(self.v(h)))
        return x + self.proj_out(out.transpose(-1, -2).reshape(batch, channels, height, width))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q, k, v [B, 1, H*W, C] as this block runs it (`fused_attention` or not)."""
        if self.fused_attention:
            return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        # Query rows are independent, so chunks of them give the same result in bounded memory.
        chunk = max(1, ATTENTION_SCORE_BUDGET // (q.shape[0] * k.shape[-2]))
        if chunk >= q.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.cat([F.scaled_dot_product_attention(q[..., start:start + chunk, :], k, v)
                          for start in range(0, q.shape[-2], chunk)], dim=-2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only) as the original LDM autoencoder.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (res blocks), `attn` (always empty in FLUX), optional resampler
    (`downsample` in the encoder, `upsample` in the decoder; the names are the checkpoints' keys)."""

    def __init__(self, blocks: list[ResnetBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        resample = getattr(self, "downsample", None) or getattr(self, "upsample", None)
        return resample(h) if resample is not None else h


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, level_mult in enumerate(mult):
            block_out = ch * level_mult
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            down = _Level(blocks)
            if level != len(mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The downsampling path: image -> latent-resolution features (what tiled encoding splits)."""
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Mid block (global attention) and output layers: features -> moments."""
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for level in reversed(range(len(mult))):
            block_out = ch * mult[level]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            up = _Level(blocks)
            if level != 0:
                up.upsample = Upsample(block_in)
            levels.insert(0, up)
        # Indexed by resolution level (0 = full resolution), run from the coarsest.
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def body(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the mid block (global attention), at the latent resolution."""
        return self.mid(self.conv_in(z))

    def upsampling(self, h: torch.Tensor) -> torch.Tensor:
        """The upsampling path and output layers (what tiled decoding splits)."""
        for up in reversed(self.up):
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsampling(self.body(z))


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = config = config or AutoencoderConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def compile_parts(self, **options) -> "Autoencoder":
        """Compile the encoder and the decoder (each as one graph, torch.compile): ~2x faster at 1024x1024 on an
        H200 (its norms, SiLUs and residual adds fused between the convolutions; bench/RESULTS.md), after ~a minute
        of compilation at the first image size and a dynamic-shape one at the second. Tiled passes call the
        parts' pieces and stay eager."""
        self.encoder.compile(**options)
        self.decoder.compile(**options)
        return self

    def use_fused_attention(self, enabled: bool = True) -> "Autoencoder":
        """Run the encoder's and the decoder's attention through SDPA's fused kernels (AttnBlock.fused_attention):
        the fast preset's choice; bf16 values rounded in another order than the exact path's. torch.compile
        guards on the flag: a change after the first compiled call costs a recompilation."""
        for block in self.modules():
            if isinstance(block, AttnBlock):
                block.fused_attention = enabled
        return self

    @property
    def parts_compiled(self) -> bool:
        return getattr(self.encoder, "_compiled_call_impl", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> scaled latent [B, 16, H/8, W/8] (posterior mean)."""
        return self.latent_from_moments(self.encoder(image.to(self.dtype)))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in about [-1, 1]."""
        return self.decoder(self.unscale(latent))

    def latent_from_moments(self, moments: torch.Tensor) -> torch.Tensor:
        """The encoder's moments -> scaled latent (the posterior mean)."""
        mean = moments[:, : self.config.z_channels]
        return self.config.scale_factor * (mean - self.config.shift_factor)

    def unscale(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> what the decoder takes."""
        return latent.to(self.dtype) / self.config.scale_factor + self.config.shift_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image))
