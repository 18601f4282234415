"""Gluon's Hopper API, imported once for the warp-specialised kernels (int8_gemm_hopper.py, sage_attention_hopper.py).

Where this Triton has no Gluon with TMA, mbarriers, wgmma and warp specialisation (or no Triton at all), the names
are stand-ins that let the kernel definitions parse, and `gluon_ready` keeps them unlaunched.
"""

from __future__ import annotations

import functools

import torch

from .runtime import interpreting, sm90, switched_on


@functools.cache
def gluon_available() -> bool:
    """Whether this Triton has Gluon with Hopper's TMA, mbarriers, wgmma and warp specialisation."""
    try:
        from triton.experimental import gluon  # noqa: F401
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401
            fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
        return hasattr(gl, "warp_specialize")
    except Exception:  # an older or broken Triton: the Triton-language kernels serve
        return False


def gluon_ready(device: torch.device) -> bool:
    """Whether a Gluon Hopper kernel can run on `device`: kernels switched on, Gluon, a compute capability 9.x GPU
    (wgmma exists there only), and not under Triton's interpreter (which does not run Gluon)."""
    return (switched_on() and gluon_available() and device.type == "cuda" and not interpreting()
            and sm90(device))


if gluon_available():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
else:
    from .runtime import _inert_triton

    gluon = _inert_triton()[0]
    gl = None
    fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None
