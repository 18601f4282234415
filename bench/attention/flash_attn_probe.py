"""FlashAttention (4's CuTe interface, 3's Hopper interface or 2) against SDPA on cuDNN, at the workloads' shapes.

    python3 bench/attention/flash_attn_probe.py

bf16 [1, L, 24, 128] (the layout the QK-norm kernel writes), L = 8704 (edit) and 4608 (t2i): ms per call
(5 calls back to back in a CUDA graph, so capture is tested too), TFLOP/s, and the relative L2 error of each
against float32 attention. Prints one markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from bench_step import cuda_time  # noqa: E402
from random_weights import rel_l2  # noqa: E402

from kontext_core.compute.attention import cudnn_first, flash_attn_variant, load_flash_attn  # noqa: E402

HEADS, HEAD_DIM = 24, 128


def main() -> int:
    flash = load_flash_attn()
    print(f"flash-attn: {flash_attn_variant() or 'not installed'}; torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")
    print("| tokens | implementation | ms / call | TFLOP/s | rel. L2 error vs float32 |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for tokens in (8704, 4608):
        generator = torch.Generator(device="cuda").manual_seed(tokens)
        q, k, v = (torch.randn(1, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
                   for _ in range(3))
        heads_first = [t.transpose(1, 2) for t in (q, k, v)]
        reference = F.scaled_dot_product_attention(*(t.float() for t in heads_first)).transpose(1, 2)
        flops = 4 * tokens * tokens * HEADS * HEAD_DIM

        def sdpa():
            with cudnn_first():
                return F.scaled_dot_product_attention(*heads_first).transpose(1, 2)

        candidates = {"SDPA, cuDNN first": sdpa}
        if flash is not None:
            candidates[f"flash-attn ({flash_attn_variant()})"] = lambda: flash(q, k, v)
        for name, fn in candidates.items():
            with torch.no_grad():
                error = rel_l2(fn().float(), reference)
                seconds = cuda_time(fn, warmup=3, iterations=10, repeat=5, graphed=True)
            print(f"| {tokens} | {name} | {seconds * 1e3:.3f} | {flops / seconds / 1e12:.0f} | {error:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
