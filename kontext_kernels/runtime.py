"""When the fused kernels run, and the Triton modules they are written against.

A kernel runs only where it can: Triton importable, not switched off (`set_enabled(False)` or the
environment variable `KONTEXT_KERNELS=0`), and a tensor on a CUDA GPU of compute capability 8.0 or
newer (bf16 tensor-core dots need Ampere). With `TRITON_INTERPRET=1` the kernels also run on CPU
tensors through Triton's interpreter: that is how the tests exercise them on a machine with no GPU.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from types import SimpleNamespace

import torch

_enabled = True

# Kernel name -> number of launches, so that tests can tell the Triton path really ran.
launches: Counter[str] = Counter()


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install can fail with more than ImportError
        return False
    return True


TRITON_PRESENT = triton_available()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_enabled(flag: bool) -> None:
    """Switch every fused kernel on or off for this process; off means the PyTorch references run."""
    global _enabled
    _enabled = bool(flag)


@functools.cache
def _capable(device_index: int) -> bool:
    if torch.version.hip is not None:
        return True
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def _switched_on() -> bool:
    # Plain reads only (TRITON_PRESENT, not the cached triton_available()): torch.compile traces this.
    return _enabled and os.environ.get("KONTEXT_KERNELS", "1") != "0" and TRITON_PRESENT


def switched_on() -> bool:
    """Triton importable and the kernels not switched off (`set_enabled(False)`, `KONTEXT_KERNELS=0`)."""
    return _switched_on()


def enabled_for(tensor: torch.Tensor) -> bool:
    """True when the fused kernels should handle `tensor` rather than the PyTorch references."""
    if not _switched_on():
        return False
    if interpreting():  # any device the interpreter can read; a meta tensor has no data to run on
        return tensor.device.type != "meta"
    return tensor.is_cuda and _capable(tensor.device.index if tensor.device.index is not None
                                       else torch.cuda.current_device())


def _inert_triton() -> tuple[SimpleNamespace, SimpleNamespace]:
    """Stand-ins that let the kernel definitions parse without Triton; `enabled_for` keeps them unlaunched."""

    def decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = SimpleNamespace(jit=decorator, autotune=decorator, heuristics=decorator,
                             Config=lambda *args, **kwargs: None)
    language = SimpleNamespace(constexpr=None)
    return triton, language


def import_triton():
    """(triton, triton.language), or inert stand-ins when Triton is missing."""
    if triton_available():
        import triton
        import triton.language as tl
        return triton, tl
    return _inert_triton()


def enabled_for_traced(tensor: torch.Tensor) -> bool:
    """Whether to hand `tensor` to a kernel op, from state that torch.compile's tracing can read.

    Coarser than `enabled_for` (no capability check, which is cached): the ops decide per call with
    `enabled_for` and run the reference where the kernel cannot.
    """
    return _switched_on() and (tensor.is_cuda or (interpreting() and tensor.device.type != "meta"))


def reduction_combines():
    """(max, sum) combine functions for `tl.reduce`: Triton's own, those tl.max and tl.sum use.

    Kernels call tl.reduce with these rather than tl.max / tl.sum, which are jit functions built for
    the interpreter or the compiler once, when triton is first imported (the tests rebuild the kernel
    modules under TRITON_INTERPRET=1 later); and rather than combines of their own, which the
    interpreter would apply one element at a time where it maps these two onto numpy.
    """
    if not triton_available():
        return None, None
    import triton.language as tl

    return tl.standard._elementwise_max, tl.standard._sum_combine


def multiprocessors(device: torch.device) -> int:
    """The CUDA device's SM count, which persistent and split-reduction grids are sized by."""
    return _multiprocessors(_device_index(device))


def hopper(device: torch.device) -> bool:
    """Whether the CUDA device is an NVIDIA Hopper or newer (TMA, wgmma)."""
    return _hopper(_device_index(device))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# Cached per device: launches ask on every call, and a device query costs microseconds.
@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _hopper(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


def sm90(device: torch.device) -> bool:
    """Whether the CUDA device is a Hopper GPU itself (compute capability 9.x): wgmma, which the Gluon kernels
    issue, exists there only (Blackwell has other tensor-core instructions)."""
    return _sm90(_device_index(device))


@functools.cache
def _sm90(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] == 9


# Host-side grid and block arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are
# constexpr functions whose call wrapper costs microseconds, paid per launch on the step's critical
# path once the GPU outruns the CPU.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def row_bucket(rows: int) -> int:
    """The int8 GEMMs' key for a product's row count (autotuned configs, tuned plans): the power of two at or
    above `rows`, since the tiles that suit 8704 rows suit 8192-16384 as well. A new resolution reuses its bucket's
    choice."""
    return next_power_of_2(rows)


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied only if its last dimension is strided (the kernels take any other strides)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def loop_count(n: int):
    """A kernel's loop count: a plain int, except under Triton 3.6's interpreter, which cannot loop to a bound
    passed at run time (its scalars are 1-element arrays, which NumPy 2 does not turn into an int) and gets
    it as a constant."""
    import triton.language as tl

    return tl.constexpr(n) if interpreting() else n


def rows_per_program(block: int) -> int:
    """Rows a row-kernel program takes, for rows padded to `block` values: narrow rows share a program,
    FLUX's (3072 and wider) get one each. Triton's interpreter pays per program, so under it programs
    take as many rows as fit 16k values. A power of two, as tl.arange needs."""
    return _power_of_two_at_most((16384 if interpreting() else 2048) // block)


def row_warps(values: int) -> int:
    """Warps for a program holding `values` float32 values: about 32 a thread, at most 8; a power of two, as
    Triton needs. Timed from CUDA graphs on an H200 (bench/linear/row_quant_probe.py): 4 warps for FLUX's 3072-wide
    LayerNorm rows and 4096-value chunks beat 8 by 7-15%, more values a thread keeping more loads in flight."""
    return _power_of_two_at_most(min(8, values // 1024))

