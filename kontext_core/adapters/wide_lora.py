"""LoRAs on fp8 layers as extra K columns of the layer's own fp8 GEMM.

On the fly, a LoRA adds `up @ (down @ x)` to a layer's output. As two more GEMMs, the second re-reads and
re-writes the whole output (~15% of an fp8 step for a rank-32 LoRA on every layer, bench/RESULTS.md). Here
the product joins the layer's GEMM instead: with R more columns on both operands,

    [x | a] @ [W | b].T = x @ W.T + a @ b.T,   a = x @ down.T / c,   b = up * c

(`c` one divisor per rank column), so the layer's single fp8 GEMM over K + R columns computes both, R
padded to a multiple of the GEMM's 128-wide K tile (~0-9% on those GEMMs instead of 20-50%). The e4m3 rows
of x come from the fused quantizers with R spare columns after each row (kontext_kernels/row_quant.py); `a` fills
them (kontext_core/compute/fused.py, `kontext::lora_columns_`). The weight lives in a wide [N, K + R] buffer whose
first K columns are the layer's weight parameter (a view, no second copy); `b` is the rest.

Both tails share the row scales of their operands (x's per-row activation scale, W's per-row weight scale),
so `c` must keep both in e4m3's range: |a| <= 448 for every possible x needs c >= ||down_r||_1 (x's rows
are at most 448 times their scale), |b| <= 448 needs c <= min_n 448 s_w[n] / |up[n, r]|. c takes the
smaller bound. When the b bound is the smaller, a clamps only for a row x with |x . down_r| above
c * max|x|; the L1 bound is loose by ~sqrt(K) for rows that are not aligned with down_r (Gaussian rows of
3072 reach ~1/40 of it), so a layer takes the columns only while the b bound is at least 1/16 of the L1
one, and keeps the two thin GEMMs otherwise (a LoRA far stronger than its layer's weights). The padding
columns hold copies of the LoRA, each up divided by their count (`install`), which multiplies
the b bound by that count.

Only where the layout holds: float8_e4m3fn weights where fp8 GEMMs run, in layers the fused quantizers
feed, not in blocks streamed by the block offloader (it repacks weights). A move or cast (`.to()`) narrows
the layout first and rebuilds it after (KontextTransformer._apply).
"""

from __future__ import annotations

import torch
from torch import nn

from ..compute.fused import LORA_FACTORS, LoraFactors, factors_layout, hooked, lora_factors
from ..compute.quant import E4M3_MAX, QuantizedLinear, fp8_weight_ok, quantize_weight

# Layers whose input the fused quantizers produce (kontext_core/compute/fused.py); the modulation layers take
# one row each and keep the two thin GEMMs.
ROW_FED = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
           "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
TILE = 128  # the fp8 GEMM's K tile: the wide K stays a multiple of it


_enabled = True


def set_enabled(enabled: bool) -> None:
    """LoRAs applied from now on take GEMM columns where they can (True) or two thin GEMMs everywhere."""
    global _enabled
    _enabled = bool(enabled)


def columns(rank: int) -> int:
    """The wide layout's extra columns for a stacked rank: padded to the K tile."""
    return -(-rank // TILE) * TILE


def row_fed(model: nn.Module, name: str) -> bool:
    """Whether the model's layer `name` is an e4m3 block layer of a kind that can take columns (fed by the
    fused quantizers), wherever it is now."""
    if not (_enabled and name.endswith(ROW_FED)):
        return False
    layer = model.get_submodule(name)
    return type(layer) is QuantizedLinear and layer.weight.dtype == torch.float8_e4m3fn


def eligible(model: nn.Module, name: str) -> bool:
    """Whether the model's layer `name` (in a block) takes its LoRAs as GEMM columns."""
    if not row_fed(model, name):
        return False
    layer, block = model.get_submodule(name), model.get_submodule(".".join(name.split(".")[:2]))
    # A block with hooks is streamed by the block offloader, which repacks its weights.
    return not hooked(block) and fp8_weight_ok(layer.weight, layer.compute_dtype)


def _weight_row_scales(layer: QuantizedLinear) -> torch.Tensor:
    return layer.weight_scale.detach().float().reshape(-1).expand(layer.out_features)


ALIGNMENT_MARGIN = 16  # how far below the L1 bound the b bound may be (module docstring)


def column_bytes(layer: QuantizedLinear, rank: int) -> int:
    """What the wide layout adds for stacked factors of `rank`: the columns' e4m3 down factor and scales, and
    the weight buffer's extra columns."""
    width = columns(rank)
    return width * layer.in_features + width * 4 + layer.out_features * width


def tail_operands(layer: QuantizedLinear, down: torch.Tensor, up: torch.Tensor,
                  down_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(b in e4m3 [N, C], the scale of a's GEMM [1, C]: down's e4m3 row scales over c) for the columns'
    factors, or None where the LoRA is too strong for them (module docstring)."""
    weight_scales = _weight_row_scales(layer).to(up.device)
    magnitude = up.detach().float().abs()
    no_clamp_for_a = down.detach().float().abs().sum(dim=1)
    no_clamp_for_b = (E4M3_MAX * weight_scales[:, None] / magnitude.clamp(min=1e-30)).amin(dim=0)
    if bool((no_clamp_for_b * ALIGNMENT_MARGIN < no_clamp_for_a).any()):
        return None
    divisors = torch.minimum(no_clamp_for_a, no_clamp_for_b)
    divisors = torch.where((divisors > 0) & torch.isfinite(divisors), divisors, torch.ones_like(divisors))
    tail = (up.float() * divisors / weight_scales[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return tail, (down_scales.float().reshape(-1) / divisors)[None, :]


def install(layer: QuantizedLinear, factors: LoraFactors) -> bool:
    """Give `layer` these stacked factors in the wide layout; a wide buffer of the same size is rewritten in
    place (compiled blocks and captured CUDA graphs stay valid). False, and nothing changed, where the LoRA is
    too strong for the columns.

    The C columns hold copies of the stacked factors, each up divided by their count: the same product, each
    column's share of it smaller by that count, which multiplies the b bound by it (module docstring)."""
    width = columns(factors.down.shape[0])
    nonzero = factors.down.detach().abs().amax(dim=1).nonzero()
    used = int(nonzero[-1]) + 1 if len(nonzero) else 1  # the stacked rank before its zero padding
    copies = width // used
    down = torch.cat((factors.down[:used].repeat(copies, 1),
                      factors.down.new_zeros(width - used * copies, factors.down.shape[1])))
    up = torch.cat((factors.up[:, :used].repeat(1, copies) / copies,
                    factors.up.new_zeros(factors.up.shape[0], width - used * copies)), dim=1)
    column_down, column_scales = quantize_weight(down, per_row=True)
    operands = tail_operands(layer, down, up, column_scales)
    if operands is None:
        return False
    tail, column_scale = operands
    factors = factors._replace(column_down=column_down, column_scale=column_scale)
    present = lora_factors(layer)
    wide_shape = (layer.out_features, layer.in_features + width)
    if (present is not None and present.wide is not None and present.wide.shape == wide_shape
            and factors_layout(present._replace(wide=None)) == factors_layout(factors)):
        for old, new in zip(present, factors):
            if new is not None:
                old.copy_(new)
        present.wide[:, layer.in_features:].copy_(tail)
        return True
    narrow(layer)
    weight = layer.weight.detach()
    wide = torch.empty(wide_shape, dtype=weight.dtype, device=weight.device)
    wide[:, :layer.in_features].copy_(weight)
    wide[:, layer.in_features:].copy_(tail)
    layer.weight = nn.Parameter(wide[:, :layer.in_features], requires_grad=False)
    setattr(layer, LORA_FACTORS, factors._replace(wide=wide))
    return True


def narrow(layer: nn.Module) -> None:
    """The layer's weight back in its own contiguous storage, the wide buffer dropped; its factors stay (the
    two thin GEMMs take over)."""
    factors = lora_factors(layer)
    if factors is None or factors.wide is None:
        return
    layer.weight = nn.Parameter(layer.weight.detach().contiguous(), requires_grad=False)
    setattr(layer, LORA_FACTORS, factors._replace(column_down=None, column_scale=None, wide=None))


def narrow_all(module: nn.Module) -> None:
    for layer in module.modules():
        narrow(layer)


def _drop_stale(layer: nn.Module) -> None:
    # A weight moved on its own (ComfyUI moves single layers when it frees part of a model) is no longer a
    # view of the wide buffer: the buffer is dropped (the weight is whole), `widen_all` rebuilds it.
    factors = lora_factors(layer)
    if factors is not None and factors.wide is not None and layer.weight.data_ptr() != factors.wide.data_ptr():
        setattr(layer, LORA_FACTORS, factors._replace(column_down=None, column_scale=None, wide=None))


def narrow_changing(module: nn.Module, fn) -> None:
    """Narrow the layers whose wide buffer `fn` (what `Module._apply` passes: a move or a cast) would change;
    an empty probe tells, without copying anything."""
    for layer in module.modules():
        _drop_stale(layer)
        factors = lora_factors(layer)
        if factors is not None and factors.wide is not None:
            probe = fn(factors.wide.new_empty(0))
            if probe.device != factors.wide.device or probe.dtype != factors.wide.dtype:
                narrow(layer)


def widen_all(model: nn.Module) -> None:
    """Rebuild the wide layout of every layer whose factors can take it (after a move, say)."""
    for name, layer in model.named_modules():
        _drop_stale(layer)
        factors = lora_factors(layer)
        if factors is not None and factors.wide is None and eligible(model, name):
            install(layer, factors)
