"""Model configurations: the real FLUX.1 Kontext [dev] values as defaults, tiny ones for tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class _SavedConfig:
    """A config as plain data, for files' metadata: keys a newer version added are ignored when read back, and
    tuples are written as JSON lists."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class TransformerConfig(_SavedConfig):
    in_channels: int = 64  # 16 latent channels x a 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled output
    context_in_dim: int = 4096  # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims for (index, row, column)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"RoPE axes_dim {list(self.axes_dim)} sum to {sum(self.axes_dim)}, "
                f"but the head dim is {self.head_dim}; they must be equal"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(f"every RoPE axis dim must be even, got {list(self.axes_dim)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @classmethod
    def tiny(cls, **overrides: Any) -> "TransformerConfig":
        """A small consistent config (the golden vectors' shape) for tests."""
        values = dict(
            vec_in_dim=32,
            context_in_dim=48,
            hidden_size=128,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=(8, 28, 28),
        )
        values.update(overrides)
        return cls(**values)



@dataclass(frozen=True)
class AutoencoderConfig(_SavedConfig):
    resolution: int = dataclasses.field(default=256, compare=False)  # nominal only; any size runs
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def tiny(cls, **overrides: Any) -> "AutoencoderConfig":
        """The golden vectors' tiny AE: 2x downsampling, one res block."""
        values = dict(resolution=64, ch=32, ch_mult=(1, 2), num_res_blocks=1)
        values.update(overrides)
        return cls(**values)

