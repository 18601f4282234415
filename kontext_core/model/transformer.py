"""The FLUX.1 Kontext transformer: 19 double-stream blocks, 38 single-stream blocks, 3D RoPE."""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.attention import attention_scope, sequence_parallel_scope
from ..adapters import wide_lora
from .config import TransformerConfig
from ..compute.fused import apply_to_lora_factors, hooked, linear
from .layers import (
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    RopeFrequencies,
    SingleStreamBlock,
    rope_frequencies,
    timestep_embedding,
)

if TYPE_CHECKING:
    from ..compute.sequence_parallel import SequenceParallel
    from ..step_cache import CacheRun


class KontextTransformer(nn.Module):
    def __init__(self, config: TransformerConfig | None = None):
        super().__init__()
        self.config = config = config or TransformerConfig()
        hidden = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(256, hidden)
        self.txt_in = nn.Linear(config.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, config.num_heads, config.mlp_hidden_dim, config.qkv_bias)
            for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, config.num_heads, config.mlp_hidden_dim)
            for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, config.out_channels)
        # Set (KontextPipeline's process_group) to split every forward over a process group's tokens.
        self.sequence_parallel: SequenceParallel | None = None

    def compile_blocks(self, **options) -> "KontextTransformer":
        """Regional compilation: each block is compiled once and reused by its 18/37 siblings.

        Fuses the norms, RoPE and GELU between the GEMMs (1.4x faster per step on an H100, see
        bench/RESULTS.md) at the cost of a minute of compilation on the first step. Only the blocks'
        forward is compiled: hooks on the blocks themselves (block offload) run around it; a block whose
        layers carry forward hooks runs uncompiled while they are there, since the compiled graph would
        not see hooks added after it was traced. LoRAs applied on the fly are not hooks: they are traced
        into the compiled graph (a recompilation when they first appear or change rank).
        """
        options.setdefault("fullgraph", True)
        compiled = {}
        for block in (*self.double_blocks, *self.single_blocks):
            kind = type(block)
            if kind not in compiled:  # one compiled function per block class, shared by its instances
                compiled[kind] = torch.compile(kind.forward, **options)
            block.forward = _CompiledForward(block, compiled[kind])
        return self

    @property
    def blocks_compiled(self) -> bool:
        return any(isinstance(block.__dict__.get("forward"), _CompiledForward)
                   for block in (*self.double_blocks, *self.single_blocks))

    def uncompile_blocks(self) -> "KontextTransformer":
        """Back to eager blocks (the compiled code stays in torch.compile's cache)."""
        for block in (*self.double_blocks, *self.single_blocks):
            if isinstance(block.__dict__.get("forward"), _CompiledForward):
                del block.forward
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .double() ...: LoRA factors applied on the fly (plain attributes, not parameters)
        # move and cast with the weights. Weights in the wide LoRA layout (views of a wider buffer) that
        # move are narrowed first, so each moves as itself, and the layout is rebuilt where it holds after.
        wide_lora.narrow_changing(self, fn)
        super()._apply(fn, *args, **kwargs)
        apply_to_lora_factors(self, fn)
        wide_lora.widen_all(self)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.bias.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.bias.device

    def forward(
        self,
        img: torch.Tensor,  # [B, L_img, 64] packed latent tokens (target, then any context)
        img_ids: torch.Tensor,  # [B, L_img, 3] (index, row, col)
        txt: torch.Tensor,  # [B, L_txt, 4096] T5 hidden states
        txt_ids: torch.Tensor,  # [B, L_txt, 3], zeros
        timesteps: torch.Tensor,  # [B] in [0, 1]
        y: torch.Tensor,  # [B, 768] CLIP pooled
        guidance: torch.Tensor | None = None,  # [B] distilled guidance scale
        *,
        step_cache: CacheRun | None = None,
        modulation: torch.Tensor | None = None,  # [B, modulation_width], one step of `modulation_table`
    ) -> torch.Tensor:
        """Velocity for every image token, [B, L_img, 64]; same meaning as the BFL forward.

        `step_cache` (a sampling run's state, kontext_core/step_cache.py) runs the blocks or reuses what they
        computed at an earlier step. `modulation`, this step's row of `modulation_table`, stands in for the
        timestep, guidance and pooled-text path (which then is not read).
        """
        if modulation is not None and step_cache is not None:
            raise ValueError("step caching reads the conditioning vector itself; pass modulation or step_cache, "
                             "not both")
        config = self.config
        dtype = self.dtype
        layout = None
        if self.sequence_parallel is not None:
            # Every token-wise layer runs on this process's chunk of the text and image tokens only.
            layout = self.sequence_parallel.layout(txt.shape[1], img.shape[1], img.device, config.num_heads)
            img, img_ids = layout.shard_image(img), layout.shard_image(img_ids)
            txt, txt_ids = layout.shard_text(txt), layout.shard_text(txt_ids)
        img = linear(self.img_in, img.to(dtype))
        vec = self.conditioning_vector(timesteps, y, guidance) if modulation is None else None
        txt = linear(self.txt_in, txt.to(dtype))

        ids = torch.cat((txt_ids, img_ids), dim=1)
        # RoPE tables in float32 (float64 when the model runs in float64), as the reference does.
        rope_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rope = RopeFrequencies(*rope_frequencies(ids, config.axes_dim, config.theta, rope_dtype))

        with attention_scope(img.device), sequence_parallel_scope(layout):
            if step_cache is None:
                img = self.run_blocks(img, txt, vec, rope, modulation=modulation)
            else:
                img = step_cache.run_blocks(self, img, txt, vec, rope, layout)
        final = None if modulation is None else modulation[:, -self.final_layer.adaLN_modulation[1].out_features:]
        out = self.final_layer(img, vec, final)
        return out if layout is None else layout.gather_image(out)

    def run_blocks(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor | None, rope: RopeFrequencies,
                   first: int = 0, modulation: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks from double block `first` on; returns the image tokens' hidden states [B, L_img, hidden]
        that the final layer reads (the text tokens end here). `modulation`: as `forward`'s."""
        parts = [None] * (len(self.double_blocks) + len(self.single_blocks))
        if modulation is not None:
            parts = modulation.split(self.modulation_widths(), dim=-1)
        double_parts, single_parts = parts[:len(self.double_blocks)], parts[len(self.double_blocks):]
        for block, part in islice(zip(self.double_blocks, double_parts), first, None):
            img, txt = block(img, txt, vec, rope, part)
        joint = torch.cat((txt, img), dim=1)
        for block, part in zip(self.single_blocks, single_parts):
            joint = block(joint, vec, rope, part)
        return joint[:, txt.shape[1]:]

    def conditioning_vector(self, timesteps: torch.Tensor, y: torch.Tensor,
                            guidance: torch.Tensor | None) -> torch.Tensor:
        """The vector every modulation reads, [B, hidden]: timestep, distilled guidance and pooled text."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError(
                    "this model is guidance-distilled ([dev]) and needs a guidance value; "
                    "pass guidance (Kontext [dev] default: 2.5)"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def modulation_widths(self) -> list[int]:
        """Columns of each block's part of a `modulation_table` row, in block order (the final layer's
        2 * hidden come last)."""
        return ([2 * block.img_mod.lin.out_features for block in self.double_blocks]
                + [block.modulation.lin.out_features for block in self.single_blocks]
                + [self.final_layer.adaLN_modulation[1].out_features])

    def modulation_table(self, timesteps: torch.Tensor, y: torch.Tensor,
                         guidance: torch.Tensor | None) -> torch.Tensor:
        """Every modulation output of a sampling run, [steps, B, sum(modulation_widths())], computed ahead of
        it: each modulation layer runs once over all steps' conditioning vectors instead of once a step.

        Those layers hold a quarter of FLUX's weights (3.2B), which a step would otherwise read for one row each.
        The values are the per-step ones up to the GEMMs' rounding (a batch of rows may take another kernel).
        `timesteps` [steps]; `y` [B, 768] and `guidance` [B] are the same at every step.
        """
        steps, batch = timesteps.shape[0], y.shape[0]
        every_t = timesteps.to(self.device)[:, None].expand(steps, batch).reshape(-1)
        every_guidance = guidance.repeat(steps) if guidance is not None else None
        vec = F.silu(self.conditioning_vector(every_t, y.repeat(steps, 1), every_guidance))
        parts = []
        for block in self.double_blocks:
            parts += [linear(block.img_mod.lin, vec), linear(block.txt_mod.lin, vec)]
        parts += [linear(block.modulation.lin, vec) for block in self.single_blocks]
        parts.append(linear(self.final_layer.adaLN_modulation[1], vec))
        return torch.cat(parts, dim=-1).view(steps, batch, -1)

    def velocity(
        self,
        target: torch.Tensor,  # [B, L_target, 64]
        target_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        context: torch.Tensor | None = None,  # [B, L_context, 64] reference-image tokens
        context_ids: torch.Tensor | None = None,
        modulation: torch.Tensor | None = None,  # [B, modulation_width]: see forward
        *,
        step_cache: CacheRun | None = None,
    ) -> torch.Tensor:
        """Velocity of the target tokens, with context tokens appended after them when given."""
        if context is None:
            return self.forward(target, target_ids, txt, txt_ids, timesteps, y, guidance, step_cache=step_cache,
                                modulation=modulation)
        if context_ids is None:
            raise ValueError("context tokens were given without their position ids (context_ids)")
        out = self.forward(
            torch.cat((target, context.to(target.dtype)), dim=1),
            torch.cat((target_ids, context_ids.to(target_ids.dtype)), dim=1),
            txt, txt_ids, timesteps, y, guidance, step_cache=step_cache, modulation=modulation,
        )
        return out[:, : target.shape[1]]


class _CompiledForward:
    """A block's forward through its class's compiled function, or eagerly while a layer inside has hooks.

    It holds the block and the compiled *unbound* function (never a bound method), so a deep copy of the
    model runs its own weights through the shared compiled code.
    """

    def __init__(self, block: nn.Module, compiled):
        self.block = block
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        block = self.block
        # torch.compile does not guard on submodules' hooks (torch._dynamo.config.skip_nnmodule_hook_guards);
        # the block's own hooks run around this call.
        if any(hooked(child) for child in block.children()):
            return type(block).forward(block, *args, **kwargs)
        return self.compiled(block, *args, **kwargs)
