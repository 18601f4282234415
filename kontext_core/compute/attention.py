"""The one attention entry point of the transformer; backends sit behind it."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fp8_attention as _fp8
from . import fused, ops

try:  # kontext_kernels/ may be missing or broken (then sage_attention is unavailable and says why)
    from kontext_kernels import runtime as _kernel_runtime
    from kontext_kernels import sage_attention as _sage
    from kontext_kernels import sage_qkv as _sage_qkv
    _SAGE_IMPORT_ERROR = None
except Exception as error:  # pragma: no cover
    _kernel_runtime = _sage = _sage_qkv = None
    _SAGE_IMPORT_ERROR = f"{type(error).__name__}: {error}"

ATTENTION_BACKENDS = ("auto", "sdpa", "math", "flash-attn", "cudnn-fp8", "sage8", "sage8-fp16")
SAGE_BACKENDS = ("sage8", "sage8-fp16")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Choose how attention runs: 'auto' (fastest available: FlashAttention 3 or 4 on Hopper and newer where
    installed, else SDPA with cuDNN first), 'sdpa', 'math', 'flash-attn' (any installed version), or
    'cudnn-fp8' (opt-in: cuDNN's fp8 flash attention on Hopper, ~1.4x faster in the model, ~6% error per call), or
    'sage8' (opt-in: our Triton kernel, q·k in int8 and P·V in fp8 on Ada / Hopper, fp16 on Ampere; ~3.7% error
    per call with fp8, ~1% with fp16: kontext_kernels/sage_attention.py), or 'sage8-fp16' (the same with P·V in fp16
    everywhere: ~1% error, P·V's tensor cores at bf16's rate)."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if (reason := backend_unavailable_reason(name)) is not None:
        raise RuntimeError(f"attention backend '{name}' cannot run here: {reason}; or choose 'auto'")
    _backend = name


def backend_unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """None when attention backend `name` can run on `device` (default: the current CUDA device), else why not."""
    if name == "flash-attn" and _flash_attn_func() is None:
        return "the flash-attn package is not installed (install flash-attn)"
    if name == "cudnn-fp8":
        return _fp8.unavailable_reason(device)
    if name in SAGE_BACKENDS:
        return sage_unavailable_reason(device)
    return None


def get_attention_backend() -> str:
    return _backend


def _first_tensor(out):
    return out[0] if isinstance(out, tuple) else out  # some builds also return the log-sum-exp


def _flash3():
    from flash_attn_interface import flash_attn_func  # type: ignore

    return lambda q, k, v: _first_tensor(flash_attn_func(q, k, v))


def _flash4():
    from flash_attn.cute import flash_attn_func  # type: ignore

    def call(q, k, v):
        return _first_tensor(flash_attn_func(q, k, v))

    # The CuTe DSL compiles its kernels when first called and runs them through its own runtime, which
    # torch.compile cannot trace: the compiled blocks call it as an opaque operator instead.
    ops.define("flash_attention_4(Tensor q, Tensor k, Tensor v) -> Tensor", call,
               lambda q, k, v: torch.empty_like(q))
    return torch.ops.kontext.flash_attention_4


def _flash2():
    from flash_attn import flash_attn_func  # type: ignore

    return flash_attn_func


# In order of preference on the GPUs each serves: FA3 (Hopper), FA4 (Hopper and Blackwell), FA2 (any).
_FLASH_VARIANTS = (("FlashAttention-3", _flash3), ("FlashAttention-4", _flash4), ("FlashAttention-2", _flash2))


def _load_flash_attn() -> tuple[str | None, object]:
    for name, loader in _FLASH_VARIANTS:
        try:
            return name, loader()
        except Exception:
            continue
    return None, None


# Resolved once at import: torch.compile cannot trace an import inside the attention call.
_FLASH_NAME, _FLASH_ATTN = _load_flash_attn()


def _flash_attn_func():
    return _FLASH_ATTN


def load_flash_attn():
    """The installed FlashAttention as a function of q, k, v laid out [B, L, H, D] (bf16 / fp16 on CUDA),
    returning [B, L, H, D]; None when none is installed."""
    return _FLASH_ATTN


def flash_attn_variant() -> str | None:
    """Which FlashAttention `load_flash_attn` found ("FlashAttention-3", -4 or -2), or None."""
    return _FLASH_NAME


# Whether "auto" takes FlashAttention in the forward under way: set by attention_scope outside the compiled
# blocks (they read a plain flag, which torch.compile guards on, instead of querying the device).
_auto_flash = False


@functools.cache
def _flash_beats_cudnn(device_index: int) -> bool:
    # On Hopper and newer, FA4 runs FLUX's attention faster than SDPA's cuDNN kernel (H100: 693 vs 647 TFLOP/s at
    # the edit shape, bench/RESULTS.md). FA3's bf16 kernel runs it at cuDNN's speed (H100: 1.42 vs 1.41 ms,
    # 2026-12-06), and FA2 at about half cuDNN's rate on Hopper and like SDPA's own flash kernel before it, so
    # "auto" takes neither (choose 'flash-attn' for them).
    return _FLASH_NAME == "FlashAttention-4" and torch.cuda.get_device_capability(device_index)[0] >= 9


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention over [B, H, L, D] inputs, returned as [B, L, H*D]. Inside
    `sequence_parallel_scope`, L is this process's share of the tokens and attention covers every process's."""
    batch, heads, length, head_dim = q.shape
    if _sequence_layout is not None:
        out = _sequence_layout.attend(q, k, v, heads_attention)
    else:
        out = heads_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The chosen backend's attention over [B, H, L, D] inputs: [B, H, L, D], for some backends a view of a
    [B, L, H, D] buffer (then `attention`'s reshape to [B, L, H*D] copies nothing)."""
    head_dim = q.shape[-1]
    use_flash = _backend == "flash-attn" or (
        _backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and _auto_flash
    )
    if use_flash:
        return _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if _backend == "cudnn-fp8" and q.is_cuda:
        return _fp8.fp8_attention(q, k, v)
    if _backend in SAGE_BACKENDS and _kernel_runtime.enabled_for_traced(q):
        return torch.ops.kontext.sage_attention(q, k, v, _backend == "sage8-fp16")  # opaque inside compiled blocks
    if _backend == "math":
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


# The token layout of the forward under way when it is split over processes (kontext_core/compute/sequence_parallel.py);
# set by sequence_parallel_scope outside the blocks, read by `attention`.
_sequence_layout = None


@contextlib.contextmanager
def sequence_parallel_scope(layout):
    """Attention inside this block attends across the processes of `layout` (a sequence_parallel.ShardLayout;
    None: this process's tokens only)."""
    global _sequence_layout
    before, _sequence_layout = _sequence_layout, layout
    try:
        yield
    finally:
        _sequence_layout = before


# sage8's q int8 rows and K/V column statistics made in the QK-norm + RoPE pass (kontext_kernels/sage_qkv.py): the
# same operands bit for bit, two passes fewer over q, k and v. Off until timed on a GPU against the separate passes
# (bench_step's +fusedqkv); a plain flag, which torch.compile guards on.
FUSED_SAGE_QKV = False


# sage8 with frozen statistics (kontext_kernels/sage_qkv.py): "record" quantizes as the unfused path does and keeps
# each layer's K mean and V amax; "reuse" quantizes q, k and v in the QK-norm + RoPE pass with the kept ones. Set per
# step by the sampler (`frozen_statistics`); a plain value, which torch.compile guards on and the CUDA graph's
# signature includes, so each mode has its own compiled blocks and graph.
STATISTICS_MODES = ("off", "record", "reuse")
_statistics_mode = "off"


def statistics_mode() -> str:
    return _statistics_mode


@contextlib.contextmanager
def frozen_statistics(mode: str):
    """Inside, sage8 attention records ("record") or reuses ("reuse") each layer's K mean and V amax, or neither
    ("off"). Other backends ignore it."""
    global _statistics_mode
    if mode not in STATISTICS_MODES:
        raise ValueError(f"unknown statistics mode {mode!r}; choose one of {', '.join(STATISTICS_MODES)}")
    before, _statistics_mode = _statistics_mode, mode
    try:
        yield
    finally:
        _statistics_mode = before


def joint_attention(streams: list[tuple[torch.Tensor, torch.nn.Module, torch.nn.Module]], cos: torch.Tensor,
                    sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Attention over the joint sequence of streams (qkv [B, L_i, 3*H*D], query_norm, key_norm), q and k
    normalised and rotated as `fused.joint_qkv_heads` does: [B, sum L_i, H*D].

    With 'cudnn-fp8' and the kernels on, q, k and v go to fp8 in the QK-norm + RoPE pass itself (no
    bf16 copies, no amax passes for q and k); with 'sage8' inside `frozen_statistics`, sage8's operands do."""
    first = streams[0][0]
    if (_statistics_mode != "off" and _backend == "sage8" and _sage_qkv is not None and _sequence_layout is None
            and fused.qk_kernel_active(first) and _sage.fp8_tensor_cores(first.device)):
        tensors = [(qkv, query_norm.scale, key_norm.scale) for qkv, query_norm, key_norm in streams]
        if _sage_qkv.runs_frozen(tensors, num_heads, fp8_pv=True):
            out = torch.ops.kontext.sage_frozen_attention([qkv for qkv, _, _ in tensors],
                                                          [q for _, q, _ in tensors], [k for _, _, k in tensors],
                                                          cos, sin, num_heads, _statistics_mode == "record")
            batch, heads, length, head_dim = out.shape
            return out.transpose(1, 2).reshape(batch, length, heads * head_dim)
    # The fused fp8 path attends over this process's tokens only; split over processes, q, k, v go through
    # `attention` (and its all-to-all) instead.
    if _backend == "cudnn-fp8" and first.is_cuda and fused.qk_kernel_active(first) and _sequence_layout is None:
        tensors = [(qkv, query_norm.scale, key_norm.scale) for qkv, query_norm, key_norm in streams]
        out = _fp8.fp8_joint_attention(tensors, cos, sin, num_heads)
        batch, heads, length, head_dim = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * head_dim)
    if (_backend in SAGE_BACKENDS and FUSED_SAGE_QKV and _sage_qkv is not None and _sequence_layout is None
            and fused.qk_kernel_active(first)):
        tensors = [(qkv, query_norm.scale, key_norm.scale) for qkv, query_norm, key_norm in streams]
        if _sage_qkv.runs_fused(tensors, num_heads):
            out = torch.ops.kontext.sage_joint_attention([qkv for qkv, _, _ in tensors], [q for _, q, _ in tensors],
                                                         [k for _, _, k in tensors], cos, sin, num_heads,
                                                         _backend == "sage8-fp16")
            batch, heads, length, head_dim = out.shape
            return out.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return attention(*fused.joint_qkv_heads(streams, cos, sin, num_heads))


def sage_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when attention backends 'sage8' and 'sage8-fp16' can run on `device` (default: the current CUDA device),
    else why not
    (one line): it needs this project's Triton kernels, switched on, and a CUDA GPU of compute capability 8.0
    (Ampere) or newer, or Triton's interpreter (TRITON_INTERPRET=1: any device, slowly; that is how the tests
    run it on a CPU)."""
    if _sage is None:
        return (f"this project's kontext_kernels/ package cannot be imported ({_SAGE_IMPORT_ERROR}); reinstall "
                "comfyui-kontext (pip install -e . in its folder) so that its Triton kernels import")
    if not _kernel_runtime.triton_available():
        return "Triton is not installed (pip install triton; on Windows, triton-windows)"
    if not _kernel_runtime.switched_on():
        return "the Triton kernels are switched off (KONTEXT_KERNELS=0 or kontext_kernels.set_enabled(False))"
    if _kernel_runtime.interpreting():
        return None
    if torch.version.hip is not None:
        return "this is a ROCm build of PyTorch; the sage8 kernel is written and tested for NVIDIA GPUs"
    if not torch.cuda.is_available():
        return "no CUDA GPU here; sage8 needs an NVIDIA GPU of compute capability 8.0 (Ampere) or newer"
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"this GPU is compute capability {major}.{minor}; sage8 needs 8.0 (Ampere) or newer"
    return None


def _sage_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp16_pv: bool) -> torch.Tensor:
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _sage.sage_attention(q, k, v, fp8_pv=False if fp16_pv else None)


def _sage_fake_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp16_pv: bool) -> torch.Tensor:
    batch, heads, length, head_dim = q.shape
    return q.new_empty((batch, length, heads, head_dim)).transpose(1, 2)


if _sage is not None:
    ops.define("sage_attention(Tensor q, Tensor k, Tensor v, bool fp16_pv) -> Tensor", _sage_attention_op,
               _sage_fake_output)


def _sage_joint_attention_op(qkvs: list[torch.Tensor], query_scales: list[torch.Tensor],
                             key_scales: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                             fp16_pv: bool) -> torch.Tensor:
    first = qkvs[0]
    with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
        return _sage_qkv.joint_sage_attention(list(zip(qkvs, query_scales, key_scales)), cos, sin, num_heads,
                                              fp8_pv=False if fp16_pv else None)


def _sage_joint_fake_output(qkvs, query_scales, key_scales, cos, sin, num_heads: int, fp16_pv: bool) -> torch.Tensor:
    first = qkvs[0]
    head_dim = first.shape[-1] // (3 * num_heads)
    length = sum(qkv.shape[1] for qkv in qkvs)
    return first.new_empty((first.shape[0], length, num_heads, head_dim)).transpose(1, 2)


if _sage_qkv is not None:
    ops.define("sage_joint_attention(Tensor[] qkvs, Tensor[] query_scales, Tensor[] key_scales, Tensor cos, "
               "Tensor sin, int num_heads, bool fp16_pv) -> Tensor", _sage_joint_attention_op,
               _sage_joint_fake_output)


# Each layer's frozen statistics, keyed by its query norm's scale (the layer's identity, by address, as the CUDA graph
# knows its weights) and the operands' shape. Entries are made outside graph capture (the warm-up steps before it)
# and then only written in place, so a captured graph keeps reading the tensors a record step writes.
_frozen: dict[tuple, object] = {}


def forget_frozen_statistics() -> None:
    """Drop every layer's kept statistics (the next "reuse" step of a layer records first)."""
    _frozen.clear()


def _sage_frozen_attention_op(qkvs: list[torch.Tensor], query_scales: list[torch.Tensor],
                              key_scales: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                              record: bool) -> torch.Tensor:
    first = qkvs[0]
    streams = list(zip(qkvs, query_scales, key_scales))
    key = (query_scales[0].data_ptr(), first.device, first.shape[0], num_heads, first.shape[-1])
    kept = _frozen.get(key)
    with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
        if record or kept is None:
            operands, statistics = _sage_qkv.record_sage_operands(streams, cos, sin, num_heads, fp8_pv=True)
            if kept is None:
                _frozen[key] = statistics
            else:
                kept.copy_(statistics)
        else:
            operands = _sage_qkv.frozen_sage_operands(streams, cos, sin, num_heads, kept)
        return _sage.attend(operands, first.dtype)


def _sage_frozen_fake_output(qkvs, query_scales, key_scales, cos, sin, num_heads: int, record: bool) -> torch.Tensor:
    return _sage_joint_fake_output(qkvs, query_scales, key_scales, cos, sin, num_heads, False)


if _sage_qkv is not None:
    ops.define("sage_frozen_attention(Tensor[] qkvs, Tensor[] query_scales, Tensor[] key_scales, Tensor cos, "
               "Tensor sin, int num_heads, bool record) -> Tensor", _sage_frozen_attention_op,
               _sage_frozen_fake_output)


# On Hopper, cuDNN's fused attention runs FLUX's shapes at about twice the rate of PyTorch's flash
# backend (measured 654 vs 344 TFLOP/s on an H100), but SDPA does not prefer it by default.
_CUDA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


def cudnn_first() -> contextlib.AbstractContextManager:
    """SDPA tries cuDNN first, then flash, then the others, inside the block (the bench gives the reference
    implementations the same order)."""
    return sdpa_kernel(_CUDA_PRIORITY, set_priority=True)


def attention_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Wrap a whole forward: with 'auto', take FlashAttention where it beats cuDNN on this device; on CUDA with
    the SDPA backends, `cudnn_first`."""
    global _auto_flash
    _auto_flash = (device.type == "cuda" and _FLASH_ATTN is not None
                   and _flash_beats_cudnn(torch.cuda.current_device() if device.index is None else device.index))
    if device.type != "cuda" or _backend not in ("auto", "sdpa"):
        return contextlib.nullcontext()
    return cudnn_first()
