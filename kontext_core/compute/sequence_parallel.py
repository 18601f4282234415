"""One transformer step split over its tokens across the processes of a torch.distributed group (Ulysses).

Every process holds the whole model and runs every layer on its share of the tokens: its chunk of the text
tokens and its chunk of the image tokens (target and context together). Only attention needs every token:
para-attn's Ulysses attention trades the token split for a head split, one all-to-all before attention and
one after, so that each process attends over the whole sequence with H/N of the heads. At the end the image
tokens' velocities are gathered, and every process carries on sampling with the same full latent (the noise
comes from a CPU generator, so the same seed gives every process the same noise).

All-to-all wants equal chunks, so each stream's tokens are padded up to a multiple of N. The padding rows go
through the per-token layers (their values are never read) and are dropped before attention computes: they
are neither keys nor queries, and the result equals the single-process one up to float summation order.

On GPUs the group is NCCL's, on CPUs gloo's (CI runs two gloo processes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["SequenceParallel", "ShardLayout", "TokenChunks", "para_attn_unavailable_reason"]

INSTALL_HINT = "pip install para-attn==0.3.24"


@functools.cache
def _ulysses():
    from para_attn.para_attn_interface import ulysses_attn_func

    return ulysses_attn_func


def para_attn_unavailable_reason() -> str | None:
    """None when para-attn (the Ulysses attention this module runs on) imports, else why not and the fix."""
    try:
        _ulysses()
    except Exception as error:
        return f"para-attn cannot be imported ({type(error).__name__}: {error}); {INSTALL_HINT}"
    return None


# torch 2.13 renamed all_gather_into_tensor (deprecated there); older versions have only that name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TokenChunks:
    """One stream of `length` tokens cut into `world` chunks of `chunk` tokens (the last ones padded)."""

    length: int
    world: int

    @property
    def chunk(self) -> int:
        return -(-self.length // self.world)

    def real(self, rank: int) -> int:
        """How many of rank `rank`'s chunk rows are tokens, not padding."""
        return max(0, min(self.chunk, self.length - rank * self.chunk))

    def take(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s chunk of x [B, length, ...] along dim 1, zero-padded to `chunk` rows."""
        start = rank * self.chunk
        part = x[:, start:start + self.chunk]
        missing = self.chunk - part.shape[1]
        if missing:
            part = torch.cat((part, part.new_zeros((part.shape[0], missing, *part.shape[2:]))), dim=1)
        return part


class ShardLayout:
    """How one forward's text and image tokens are spread over the group, and where the real tokens sit in
    the sequence that Ulysses' all-to-all gathers: each rank's [text chunk, image chunk], rank after rank."""

    def __init__(self, parallel: SequenceParallel, text_length: int, image_length: int, device: torch.device):
        self.parallel = parallel
        world, rank = parallel.world, parallel.rank
        self.text = TokenChunks(text_length, world)
        self.image = TokenChunks(image_length, world)
        self.rank = rank
        local = self.text.chunk + self.image.chunk
        self.gathered_length = world * local
        rows = []
        for source in range(world):
            start = source * local
            rows.append(torch.arange(start, start + self.text.real(source)))
            start += self.text.chunk
            rows.append(torch.arange(start, start + self.image.real(source)))
        keep = torch.cat(rows)
        # None when nothing is padded: attention then runs on the gathered tensors as they are.
        self.keep = keep.to(device) if keep.numel() < self.gathered_length else None

    def shard_text(self, x: torch.Tensor) -> torch.Tensor:
        return self.text.take(x, self.rank)

    def shard_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image.take(x, self.rank)

    def gather_image(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's image chunk of x [B, chunk, C] -> the whole [B, image length, C], on every rank."""
        chunks = x.transpose(0, 1).contiguous()  # rank-major along dim 0 once gathered: [world * chunk, B, C]
        gathered = chunks.new_empty((self.parallel.world * chunks.shape[0], *chunks.shape[1:]))
        _all_gather_single(gathered, chunks, group=self.parallel.group)
        return gathered.transpose(0, 1)[:, :self.image.length]

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the group, in place (step caching's change measures: one decision for all)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.parallel.group)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               heads_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Attention of this rank's tokens [B, H, L_local, D] over every rank's: [B, H, L_local, D].
        `heads_attention` computes attention over whole [B, h, L, D] tensors on each rank's share of heads."""
        ulysses_attn_func = _ulysses()
        if q.shape[2] * self.parallel.world != self.gathered_length:
            raise RuntimeError(f"sequence parallel attention got {q.shape[2]} tokens on this rank, but the layout "
                               f"holds {self.gathered_length // self.parallel.world} (text + image chunks)")
        return ulysses_attn_func(q, k, v, mesh=self.parallel.group,
                                 attn_func=functools.partial(_without_padding, keep=self.keep,
                                                             heads_attention=heads_attention))


def _without_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale=None, *, keep: torch.Tensor | None,
                     heads_attention) -> torch.Tensor:
    # para-attn calls this with the gathered sequence and the SDPA keywords, which our attention never sets.
    if attn_mask is not None or dropout_p or is_causal or scale is not None:
        raise ValueError("sequence parallel attention takes no mask, dropout, causality or custom scale")
    if keep is None:
        return heads_attention(q, k, v)
    out = heads_attention(q.index_select(2, keep), k.index_select(2, keep), v.index_select(2, keep))
    full = out.new_zeros(q.shape)
    return full.index_copy_(2, keep, out.contiguous() if out.dtype == full.dtype else out.to(full.dtype))


class SequenceParallel:
    """A torch.distributed process group that transformer steps are split over (Ulysses, over tokens).

    The group must be initialised (`torch.distributed.init_process_group`; torchrun's environment does that
    for the CLI). Each process holds the whole model; the group's size must divide the model's heads.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("sequence parallelism needs an initialised torch.distributed process group: call "
                               "torch.distributed.init_process_group first, or launch the CLI with torchrun "
                               "(torchrun --nproc-per-node N -m kontext_core edit ...)")
        if (reason := para_attn_unavailable_reason()) is not None:
            raise RuntimeError(f"sequence parallelism runs on para-attn's Ulysses attention: {reason}")
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._layouts: dict[tuple, ShardLayout] = {}

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.world:
            divisors = [n for n in range(2, num_heads + 1) if num_heads % n == 0]
            raise ValueError(f"Ulysses sequence parallelism splits attention's {num_heads} heads evenly over the "
                             f"processes; {self.world} does not divide {num_heads}: run on "
                             f"{', '.join(map(str, divisors))} processes")

    def layout(self, text_length: int, image_length: int, device: torch.device, num_heads: int) -> ShardLayout:
        """The layout of a forward with these token counts: made once per shape (every step of a run reuses it,
        so no step waits on copying its indices to the GPU)."""
        key = (text_length, image_length, torch.device(device))
        if key not in self._layouts:
            self.check_heads(num_heads)
            self._layouts[key] = ShardLayout(self, text_length, image_length, device)
        return self._layouts[key]

    def __repr__(self) -> str:
        return f"SequenceParallel(rank {self.rank} of {self.world}, {dist.get_backend(self.group)})"

