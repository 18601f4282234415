"""LoRA adapters for the Kontext transformer: files in, merged into the weights or added on the fly.

Every file format is converted at the door into one form, `LoraWeights`: for each of our (BFL)
linear layers, low-rank parts `up @ down` that update a row range of its weight. Formats read:

- BFL / ComfyUI: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or `lora_down` /
  `lora_up`, optional `.alpha`), under `model.diffusion_model.`, `diffusion_model.`, `transformer.` or none;
- diffusers / peft: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, ... Parts of our fused
  layers (q, k, v of `qkv`; q, k, v, mlp of a single block's `linear1`) become row ranges of the fused
  layer, found from `key_maps.transformer_links`; `norm_out.linear` is (scale, shift) in diffusers and
  (shift, scale) here, so its up-projection's halves are swapped. peft's `lora_alpha` is read from the
  file's `lora_adapter_metadata` when there is no `.alpha` tensor;
- kohya (sd-scripts): `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` and its diffusers-named
  form `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`.

Each part's update is `up @ down * alpha / rank` (scale 1 without alpha); `alpha / rank` is folded
into `up` at load, and the strength is applied when the LoRA is applied. Text-encoder keys are skipped
with a warning and listed in `LoraWeights.skipped`.

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
  the layer (kontext_core/fused.py); the weights are never touched. All on-the-fly LoRAs of a layer are
  stacked into one pair of factors, so a layer costs two thin GEMMs more however many LoRAs it has; being
  part of the model's own code, they run inside compiled blocks and CUDA graphs. Strength changes rewrite
  the factors in place (no recompilation, no new graph capture). Works for `nn.Linear` and `QuantizedLinear`
  alike; on 8-bit layers the LoRA reads the same e4m3 or int8 activations as the layer's GEMM, and where
  fp8 GEMMs run it joins that GEMM as extra K columns instead of two GEMMs more (kontext_core/wide_lora.py).

A model saved while LoRAs are merged is saved with them baked in. Apply LoRAs after copying a model
(`copy.deepcopy` carries on-the-fly factors over to the copy, but not the handles that remove them).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import weakref
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .checkpoints.files import CheckpointError, open_file
from .checkpoints.key_maps import transformer_links
from .checkpoints.layouts import describe_file
from .config import TransformerConfig
from .fused import LORA_FACTORS, LoraFactors, factors_layout, lora_factors
from . import wide_lora
from .quant import QuantizedLinear, quantize_weight

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


class LoraError(CheckpointError):
    """A LoRA file that cannot be read, or that does not fit the model. The message says what to do."""


@dataclass(frozen=True)
class LoraPart:
    """One low-rank update of a linear layer: weight[rows] += up @ down (times the strength)."""

    down: torch.Tensor  # [rank, in_features] (lora_A / lora_down), float32
    up: torch.Tensor  # [rows, rank] (lora_B / lora_up) with alpha / rank folded in, float32
    part: int | None  # index into the fused layer's split (q, k, v[, mlp]); None: every row
    key: str  # the file's name for it, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraWeights:
    """A LoRA in our canonical form: our module name -> its parts. Nothing here knows the file format."""

    layers: dict[str, list[LoraPart]]
    name: str = ""
    format: str = ""  # bfl | diffusers | kohya | mixed (what the file's names were)
    skipped: list[str] = field(default_factory=list)  # text-encoder keys, not applied

    @property
    def targets(self) -> list[str]:
        return sorted(self.layers)

    @property
    def rank(self) -> int:
        """The largest rank of any part."""
        return max((p.rank for parts in self.layers.values() for p in parts), default=0)

    def __repr__(self) -> str:
        return (f"LoraWeights({self.name!r}, format={self.format}, layers={len(self.layers)}, "
                f"rank={self.rank}, skipped={len(self.skipped)})")


# --- names: every format to our module names ------------------------------------------------------

_BLOCK_PREFIXES = r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)"
_DOTTED_BLOCK = re.compile(rf"^{_BLOCK_PREFIXES}\.(\d+)\.(.+)$")
_KOHYA_BLOCK = re.compile(rf"^{_BLOCK_PREFIXES}_(\d+)_(.+)$")
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
                    "model.", "unet.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_clip", "te1.", "te2.")

_WEIGHT_KEY = re.compile(r"^(?P<stem>.+)\.(?P<role>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<stem>.+)\.alpha$")
_ROLES = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}
_UNSUPPORTED = {
    "LyCORIS LoHa": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
    "LyCORIS LoKr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
    "full weight or bias difference (.diff / .diff_b)": (".diff", ".diff_b"),
    "DoRA": (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight"),
    "LoRA bias (peft lora_bias)": (".lora_B.bias", ".lora_up.bias"),
    "LoCon mid weight (convolutional LoRA)": (".lora_mid.weight",),
}


@dataclass(frozen=True)
class _Target:
    layer: str  # our module name; "#" stands for the block index in the templates
    part: int | None = None
    swap_halves: bool = False  # diffusers' (scale, shift) -> our (shift, scale)
    style: str = "bfl"


def _template(name: str, pattern: re.Pattern, separator: str) -> tuple[str, int | None]:
    """`double_blocks.3.img_attn.qkv` -> (`double_blocks.#.img_attn.qkv`, 3); other names unchanged."""
    match = pattern.match(name)
    if match is None:
        return name, None
    prefix, index, rest = match.groups()
    return f"{prefix}{separator}#{separator}{rest}", int(index)


@lru_cache(maxsize=1)
def _name_tables() -> tuple[dict[str, _Target], dict[str, _Target]]:
    """(dotted names, kohya names) of every linear layer in BFL and diffusers spelling -> our target.

    Built from key_maps on a one-block config: only the names matter, the block index is a wildcard.
    """
    dotted: dict[str, _Target] = {}
    for link in transformer_links(TransformerConfig.tiny(depth=1, depth_single_blocks=1)):
        if not link.ours.endswith(".weight"):
            continue  # norms (`.scale`) and biases carry no LoRA
        ours = _template(link.ours.removesuffix(".weight"), _DOTTED_BLOCK, ".")[0]
        dotted[ours] = _Target(ours)
        for index, theirs in enumerate(link.theirs):
            theirs = _template(theirs.removesuffix(".weight"), _DOTTED_BLOCK, ".")[0]
            dotted[theirs] = _Target(ours, index if link.kind == "concat" else None,
                                     link.kind == "swap_halves", "diffusers")
    kohya = {name.replace(".", "_").lower(): target for name, target in dotted.items()}
    return dotted, kohya


def _resolve_stem(stem: str) -> _Target | None:
    """Our target for one LoRA module name in any supported spelling, or None."""
    dotted, kohya = _name_tables()
    for prefix in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            template, index = _template(stem[len(prefix):].lower(), _KOHYA_BLOCK, "_")
            target = kohya.get(template)
            if target is None:
                return None
            return _with_index(target, index, "kohya")
    candidates = [stem]
    while candidates:
        name = candidates.pop()
        template, index = _template(name, _DOTTED_BLOCK, ".")
        target = dotted.get(template)
        if target is not None:
            return _with_index(target, index, target.style)
        candidates += [name[len(p):] for p in _DOTTED_PREFIXES if name.startswith(p)]
    return None


def _with_index(target: _Target, index: int | None, style: str) -> _Target:
    layer = target.layer if index is None else target.layer.replace("#", str(index))
    return _Target(layer, target.part, target.swap_halves, style)


def _is_text_encoder(stem: str) -> bool:
    return stem.startswith(_TEXT_ENCODER_PREFIXES)


def _guess_model(keys: Iterable[str]) -> str:
    """What a LoRA whose names we do not know was most likely made for."""
    text = " ".join(keys)
    if re.search(r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)", text):
        if "lora_te2_" in text or "text_encoder_2" in text:
            return "a Stable Diffusion XL LoRA"
        return "a Stable Diffusion (1.x / 2.x / XL) UNet LoRA"
    if "joint_blocks" in text or "context_block" in text:
        return "a Stable Diffusion 3 LoRA"
    if "processor.proj_lora" in text or "processor.qkv_lora" in text:
        return ("an XLabs FLUX LoRA (its own key format, not supported here; convert it to the diffusers or "
                "ComfyUI format first)")
    if "double_stream_modulation" in text or "single_stream_modulation" in text:
        return "a FLUX.2 LoRA"
    if re.search(r"blocks[._]\d+[._](self_attn|cross_attn)", text):
        return "a video-model LoRA (Wan / HunyuanVideo style)"
    return "a LoRA for another model"


# --- loading ---------------------------------------------------------------------------------------


def load_lora(path: str | os.PathLike, name: str | None = None) -> LoraWeights:
    """Read a FLUX LoRA `.safetensors` file in any supported key format (see the module docstring).

    Raises `LoraError` (a `CheckpointError`) for files that are not FLUX LoRAs, naming what they look like.
    """
    path = Path(path)
    source = open_file(path)
    return _parse(source.keys(), source.get, source.metadata, name or path.name)


def lora_from_state_dict(tensors: Mapping[str, torch.Tensor], name: str = "LoRA",
                         metadata: Mapping[str, str] | None = None) -> LoraWeights:
    """The same as `load_lora`, from tensors already in memory (file keys as names)."""
    return _parse(list(tensors), tensors.__getitem__, dict(metadata or {}), name)


def _parse(keys: list[str], get: Callable[[str], torch.Tensor], metadata: Mapping[str, str],
           name: str) -> LoraWeights:
    if not keys:
        raise LoraError(f"{name} holds no tensors; it is not a LoRA. Download it again.")
    for kind, suffixes in _UNSUPPORTED.items():
        found = [k for k in keys if k.endswith(suffixes)]
        if found:
            raise LoraError(
                f"{name} is a {kind} adapter ({found[0]}, ...); only plain LoRA (lora_A/lora_B, "
                "lora_down/lora_up) is supported. Use a plain LoRA version of it."
            )

    pairs: dict[str, dict[str, str]] = {}  # stem -> {"down": key, "up": key, "alpha": key}
    others: list[str] = []
    for key in keys:
        match = _WEIGHT_KEY.match(key) or _ALPHA_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        role = _ROLES.get(match.groupdict().get("role") or "", "alpha")
        roles = pairs.setdefault(match["stem"], {})
        if role in roles:
            raise LoraError(
                f"{name}: {roles[role]} and {key} are both the {role} weight of {match['stem']}; the file holds "
                "more than one adapter. Save each adapter to its own file."
            )
        roles[role] = key
    # An alpha with no weights beside it changes nothing (some kohya files keep final_layer's this way).
    pairs = {stem: roles for stem, roles in pairs.items() if set(roles) != {"alpha"}}

    if not pairs:
        raise LoraError(
            f"{describe_file(set(keys), name)}, not a LoRA (no lora_A/lora_B or lora_down/lora_up tensors). "
            "Model files load with Load Kontext Model (core: load_transformer); a LoRA file holds lora_A/lora_B "
            "pairs and goes in models/loras."
        )
    if others:
        raise LoraError(
            f"{name} holds {len(others)} tensors that are not LoRA weights beside its LoRA pairs (first: "
            f"{', '.join(others[:3])}); full replacement tensors (as in FLUX.1 Canny/Depth control LoRAs) "
            "are not supported. Use a LoRA that holds only lora_A/lora_B (or lora_down/lora_up) pairs."
        )

    skipped = sorted(stem for stem in pairs if _is_text_encoder(stem))
    targets = {stem: _resolve_stem(stem) for stem in pairs if stem not in skipped}
    unknown = sorted(stem for stem, target in targets.items() if target is None)
    if unknown:
        raise LoraError(
            f"{name} has {len(unknown)} LoRA modules that are not layers of the FLUX transformer (first: "
            f"{', '.join(unknown[:3])}); it looks like {_guess_model(pairs)}. Use a LoRA made for "
            "FLUX.1 (Kontext) [dev]."
        )
    if not targets:
        raise LoraError(f"{name} only holds text-encoder LoRA weights ({skipped[0]}, ...); "
                        "there is nothing to apply to the transformer.")
    if skipped:
        warnings.warn(f"{name}: {len(skipped)} text-encoder LoRA modules skipped (first: {skipped[0]}); "
                      "only the transformer part is applied.", stacklevel=3)

    peft_alpha = _PeftAlpha.from_metadata(metadata)
    layers: dict[str, list[LoraPart]] = {}
    seen: dict[tuple[str, int | None], str] = {}
    styles = set()
    for stem, target in targets.items():
        roles = pairs[stem]
        missing = [r for r in ("down", "up") if r not in roles]
        if missing:
            raise LoraError(
                f"{name}: {stem} has no {missing[0]} weight (its lora_A/lora_down and lora_B/lora_up must come "
                "in pairs); the file is incomplete. Download it again."
            )
        down, up = get(roles["down"]), get(roles["up"])
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{name}: {stem} has down {list(down.shape)} and up {list(up.shape)}; a linear LoRA needs "
                "down [rank, in] and up [out, rank] (a convolutional LoRA is for another kind of model)."
            )
        rank = down.shape[0]
        if "alpha" in roles:
            scale = float(get(roles["alpha"]).float().reshape(-1)[0]) / rank
        else:
            scale = peft_alpha.scale(stem, rank)
        up = up.float() * scale if scale != 1.0 else up.float()
        if target.swap_halves:
            if up.shape[0] % 2:
                raise LoraError(f"{name}: {stem} should have an even number of rows (scale and shift), "
                                f"has {up.shape[0]}.")
            scale_rows, shift_rows = up.chunk(2, dim=0)
            up = torch.cat((shift_rows, scale_rows), dim=0)
        slot = (target.layer, target.part)
        if slot in seen:
            raise LoraError(f"{name}: {seen[slot]} and {stem} both target {target.layer}"
                            f"{'' if target.part is None else f' (part {target.part})'}; the file mixes two copies "
                            "of one LoRA. Keep one of them.")
        seen[slot] = stem
        styles.add(target.style)
        layers.setdefault(target.layer, []).append(LoraPart(down.float().contiguous(), up.contiguous(),
                                                            target.part, stem))
    for layer, parts in layers.items():
        whole = [p for p in parts if p.part is None]
        if whole and len(parts) > 1:
            other = next(p for p in parts if p is not whole[0])
            raise LoraError(f"{name}: {whole[0].key} and {other.key} both target {layer}; the file mixes the "
                            "fused and the split form of one layer. Keep one of them.")
    style = styles.pop() if len(styles) == 1 else "mixed"
    return LoraWeights(layers, name, style, skipped)


@dataclass
class _PeftAlpha:
    """peft's `lora_alpha` (and `alpha_pattern`, `use_rslora`) from diffusers' `lora_adapter_metadata`."""

    alpha: float | None = None
    pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "_PeftAlpha":
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return cls()
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            return cls()
        # A pipeline's save prefixes each entry with the component ("transformer.lora_alpha").
        if any(k.startswith("transformer.") for k in config):
            config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
        alpha = config.get("lora_alpha")
        return cls(float(alpha) if alpha is not None else None,
                   {k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                   bool(config.get("use_rslora", False)))

    def scale(self, stem: str, rank: int) -> float:
        alpha = self.alpha
        module = stem.removeprefix("transformer.")
        for pattern, value in self.pattern.items():
            if module == pattern or re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        if alpha is None:
            return 1.0
        return alpha / (math.sqrt(rank) if self.rslora else rank)


# --- applying --------------------------------------------------------------------------------------


@dataclass
class _Span:
    """A part resolved against one model: rows [start, stop) of the layer's weight."""

    start: int
    stop: int
    down: torch.Tensor
    up: torch.Tensor


@lru_cache(maxsize=8)
def _fused_splits(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    return {link.ours.removesuffix(".weight"): link.split for link in transformer_links(config)
            if link.kind == "concat" and link.ours.endswith(".weight")}


def _resolve(model: nn.Module, lora: LoraWeights, dtype_for: Callable[[nn.Module], torch.dtype],
             on_layer_devices: bool) -> dict[str, list[_Span]]:
    """Check every target against the model; the parts in `dtype_for` their layer, on its device or left where
    they are (on-the-fly ones: `_stack_factors` puts the stacked factors where the model computes)."""
    splits = _fused_splits(model.config)
    missing, mismatched = [], []
    resolved: dict[str, list[_Span]] = {}
    for layer_name, parts in lora.layers.items():
        try:
            module = model.get_submodule(layer_name)
        except AttributeError:
            missing.append(layer_name)
            continue
        if not isinstance(module, (nn.Linear, QuantizedLinear)):
            missing.append(layer_name)
            continue
        spans = []
        for part in parts:
            if part.part is None:
                start, stop = 0, module.out_features
            else:
                split = splits.get(layer_name, ())
                if part.part >= len(split):
                    missing.append(f"{layer_name} (part {part.part})")
                    continue
                start = sum(split[:part.part])
                stop = start + split[part.part]
            if part.down.shape[1] != module.in_features or part.up.shape[0] != stop - start:
                mismatched.append(f"{part.key}: LoRA {part.up.shape[0]}x{part.down.shape[1]}, layer {layer_name} "
                                  f"rows {start}:{stop} of {module.out_features}x{module.in_features}")
                continue
            device, dtype = module.weight.device if on_layer_devices else part.down.device, dtype_for(module)
            spans.append(_Span(start, stop, part.down.to(device, dtype), part.up.to(device, dtype)))
        resolved[layer_name] = spans
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
            f"The model's hidden size is {model.config.hidden_size}; the LoRA was made for another model."
        )
    return resolved


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _merge_into(module: nn.Module, spans: list[_Span], strength: float) -> None:
    """weight[rows] += strength * up @ down, rounded once to the weight's storage."""
    if isinstance(module, QuantizedLinear):
        weight = module.dequantized_weight(torch.float32)
        for span in spans:
            weight[span.start:span.stop] += strength * (span.up.float() @ span.down.float())
        quantized, scale = quantize_weight(weight, module.weight.dtype, per_row=module.weight_scale.ndim == 1)
        module.weight.copy_(quantized)
        module.weight_scale.copy_(scale)
        return
    weight = module.weight
    compute = _accumulate_dtype(weight.device)
    rows_per_chunk = max(1, (1 << 22) // max(1, weight.shape[1]))  # bounds the float64 temporaries
    for span in spans:
        down = span.down.to(compute)
        for first in range(span.start, span.stop, rows_per_chunk):
            last = min(first + rows_per_chunk, span.stop)
            delta = span.up[first - span.start:last - span.start].to(compute) @ down
            rows = weight[first:last]
            rows.copy_((rows.to(compute) + strength * delta).to(weight.dtype))


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
    """A layer's weights before any merge, and the handles merged into it, in order."""

    weight: torch.Tensor
    weight_scale: torch.Tensor | None
    handles: list["LoraHandle"] = field(default_factory=list)

    def restore(self, module: nn.Module) -> None:
        _staged_copy(module.weight.detach(), self.weight)
        if self.weight_scale is not None:
            module.weight_scale.copy_(self.weight_scale)


_MERGED: "weakref.WeakKeyDictionary[nn.Module, _MergedLayer]" = weakref.WeakKeyDictionary()
# The handles applied on the fly to each layer, in order.
_ON_THE_FLY: "weakref.WeakKeyDictionary[nn.Module, list[LoraHandle]]" = weakref.WeakKeyDictionary()
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, list[LoraHandle]]" = weakref.WeakKeyDictionary()


def _stack_factors(module: nn.Module, name: str, model: nn.Module) -> None:
    """Set `module`'s on-the-fly factors (kontext_core/fused.py) from the handles on it: their downs stacked
    [R, in], their ups times their strengths side by side [out, R], zero outside each part's rows (R padded
    with zeros, below).

    They are made where the model computes, in the layer's compute dtype: with blocks offloaded
    (kontext_core/offload.py) a layer's weights live on the host while its arithmetic runs on the GPU. Factors
    laid out as the present ones are overwritten in place: compiled blocks then run on unchanged and a captured
    CUDA graph (which reads them by address) replays the new strengths. fp8 layers that can take them as
    columns of their own GEMM get the wide layout (kontext_core/wide_lora.py)."""
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
    # (kontext_core/wide_lora.py): on-the-fly LoRAs in that layout are stacked again.
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
    with GEMM columns (kontext_core/wide_lora.py); one whose LoRAs turn out too strong for them takes less.

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
                 strength: float, mode: str, backup_device: torch.device | None):
        # Weak: the registries below must not keep a deleted model (or its layers) alive.
        self.model_ref = weakref.ref(model)
        self.lora = lora
        self.mode = mode
        self._strength = strength
        self._spans = spans
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

    @torch.no_grad()
    def _attach(self) -> None:
        model = self.model_ref()
        if self.mode == "on_the_fly":
            for name in self._spans:
                module = model.get_submodule(name)
                _ON_THE_FLY.setdefault(module, []).append(self)
                _stack_factors(module, name, model)
        else:
            for name, spans in self._spans.items():
                module = model.get_submodule(name)
                record = _MERGED.get(module)
                if record is None:
                    backup = self._backup_device or module.weight.device
                    scale = (module.weight_scale.detach().to(backup, copy=True)
                             if isinstance(module, QuantizedLinear) else None)
                    record = _MERGED[module] = _MergedLayer(_copy_to(module.weight.detach(), backup), scale)
                record.handles.append(self)
                _merge_into(module, spans, self._strength)
                _refresh_columns(module, name, model)
        self.active = True
        _HANDLES.setdefault(model, []).append(self)

    @torch.no_grad()
    def _rebuild(self, model: nn.Module) -> None:
        """Restore each touched layer's original weights and re-merge the handles still on it, in order."""
        for name in self._spans:
            module = model.get_submodule(name)
            record = _MERGED[module]
            record.restore(module)
            for handle in record.handles:
                _merge_into(module, handle._spans[name], handle._strength)
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
        if self.mode == "merge":
            self._rebuild(model)
        else:
            with torch.no_grad():
                for name in self._spans:
                    _stack_factors(model.get_submodule(name), name, model)

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
        else:
            for name in self._spans:
                _MERGED[model.get_submodule(name)].handles.remove(self)
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

    spans = _resolve(model, lora, dtype_for, on_layer_devices=mode == "merge")
    handle = LoraHandle(model, lora, spans, strength, mode,
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
