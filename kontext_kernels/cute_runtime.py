"""Calling sage8's CuTe DSL attention kernel (sage_attention_cute.py) from PyTorch, without importing the DSL here.

The kernel is found, once a process, as
- an object file exported ahead of time (`sage_attention_cute.export`), linked into a shared library against the
  DSL's runtime library and TVM-FFI's, named by KONTEXT_SAGE_CUTE_MODULE: for a machine where the DSL's compiler is
  not installed (it is ~190 MB; bench/attention/cute_on_device.sh links one);
- else compiled here by the DSL (`nvidia-cutlass-dsl`, the `hopper` extra).
Either way it is a TVM-FFI function taking torch tensors; it runs on PyTorch's current stream (CUDA graphs too).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from .runtime import launches

MODULE_VARIABLE = "KONTEXT_SAGE_CUTE_MODULE"
CHANNELS = 128  # the head dim it is built for: it writes whole 128-channel rows
FUNCTION = "sage8_attention"  # the exported function's name (sage_attention_cute.export)
# The kernel's builds, by the name their exported files take (bench/attention/cute_export.py): "sage8" is the default
# build (P's row sums from P·V), the one launch takes; "softmax_row_sums" sums P in the softmax, as the Gluon kernel does.
DEFAULT_BUILD = "sage8"
VARIANTS = {
    DEFAULT_BUILD: {},
    "softmax_row_sums": {"row_sums_in_pv": False},
}
# Whether the default build's row sums are P's as P·V multiplies it (sage_attention.attend_reference's
# rounded_row_sums): its ROW_SUMS_IN_PV, restated here so that the DSL need not be imported to know it.
ROUNDED_ROW_SUMS = True


def load_module(path: str):
    """The kernel exported to `path` (a shared library linked from `sage_attention_cute.export`'s object file)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no exported CuTe DSL kernel there. Export one with "
                                f"kontext_kernels.sage_attention_cute.export and link it "
                                f"(bench/attention/cute_on_device.sh), "
                                f"or unset {MODULE_VARIABLE} to compile the kernel here")
    import tvm_ffi

    return tvm_ffi.load_module(path)[FUNCTION]


@functools.cache
def variant_kernel(name: str = DEFAULT_BUILD):
    """The build `name` of VARIANTS: where KONTEXT_SAGE_CUTE_MODULE names an exported module, that module for the
    default build and `name`.so beside it for the others; else compiled here. None where neither can be had."""
    if name not in VARIANTS:
        raise ValueError(f"{name!r} is not one of sage8's CuTe DSL builds: {', '.join(VARIANTS)}")
    path = os.environ.get(MODULE_VARIABLE)
    if path:
        exported = path if name == DEFAULT_BUILD else str(Path(path).parent / f"{name}.so")
        if name == DEFAULT_BUILD or Path(exported).is_file():
            return load_module(exported)
    try:
        from . import sage_attention_cute
    except Exception:  # noqa: BLE001 - the DSL's import loads a large native library; any failure means no DSL
        return None
    return sage_attention_cute.compiled(CHANNELS, **VARIANTS[name])


@functools.cache
def available() -> bool:
    """Whether the kernel can be had here: an exported module named, or the DSL and TVM-FFI importable."""
    if os.environ.get(MODULE_VARIABLE):
        return True
    try:
        import cutlass  # noqa: F401
        import tvm_ffi  # noqa: F401
    except Exception:  # noqa: BLE001 - the DSL's import loads a large native library; any failure means no
        return False
    return True


# What to do where the kernel cannot be had: the warning's and the error's fix.
_HOW_TO_GET_IT = f"install it with pip install -e '.[hopper]', or name an exported one in {MODULE_VARIABLE}"


@functools.cache
def _warn_unavailable() -> None:
    warnings.warn("sage8's CuTe DSL kernel was chosen (HOPPER_KERNEL 'cute') but cannot be had here: "
                  f"{_HOW_TO_GET_IT}; the Gluon kernel runs instead", stacklevel=3)


def takes(operands, out_dtype: torch.dtype) -> bool:
    """Whether the kernel takes these quantized operands (keys in the Hopper kernels' order, a Hopper GPU) into an
    output of `out_dtype`: bf16, head dim 128."""
    o = operands
    if not (o.keys_permuted and out_dtype == torch.bfloat16 and o.head_dim == CHANNELS and o.q8.shape[3] == CHANNELS
            and o.q8.is_cuda and torch.cuda.get_device_capability(o.q8.device) >= (9, 0)):
        return False
    if not available():
        _warn_unavailable()
        return False
    return True


def kernel_views(operands, out: torch.Tensor):
    """The operands (sage_attention.Operands, keys permuted) and out [B, Lq, H, D] as the kernel's arguments
    (sage_attention_cute.Sage8Hopper): views with batch and heads last, no copies."""
    o = operands
    batch, heads, padded_q, channels = o.q8.shape
    padded_k = o.k8.shape[2]
    return (o.q8.view(batch * heads, padded_q, channels).permute(1, 2, 0),
            o.k8.view(batch * heads, padded_k, channels).permute(1, 2, 0),
            o.v8t.view(batch * heads, channels, padded_k).permute(1, 2, 0),
            o.q_scale.view(batch * heads, -1).permute(1, 0), o.k_scale.view(batch * heads, -1).permute(1, 0),
            o.v_scale.view(batch * heads, channels).permute(1, 0), out.permute(1, 3, 2, 0),
            o.length_q, o.length_k)


def launch(operands, out: torch.Tensor, kernel=None) -> None:
    """The attention of quantized `operands` (keys in the Hopper kernels' order) into `out` [B, Lq, H, D] bf16, by
    `kernel` (a compiled or loaded variant; None: the one this module finds)."""
    if not operands.keys_permuted:
        raise ValueError("the CuTe DSL kernel reads keys in sage_attention.key_tokens order: quantize with "
                         "permute_keys=True")
    kernel = kernel or variant_kernel()
    if kernel is None:
        raise RuntimeError(f"sage8's CuTe DSL kernel cannot be had here: {_HOW_TO_GET_IT}")
    with _torch_stream()():
        kernel(*kernel_views(operands, out))
    launches["sage_attention_cute"] += 1


@functools.cache
def _torch_stream():
    """TVM-FFI's context that sets its environment stream to PyTorch's current one (imported once, not per call)."""
    import tvm_ffi

    return tvm_ffi.use_torch_stream
