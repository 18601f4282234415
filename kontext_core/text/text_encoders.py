"""The FLUX text conditioning: T5-XXL token embeddings and the CLIP-L pooled vector, from the files users have.

Both encoders are `transformers` models built on the meta device from a config (the real T5-XXL v1.1 and
CLIP-L by default, otherwise read from a diffusers `config.json` or inferred from the tensor shapes) and
filled tensor by tensor from safetensors: ComfyUI single files (`t5xxl_fp16`, `t5xxl_fp8_e4m3fn`,
`t5xxl_fp8_e4m3fn_scaled`, `clip_l`, bundled checkpoints) and diffusers folders (`text_encoder/`,
`text_encoder_2/`, sharded). float8 weights are dequantized on load (`weight.float() * scale_weight`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5Tokenizer)

from ..checkpoints.files import CheckpointError, TensorSource, first_few, open_file, open_sharded, refuse_lone_shard
from ..checkpoints.layouts import describe, describe_file
from ..checkpoints.loading import resolve_dtype

T5_MAX_LENGTH = 512  # Kontext [dev] and FLUX.1 [dev]; [schnell] used 256
CLIP_MAX_LENGTH = 77
T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"
CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"
# Copies of those two repos' tokenizers (data files with their licenses), for machines with an empty cache.
BUNDLED_TOKENIZERS = Path(__file__).resolve().parent / "tokenizers"

_FLOAT_STORAGE = {"F16", "BF16", "F32", "F64"}
_FP8_STORAGE = {"F8_E4M3", "F8_E5M2"}
_SCALE_SUFFIXES = ("scale_weight", "weight_scale")  # ComfyUI's scaled fp8, and newer files
_T5_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?)encoder\.block\.(?P<index>\d+)\.layer\.")
_CLIP_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?)encoder\.layers\.(?P<index>\d+)\.layer_norm1\.weight$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
_T5_FILES = "t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors"
_CLIP_FILES = "clip_l.safetensors"


def t5_xxl_config(**overrides) -> T5Config:
    """The T5 v1.1 XXL encoder FLUX uses (google/t5-v1_1-xxl); `overrides` for other sizes."""
    values = dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return T5Config(**values)


def clip_l_config(**overrides) -> CLIPTextConfig:
    """The CLIP ViT-L/14 text model (openai/clip-vit-large-patch14); `overrides` for other sizes.

    eos_token_id stays 2 as in OpenAI's config: transformers then pools at the highest token id (the
    end-of-text token), which is what FLUX was trained with.
    """
    values = dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    values.update(overrides)
    return CLIPTextConfig(**values)


# ---------------------------------------------------------------------------------------------------------
# Files and folders


@dataclass
class _Weights:
    source: TensorSource
    name: str  # what messages call it
    folder: Path | None  # the diffusers component folder (config.json lives there), if any
    prefix: str = ""  # the prefix under which this encoder's tensors sit in the file

    def keys(self) -> set[str]:
        return set(self.source.keys())

    def file_key(self, model_key: str) -> str:
        return self.prefix + model_key


def _open_weights(path: Path, component: str) -> _Weights:
    """The safetensors behind a text-encoder path: a file, a diffusers root, or a component folder."""
    if not path.exists():
        raise CheckpointError(f"text encoder path not found: {path}")
    if path.is_file():
        return _Weights(open_file(path), path.name, path.parent if path.suffix == ".json" else None)
    folder = path / component if (path / component).is_dir() else path
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _Weights(open_sharded(indexes[0]), f"{folder.name}/", folder)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return _Weights(open_file(files[0]), f"{folder.name}/{files[0].name}", folder)
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"no text encoder weights in the folder {folder}: expected one .safetensors file or a sharded set with "
        f"its .safetensors.index.json, or a diffusers folder with {component}/ (found: {found})"
    )


def _t5_prefixes(keys: set[str]) -> list[str]:
    return sorted({m["prefix"] for k in keys if (m := _T5_BLOCK.match(k))}, key=len)


def _clip_prefixes(keys: set[str]) -> list[str]:
    found = {m["prefix"] for k in keys if (m := _CLIP_LAYER.match(k))}
    # CLIP vision towers share these layer names, under `vision_model.`.
    text = [p for p in found if "vision" not in p]
    # A bundle may hold CLIP-L and CLIP-G (SD3); FLUX wants CLIP-L.
    return sorted(text, key=lambda p: ("clip_l" not in p, len(p), p))


@dataclass(frozen=True)
class _EncoderKind:
    """One text encoder as the shared loading and fit-check steps need it: how to find it in a file, build it
    and check it, and what messages call it and the files to use instead (also when the other one is given)."""

    name: str  # "T5-XXL"
    short: str  # "T5"
    trained_with: str  # "T5-XXL v1.1": the exact model FLUX was trained with
    prefixes: Callable[[set[str]], list[str]]
    files: str
    argument: str
    diffusers_folder: str
    model_cls: type[nn.Module]
    config_cls: type
    infer_config: Callable[[_Weights], object]
    file_names: Callable[[str], tuple[str, ...]]  # model key -> the names a file may store it under
    check_fits: Callable[..., None]

    @property
    def fix(self) -> str:
        """The next step when a file is not the encoder FLUX reads."""
        return (f"Use {self.trained_with}: {self.files} (ComfyUI's models/text_encoders), or a diffusers "
                f"{self.diffusers_folder}/ folder.")


def _encoder_prefix(weights: _Weights, path: Path, wanted: _EncoderKind, other: _EncoderKind) -> str:
    """Where the `wanted` encoder sits in the file (for CLIP `text_model.` included); what the file is, if none."""
    keys = weights.keys()
    prefixes = wanted.prefixes(keys)
    if prefixes:
        return prefixes[0]
    if other.prefixes(keys) and describe(keys) == f"a {other.short} text encoder":
        raise CheckpointError(
            f"{weights.name} is a {other.short} text encoder, not {wanted.name}. Pass it as the {other.short} file "
            f"(`{other.argument}`); the {wanted.short} file is {wanted.files} (in ComfyUI's models/text_encoders), "
            f"or a diffusers {wanted.diffusers_folder}/ folder."
        )
    refuse_lone_shard(path.name, "text encoder")
    raise CheckpointError(
        f"{describe_file(keys, weights.name)}, not a {wanted.name} text encoder. Expected {wanted.files} "
        f"(in ComfyUI's models/text_encoders or models/clip), or a diffusers {wanted.diffusers_folder}/ folder."
    )


def _folder_config(weights: _Weights, config_cls):
    """The config.json of a diffusers/transformers component folder, if there is one."""
    if weights.folder is None or not (weights.folder / "config.json").is_file():
        return None
    config_path = weights.folder / "config.json"
    try:
        values = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); download it again or delete it.") from exc
    values = values.get("text_config", values)  # a full CLIPConfig nests the text model's
    values = {k: v for k, v in values.items() if k not in ("architectures", "model_type", "transformers_version")}
    return config_cls(**values)


# ---------------------------------------------------------------------------------------------------------
# Configs from shapes


def _shape(weights: _Weights, model_key: str, *alternatives: str) -> tuple[int, ...] | None:
    for key in (model_key, *alternatives):
        if weights.file_key(key) in weights.source:
            return weights.source.shape(weights.file_key(key))
    return None


def _count(weights: _Weights, pattern: str) -> int:
    """1 + the highest block index under `pattern` (which holds one `(\\d+)` group)."""
    compiled = re.compile(re.escape(weights.prefix) + pattern)
    indices = [int(m[1]) for k in weights.keys() if (m := compiled.match(k))]
    return max(indices) + 1 if indices else 0


def _infer_t5_config(weights: _Weights) -> T5Config:
    embedding = _shape(weights, "shared.weight", "encoder.embed_tokens.weight")
    bias = _shape(weights, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    query = _shape(weights, "encoder.block.0.layer.0.SelfAttention.q.weight")
    gated = _shape(weights, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    plain = _shape(weights, "encoder.block.0.layer.1.DenseReluDense.wi.weight")
    if embedding is None or bias is None or query is None or (gated or plain) is None:
        return t5_xxl_config()  # incomplete file: the missing-tensor check names what is absent
    buckets, heads = bias
    return t5_xxl_config(
        vocab_size=embedding[0], d_model=embedding[1], num_heads=heads, d_kv=query[0] // heads,
        relative_attention_num_buckets=buckets, d_ff=(gated or plain)[0],
        num_layers=_count(weights, r"encoder\.block\.(\d+)\."),
        # T5 v1.0 (relu) stores one input projection, v1.1 (gated-gelu, what FLUX uses) two.
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def _infer_clip_config(weights: _Weights) -> CLIPTextConfig:
    tokens = _shape(weights, "embeddings.token_embedding.weight")
    positions = _shape(weights, "embeddings.position_embedding.weight")
    fc1 = _shape(weights, "encoder.layers.0.mlp.fc1.weight")
    if tokens is None or positions is None or fc1 is None:
        return clip_l_config()
    vocab, hidden = tokens
    # Head count leaves no trace in the shapes; every OpenAI/OpenCLIP text tower uses 64-wide heads.
    heads = hidden // 64 if hidden % 64 == 0 else 1
    return clip_l_config(
        vocab_size=vocab, hidden_size=hidden, max_position_embeddings=positions[0], intermediate_size=fc1[0],
        num_attention_heads=heads, num_hidden_layers=_count(weights, r"encoder\.layers\.(\d+)\."),
    )


# ---------------------------------------------------------------------------------------------------------
# Filling a meta-device model


def _check_dtype(dtype) -> torch.dtype:
    refusal = CheckpointError(
        f"unsupported dtype {dtype!r} for the text encoders; choose bf16, fp16 or fp32 "
        "(fp8 files are read too: their weights are dequantized to the dtype chosen)"
    )
    try:
        compute_dtype, fp8 = resolve_dtype(dtype)
    except CheckpointError:
        raise refusal from None
    if fp8 is not None:
        raise refusal
    return compute_dtype


def _sources_for(weights: _Weights, model: nn.Module,
                 names: Callable[[str], tuple[str, ...]]) -> tuple[dict[str, str], list[str], set[str]]:
    """(model key -> file key for each tensor the model needs, the file keys absent, every file key it knows)."""
    needed: dict[str, str] = {}
    missing: list[str] = []
    known: set[str] = set()
    for key in model.state_dict():
        candidates = [weights.file_key(name) for name in names(key)]
        known.update(candidates)
        found = next((c for c in candidates if c in weights.source), None)
        if found is None:
            missing.append(weights.file_key(key))
        else:
            needed[key] = found
    return needed, missing, known


def _validate(weights: _Weights, model: nn.Module, needed: dict[str, str], missing: list[str], known: set[str],
              kind: _EncoderKind) -> None:
    what = f"{kind.short} text encoder"
    if missing:
        refuse_lone_shard(weights.name, "text encoder")
        raise CheckpointError(
            f"{weights.name} is missing {len(missing)} tensors a {what} needs (first: {first_few(missing)}); "
            "the file is truncated or a different model. Download it again or pick the right file."
        )
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, file_key in needed.items():
        info = weights.source.tensors[file_key]
        if info.dtype not in _FLOAT_STORAGE | _FP8_STORAGE:
            raise CheckpointError(
                f"{weights.name}: tensor {file_key} is stored as {info.dtype}, which this loader does not read; "
                f"text encoders load from float16 / bfloat16 / float32 or float8 (plain or scaled) safetensors. "
                f"Use {kind.files}."
            )
        if info.shape != shapes[key]:
            raise CheckpointError(
                f"{weights.name}: tensor {file_key} has shape {list(info.shape)} but the {what} config needs "
                f"{list(shapes[key])}; the config (given, or the folder's config.json) does not match these weights."
            )
    unexpected = _unexpected(weights, known)
    if unexpected:
        raise CheckpointError(
            f"{weights.name} has {len(unexpected)} {what} tensors the config does not have "
            f"(first: {', '.join(unexpected[:5])}); the config (given, or the folder's config.json) does not match "
            "these weights. Leave the config unset to read it from the file."
        )


def _unexpected(weights: _Weights, known: set[str]) -> list[str]:
    """Encoder tensors under the prefix that the model leaves unread (more layers than the config, say)."""
    stack = weights.prefix + "encoder."
    ignored = _SCALE_SUFFIXES + ("scale_input", "input_scale", "comfy_quant")
    return sorted(k for k in weights.keys() if k.startswith(stack) and k not in known and not k.endswith(ignored))


def _scale(weights: _Weights, file_key: str, rows: int) -> torch.Tensor | None:
    stem = file_key[: -len("weight")] if file_key.endswith("weight") else file_key + "."
    for suffix in _SCALE_SUFFIXES:
        if stem + suffix in weights.source:
            scale = weights.source.get(stem + suffix).float()
            if scale.numel() == 1:
                return scale.reshape(())
            if scale.numel() == rows:
                return scale.reshape(rows, 1)
            raise CheckpointError(
                f"{weights.name}: the scale {stem + suffix} has {scale.numel()} values for a weight with {rows} "
                "rows; the file is damaged or of an unknown fp8 variant."
            )
    return None


def _read(weights: _Weights, file_key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    stored = weights.source.get(file_key)
    tensor = stored.to(device)
    if weights.source.tensors[file_key].dtype in _FP8_STORAGE:
        scale = _scale(weights, file_key, stored.shape[0] if stored.ndim else 1)
        tensor = tensor.float() * scale.to(device) if scale is not None else tensor.float()
    tensor = tensor.to(dtype)
    # The reader's buffers are not 64-byte aligned, which changes CPU kernels' summation order; a tensor
    # that needed no conversion gets its own aligned copy.
    return tensor.clone() if tensor.data_ptr() == stored.data_ptr() else tensor


def _fill(kind: _EncoderKind, config, weights: _Weights, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build on the meta device, then read each tensor (found under `kind.file_names(model_key)`) to dtype and
    device."""
    with torch.device("meta"):
        model = kind.model_cls(config)
    needed, missing, known = _sources_for(weights, model, kind.file_names)
    _validate(weights, model, needed, missing, known, kind)
    # transformers keeps these (T5's `wo`) in float32 when loading in float16: their activations overflow it.
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    read: dict[str, torch.Tensor] = {}
    state = {}
    for key, file_key in needed.items():
        target = torch.float32 if keep_fp32 & set(key.split(".")) else dtype
        if (file_key, target) not in read:
            read[file_key, target] = _read(weights, file_key, target, device)
        state[key] = read[file_key, target]
    model.load_state_dict(state, strict=True, assign=True)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            # Non-persistent buffers are not in any file; CLIP's only one is its position index.
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{kind.model_cls.__name__} has a buffer {name} this loader cannot fill")
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            positions = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
            module.register_buffer(attr, positions, persistent=False)
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Do they fit the transformer?

# Other text encoders that share these layouts, by what tells them apart, for messages that name the file.
_T5_BY_WIDTH = {512: "T5-small", 768: "T5-base", 1024: "T5-large", 2048: "T5-XL", 4096: "T5-XXL"}
_T5_BY_VOCABULARY = {250112: "mT5 (multilingual T5)", 256384: "UMT5 (Wan's and other video models' text encoder)",
                     384: "ByT5"}
_CLIP_BY_WIDTH = {512: "the text tower of CLIP ViT-B", 768: "CLIP-L", 1024: "OpenCLIP ViT-H (SD 2.x's CLIP)",
                  1280: "CLIP-G (SDXL's / SD3's larger CLIP)"}


def _t5_layout(config: T5Config) -> dict[str, object]:
    return dict(vocabulary=config.vocab_size, width=config.d_model, layers=config.num_layers,
                heads=config.num_heads, head_width=config.d_kv, feed_forward=config.d_ff,
                activation=config.feed_forward_proj)


def _clip_layout(config: CLIPTextConfig) -> dict[str, object]:
    return dict(vocabulary=config.vocab_size, width=config.hidden_size, layers=config.num_hidden_layers,
                feed_forward=config.intermediate_size)


def _source_name(config, fallback: str) -> str:
    return Path(config.name_or_path).name if getattr(config, "name_or_path", "") else fallback


def _check_fits(config, name: str | None, kind: _EncoderKind, layout: dict[str, object],
                flux_layout: dict[str, object], wanted: int, *, wrong_width: str, not_flux: str) -> None:
    """Refuse an encoder whose width is not the `wanted` one; against a full-size FLUX transformer also one whose
    layout differs from FLUX's. `wrong_width` and `not_flux` say, for each refusal, what the encoder is instead."""
    name = name or _source_name(config, f"the {kind.short} text encoder")
    if layout["width"] != wanted:
        raise CheckpointError(f"{name}: {kind.short} with hidden size {layout['width']}, {wrong_width}. {kind.fix}")
    if wanted != flux_layout["width"]:
        return  # a test-sized transformer: only the width is known to matter
    differences = [f"{key} {value} ({kind.trained_with}: {flux_layout[key]})" for key, value in layout.items()
                   if value != flux_layout[key]]
    if differences:
        raise CheckpointError(f"{name}: a {kind.short} with {', '.join(differences)}: {not_flux}. {kind.fix}")


def check_t5_fits(config: T5Config, transformer_config, name: str | None = None) -> None:
    """Refuse a T5 the transformer cannot read: its width against `context_in_dim`; for a full-size FLUX
    transformer (4096-wide text features) also T5-XXL v1.1's vocabulary and layers. `name`: the file."""
    wanted = transformer_config.context_in_dim
    known = _T5_BY_VOCABULARY.get(config.vocab_size) or _T5_BY_WIDTH.get(config.d_model, f"a T5 {config.d_model} wide")
    _check_fits(config, name, _T5, _t5_layout(config), _t5_layout(t5_xxl_config()), wanted,
                wrong_width=f"that is {known}; this transformer reads {wanted}-wide text features (FLUX: T5-XXL, 4096)",
                not_flux=f"that is {known}, not the T5-XXL v1.1 FLUX was trained with")


def check_clip_fits(config: CLIPTextConfig, transformer_config, name: str | None = None) -> None:
    """Refuse a CLIP the transformer cannot read: its width against `vec_in_dim`; for a full-size FLUX
    transformer (a 768-wide pooled vector) also CLIP-L's vocabulary and layers (any context length: LongCLIP-L
    is CLIP-L with 248 positions). `name`: the file."""
    wanted = transformer_config.vec_in_dim
    known = _CLIP_BY_WIDTH.get(config.hidden_size, f"a CLIP {config.hidden_size} wide")
    _check_fits(config, name, _CLIP, _clip_layout(config), _clip_layout(clip_l_config()), wanted,
                wrong_width=f"that is {known}, not what this transformer reads: a {wanted}-wide pooled vector "
                            "(FLUX: CLIP-L, 768)",
                not_flux="not the CLIP-L FLUX was trained with")


def check_text_encoders_fit(encoders, transformer_config) -> None:
    """Both encoders of a TextEncoders (or a wrapper of one) against the transformer they condition; objects
    without transformers models (precomputed or stand-in encoders) pass."""
    t5, clip = getattr(encoders, "t5", None), getattr(encoders, "clip", None)
    if isinstance(getattr(t5, "config", None), T5Config):
        check_t5_fits(t5.config, transformer_config)
    if isinstance(getattr(clip, "config", None), CLIPTextConfig):
        check_clip_fits(clip.config, transformer_config)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _t5_file_names(key: str) -> tuple[str, ...]:
    # Some files store only `shared.weight`, others only `encoder.embed_tokens.weight`: they are one tensor.
    embedding = ("shared.weight", "encoder.embed_tokens.weight")
    return embedding if key in embedding else (key,)


def _clip_file_names(key: str) -> tuple[str, ...]:
    # transformers 4 nested the model under `text_model.`; files keep that name, and the prefix holds it.
    return (key.removeprefix("text_model."),)


_T5 = _EncoderKind(
    name="T5-XXL", short="T5", trained_with="T5-XXL v1.1", prefixes=_t5_prefixes, files=_T5_FILES,
    argument="t5_path", diffusers_folder="text_encoder_2", model_cls=T5EncoderModel, config_cls=T5Config,
    infer_config=_infer_t5_config, file_names=_t5_file_names, check_fits=check_t5_fits,
)
_CLIP = _EncoderKind(
    name="CLIP-L", short="CLIP", trained_with="CLIP-L", prefixes=_clip_prefixes, files=_CLIP_FILES,
    argument="clip_path", diffusers_folder="text_encoder", model_cls=CLIPTextModel, config_cls=CLIPTextConfig,
    infer_config=_infer_clip_config, file_names=_clip_file_names, check_fits=check_clip_fits,
)


def _load_encoder(path: str | os.PathLike, kind: _EncoderKind, other: _EncoderKind, config,
                  dtype: str | torch.dtype | None, device: str | torch.device, transformer_config,
                  refuse: Callable[[object, Path], None] | None = None) -> nn.Module:
    """The steps both encoders share: the dtype checked, the file read, the encoder found in it, its config
    (given, the folder's config.json, or read from the shapes) named after the file, `refuse(config, path)` for
    an encoder's own refusals, the fit with `transformer_config` checked, then the weights read."""
    path = Path(path)
    compute_dtype = _check_dtype(dtype)
    weights = _open_weights(path, kind.diffusers_folder)
    weights.prefix = _encoder_prefix(weights, path, kind, other)
    if config is not None:
        config = copy.deepcopy(config)  # about to be named after this file
    else:
        config = _folder_config(weights, kind.config_cls) or kind.infer_config(weights)
    config.name_or_path = weights.name  # what later messages call it
    if refuse is not None:
        refuse(config, path)
    if transformer_config is not None:
        kind.check_fits(config, transformer_config)
    return _fill(kind, config, weights, compute_dtype, torch.device(device))


def load_t5_encoder(path: str | os.PathLike, *, config: T5Config | None = None,
                    dtype: str | torch.dtype | None = "bf16", device: str | torch.device = "cpu",
                    transformer_config=None) -> T5EncoderModel:
    """T5-XXL from a ComfyUI file (fp16, fp8, scaled fp8, bundle) or a diffusers folder (`text_encoder_2/`).

    The config: `config` if given, else the folder's config.json, else read from the tensor shapes.
    `transformer_config`: the transformer it will condition, checked against before any weight is read.
    """
    model = _load_encoder(path, _T5, _CLIP, config, dtype, device, transformer_config)
    model.set_input_embeddings(model.shared)
    return model


def _refuse_clip_g(config: CLIPTextConfig, path: Path) -> None:
    if config.hidden_size == 1280:  # OpenCLIP ViT-bigG's text tower: never FLUX's, whatever the transformer
        raise CheckpointError(
            f"{path.name} is CLIP-G (SDXL's / SD3's larger CLIP, 1280 wide); FLUX pairs T5-XXL with CLIP-L "
            "(clip_l.safetensors, 768 wide). Choose the CLIP-L file."
        )


def load_clip_encoder(path: str | os.PathLike, *, config: CLIPTextConfig | None = None,
                      dtype: str | torch.dtype | None = "bf16", device: str | torch.device = "cpu",
                      transformer_config=None) -> CLIPTextModel:
    """CLIP-L's text model from a ComfyUI file (`clip_l.safetensors`, bundle) or a diffusers `text_encoder/`.

    `text_projection.weight` and `logit_scale`, which some files carry, are not part of it and are ignored.
    `transformer_config`: the transformer it will condition, checked against before any weight is read.
    """
    return _load_encoder(path, _CLIP, _T5, config, dtype, device, transformer_config, refuse=_refuse_clip_g)


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def _tokenizer_from_folder(folder: Path, family_cls, what: str):
    errors = []
    loaders = []
    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        loaders.append(AutoTokenizer)
    loaders.append(family_cls)
    for loader in loaders:
        try:
            return loader.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, TypeError... for unreadable folders
            errors.append(f"{loader.__name__}: {exc}".splitlines()[0])
    hint = ""
    if ((folder / "spiece.model").exists() and not (folder / "tokenizer.json").exists()
            and not _importable("google.protobuf")):
        hint = " Reading spiece.model needs the protobuf package: pip install protobuf (or add a tokenizer.json)."
    raise CheckpointError(f"the {what} tokenizer in {folder} could not be read ({'; '.join(errors)}).{hint}")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _has_tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in _TOKENIZER_FILES)


def _tokenizer_folders_near(weights_path: Path, component: str) -> list[Path]:
    """Where a diffusers or transformers download keeps the tokenizer of the weights at `weights_path`."""
    if weights_path.is_dir():
        # a diffusers root; its text_encoder(_2)/ folder; a transformers download holding both
        return [weights_path / component, weights_path.parent / component, weights_path]
    # a file inside text_encoder(_2)/ of a diffusers folder
    return [weights_path.parent.parent / component]


def _from_hub(repo: str, allow_download: bool):
    """The tokenizer of Hugging Face repo `repo`: from the cache, or from the hub when downloads are allowed."""
    return AutoTokenizer.from_pretrained(repo, local_files_only=not allow_download)


def _load_tokenizer(source, weights_path, *, component: str, repo: str, bundled: Path, argument: str,
                    family_cls, what: str, allow_download: bool):
    """`source` (a tokenizer, a folder, or a hub repo id), else the tokenizer beside the weights, else the
    Hugging Face cache's copy of `repo`, else the copy in `bundled`: the same files, shipped with this package
    so that a first run works offline."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source  # already a tokenizer
    if source is not None:
        folder = Path(source)
        if folder.is_file():
            folder = folder.parent
        if _has_tokenizer_files(folder):
            return _tokenizer_from_folder(folder, family_cls, what)
        if folder.exists():
            raise CheckpointError(
                f"no {what} tokenizer in {folder}: expected tokenizer.json, spiece.model (T5) or vocab.json + "
                f"merges.txt (CLIP). Pass the tokenizer folder of a diffusers FLUX.1 Kontext download "
                f"({component}/), a Hugging Face repo id (e.g. {repo}), or leave `{argument}` unset for the "
                "tokenizer that comes with kontext_core."
            )
        try:
            return _from_hub(str(source), allow_download)
        except Exception as exc:  # offline, not cached, gated, or no such repo
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            where = "on the Hugging Face hub" if allow_download else "in the Hugging Face cache"
            fix = "Check the repo id" if allow_download else "Allow downloads (`allow_download=True`) to fetch it"
            raise CheckpointError(
                f"the {what} tokenizer {source} is neither a folder nor a repo found {where} ({reason}). {fix}, "
                f"or leave `{argument}` unset for the tokenizer that comes with kontext_core."
            ) from exc
    if weights_path is not None:
        for folder in _tokenizer_folders_near(Path(weights_path), component):
            if _has_tokenizer_files(folder):
                return _tokenizer_from_folder(folder, family_cls, what)
    try:
        return _from_hub(repo, allow_download=False)
    except Exception:  # not cached (or a cached copy that cannot be read): the bundled copy is the same tokenizer
        return _tokenizer_from_folder(bundled, family_cls, what)


def load_t5_tokenizer(source: str | os.PathLike | None = None, *, weights_path: str | os.PathLike | None = None,
                      allow_download: bool = False):
    """The T5 tokenizer from `source` (a folder, or a hub repo id: from the cache, or the hub when downloads
    are allowed), else from `tokenizer_2/` beside the diffusers weights at `weights_path`, else
    google/t5-v1_1-xxl's from the Hugging Face cache, else the copy of it in kontext_core/text/tokenizers/t5/."""
    return _load_tokenizer(source, weights_path, component="tokenizer_2", repo=T5_TOKENIZER_REPO,
                           bundled=BUNDLED_TOKENIZERS / "t5", argument="t5_tokenizer", family_cls=T5Tokenizer,
                           what="T5", allow_download=allow_download)


def load_clip_tokenizer(source: str | os.PathLike | None = None, *, weights_path: str | os.PathLike | None = None,
                        allow_download: bool = False):
    """The CLIP tokenizer, found like `load_t5_tokenizer` (`tokenizer/`, openai/clip-vit-large-patch14,
    kontext_core/text/tokenizers/clip_l/)."""
    return _load_tokenizer(source, weights_path, component="tokenizer", repo=CLIP_TOKENIZER_REPO,
                           bundled=BUNDLED_TOKENIZERS / "clip_l", argument="clip_tokenizer",
                           family_cls=CLIPTokenizer, what="CLIP", allow_download=allow_download)


# ---------------------------------------------------------------------------------------------------------
# The pair


def _check_tokenizer(tokenizer, vocab_size: int, what: str, expected: str, argument: str) -> None:
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the {what} tokenizer has {len(tokenizer)} tokens but the {what} model only {vocab_size}; they belong to "
            f"different models. Pair {expected} with FLUX's {what} weights, or pass the tokenizer made for this "
            f"model (`{argument}`)."
        )
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"the {what} tokenizer has no padding token; use {expected} (`{argument}`).")


class TextEncoders:
    """T5-XXL and CLIP-L with their tokenizers: prompts in, FLUX text conditioning out.

    Encoded prompts are kept in an LRU cache (`cache_size` prompts, 0 to disable) on the compute device,
    so an edit session that repeats its prompt never runs the encoders twice.
    """

    def __init__(self, t5: T5EncoderModel, clip: CLIPTextModel, t5_tokenizer, clip_tokenizer, *,
                 t5_max_length: int = T5_MAX_LENGTH, cache_size: int = 16,
                 device: str | torch.device | None = None):
        if t5_max_length < 1 or cache_size < 0:
            raise ValueError(f"t5_max_length must be >= 1 and cache_size >= 0 (got {t5_max_length}, {cache_size})")
        _check_tokenizer(t5_tokenizer, t5.config.vocab_size, "T5", f"the T5 v1.1 tokenizer ({T5_TOKENIZER_REPO})",
                         "t5_tokenizer")
        _check_tokenizer(clip_tokenizer, clip.config.vocab_size, "CLIP",
                         f"the CLIP-L tokenizer ({CLIP_TOKENIZER_REPO})", "clip_tokenizer")
        self.t5, self.clip = t5, clip
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.t5_max_length = t5_max_length
        self.clip_max_length = clip.config.max_position_embeddings
        self.device = torch.device(device) if device is not None else t5.device
        self.cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids as FLUX feeds them: T5 [B, t5_max_length], CLIP [B, 77], padded and truncated."""
        def ids(tokenizer, length):
            return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                             return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
        return ids(self.t5_tokenizer, self.t5_max_length), ids(self.clip_tokenizer, self.clip_max_length)

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t5_ids, clip_ids = self.tokenize(prompts)
        self.to(self.device)
        # No attention mask, as in BFL's and diffusers' FLUX: the model was trained seeing the padding.
        t5_embeddings = self.t5(input_ids=t5_ids.to(self.device)).last_hidden_state  # [B, L, d_model]
        clip_pooled = self.clip(input_ids=clip_ids.to(self.device)).pooler_output  # [B, hidden]
        return t5_embeddings, clip_pooled

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(t5_embeddings [B, t5_max_length, 4096], clip_pooled [B, 768]) on `device`, from the cache when known."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("encode needs a non-empty list of prompt strings")
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        misses = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        self.cache_hits += sum(p in self._cache for p in prompts)
        self.cache_misses += len(misses)
        if misses:
            t5_embeddings, clip_pooled = self._run(misses)
            for index, prompt in enumerate(misses):
                # Copies, so that an entry does not keep its whole batch alive.
                fresh[prompt] = (t5_embeddings[index].clone(), clip_pooled[index].clone())
        entries = []
        for prompt in prompts:
            entry = fresh.get(prompt) or self._cache[prompt]
            entries.append(entry)
            self._remember(prompt, entry)
        return torch.stack([e[0] for e in entries]), torch.stack([e[1] for e in entries])

    def _remember(self, prompt: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.cache_size == 0:
            return
        self._cache[prompt] = entry
        self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()

    def to(self, device: str | torch.device) -> "TextEncoders":
        """Move both models (not the cache); `encode` brings them back to `device` when it needs them."""
        device = torch.device(device)
        if self.t5.device != device:
            self.t5.to(device)
        if self.clip.device != device:
            self.clip.to(device)
        return self

    def offload(self, device: str | torch.device = "cpu") -> "TextEncoders":
        """Free the accelerator for the transformer: the models go to `device` until the next `encode` miss."""
        self.to(device)
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self


def load_text_encoders(t5_path: str | os.PathLike, clip_path: str | os.PathLike | None = None, *,
                       t5_tokenizer=None, clip_tokenizer=None, dtype: str | torch.dtype | None = "bf16",
                       device: str | torch.device = "cpu", allow_download: bool = False,
                       t5_max_length: int = T5_MAX_LENGTH, cache_size: int = 16,
                       transformer_config=None) -> TextEncoders:
    """Both encoders and their tokenizers, ready to `encode`.

    `t5_path` / `clip_path`: ComfyUI files (`t5xxl_fp16.safetensors`, `clip_l.safetensors`, fp8 variants,
    a bundled checkpoint) or a diffusers folder; `clip_path` defaults to `t5_path` (a diffusers root or a
    bundle holds both). Tokenizers: a folder, hub repo id or tokenizer object, else the diffusers `tokenizer_2/`
    and `tokenizer/` beside the weights, else the Hugging Face cache, else the copies bundled in
    kontext_core/text/tokenizers/ (so no download is ever needed); `allow_download` lets a repo id given as a
    tokenizer come from the hub. `transformer_config`: the transformer they will condition; each encoder is
    checked against it (width, and for FLUX's real sizes vocabulary and layers) before its weights are read.
    """
    clip_path = t5_path if clip_path is None else clip_path
    t5 = load_t5_encoder(t5_path, dtype=dtype, device=device, transformer_config=transformer_config)
    clip = load_clip_encoder(clip_path, dtype=dtype, device=device, transformer_config=transformer_config)
    t5_tokenizer = load_t5_tokenizer(t5_tokenizer, weights_path=t5_path, allow_download=allow_download)
    clip_tokenizer = load_clip_tokenizer(clip_tokenizer, weights_path=clip_path, allow_download=allow_download)
    return TextEncoders(t5, clip, t5_tokenizer, clip_tokenizer, t5_max_length=t5_max_length,
                        cache_size=cache_size, device=device)
