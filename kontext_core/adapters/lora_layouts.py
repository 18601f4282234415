"""LoRA files in: every key layout converted at the door into one form, `LoraWeights`.

`LoraWeights` holds, for modules of ours (BFL names: `double_blocks.0.img_attn.qkv`), the low-rank parts
`up @ down` that update row ranges of a linear layer's weight, and the changes that are not low-rank
(`TensorChange`: bias deltas, full differences, norm scales replaced). The layouts read are every FLUX layout
that diffusers 0.42 (`FluxLoraLoaderMixin.lora_state_dict`) reads, and ComfyUI's:

- BFL / ComfyUI: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or `lora_down` / `lora_up`,
  optional `.alpha`) under `model.diffusion_model.`, `diffusion_model.`, `transformer.` or no prefix; ComfyUI's
  full differences `.diff` (of a weight, or of a norm's scale: `...query_norm.scale.diff`), `.diff_b` (of a
  bias) and replacements `.set_weight`;
- fal's Kontext LoRAs: the BFL names under peft's `base_model.model.`;
- BFL's control LoRAs (FLUX.1 Canny / Depth [dev] LoRA): BFL names, peft's `lora_B.bias`, and the q/k norms'
  scales as whole tensors (`double_blocks.0.img_attn.norm.query_norm.scale`) that replace ours. Their `img_in`
  reads twice the channels (the image's latent and the control image's side by side), an input Kontext does
  not have: applying one says so (lora.py);
- diffusers / peft / ai-toolkit: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` with `.alpha`
  tensors or peft's `lora_adapter_metadata` for alpha, `lora_B.bias`, and norm replacements
  (`transformer.transformer_blocks.0.attn.norm_q.weight`, as diffusers loads control LoRAs). Parts of our
  fused layers (q, k, v of `qkv`; q, k, v, mlp of a single block's `linear1`) become row ranges of the fused
  layer, found from `key_maps.transformer_links`; `norm_out.linear` is (scale, shift) in diffusers and
  (shift, scale) here, so the rows of its up-projection, bias and differences swap halves;
- kohya (sd-scripts, OneTrainer, ...): `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` and the
  diffusers-named `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`;
- XLabs: `double_blocks.0.processor.qkv_lora1.down.weight`: `qkv_lora1` / `proj_lora1` update the image
  stream's `qkv` / `proj`, `qkv_lora2` / `proj_lora2` the text stream's; a single block's `qkv_lora` updates
  the q, k, v rows of `linear1`, its `proj_lora` `linear2` (as diffusers reads them).

Each part's update is `up @ down * alpha / rank` (scale 1 without alpha; XLabs files have none): `alpha / rank`
is folded into `up` (and into a `lora_B.bias`) at load, the strength is applied when the LoRA is applied.
Text-encoder modules are skipped with one warning (`LoraWeights.skipped`), modules that are no part of our
transformer likewise (`LoraWeights.unmatched`). A LoRA for another model (Stable Diffusion 1/2/XL, SD3,
FLUX.2, Wan, HunyuanVideo, Qwen-Image, ...) is refused, saying what it looks like.
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

from ..checkpoints.files import CheckpointError, first_few, open_file
from ..checkpoints.key_maps import transformer_links
from ..checkpoints.layouts import describe_file
from ..model.config import TransformerConfig

__all__ = ["LoraError", "LoraPart", "LoraWeights", "TensorChange", "load_lora", "lora_from_state_dict"]


class LoraError(CheckpointError):
    """A LoRA file that cannot be read, or that does not fit the model. The message says what to do."""


_USE_A_FLUX_LORA = "Use a LoRA made for FLUX.1 (Kontext) [dev]."
# For a file whose tensors no FLUX.1 LoRA could have: most likely one for another model, or damaged; if neither,
# a layout this reader gets wrong, which only its user can show us.
_FOREIGN_OR_DAMAGED = ("Use a LoRA made for FLUX.1 (Kontext) [dev]; if this file is one, download it again, and if "
                       "it still fails while other tools load it, report it at "
                       "https://github.com/comfyui-kontext/comfyui-kontext/issues.")


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


@dataclass(frozen=True)
class TensorChange:
    """A change of one of our parameters that is not low-rank.

    "add": `value` times the strength is added (a bias delta: peft's `lora_B.bias`, ComfyUI's `.diff_b`; a full
    difference: `.diff`). "set": the parameter becomes `value` (a control LoRA's norm scales, `.set_weight`);
    a strength s moves it that fraction of the way (0: unchanged, 1: replaced).
    """

    value: torch.Tensor  # float32: the parameter's rows of `part` of a fused layer, or all of it
    kind: str  # add | set
    part: int | None
    key: str  # the file's name for it, for messages


@dataclass
class LoraWeights:
    """A LoRA in our canonical form: our module names -> their updates. Nothing here knows the file format."""

    layers: dict[str, list[LoraPart]]  # our linear layer -> its low-rank parts
    name: str = ""
    format: str = ""  # bfl | diffusers | kohya | xlabs | mixed (what the file's names were)
    skipped: list[str] = field(default_factory=list)  # text-encoder modules, not applied
    changes: dict[str, list[TensorChange]] = field(default_factory=dict)  # our parameter name -> its changes
    unmatched: list[str] = field(default_factory=list)  # modules that are no part of our transformer
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # weight shapes the file asks of layers

    @property
    def targets(self) -> list[str]:
        return sorted(self.layers)

    @property
    def rank(self) -> int:
        """The largest rank of any part."""
        return max((p.rank for parts in self.layers.values() for p in parts), default=0)

    def __repr__(self) -> str:
        return (f"LoraWeights({self.name!r}, format={self.format}, layers={len(self.layers)}, "
                f"rank={self.rank}, changes={len(self.changes)}, skipped={len(self.skipped)}, "
                f"unmatched={len(self.unmatched)})")


# --- names: every layout to our module names -------------------------------------------------------

_BLOCK_PREFIXES = r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)"
_DOTTED_BLOCK = re.compile(rf"^{_BLOCK_PREFIXES}\.(\d+)\.(.+)$")
_KOHYA_BLOCK = re.compile(rf"^{_BLOCK_PREFIXES}_(\d+)_(.+)$")
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.",
                    "model.", "unet.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_clip", "te1.", "te2.")
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)$")

# What a key is to its module, by its ending; the rest of the key is the module's name in the file (its stem).
_ROLE_KEYS = (
    ("down", re.compile(r"^(?P<stem>.+)\.(?:lora_A|lora_down)(?:\.[^.]+)?\.weight$")),
    ("up", re.compile(r"^(?P<stem>.+)\.(?:lora_B|lora_up)(?:\.[^.]+)?\.weight$")),
    ("up_bias", re.compile(r"^(?P<stem>.+)\.(?:lora_B|lora_up)(?:\.[^.]+)?\.bias$")),
    ("down", re.compile(r"^(?P<stem>.+\.processor\.(?:qkv|proj)_lora[12]?)\.down\.weight$")),
    ("up", re.compile(r"^(?P<stem>.+\.processor\.(?:qkv|proj)_lora[12]?)\.up\.weight$")),
    ("alpha", re.compile(r"^(?P<stem>.+)\.alpha$")),
    ("diff", re.compile(r"^(?P<stem>.+)\.diff$")),
    ("diff_b", re.compile(r"^(?P<stem>.+)\.diff_b$")),
    ("set", re.compile(r"^(?P<stem>.+)\.set_weight$")),
    ("reshape", re.compile(r"^(?P<stem>.+)\.reshape_weight$")),
    # A whole parameter: in a LoRA, only a control LoRA's norm scales (anything else is refused in _parse).
    ("tensor", re.compile(r"^(?P<stem>.+)\.(?P<param>weight|scale|bias)$")),
)
_UPDATES = {"down", "up", "up_bias", "diff", "diff_b", "set"}  # a file with none of these is no LoRA
_UNSUPPORTED = {
    "LyCORIS LoHa": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
    "LyCORIS LoKr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
    "DoRA": (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight"),
    "LoCon mid weight (convolutional LoRA)": (".lora_mid.weight",),
    "LoRA with a bias on its down projection (lora_A.bias)": (".lora_A.bias", ".lora_down.bias"),
}
# FLUX.1 has 19 double and 38 single blocks: a LoRA with a block past them is for another model.
_BLOCK_COUNTS = {"double_blocks": 19, "transformer_blocks": 19, "single_blocks": 38, "single_transformer_blocks": 38}


@dataclass(frozen=True)
class _Target:
    layer: str  # our module name; "#" stands for the block index in the templates
    part: int | None = None
    swap_halves: bool = False  # diffusers' (scale, shift) -> our (shift, scale)
    style: str = "bfl"
    kind: str = "linear"  # linear | norm (an RMSNorm's `scale`)
    chunk: tuple[int, int] | None = None  # (i, n): the target takes the i-th of n equal row blocks of the update

    @property
    def main(self) -> str:
        """The parameter a full difference or replacement of this module changes."""
        return "scale" if self.kind == "norm" else "weight"


def _template(name: str, pattern: re.Pattern, separator: str) -> tuple[str, int | None]:
    """`double_blocks.3.img_attn.qkv` -> (`double_blocks.#.img_attn.qkv`, 3); other names unchanged."""
    match = pattern.match(name)
    if match is None:
        return name, None
    prefix, index, rest = match.groups()
    return f"{prefix}{separator}#{separator}{rest}", int(index)


@lru_cache(maxsize=1)
def _name_tables() -> tuple[dict[str, _Target], dict[str, _Target]]:
    """(dotted names, kohya names) of every linear layer and q/k norm in BFL and diffusers spelling -> our target.

    Built from key_maps on a one-block config: only the names matter, the block index is a wildcard.
    """
    dotted: dict[str, _Target] = {}
    for link in transformer_links(TransformerConfig.tiny(depth=1, depth_single_blocks=1)):
        if link.ours.endswith(".weight"):
            kind, our_param = "linear", ".weight"
        elif link.ours.endswith(".scale"):
            kind, our_param = "norm", ".scale"  # diffusers calls it `.weight`
        else:
            continue  # biases belong to their linear layer
        ours = _template(link.ours.removesuffix(our_param), _DOTTED_BLOCK, ".")[0]
        dotted[ours] = _Target(ours, kind=kind)
        for index, theirs in enumerate(link.theirs):
            theirs = _template(theirs.removesuffix(".weight"), _DOTTED_BLOCK, ".")[0]
            dotted[theirs] = _Target(ours, index if link.kind == "concat" else None,
                                     link.kind == "swap_halves", "diffusers", kind)
    kohya = {name.replace(".", "_").lower(): target for name, target in dotted.items()}
    return dotted, kohya


def _xlabs_targets(stem: str) -> list[_Target] | None:
    match = _XLABS.match(stem)
    if match is None:
        return None
    blocks, index, which, stream = match.groups()
    if blocks == "double_blocks" and stream:
        attention = "img_attn" if stream == "1" else "txt_attn"
        return [_Target(f"double_blocks.{index}.{attention}.{which}", style="xlabs")]
    if blocks == "single_blocks" and not stream:
        if which == "proj":
            return [_Target(f"single_blocks.{index}.linear2", style="xlabs")]
        # q, k and v: the first three parts of linear1 (its fourth, the MLP's input, is left alone)
        return [_Target(f"single_blocks.{index}.linear1", part, style="xlabs", chunk=(part, 3)) for part in range(3)]
    return None


def _resolve_stem(stem: str) -> list[_Target] | None:
    """Our targets for one module name of a LoRA file in any supported spelling, or None."""
    xlabs = _xlabs_targets(stem)
    if xlabs is not None:
        return xlabs
    dotted, kohya = _name_tables()
    for prefix in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            template, index = _template(stem[len(prefix):].lower(), _KOHYA_BLOCK, "_")
            target = kohya.get(template)
            return None if target is None else [_with_index(target, index, "kohya")]
    candidates = [stem]
    while candidates:
        name = candidates.pop()
        template, index = _template(name, _DOTTED_BLOCK, ".")
        target = dotted.get(template)
        if target is not None:
            return [_with_index(target, index, target.style)]
        candidates += [name[len(p):] for p in _DOTTED_PREFIXES if name.startswith(p)]
    return None


def _resolve_module(stem: str) -> tuple[list[_Target], str | None] | None:
    """`_resolve_stem`, and for a stem that names a parameter (ComfyUI's `...query_norm.scale.diff`) its
    module's targets and that parameter."""
    targets = _resolve_stem(stem)
    if targets is not None:
        return targets, None
    module, _, param = stem.rpartition(".")
    if module and param in ("weight", "scale", "bias"):
        targets = _resolve_stem(module)
        if targets is not None:
            return targets, param
    return None


def _with_index(target: _Target, index: int | None, style: str) -> _Target:
    layer = target.layer if index is None else target.layer.replace("#", str(index))
    return _Target(layer, target.part, target.swap_halves, style, target.kind, target.chunk)


def _is_text_encoder(stem: str) -> bool:
    return stem.startswith(_TEXT_ENCODER_PREFIXES)


# Names no FLUX.1 LoRA has, and the model they come from (searched in each module name, case ignored).
_OTHER_MODELS = (
    (r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)[._]\d", "unet"),
    (r"joint_blocks|context_block[._]|x_block[._]", "a Stable Diffusion 3 LoRA"),
    (r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj", "a FLUX.2 LoRA"),
    (r"double_stream_blocks|single_stream_blocks", "a HiDream LoRA"),
    (r"token_refiner|\.(img|txt)_attn_(qkv|proj)\b|\.(img|txt)_mod\.linear|\.(img|txt)_mlp\.fc[12]",
     "a HunyuanVideo LoRA"),
    (r"(img|txt)_mod[._]1\b|(img|txt)_mlp[._]net|txt_norm", "a Qwen-Image LoRA"),
    (r"(^|\.|lora_unet_|lora_transformer_)blocks[._]\d+[._](self_attn|cross_attn|ffn|attn1|attn2)\b",
     "a Wan video-model LoRA"),
    (r"[._]attn[12][._]", "a LoRA for a model with cross-attention (Stable Diffusion 3.5, LTX-Video, ...)"),
    (r"(^|[._])layers[._]\d+[._](attention|feed_forward)|context_refiner|noise_refiner",
     "a Lumina 2 / Z-Image LoRA"),
)


def _block_past_flux(stem: str) -> str | None:
    """`transformer_blocks.25` when the stem names a block FLUX.1 does not have, else None."""
    for prefix in ("", *_DOTTED_PREFIXES, *_KOHYA_PREFIXES):
        if not stem.startswith(prefix):
            continue
        name = stem[len(prefix):]
        match = _DOTTED_BLOCK.match(name) or _KOHYA_BLOCK.match(name.lower())
        if match is not None:
            blocks, index = match.group(1), int(match.group(2))
            return f"{blocks}.{index}" if index >= _BLOCK_COUNTS[blocks] else None
    return None


def _other_model(stems: Iterable[str]) -> str | None:
    """What a LoRA was made for when its names say it is not a FLUX.1 LoRA, else None."""
    stems = list(stems)
    transformer = [s for s in stems if not _is_text_encoder(s)]
    for pattern, model in _OTHER_MODELS:
        if any(re.search(pattern, stem, re.IGNORECASE) for stem in transformer):
            if model != "unet":
                return model
            if any(s.startswith("lora_te2_") or "text_encoder_2" in s for s in stems):
                return "a Stable Diffusion XL LoRA"
            return "a Stable Diffusion (1.x / 2.x / XL) UNet LoRA"
    past = next((block for s in transformer if (block := _block_past_flux(s)) is not None), None)
    if past is not None:
        return (f"a LoRA for a model with more blocks than FLUX.1 ({past}; FLUX.1 has 19 double and 38 single "
                "blocks): Stable Diffusion 3, HunyuanVideo, Qwen-Image, ...")
    return None


# --- loading ---------------------------------------------------------------------------------------


def load_lora(path: str | os.PathLike, name: str | None = None) -> LoraWeights:
    """Read a FLUX LoRA `.safetensors` file in any supported key layout (see the module docstring).

    Raises `LoraError` (a `CheckpointError`) for files that are not FLUX LoRAs, naming what they look like.
    """
    path = Path(path)
    source = open_file(path)
    return _parse(source.keys(), source.get, source.metadata, name or path.name)


def lora_from_state_dict(tensors: Mapping[str, torch.Tensor], name: str = "LoRA",
                         metadata: Mapping[str, str] | None = None) -> LoraWeights:
    """The same as `load_lora`, from tensors already in memory (file keys as names)."""
    return _parse(list(tensors), tensors.__getitem__, dict(metadata or {}), name)


def _split_key(key: str) -> tuple[str, str]:
    """(stem, role) of one key; a whole tensor's role names its parameter (`tensor.scale`)."""
    for role, pattern in _ROLE_KEYS:
        match = pattern.match(key)
        if match is not None:
            return match["stem"], f"tensor.{match['param']}" if role == "tensor" else role
    return key, "other"


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

    modules: dict[str, dict[str, str]] = {}  # stem -> role -> key
    for key in keys:
        stem, role = _split_key(key)
        roles = modules.setdefault(stem, {})
        if role in roles:
            raise LoraError(
                f"{name}: {roles[role]} and {key} are both the {role} weight of {stem}; the file holds "
                "more than one adapter. Save each adapter to its own file."
            )
        roles[role] = key
    if not any(_UPDATES & set(roles) for roles in modules.values()):
        raise LoraError(
            f"{describe_file(set(keys), name)}, not a LoRA (no lora_A/lora_B or lora_down/lora_up tensors). "
            "Model files load with Load Kontext Model (core: load_transformer); a LoRA file holds lora_A/lora_B "
            "pairs and goes in models/loras."
        )
    # An alpha with no weights beside it changes nothing (some kohya files keep final_layer's this way).
    modules = {stem: roles for stem, roles in modules.items() if set(roles) != {"alpha"}}

    other = _other_model(modules)
    if other is not None:
        foreign = sorted(s for s in modules if not _is_text_encoder(s) and _resolve_module(s) is None)
        raise LoraError(
            f"{name} is not a FLUX.1 LoRA: its modules ({first_few(foreign or sorted(modules), 3)}) look like "
            f"{other}. {_USE_A_FLUX_LORA}"
        )
    skipped = sorted(stem for stem in modules if _is_text_encoder(stem))
    resolved = {stem: _resolve_module(stem) for stem in modules if stem not in skipped}
    unmatched = sorted(stem for stem, found in resolved.items() if found is None)
    resolved = {stem: found for stem, found in resolved.items() if found is not None}
    if not resolved:
        if not unmatched:
            raise LoraError(f"{name} only holds text-encoder LoRA weights ({first_few(skipped, 1)}); LoRAs are "
                            "applied to the transformer only, so there is nothing to apply. Use a LoRA that trains "
                            "the FLUX.1 (Kontext) [dev] transformer.")
        raise LoraError(
            f"{name} has {len(unmatched)} LoRA modules and none is a layer of the FLUX transformer (first: "
            f"{first_few(unmatched, 3)}); it looks like a LoRA for another model. {_USE_A_FLUX_LORA}"
        )
    if skipped:
        warnings.warn(f"{name}: {len(skipped)} text-encoder LoRA modules skipped (first: {skipped[0]}); "
                      "only the transformer part is applied.", stacklevel=3)
    if unmatched:
        warnings.warn(f"{name}: {len(unmatched)} modules are no part of the FLUX transformer and are not applied: "
                      f"{first_few(unmatched, 20)}", stacklevel=3)

    builder = _Builder(name, get, _PeftAlpha.from_metadata(metadata))
    for stem, (targets, param) in resolved.items():
        builder.add(stem, modules[stem], targets, param)
    return builder.finish(skipped, unmatched)


class _Builder:
    """Collects one file's parts and changes in our names, checking that no two of them collide."""

    def __init__(self, name: str, get: Callable[[str], torch.Tensor], peft_alpha: "_PeftAlpha"):
        self.name, self.get, self.peft_alpha = name, get, peft_alpha
        self.layers: dict[str, list[LoraPart]] = {}
        self.changes: dict[str, list[TensorChange]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.whole: set[str] = set()  # whole tensors of linear layers: refused
        self.styles: set[str] = set()
        self.seen: dict[tuple[str, int | None], str] = {}

    def add(self, stem: str, roles: dict[str, str], targets: list[_Target], param: str | None) -> None:
        name = self.name
        self.styles.update(target.style for target in targets)
        lowrank = {"down", "up", "up_bias"} & set(roles)
        scale = 1.0
        if lowrank:
            missing = [r for r in ("down", "up") if r not in roles]
            if missing:
                raise LoraError(
                    f"{name}: {stem} has no {missing[0]} weight (its lora_A/lora_down and lora_B/lora_up must come "
                    "in pairs); the file is incomplete. Download it again."
                )
            down, up = self.get(roles["down"]), self.get(roles["up"])
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise LoraError(
                    f"{name}: {stem} has down {list(down.shape)} and up {list(up.shape)}; a linear LoRA needs "
                    "down [rank, in] and up [out, rank] (a convolutional LoRA is for another kind of model). "
                    f"{_FOREIGN_OR_DAMAGED}"
                )
            rank = down.shape[0]
            if "alpha" in roles:
                scale = float(self.get(roles["alpha"]).float().reshape(-1)[0]) / rank
            else:
                scale = self.peft_alpha.scale(stem, rank)
            up = up.float() * scale if scale != 1.0 else up.float()
            down = down.float().contiguous()
            for target in targets:
                self._claim(target.layer, target.part, stem, "the LoRA")
                if target.kind != "linear":
                    raise LoraError(f"{name}: {stem} is a LoRA on a norm ({target.layer}), which has no weight "
                                    f"matrix; the file is not a FLUX.1 LoRA. {_FOREIGN_OR_DAMAGED}")
                self.layers.setdefault(target.layer, []).append(
                    LoraPart(down, self._rows(up, target, stem).contiguous(), target.part, stem))
        for role, key in roles.items():
            if role in ("down", "up", "alpha"):
                continue
            value = self.get(key).float()
            for target in targets:
                if role == "reshape":
                    self.shapes[target.layer] = tuple(int(v) for v in value.reshape(-1).tolist())
                    continue
                if role.startswith("tensor."):
                    if target.kind != "norm" or role == "tensor.bias":
                        self.whole.add(key)
                        continue
                    self._change(target, target.main, value, "set", key)
                elif role == "up_bias":
                    self._change(target, "bias", value * scale, "add", key)
                elif role == "diff_b" or param == "bias":
                    self._change(target, "bias", value, "set" if role == "set" else "add", key)
                elif role in ("diff", "set"):
                    self._change(target, target.main, value, "add" if role == "diff" else "set", key)

    def _rows(self, tensor: torch.Tensor, target: _Target, stem: str) -> torch.Tensor:
        """The rows of a file's tensor that go to `target`, in our order."""
        if target.chunk is not None:
            index, count = target.chunk
            if tensor.shape[0] % count:
                raise LoraError(f"{self.name}: {stem} has {tensor.shape[0]} rows, which do not split into "
                                f"{count} equal parts (one for each projection of {target.layer} it updates); the "
                                f"file is damaged or made for another model. {_FOREIGN_OR_DAMAGED}")
            tensor = tensor.chunk(count, dim=0)[index]
        if target.swap_halves:
            if tensor.shape[0] % 2:
                raise LoraError(f"{self.name}: {stem} should have an even number of rows (scale and shift), "
                                f"has {tensor.shape[0]}; the file is damaged or made for another model. "
                                f"{_FOREIGN_OR_DAMAGED}")
            scale_rows, shift_rows = tensor.chunk(2, dim=0)
            tensor = torch.cat((shift_rows, scale_rows), dim=0)
        return tensor

    def _change(self, target: _Target, param: str, value: torch.Tensor, kind: str, key: str) -> None:
        if param == "bias" and target.kind == "norm":
            raise LoraError(f"{self.name}: {key} changes a bias of {target.layer}, a norm without one; "
                            f"the file is not a FLUX.1 LoRA. {_FOREIGN_OR_DAMAGED}")
        parameter = f"{target.layer}.{param}"
        self._claim(parameter, target.part, key, "a change")
        self.changes.setdefault(parameter, []).append(
            TensorChange(self._rows(value, target, key).contiguous(), kind, target.part, key))

    def _claim(self, slot_name: str, part: int | None, key: str, what: str) -> None:
        slot = (slot_name, part)
        if slot in self.seen:
            raise LoraError(f"{self.name}: {self.seen[slot]} and {key} both target {slot_name}"
                            f"{'' if part is None else f' (part {part})'}; the file mixes two copies "
                            f"of {what}. Keep one of them.")
        self.seen[slot] = key

    def finish(self, skipped: list[str], unmatched: list[str]) -> LoraWeights:
        name = self.name
        if self.whole:
            raise LoraError(
                f"{name} holds {len(self.whole)} whole weights of linear layers beside its LoRA weights (first: "
                f"{first_few(sorted(self.whole), 3)}); a LoRA holds lora_A/lora_B (lora_down/lora_up) pairs, .diff / "
                ".diff_b differences and (control LoRAs) norm scales. Use the model file as a model, or a LoRA "
                "that holds only those."
            )
        for target, entries in (*self.layers.items(), *self.changes.items()):
            whole = [e for e in entries if e.part is None]
            if whole and len(entries) > 1:
                other = next(e for e in entries if e is not whole[0])
                raise LoraError(f"{name}: {whole[0].key} and {other.key} both target {target}; the file mixes the "
                                "fused and the split form of one layer. Keep one of them.")
        style = self.styles.pop() if len(self.styles) == 1 else "mixed"
        return LoraWeights(self.layers, name, style, skipped, self.changes, unmatched, self.shapes)


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
