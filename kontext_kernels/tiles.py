"""The order in which the GEMM kernels (kontext_kernels/ffn.py, kontext_kernels/int8_gemm.py) walk their output
tiles."""

from __future__ import annotations

from .runtime import import_triton

triton, tl = import_triton()


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile number `tile`. Tiles walk GROUP_M row blocks down one column
    band before moving right, so the weight tiles a group shares are still in L2 when its next member asks
    for them; the last group may have fewer rows."""
    # Builtins only, not tl.cdiv: see the note in kontext_kernels/modulation.py.
    blocks_m = (M + BLOCK_M - 1) // BLOCK_M
    blocks_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * blocks_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    in_group = tile % per_group
    return first_m + in_group % group_rows, in_group // group_rows
