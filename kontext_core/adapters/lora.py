"""LoRA adapters for the Kontext transformer: merged into the weights or added on the fly.

Every file layout is converted at the door (kontext_core/adapters/lora_layouts.py) into one form, `LoraWeights`:
for each of our (BFL) linear layers, low-rank parts `up @ down` that update a row range of its weight, and
the changes that are not low-rank (bias deltas, full differences, a control LoRA's norm scales).

Two ways to apply (`apply_lora`; by default merged, except into 8-bit weights), both stackable and
removable through the returned `LoraHandle`:

- "merge": the delta is added into the weights (no cost per step). The first merge into a layer keeps
  a copy of the layer's original weight (on `backup_device`, CPU by default); removing a LoRA restores
  that copy and re-merges the LoRAs still applied, in their order, so removing them all gives back the
  original weights bit for bit. The sum `W + delta` is formed in float64 (float32 on MPS) and rounded
  once to the weight's dtype. For `QuantizedLinear` layers the weight is dequantized, the delta added and the
  result requantized (per-tensor, or per-row when the layer has per-row scales): small LoRA deltas can
  fall below 8-bit resolution, so fp8 and int8 models get "on_the_fly" unless "merge" is asked for.
- "on_the_fly": `up @ (down @ x) * strength` is added to the layer's output rows where the model computes
  the layer (kontext_core/compute/fused.py); the weights are never touched. All on-the-fly LoRAs of a layer are
  stacked into one pair of factors, so a layer costs two thin GEMMs more however many LoRAs it has; being
  part of the model's own code, they run inside compiled blocks and CUDA graphs. Strength changes rewrite
  the factors in place (no recompilation, no new graph capture). Works for `nn.Linear` and `QuantizedLinear`
  alike; on 8-bit layers the LoRA reads the same e4m3 or int8 activations as the layer's GEMM, and where
  fp8 GEMMs run it joins that GEMM as extra K columns instead of two GEMMs more (kontext_core/adapters/wide_lora.py).

The changes that are not low-rank are written into their parameters in either mode (restored likewise on
removal): biases and norm scales are small, and a full difference has no cheaper form. A "set" change at
strength s moves the parameter that fraction of the way to its value.

A model saved while LoRAs are merged is saved with them baked in. Apply LoRAs after copying a model
(`copy.deepcopy` carries on-the-fly factors over to the copy, but not the handles that remove them).
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Callable, Iterable

import torch
from torch import nn

from ..checkpoints.key_maps import transformer_links
from ..model.config import TransformerConfig
from ..compute.fused import LORA_FACTORS, LoraFactors, factors_layout, lora_factors
from . import wide_lora
from .lora_layouts import LoraError, LoraPart, LoraWeights, load_lora, lora_from_state_dict
from ..compute.quant import QuantizedLinear, quantize_weight

MODES = ("auto", "merge", "on_the_fly")

__all__ = [
    "MODES",
    "LoraError",
    "LoraHandle",
    "LoraPart",
    "LoraWeights",
    "active_loras",
    "apply_lora",
    "factor_bytes",
    "load_lora",
    "lora_from_state_dict",
    "on_the_fly_bytes",
    "preferred_mode",
    "remove_all_loras",
]


# Elements of a weight merged at a time (in float64 on CPUs): bounds the temporaries at full FLUX sizes, where one
# layer's chunk holds only part of a fused layer's spans.
MERGE_CHUNK_ELEMENTS = 1 << 22


# --- applying --------------------------------------------------------------------------------------


@dataclass
class _Span:
    """A part resolved against one model: rows [start, stop) of the layer's weight."""

    start: int
    stop: int
    down: torch.Tensor
    up: torch.Tensor


@dataclass(eq=False)
class _Change:
    """A `TensorChange` resolved against one model: rows [start, stop) of the module's parameter `param`."""

    param: str
    start: int
    stop: int
    kind: str  # add | set
    value: torch.Tensor  # float32, on the parameter's device


@lru_cache(maxsize=8)
def _fused_splits(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    return {link.ours.removesuffix(".weight"): link.split for link in transformer_links(config)
            if link.kind == "concat" and link.ours.endswith(".weight")}


def _linear(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, (nn.Linear, QuantizedLinear)) else None


def _refuse_wider_input(lora: LoraWeights, layer_name: str, module: nn.Module, in_features: int) -> None:
    """A FLUX.1 Canny / Depth control LoRA widens img_in for the control image's latent: say why it cannot apply."""
    if layer_name == "img_in" and in_features > module.in_features:
        raise LoraError(
            f"{lora.name} widens img_in from {module.in_features} to {in_features} input channels: it is a FLUX.1 "
            "Canny / Depth control LoRA, made for a model that reads a control image's latent beside the image's, "
            "channel by channel. FLUX.1 Kontext takes its reference images as context tokens and has no such "
            "input. Use this LoRA with FLUX.1 [dev] in a control workflow, or a Kontext LoRA here."
        )


def _resolve(model: nn.Module, lora: LoraWeights, dtype_for: Callable[[nn.Module], torch.dtype],
             on_layer_devices: bool) -> tuple[dict[str, list[_Span]], dict[str, list[_Change]]]:
    """Check every target against the model. The parts in `dtype_for` their layer, on its device or left where
    they are (on-the-fly ones: `_stack_factors` puts the stacked factors where the model computes); the changes
    in float32 on their parameter's device, by module."""
    splits = _fused_splits(model.config)
    missing, mismatched = [], []

    def rows(layer_name: str, part: int | None, total: int) -> tuple[int, int] | None:
        if part is None:
            return 0, total
        split = splits.get(layer_name, ())
        if part >= len(split):
            return None
        start = sum(split[:part])
        return start, start + split[part]

    resolved: dict[str, list[_Span]] = {}
    for layer_name, parts in lora.layers.items():
        module = _linear(model, layer_name)
        if module is None:
            missing.append(layer_name)
            continue
        spans = []
        for part in parts:
            _refuse_wider_input(lora, layer_name, module, part.down.shape[1])
            found = rows(layer_name, part.part, module.out_features)
            if found is None:
                missing.append(f"{layer_name} (part {part.part})")
                continue
            start, stop = found
            if part.down.shape[1] != module.in_features or part.up.shape[0] != stop - start:
                mismatched.append(f"{part.key}: LoRA {part.up.shape[0]}x{part.down.shape[1]}, layer {layer_name} "
                                  f"rows {start}:{stop} of {module.out_features}x{module.in_features}")
                continue
            device, dtype = module.weight.device if on_layer_devices else part.down.device, dtype_for(module)
            spans.append(_Span(start, stop, part.down.to(device, dtype), part.up.to(device, dtype)))
        resolved[layer_name] = spans

    for layer_name, shape in lora.shapes.items():
        module = _linear(model, layer_name)
        if module is None:
            missing.append(layer_name)
            continue
        if len(shape) == 2:
            _refuse_wider_input(lora, layer_name, module, shape[1])
        if tuple(shape) != (module.out_features, module.in_features):
            mismatched.append(f"{layer_name}: the LoRA reshapes it to {list(shape)}, the layer is "
                              f"{module.out_features}x{module.in_features}")

    changes: dict[str, list[_Change]] = {}
    for parameter, entries in lora.changes.items():
        module_name, _, param = parameter.rpartition(".")
        try:
            tensor = getattr(model.get_submodule(module_name), param)
        except AttributeError:
            tensor = None
        if not isinstance(tensor, torch.Tensor):
            missing.append(parameter)
            continue
        for entry in entries:
            if module_name == "img_in" and param == "weight" and entry.value.ndim == 2:
                _refuse_wider_input(lora, module_name, model.get_submodule(module_name), entry.value.shape[1])
            found = rows(module_name, entry.part, tensor.shape[0])
            if found is None:
                missing.append(f"{parameter} (part {entry.part})")
                continue
            start, stop = found
            if tuple(entry.value.shape) != (stop - start, *tensor.shape[1:]):
                mismatched.append(f"{entry.key}: {list(entry.value.shape)}, {parameter} rows {start}:{stop} "
                                  f"of {list(tensor.shape)}")
                continue
            changes.setdefault(module_name, []).append(
                _Change(param, start, stop, entry.kind, entry.value.to(tensor.device, torch.float32)))

    if missing:
        raise LoraError(
            f"{lora.name} targets {len(missing)} layers this model does not have (first: {', '.join(missing[:3])}); "
            f"the model has {model.config.depth} double and {model.config.depth_single_blocks} single blocks"
            f"{'' if model.config.guidance_embed else ' and no guidance embedder'}. Use a LoRA made for this model."
        )
    if mismatched:
        raise LoraError(
            f"{lora.name} does not fit this model: {len(mismatched)} shapes differ "
            f"(first: {'; '.join(mismatched[:2])}). "
            f"The model's hidden size is {model.config.hidden_size}; the LoRA was made for another model. "
            "Use a LoRA made for this model."
        )
    return resolved, changes


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _apply_change(rows: torch.Tensor, change: _Change, values: torch.Tensor, strength: float) -> None:
    """rows (in the accumulation dtype) += strength * values, or moved that fraction of the way to them."""
    values = values.to(rows.dtype)
    if change.kind == "set":
        rows += strength * (values - rows)
    else:
        rows += strength * values


def _merge_into(module: nn.Module, spans: list[_Span], dense: list[_Change], strength: float) -> None:
    """weight[rows] += strength * up @ down for each span, and each full change of the weight, rounded once to
    the weight's storage."""
    if isinstance(module, QuantizedLinear):
        weight = module.dequantized_weight(torch.float32)
        for span in spans:
            weight[span.start:span.stop] += strength * (span.up.float() @ span.down.float())
        for change in dense:
            _apply_change(weight[change.start:change.stop], change, change.value, strength)
        quantized, scale = quantize_weight(weight, module.weight.dtype, per_row=module.weight_scale.ndim == 1)
        module.weight.copy_(quantized)
        module.weight_scale.copy_(scale)
        return
    weight = module.weight
    compute = _accumulate_dtype(weight.device)
    rows_per_chunk = max(1, MERGE_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    pieces = [*spans, *dense]
    if not pieces:
        return
    downs = [span.down.to(compute) for span in spans]
    for first in range(min(p.start for p in pieces), max(p.stop for p in pieces), rows_per_chunk):
        last = min(first + rows_per_chunk, weight.shape[0])
        rows = None
        for span, down in zip(spans, downs):
            low, high = max(first, span.start), min(last, span.stop)
            if low < high:
                rows = weight[first:last].to(compute) if rows is None else rows
                rows[low - first:high - first] += strength * (
                    span.up[low - span.start:high - span.start].to(compute) @ down)
        for change in dense:
            low, high = max(first, change.start), min(last, change.stop)
            if low < high:
                rows = weight[first:last].to(compute) if rows is None else rows
                _apply_change(rows[low - first:high - first], change,
                              change.value[low - change.start:high - change.start], strength)
        if rows is not None:
            weight[first:last].copy_(rows.to(weight.dtype))


def _change_parameter(tensor: torch.Tensor, changes: list[_Change], strength: float) -> None:
    """A bias or a norm's scale changed, rounded once to its dtype."""
    values = tensor.detach().to(_accumulate_dtype(tensor.device))
    for change in changes:
        _apply_change(values[change.start:change.stop], change, change.value, strength)
    tensor.detach().copy_(values.to(tensor.dtype))


_STAGING_BYTES = 64 << 20


@cache
def _pinned_buffer(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


def _staged_copy(target: torch.Tensor, source: torch.Tensor) -> None:
    """target.copy_(source) between a GPU and pageable CPU memory, through a pinned staging buffer: direct
    copies from and to pageable memory ran at 1.3 / 7.1 GB/s on an H100 machine of bench/RESULTS.md, staged
    ones at 7.9 / 21.3 (a LoRA on every block of a bf16 model: merge 20.4 -> 4.0 s, removal 4.9 -> 2.1 s)."""
    if (source.is_cuda == target.is_cuda or not (source.is_contiguous() and target.is_contiguous())
            or source.dtype != target.dtype or source.shape != target.shape):
        target.copy_(source)
        return
    staging = _pinned_buffer(_STAGING_BYTES)
    source_bytes, target_bytes = source.view(-1).view(torch.uint8), target.view(-1).view(torch.uint8)
    for start in range(0, source_bytes.numel(), staging.numel()):
        size = min(staging.numel(), source_bytes.numel() - start)
        # Synchronous copies: the staging buffer is reused by the next chunk at once.
        staging[:size].copy_(source_bytes[start:start + size])
        target_bytes[start:start + size].copy_(staging[:size])


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of `tensor` on `device` (staged between a GPU and the CPU)."""
    if tensor.device == device:
        return tensor.clone()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    _staged_copy(out, tensor)
    return out


@dataclass
class _MergedLayer:
    """A module's parameters before any merge (those merges changed), and the handles merged into it, in order."""

    originals: dict[str, torch.Tensor]  # parameter name -> its copy
    weight_scale: torch.Tensor | None = None  # a QuantizedLinear's, with its weight
    handles: list["LoraHandle"] = field(default_factory=list)

    @property
    def weight(self) -> torch.Tensor | None:
        return self.originals.get("weight")

    def keep(self, module: nn.Module, params: Iterable[str], backup_device: torch.device | None) -> None:
        """Copy the parameters not kept yet: no merge has changed them so far."""
        for param in params:
            if param in self.originals:
                continue
            tensor = getattr(module, param).detach()
            backup = backup_device or tensor.device
            self.originals[param] = _copy_to(tensor, backup)
            if param == "weight" and isinstance(module, QuantizedLinear):
                self.weight_scale = module.weight_scale.detach().to(backup, copy=True)

    def restore(self, module: nn.Module) -> None:
        for param, original in self.originals.items():
            _staged_copy(getattr(module, param).detach(), original)
        if self.weight_scale is not None:
            module.weight_scale.copy_(self.weight_scale)


_MERGED: "weakref.WeakKeyDictionary[nn.Module, _MergedLayer]" = weakref.WeakKeyDictionary()
# The handles applied on the fly to each layer, in order.
_ON_THE_FLY: "weakref.WeakKeyDictionary[nn.Module, list[LoraHandle]]" = weakref.WeakKeyDictionary()
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, list[LoraHandle]]" = weakref.WeakKeyDictionary()


def _stack_factors(module: nn.Module, name: str, model: nn.Module) -> None:
    """Set `module`'s on-the-fly factors (kontext_core/compute/fused.py) from the handles on it: their downs stacked
    [R, in], their ups times their strengths side by side [out, R], zero outside each part's rows (R padded
    with zeros, below).

    They are made where the model computes, in the layer's compute dtype: with blocks offloaded
    (kontext_core/placement/offload.py) a layer's weights live on the host while its arithmetic runs on the GPU. Factors
    laid out as the present ones are overwritten in place: compiled blocks then run on unchanged and a captured
    CUDA graph (which reads them by address) replays the new strengths. fp8 layers that can take them as
    columns of their own GEMM get the wide layout (kontext_core/adapters/wide_lora.py)."""
    device = model.device
    downs, ups = [], []
    for handle in _ON_THE_FLY.get(module, []):
        if handle._strength == 0.0:
            continue
        for span in handle._spans[name]:
            up = span.up * handle._strength
            if (span.start, span.stop) != (0, module.out_features):
                up = torch.zeros((module.out_features, up.shape[1]), dtype=up.dtype, device=up.device
                                 ).index_copy_(0, torch.arange(span.start, span.stop, device=up.device), up)
            downs.append(span.down)
            ups.append(up)
    if not downs:
        wide_lora.narrow(module)
        if hasattr(module, LORA_FACTORS):
            delattr(module, LORA_FACTORS)
        return
    wide = wide_lora.eligible(model, name)
    # Zero rows pad the stacked rank to a power of two from 16: compiled blocks are specialised to the factors'
    # shapes, so LoRAs of ranks 4, 8 and 16 share one compilation (a new shape recompiles the blocks, a
    # minute for inductor), and the fp8 GEMM gets the multiple of 16 it needs. The zeros add nothing.
    rank = sum(down.shape[0] for down in downs)
    padding = _stacked_rank(rank) - rank
    dtype = module.compute_dtype if isinstance(module, QuantizedLinear) else module.weight.dtype
    down = torch.cat((*downs, downs[0].new_zeros(padding, downs[0].shape[1]))).to(device, dtype)
    up = torch.cat((*ups, ups[0].new_zeros(ups[0].shape[0], padding)), dim=1).to(device, dtype)
    factors = LoraFactors(down, up)
    if isinstance(module, QuantizedLinear) and module.weight.dtype == torch.float8_e4m3fn:
        down_e4m3, scales = quantize_weight(down, per_row=True)
        factors = LoraFactors(down, up, down_e4m3, scales[None, :])
    if wide and wide_lora.install(module, factors):
        return
    wide_lora.narrow(module)
    present = lora_factors(module)
    if present is not None and factors_layout(present) == factors_layout(factors):
        for old, new in zip(present, factors):
            if old is not None:
                old.copy_(new)
    else:
        setattr(module, LORA_FACTORS, factors)


def _refresh_columns(module: nn.Module, name: str, model: nn.Module) -> None:
    # Merging into fp8 weights changes their row scales, which the wide layout's columns are made against
    # (kontext_core/adapters/wide_lora.py): on-the-fly LoRAs in that layout are stacked again.
    factors = lora_factors(module)
    if factors is not None and factors.wide is not None:
        _stack_factors(module, name, model)


def _stacked_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def factor_bytes(model: nn.Module) -> int:
    """The bytes that the on-the-fly LoRA factors on `model` take where it computes: memory beside its weights
    that moves with it (`.to()`), which a memory manager counting only parameters and buffers would miss."""
    total = 0
    for module in model.modules():
        factors = lora_factors(module)
        if factors is not None:
            total += sum(t.nbytes for t in factors if t is not None)
            if factors.wide is not None:  # its first columns are the weight, counted as the model's
                total -= module.weight.nbytes
    return total


def on_the_fly_bytes(model: nn.Module, loras: Iterable[LoraWeights], columns: bool | None = None) -> int:
    """What `factor_bytes(model)` will be with `loras` (and no others) applied on the fly: room to make before
    applying them. Layers `model` lacks are left out (applying such a LoRA raises). fp8 layers are counted
    with GEMM columns (kontext_core/adapters/wide_lora.py); one whose LoRAs turn out too strong for them takes less.

    columns: None counts the columns where the layer takes them now; True wherever a layer of that kind can
    (for a model not yet on its device, e.g. built on the meta device to plan memory: an upper bound)."""
    ranks: dict[str, int] = {}
    for lora in loras:
        for name, parts in lora.layers.items():
            ranks[name] = ranks.get(name, 0) + sum(part.down.shape[0] for part in parts)
    total = 0
    for name, rank in ranks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(module, (nn.Linear, QuantizedLinear)) or rank == 0:
            continue
        stacked = _stacked_rank(rank)
        quantized = isinstance(module, QuantizedLinear)
        element = (module.compute_dtype if quantized else module.weight.dtype).itemsize
        total += stacked * (module.in_features + module.out_features) * element
        if quantized and module.weight.dtype == torch.float8_e4m3fn:
            # the down factor again in e4m3, with one float32 scale per rank row
            total += stacked * module.in_features + stacked * 4
        if wide_lora.eligible(model, name) if columns is None else (columns and wide_lora.row_fed(model, name)):
            total += wide_lora.column_bytes(module, stacked)
    return total


class LoraHandle:
    """One LoRA applied to one model. `remove()` takes it off; `set_strength()` changes its weight.

    Usable as a context manager: `with apply_lora(model, lora): ...` removes it on exit.
    """

    def __init__(self, model: nn.Module, lora: LoraWeights, spans: dict[str, list[_Span]],
                 changes: dict[str, list[_Change]], strength: float, mode: str, backup_device: torch.device | None):
        # Weak: the registries below must not keep a deleted model (or its layers) alive.
        self.model_ref = weakref.ref(model)
        self.lora = lora
        self.mode = mode
        self._strength = strength
        self._spans = spans
        self._changes = changes
        self._backup_device = backup_device
        self.active = False

    @property
    def strength(self) -> float:
        return self._strength

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"LoraHandle({self.lora.name!r}, mode={self.mode}, strength={self._strength}, {state})"

    def __enter__(self) -> "LoraHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _merged_names(self) -> list[str]:
        """The modules this handle changes the parameters of: its layers when merged, and those of its changes
        (written into the parameters in either mode)."""
        return list(dict.fromkeys([*(self._spans if self.mode == "merge" else ()), *self._changes]))

    def _merge(self, module: nn.Module, name: str) -> None:
        """Add this handle's updates of one module into its parameters."""
        spans = self._spans.get(name, []) if self.mode == "merge" else []
        linear = isinstance(module, (nn.Linear, QuantizedLinear))
        changes = self._changes.get(name, [])
        dense = [c for c in changes if linear and c.param == "weight"]
        if spans or dense:
            _merge_into(module, spans, dense, self._strength)
        others: dict[str, list[_Change]] = {}
        for change in changes:
            if not (linear and change.param == "weight"):
                others.setdefault(change.param, []).append(change)
        for param, entries in others.items():
            _change_parameter(getattr(module, param), entries, self._strength)

    @torch.no_grad()
    def _attach(self) -> None:
        model = self.model_ref()
        if self.mode == "on_the_fly":
            for name in self._spans:
                module = model.get_submodule(name)
                _ON_THE_FLY.setdefault(module, []).append(self)
                _stack_factors(module, name, model)
        for name in self._merged_names():
            module = model.get_submodule(name)
            params = {change.param for change in self._changes.get(name, [])}
            if self.mode == "merge" and name in self._spans:
                params.add("weight")
            record = _MERGED.get(module)
            if record is None:
                record = _MERGED[module] = _MergedLayer({})
            record.keep(module, sorted(params), self._backup_device)
            record.handles.append(self)
            self._merge(module, name)
            _refresh_columns(module, name, model)
        self.active = True
        _HANDLES.setdefault(model, []).append(self)

    @torch.no_grad()
    def _rebuild(self, model: nn.Module) -> None:
        """Restore each module's original parameters and re-merge the handles still on it, in order."""
        for name in self._merged_names():
            module = model.get_submodule(name)
            record = _MERGED[module]
            record.restore(module)
            for handle in record.handles:
                handle._merge(module, name)
            _refresh_columns(module, name, model)
            if not record.handles:
                del _MERGED[module]

    def set_strength(self, strength: float) -> None:
        """Change the strength. On the fly this is free; merged, the touched layers are rebuilt."""
        strength = _check_strength(strength)
        if not self.active:
            raise RuntimeError(f"{self!r} was removed; apply the LoRA again instead")
        self._strength = strength
        model = self.model_ref()
        if model is None:
            return
        if self.mode == "on_the_fly":
            with torch.no_grad():
                for name in self._spans:
                    _stack_factors(model.get_submodule(name), name, model)
        if self._merged_names():
            self._rebuild(model)

    def remove(self) -> None:
        """Take this LoRA off the model; removing every LoRA restores the original weights exactly."""
        model = self.model_ref()
        if not self.active or model is None:
            self.active = False
            return
        if self.mode == "on_the_fly":
            with torch.no_grad():
                for name in self._spans:
                    module = model.get_submodule(name)
                    _ON_THE_FLY[module].remove(self)
                    _stack_factors(module, name, model)
                    if not _ON_THE_FLY[module]:
                        del _ON_THE_FLY[module]
        merged = self._merged_names()
        for name in merged:
            _MERGED[model.get_submodule(name)].handles.remove(self)
        if merged:
            self._rebuild(model)
        self.active = False
        if self in _HANDLES.get(model, []):
            _HANDLES[model].remove(self)


def _check_strength(strength: float) -> float:
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"LoRA strength must be a finite number, got {strength}")
    return strength


def preferred_mode(model: nn.Module) -> str:
    """"on_the_fly" for a model with 8-bit weights (e4m3's 3 mantissa bits, or int8's steps of a row's
    amax / 127, would round most of a LoRA's delta away if merged), "merge" for any other (no cost per step)."""
    eight_bit = any(isinstance(module, QuantizedLinear) for module in model.modules())
    return "on_the_fly" if eight_bit else "merge"


def apply_lora(model: nn.Module, lora: LoraWeights | str | os.PathLike, strength: float = 1.0,
               mode: str = "auto", backup_device: str | torch.device | None = "cpu") -> LoraHandle:
    """Apply a LoRA to a `KontextTransformer` and return the handle that removes it.

    lora: a `LoraWeights` (from `load_lora`) or a path to a LoRA file.
    strength: multiplies the LoRA's delta (0.5 gives half of it; negative values subtract it).
    mode: "merge" adds the delta into the weights (no cost per step; removal restores a saved copy of each
        touched layer, kept on `backup_device`, None for the layer's own device); "on_the_fly" adds
        `up @ (down @ x) * strength` where the model computes the layer (weights untouched, strength changes
        free; two thin GEMMs per layer, ~13% of a step for a rank-32 LoRA on every layer, ~7% on fp8 layers
        where it joins the layer's fp8 GEMM as extra columns); "auto"
        (`preferred_mode`) merges, except into 8-bit weights.
    A LoRA's changes that are not low-rank (bias deltas, `.diff` differences, a control LoRA's norm scales) are
    written into their parameters in either mode, and restored on removal.
    Several LoRAs stack in any mode. Apply after moving the model to its device and dtype.
    """
    if mode not in MODES:
        raise ValueError(f"unknown LoRA mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        mode = preferred_mode(model)
    strength = _check_strength(strength)
    if not isinstance(lora, LoraWeights):
        lora = load_lora(lora)
    if not isinstance(getattr(model, "config", None), TransformerConfig):
        raise TypeError(f"apply_lora needs a KontextTransformer, got {type(model).__name__}")

    def dtype_for(module: nn.Module) -> torch.dtype:
        if mode == "merge":
            return torch.float32  # merged in float64 anyway; float32 keeps the LoRA's precision
        return module.compute_dtype if isinstance(module, QuantizedLinear) else module.weight.dtype

    spans, changes = _resolve(model, lora, dtype_for, on_layer_devices=mode == "merge")
    handle = LoraHandle(model, lora, spans, changes, strength, mode,
                        torch.device(backup_device) if backup_device is not None else None)
    handle._attach()
    return handle


def active_loras(model: nn.Module) -> list[LoraHandle]:
    """The LoRAs applied to `model` and not removed, in the order they were applied."""
    return list(_HANDLES.get(model, []))


def remove_all_loras(model: nn.Module) -> None:
    """Remove every LoRA from `model` (latest first); merged layers get their original weights back."""
    for handle in reversed(active_loras(model)):
        handle.remove()
