"""LoRA files in: every key format converted at the door into one form, `LoraWeights`.

`LoraWeights` holds, for each of our (BFL)
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
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .checkpoints.files import CheckpointError, open_file
from .checkpoints.key_maps import transformer_links
from .checkpoints.layouts import describe_file
from .config import TransformerConfig

__all__ = ["LoraError", "LoraPart", "LoraWeights", "load_lora", "lora_from_state_dict"]


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
