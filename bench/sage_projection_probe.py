"""Does the QKV projection's GEMM writing sage8's operands (kontext_kernels/sage_projection_hopper.py) beat the plain
GEMM followed by the frozen pass? GPU time per block at the edit shape (8704 tokens, 24 heads of 128, K 3072).

    python3 bench/sage_projection_probe.py        # on a Hopper GPU

A double block projects its text (512 tokens) and image (8192) streams with their own weights (N = 9216 each);
a single block projects the joint sequence into q, k, v and the MLP's input at once (N = 21504). Per step: 19
double and 38 single blocks. Random int8 operands; times from the profiler, the kernels of `repeats` calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sage_quant_breakdown import kernel_times  # noqa: E402
from kontext_kernels import int8_gemm_hopper, sage_projection_hopper, sage_qkv  # noqa: E402

HEADS, HEAD_DIM, DEPTH, TEXT, IMAGE, MLP = 24, 128, 3072, 512, 8192, 12288
BLOCKS = {"double": 19, "single": 38}


def projection(rows: int, columns: int) -> tuple:
    data = torch.randint(-127, 128, (rows, DEPTH), dtype=torch.int8, device="cuda")
    weight = torch.randint(-127, 128, (columns, DEPTH), dtype=torch.int8, device="cuda")
    return (data, torch.rand(rows, device="cuda") * 1e-3 + 5e-4, weight,
            torch.rand(columns, device="cuda") * 1e-2 + 5e-3, (0.5 * torch.randn(columns, device="cuda")).bfloat16())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    qkv = 3 * HEADS * HEAD_DIM
    total = TEXT + IMAGE
    angles = torch.rand(1, 1, total, HEAD_DIM // 2, device="cuda") * 6.2832
    cos, sin = angles.cos(), angles.sin()
    norm = (1 + 0.2 * torch.randn(2, HEAD_DIM, device="cuda")).bfloat16()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GPU time of one block's projections",
          flush=True)
    blocks = {"double": [(TEXT, qkv), (IMAGE, qkv)], "single": [(total, qkv + MLP)]}
    for name, streams in blocks.items():
        projections = [projection(length, columns) for length, columns in streams]
        lengths = [length for length, _ in streams]

        def plain():
            return [int8_gemm_hopper.launch(*p[:4], p[4], torch.bfloat16) for p in projections]

        def streams_of(products):
            return [(product[:, :qkv].view(1, length, qkv), norm[0], norm[1])
                    for product, length in zip(products, lengths)]

        _, statistics = sage_qkv.record_sage_operands(streams_of(plain()), cos, sin, HEADS, fp8_pv=True)

        def plain_then_frozen():
            sage_qkv.frozen_sage_operands(streams_of(plain()), cos, sin, HEADS, True, statistics)

        def fused():
            operands = sage_qkv.empty_operands(1, HEADS, total, HEAD_DIM, True, statistics, True, "cuda")
            offset = 0
            for p, length in zip(projections, lengths):
                sage_projection_hopper.project_to_operands(*p, operands, statistics, norm[0], norm[1],
                                                           cos[:, :, offset:offset + length],
                                                           sin[:, :, offset:offset + length], HEADS, length, offset)
                offset += length

        rows = {}
        for label, fn in (("plain GEMM", plain), ("plain GEMM + frozen pass", plain_then_frozen),
                          ("GEMM writing the operands", fused)):
            times = kernel_times(fn, args.repeats)
            rows[label] = sum(times.values())
            detail = ", ".join(f"{kernel} {micros:.1f}" for kernel, micros in times.items())
            print(f"  {name:6s} {label:28s} {rows[label]:8.1f} us ({BLOCKS[name] * rows[label] / 1e3:6.2f} ms per "
                  f"step): {detail}", flush=True)
        saved = rows["plain GEMM + frozen pass"] - rows["GEMM writing the operands"]
        print(f"  {name:6s} saved {saved:.1f} us a block, {BLOCKS[name] * saved / 1e3:.2f} ms a step", flush=True)


if __name__ == "__main__":
    main()
