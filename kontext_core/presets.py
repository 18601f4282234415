"""Runtime presets: one name for a combination of weight dtype, attention backend, compiled blocks and CUDA
graphs, so that the node, the CLI and scripts ask for "fast" instead of four settings.

`exact` is what runs when nothing is asked for: bf16 weights (or what the memory plan picks), exact
attention, eager blocks. `fast` takes every opt-in speed path at once: int8 block GEMMs (~3% velocity error
vs bf16 on random weights, bench/RESULTS.md), 8-bit attention (int8 Q.K, fp8 P.V), regional compilation,
CUDA-graph replay, a run's modulation vectors computed before its first step, sage8's K mean and V amax
recorded every 7 steps and reused between (sample_euler's `attention_statistics_refresh`), and (in
`load_pipeline`) a compiled AE whose attention runs through SDPA's fused kernels. A part that cannot run on the
device at hand falls back to `exact`'s choice, and `resolve_preset` says which and why, so a preset never fails
where the exact path would run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class RuntimePreset:
    name: str
    dtype: str | None  # None: the memory plan chooses (bf16 when it fits)
    attention: str
    compile: bool
    cuda_graphs: bool
    # Every step's modulation vectors computed before sampling (KontextTransformer.modulation_table): equal to
    # the per-step ones up to the GEMMs' rounding, so not in `exact`.
    batched_modulation: bool = False
    # The AE's encoder and decoder compiled (Autoencoder.compile_parts): bf16 values rounded in another order.
    compile_autoencoder: bool = False
    # The AE's attention through SDPA's fused kernels (Autoencoder.use_fused_attention): bf16 tensor cores instead
    # of float32 matmuls, ~10 ms off each of a 1024² edit's encode and decode on an H200 (bench/pipeline/ae_probe.py
    # --attention); bf16 values rounded in another order.
    fused_autoencoder_attention: bool = False
    # sage8's K mean and V amax recorded every this-many steps and reused between (sample_euler); 0: off.
    attention_statistics_refresh: int = 0


PRESETS = {
    "exact": RuntimePreset("exact", None, "auto", False, False),
    # The frozen attention statistics: 6 ms a step faster, velocity error vs bf16 unchanged on random weights
    # (bench/RESULTS.md, 2026-12-06); 7 steps is four recordings in a 28-step edit.
    "fast": RuntimePreset("fast", "int8", "sage8", True, True, batched_modulation=True, compile_autoencoder=True,
                          fused_autoencoder_attention=True, attention_statistics_refresh=7),
}


def _int8_gemm_reason(device: torch.device) -> str | None:
    from .compute import quant

    if device.type != "cuda":
        return "int8 GEMMs need a CUDA GPU"
    if not quant.int8_weight_ok(torch.empty(0, dtype=torch.int8, device=device), torch.bfloat16):
        return "int8 GEMMs need Triton and an Ampere or newer GPU"
    return None


def _attention_reason(backend: str, device: torch.device) -> str | None:
    from .compute.attention import ATTENTION_BACKENDS, backend_unavailable_reason

    if device.type != "cuda":
        return "it needs a CUDA GPU"
    if backend not in ATTENTION_BACKENDS:
        return "this version has no such backend"
    return backend_unavailable_reason(backend, device)


def _triton_available() -> bool:
    try:
        from kontext_kernels.runtime import triton_available
    except ImportError:
        return False
    return triton_available()


def resolve_preset(name: str, device: str | torch.device) -> tuple[RuntimePreset, list[str]]:
    """The preset `name` as it can run on `device`, and a line for each part that fell back (and why)."""
    preset, notes = _resolve(name, device)
    return preset, list(notes.values())


def _resolve(name: str, device: str | torch.device) -> tuple[RuntimePreset, dict[str, str]]:
    """`resolve_preset` with each fallback line keyed by the part it is about (dtype, attention, compile,
    cuda_graphs)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    device = torch.device(device)
    preset, exact, notes = PRESETS[name], PRESETS["exact"], {}
    if preset.dtype == "int8" and (reason := _int8_gemm_reason(device)):
        preset = replace(preset, dtype=exact.dtype)
        notes["dtype"] = f"int8 weights: {reason}; the default weights instead"
    if preset.attention != exact.attention and (reason := _attention_reason(preset.attention, device)):
        preset = replace(preset, attention=exact.attention)
        notes["attention"] = f"{PRESETS[name].attention} attention: {reason}; exact attention instead"
    if (preset.compile or preset.compile_autoencoder) and (device.type != "cuda" or not _triton_available()):
        preset = replace(preset, compile=False, compile_autoencoder=False)
        notes["compile"] = "compiled blocks and AE: need a CUDA GPU and Triton; eager ones instead"
    if preset.cuda_graphs and device.type != "cuda":
        preset = replace(preset, cuda_graphs=False)
        notes["cuda_graphs"] = "CUDA graphs: need a CUDA GPU; plain steps instead"
    if preset.batched_modulation and device.type != "cuda":
        # Off the GPU it saves nothing worth its last-bit differences: fast stays exact there, and says nothing.
        preset = replace(preset, batched_modulation=False)
    if preset.fused_autoencoder_attention and device.type != "cuda":
        # As batched_modulation: off the GPU, fast keeps the exact path's AE bits, and says nothing.
        preset = replace(preset, fused_autoencoder_attention=False)
    return preset, notes


def attention_refresh_for(attention: str, asked: int | None, preset_refresh: int = 0) -> tuple[int, str | None]:
    """The period at which sage8's K mean and V amax are recorded (0: every step, the exact sage8 path) for a run
    whose attention backend is `attention`: `asked` where the caller gave one (None: the preset's), and a line
    saying why an asked period is dropped (only sage8 keeps statistics)."""
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 0):
        raise ValueError(f"attention refresh {asked!r}: give 0 (statistics of every step) or a number of steps "
                         "between recordings, e.g. 7")
    period = preset_refresh if asked is None else asked
    if attention == "sage8":
        return period, None
    note = (f"attention refresh {asked}: only sage8 attention has statistics to reuse, not {attention}; off"
            if asked else None)
    return 0, note


def apply_preset_options(name: str, device: str | torch.device, *, dtype: str | None, attention: str,
                         compile: bool, cuda_graphs: bool, attention_refresh: int | None = None,
                         ) -> tuple[dict, list[str]]:
    """Settings asked for one by one, completed by preset `name` where they were left at their defaults
    (dtype None, attention "auto", compile and cuda_graphs off, attention_refresh None): an explicit setting wins
    over the preset, and a fallback of a part the caller set is not reported (the preset's part was never
    used)."""
    preset, notes = _resolve(name, device)
    chosen_by_caller = {"dtype": dtype is not None, "attention": attention != "auto", "compile": compile,
                        "cuda_graphs": cuda_graphs}
    attention = attention if attention != "auto" else preset.attention
    # Only sage8 has statistics to keep (whoever chose it, or wherever it fell back).
    refresh, refresh_note = attention_refresh_for(attention, attention_refresh, preset.attention_statistics_refresh)
    said = [note for part, note in notes.items() if not chosen_by_caller[part]]
    if refresh_note is not None:
        said.append(refresh_note)
    return (dict(dtype=dtype if dtype is not None else preset.dtype, attention=attention,
                 compile=compile or preset.compile, cuda_graphs=cuda_graphs or preset.cuda_graphs,
                 batched_modulation=preset.batched_modulation, compile_autoencoder=preset.compile_autoencoder,
                 fused_autoencoder_attention=preset.fused_autoencoder_attention,
                 attention_statistics_refresh=refresh), said)
