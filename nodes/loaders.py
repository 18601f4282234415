"""Loader nodes: the Kontext transformer, the FLUX VAE, T5-XXL + CLIP-L, LoRAs.

Each loads (or finds in the cache) right away, so a bad file is reported on the loader node, and
outputs a reference that the sampling nodes resolve through the cache.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from kontext_core import set_attention_backend
from kontext_core.presets import PRESETS, apply_preset_options, attention_refresh_for

from . import comfy_adapter, model_cache, resolve
from .model_cache import (AE_DTYPES, ATTENTION_BACKENDS, WEIGHT_DTYPES, AutoencoderRef, LoraRef, TextEncodersRef,
                          TransformerRef)
from .schema import (MODEL, TEXT_ENCODERS, VAE, Combo, Float, Int, KontextNode, NodeResult, Output, Socket,
                     node_spec)


PRESET_REFRESH = -1  # attention_refresh's "as the preset says"


def _files(folder: str):
    return lambda: comfy_adapter.filenames(folder)


class KontextModelLoader(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextModelLoader", "Load Kontext Model",
            "Loads FLUX.1 Kontext [dev] (any of its files: BFL, ComfyUI fp8 / scaled fp8, full checkpoints) from "
            "models/diffusion_models. It stays loaded between runs.",
            [
                Combo("model_name", _files("diffusion_models"),
                      tooltip="flux1-kontext-dev.safetensors or an fp8 version of it, in models/diffusion_models."),
                Combo("weight_dtype", WEIGHT_DTYPES, "default",
                      tooltip="default: fp8 for fp8 files, else bf16 on a GPU (fp32 on the CPU). fp8 halves memory. "
                              "int8 (best from the bf16 file): int8 matrix products on RTX 30/40, A100 and "
                              "H100/H200, ~3x less rounding error than fp8, ~15 GB."),
                Combo("attention", ATTENTION_BACKENDS, "auto",
                      tooltip="auto picks the fastest exact backend; flash-attn needs the flash-attn package. "
                              "cudnn-fp8 (Hopper GPUs, pip install nvidia-cudnn-frontend): ~1.4x faster "
                              "attention, with fp8's rounding error. sage8 (RTX 30/40, A100, H100/H200; "
                              "Triton): our 8-bit attention kernel, q.k in int8, P.V in fp8 (fp16 on "
                              "RTX 30 / A100), less rounding error than cudnn-fp8; sage8-fp16: P.V in fp16 "
                              "everywhere, ~1% error per call."),
                Combo("compile", COMPILE_MODES, "off",
                      tooltip="on: torch.compile each transformer block (needs a CUDA GPU and Triton). The first "
                              "run takes about a minute longer, then steps are ~4% (bf16) to 5-20% (fp8) faster; "
                              "LoRAs still apply.",
                      optional=True),  # optional: API prompts written before this input still validate
                Combo("preset", PRESET_CHOICES, "custom",
                      tooltip="custom: the three inputs above as set. fast: int8 weights, 8-bit attention, "
                              "compiled blocks, CUDA graphs and modulation computed ahead of the steps, for inputs "
                              "above left at default / auto / off "
                              "(a few percent of velocity error vs bf16; judge it on your images). Parts this "
                              "GPU cannot run fall back to the exact path, said in the console.",
                      optional=True),
                Int("attention_refresh", PRESET_REFRESH, PRESET_REFRESH, 1000,
                    tooltip="sage8 attention only: record its statistics (K's mean, V's range) every this-many "
                            "steps and reuse them between: a few percent faster steps, but approximate. 0: every "
                            "step (the exact sage8 path). -1: the preset's (fast: 7; custom: 0). Compare 0 and 7 "
                            "on your images.",
                    optional=True),
            ],
            [Output(MODEL, "model")],
        )

    @classmethod
    def run(cls, model_name: str, weight_dtype: str = "default", attention: str = "auto",
            compile: str | None = None, preset: str | None = None,
            attention_refresh: int | None = None) -> NodeResult:
        path = comfy_adapter.full_path("diffusion_models", model_name)
        device = comfy_adapter.compute_device()
        cuda_graphs = batched_modulation = False
        asked_refresh = None if attention_refresh in (None, PRESET_REFRESH) else attention_refresh
        if preset not in (None, "custom"):
            chosen, notes = apply_preset_options(
                preset, device, dtype=None if weight_dtype == "default" else weight_dtype, attention=attention,
                compile=compile == "on", cuda_graphs=False, attention_refresh=asked_refresh)
            for note in notes:
                comfy_adapter.log.warning("comfyui-kontext: preset %s: %s", preset, note)
            weight_dtype = chosen["dtype"] or "default"
            attention, cuda_graphs = chosen["attention"], chosen["cuda_graphs"]
            batched_modulation = chosen["batched_modulation"]
            attention_statistics_refresh = chosen["attention_statistics_refresh"]
            compile = "on" if chosen["compile"] else "off"
        else:
            attention_statistics_refresh, note = attention_refresh_for(attention, asked_refresh)
            if note is not None:
                comfy_adapter.log.warning("comfyui-kontext: %s", note)
        set_attention_backend(attention)  # refuses flash-attn when it is not installed, here rather than later
        if compile == "on":
            _check_compile(device)
        dtype = model_cache.resolve_weight_dtype(weight_dtype, path, device)
        ref = TransformerRef(path, dtype, str(device), attention, compile=compile == "on", cuda_graphs=cuda_graphs,
                             batched_modulation=batched_modulation,
                             attention_statistics_refresh=attention_statistics_refresh)
        resolve.transformer(ref)
        return NodeResult((ref,))


COMPILE_MODES = ("off", "on")
PRESET_CHOICES = ("custom", *(name for name in PRESETS if name != "exact"))


def _check_compile(device) -> None:
    """Refuse compile=on here, on the loader, where it cannot work (rather than failing at the first step)."""
    if torch.device(device).type != "cuda":
        raise RuntimeError(f"compile needs a CUDA GPU and ComfyUI runs this model on {device}; set compile to off")
    if importlib.util.find_spec("triton") is None:  # torch.compile's GPU code generator
        raise RuntimeError("compile needs Triton (pip install triton; on Windows triton-windows); set compile to off")


class KontextVAELoader(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextVAELoader", "Load Kontext VAE",
            "Loads the FLUX VAE (ae.safetensors) from models/vae for the Kontext nodes. ComfyUI's own Load VAE "
            "works with them too.",
            [
                Combo("vae_name", _files("vae"), tooltip="ae.safetensors (the FLUX VAE), in models/vae."),
                Combo("dtype", AE_DTYPES, "default", tooltip="default: bf16 on a GPU, fp32 on the CPU."),
            ],
            [Output(VAE, "vae")],
        )

    @classmethod
    def run(cls, vae_name: str, dtype: str = "default") -> NodeResult:
        path = comfy_adapter.full_path("vae", vae_name)
        device = comfy_adapter.compute_device()
        ref = AutoencoderRef(path, model_cache.resolve_ae_dtype(dtype, device), str(device))
        resolve.autoencoder(ref)
        return NodeResult((ref,))


class KontextTextEncodersLoader(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextTextEncodersLoader", "Load Kontext Text Encoders",
            "Loads T5-XXL and CLIP-L from models/text_encoders for Kontext Prompt and the session nodes. Prompts "
            "already encoded are remembered.",
            [
                Combo("t5_name", _files("text_encoders"),
                      tooltip="t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn(_scaled).safetensors."),
                Combo("clip_name", _files("text_encoders"), tooltip="clip_l.safetensors."),
                Combo("dtype", AE_DTYPES, "default", tooltip="default: bf16 on a GPU, fp32 on the CPU."),
            ],
            [Output(TEXT_ENCODERS, "text_encoders")],
        )

    @classmethod
    def run(cls, t5_name: str, clip_name: str, dtype: str = "default") -> NodeResult:
        t5 = comfy_adapter.full_path("text_encoders", t5_name)
        clip = comfy_adapter.full_path("text_encoders", clip_name)
        if Path(t5).resolve() == Path(clip).resolve():
            raise ValueError("t5_name and clip_name are the same file; pick the T5-XXL file and the CLIP-L file.")
        device = comfy_adapter.compute_device()
        t5_tokenizer, clip_tokenizer = comfy_adapter.tokenizer_folders()
        ref = TextEncodersRef(t5, clip, model_cache.resolve_ae_dtype(dtype, device), str(device),
                              str(t5_tokenizer) if t5_tokenizer else None,
                              str(clip_tokenizer) if clip_tokenizer else None)
        model_cache.text_encoders(ref)
        return NodeResult((ref,))


class KontextLoRA(KontextNode):
    @classmethod
    def spec(cls):
        return node_spec(
            "KontextLoRA", "Kontext LoRA",
            "Adds a FLUX LoRA (BFL/ComfyUI, kohya, diffusers/peft/ai-toolkit, fal, XLabs) to a Kontext model. "
            "Merged into bf16/fp16 weights when a run first uses it and kept until a run asks for other LoRAs, so "
            "steps run at full speed (compiled blocks stay compiled). On fp8 or int8 weights it is added on the fly "
            "instead (8 bits "
            "would round a LoRA's small changes away): on fp8 as extra columns of each layer's own fp8 matrix "
            "product, ~7% a step, elsewhere as two thin products per layer, ~15%; with compile "
            "on, the first run with such a LoRA (or one of a much larger rank) compiles the blocks again. Chain "
            "several to stack them.",
            [
                Socket("model", MODEL),
                Combo("lora_name", _files("loras"), tooltip="A FLUX / Kontext LoRA in models/loras."),
                Float("strength", 1.0, -10.0, 10.0, tooltip="1 applies the LoRA as trained; negative subtracts it."),
            ],
            [Output(MODEL, "model")],
        )

    @classmethod
    def run(cls, model: TransformerRef, lora_name: str, strength: float = 1.0) -> NodeResult:
        if not isinstance(model, TransformerRef):
            resolve.transformer(model)  # raises the explanatory TypeError
        if not math.isfinite(float(strength)):
            raise ValueError(f"LoRA strength must be a finite number, got {strength}")
        ref = LoraRef(comfy_adapter.full_path("loras", lora_name), float(strength))
        model_cache.lora(ref)  # a bad file is reported on this node (one made for another model: on the first run)
        return NodeResult((model.with_lora(ref),))
