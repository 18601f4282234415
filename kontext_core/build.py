"""Assemble a ready pipeline from located model files, placed by a memory plan."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from .compute.attention import get_attention_backend, set_attention_backend
from .checkpoints import inspect_model, load_autoencoder, load_transformer
from .model.config import TransformerConfig
from .adapters.lora import LoraWeights, apply_lora, load_lora
from .placement.memory import (EDIT_TOKENS, TEXT_ENCODER_ACTIVATION_BYTES, TEXT_ENCODER_BYTES, MemoryPlan,
                     OffloadedTextEncoders, choose_plan, free_device_memory)
from .checkpoints.model_files import ModelFiles
from .placement.offload import BlockOffloader
from .pipeline import KontextPipeline
from .presets import apply_preset_options, attention_refresh_for
from .text.text_encoders import load_text_encoders


def plan_memory(files: ModelFiles, device: str | torch.device, memory: str = "auto", dtype: str | None = None,
                tokens: int = EDIT_TOKENS, loras: Sequence[LoraWeights] = ()) -> MemoryPlan:
    """The memory plan for these files on `device` now: chosen from its free memory, or the one named.

    dtype None lets the plan choose the transformer's storage (fp8 for an fp8 file); a dtype restricts it.
    loras: the LoRAs to be applied, counted where they will hold device memory (on fp8 weights).
    """
    device = torch.device(device)
    report = inspect_model(files.transformer)
    config = TransformerConfig.from_dict(report["config"]) if "config" in report else TransformerConfig()
    if dtype is None and any(kind.startswith("F8") for kind in report.get("storage_dtypes", {})):
        dtype = "fp8"  # its weights are float8 already: bf16 storage would double the memory, not the quality
    storage = {"fp8_e4m3fn": "fp8", "fp8_e5m2": "fp8"}.get(dtype, dtype)
    text_bytes = TEXT_ENCODER_BYTES if files.t5 is not None else 0
    return choose_plan(free_device_memory(device), config, tokens, name=memory, storage=storage,
                       device=str(device), text_encoder_bytes=text_bytes, loras=loras)


def load_pipeline(files: ModelFiles, *, dtype: str | None = None, device: str | torch.device = "cpu",
                  text_dtype: str | None = None, ae_dtype: str | None = None, allow_download: bool = False,
                  memory: str | MemoryPlan = "auto", ae_tiling: str = "auto", cuda_graphs: bool = False,
                  compile: bool = False, loras: Sequence[tuple[LoraWeights | str | os.PathLike, float]] = (),
                  log: Callable[[str], None] | None = print, preset: str | None = None,
                  attention_refresh: int | None = None, process_group=None) -> KontextPipeline:
    """Transformer, autoencoder and (when their files are known) the text encoders, placed on `device`.

    memory: "auto" chooses a plan from the device's free memory (see kontext_core.placement.memory), a plan name
        (resident-bf16, resident-fp8, offload-bf16, offload-fp8) forces one, or a MemoryPlan.
    dtype: the transformer's storage (bf16, fp16, fp32, fp8, int8); None lets the plan choose (bf16 when it fits,
        else fp8).
    ae_tiling: "auto" (tiles only when a full-size AE pass would not fit), "always" or "never".
    compile: compile the transformer's blocks (`KontextTransformer.compile_blocks`); a preset may also.
    cuda_graphs: replay each sampling step from a CUDA graph (CUDA only; a run whose model carries hooks,
        such as offloaded blocks, runs plainly and says why: KontextPipeline).
    loras: (LoRA or its file, strength) pairs applied to the transformer as `apply_lora`'s "auto" mode does
        (merged, on the fly into fp8 weights); read before the model so a bad file fails first, and counted
        by the memory plan.
    log: receives the one-line plan description and what a preset could not use here (None: silent).
    preset: "exact" or "fast" (kontext_core.presets): fills in dtype where it is None, sets the attention
        backend for the process, compiles the blocks, turns on CUDA graphs and (fast) computes the modulation
        vectors of a run's steps ahead of it (KontextPipeline.batched_modulation) and compiles the AE
        (Autoencoder.compile_parts) with its attention on SDPA's fused kernels (use_fused_attention); parts the
        device cannot run
        fall back to the exact path, each said through `log`.
    attention_refresh: with sage8 attention, record its K mean and V amax every this-many steps and reuse them
        between (sample_euler's `attention_statistics_refresh`; approximate); 0: every step (exact sage8). None:
        the preset's (fast: 7), else 0.
    process_group: split each transformer step over this torch.distributed group's processes (one per GPU;
        KontextPipeline).

    The AE runs in bf16 on CUDA and float32 on the CPU unless told otherwise; the text encoders use the
    transformer's dtype (bf16 for fp8 and int8). The pipeline carries the plan as `memory_plan` and, when blocks
    are offloaded, the BlockOffloader as `offloader`.
    """
    device = torch.device(device)
    compile_blocks, batched_modulation, compile_autoencoder, fused_autoencoder_attention = compile, False, False, False
    if preset is not None:
        chosen, notes = apply_preset_options(preset, device, dtype=dtype, attention=get_attention_backend(),
                                             compile=compile, cuda_graphs=cuda_graphs,
                                             attention_refresh=attention_refresh)
        dtype, cuda_graphs, compile_blocks = chosen["dtype"], chosen["cuda_graphs"], chosen["compile"]
        batched_modulation, compile_autoencoder = chosen["batched_modulation"], chosen["compile_autoencoder"]
        fused_autoencoder_attention = chosen["fused_autoencoder_attention"]
        attention_statistics_refresh = chosen["attention_statistics_refresh"]
        set_attention_backend(chosen["attention"])
        for note in notes if log is not None else ():
            log(f"preset {preset}: {note}")
    else:
        attention_statistics_refresh, note = attention_refresh_for(get_attention_backend(), attention_refresh)
        if note is not None and log is not None:
            log(note)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}; drop cuda_graphs (CLI: --cuda-graphs)")
    loras = [(lora if isinstance(lora, LoraWeights) else load_lora(lora), strength) for lora, strength in loras]
    plan = memory if isinstance(memory, MemoryPlan) else plan_memory(files, device, memory, dtype,
                                                                     loras=[lora for lora, _ in loras])
    if log is not None:
        log(plan.describe())
    storage = plan.storage
    weights = dtype if storage == "fp8" and dtype in ("fp8_e4m3fn", "fp8_e5m2") else storage
    offloader = None
    if plan.offload:
        transformer = load_transformer(files.transformer, dtype=weights, device="cpu")
        offloader = BlockOffloader(transformer, device, prefetch=plan.prefetch, resident=plan.resident_blocks)
    else:
        transformer = load_transformer(files.transformer, dtype=weights, device=device)
    ae_dtype = ae_dtype or ("bf16" if device.type == "cuda" else "fp32")
    autoencoder = load_autoencoder(files.autoencoder, dtype=ae_dtype, device=device)
    encoders = None
    if files.t5 is not None:
        resting = device if plan.text_encoders == "device" else torch.device("cpu")
        encoders = load_text_encoders(files.t5, files.clip, t5_tokenizer=files.t5_tokenizer,
                                      clip_tokenizer=files.clip_tokenizer,
                                      dtype=text_dtype or ("bf16" if storage in ("fp8", "int8") else storage),
                                      device=resting, allow_download=allow_download,
                                      transformer_config=transformer.config)
        if plan.text_encoders == "offload":
            encoders = OffloadedTextEncoders(encoders, device, TEXT_ENCODER_BYTES + TEXT_ENCODER_ACTIVATION_BYTES)
    for lora, strength in loras:
        apply_lora(transformer, lora, strength=strength, mode="auto")
    if compile_blocks:
        transformer.compile_blocks()
    if fused_autoencoder_attention:
        autoencoder.use_fused_attention()
    if compile_autoencoder:
        autoencoder.compile_parts()
    pipeline = KontextPipeline(transformer, autoencoder, encoders, cuda_graphs=cuda_graphs,
                               process_group=process_group)
    pipeline.ae_tiling = ae_tiling
    pipeline.batched_modulation = batched_modulation
    pipeline.attention_statistics_refresh = attention_statistics_refresh
    pipeline.memory_plan = plan
    pipeline.offloader = offloader
    return pipeline
