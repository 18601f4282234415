"""Probe cuDNN's fp8 attention against bf16 SDPA (cuDNN backend) at FLUX Kontext's shape.

    python bench/attention/fp8_attention_probe.py [--batch 1 --heads 24 --length 8704 --head-dim 128]

Prints versions, then for each path ms per call and TFLOP/s (4*L*L*H*D flops per batch): bf16 SDPA
on cuDNN, fp8_attention (quantization + cuDNN fp8 graph + conversion back to bf16), and its parts
alone; then the relative L2 error of fp8 against bf16 SDPA and both against float32 SDPA.
Every failure is printed in full and the probe goes on with what is left.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from bench_step import cuda_time, profile_step  # noqa: E402
from random_weights import rel_l2  # noqa: E402
from kontext_kernels import fp8_qkv  # noqa: E402
from kontext_core.compute import fp8_attention as fa  # noqa: E402


def timed(fn) -> float:
    """Milliseconds per call: median over CUDA-event-timed runs of 10 back-to-back calls, so the host
    queues ahead and the quantization kernels (tens of microseconds) are not timed waiting on their launch."""
    return 1e3 * cuda_time(fn, warmup=3, iterations=20, repeat=10)


def attempt(label, fn):
    try:
        return fn()
    except Exception:
        print(f"!! {label} failed:")
        traceback.print_exc()
        sys.stdout.flush()
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--length", type=int, default=8704)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=57, help="attention calls per model step, for the total")
    args = parser.parse_args()
    b, h, l, d = args.batch, args.heads, args.length, args.head_dim
    flops = 4 * b * l * l * h * d

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, torch's cuDNN {torch.backends.cudnn.version()}")
    print(f"GPU {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}")
    try:
        t0 = time.perf_counter()
        info = fa.describe()
        print(f"cudnn frontend {info['frontend']} from {info['frontend_path']}, backend {info['backend']}, "
              f"libcudnn {info['libcudnn']}, import {1e3 * (time.perf_counter() - t0):.0f} ms")
    except Exception:
        traceback.print_exc()
    print(f"available: {fa.available('cuda')}  reason: {fa.unavailable_reason('cuda')}")
    sys.stdout.flush()

    gen = torch.Generator(device="cuda").manual_seed(0)

    def unit_rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    q = unit_rms(torch.randn(b, h, l, d, generator=gen, device="cuda")).bfloat16()
    k = unit_rms(torch.randn(b, h, l, d, generator=gen, device="cuda")).bfloat16()
    v = torch.randn(b, h, l, d, generator=gen, device="cuda").bfloat16()

    def report(label, ms):
        if ms is not None:
            print(f"{label:<42s} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  "
                  f"x{args.blocks}: {ms * args.blocks:6.1f} ms")
            sys.stdout.flush()

    def bf16_sdpa():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    ref_bf16 = attempt("bf16 SDPA", bf16_sdpa)
    report("bf16 SDPA (cuDNN backend)", attempt("bf16 SDPA timing", lambda: timed(bf16_sdpa)))

    t0 = time.perf_counter()
    out = attempt("fp8_attention first call", lambda: fa.fp8_attention(q, k, v))
    torch.cuda.synchronize()
    print(f"fp8_attention first call (graph build) {time.perf_counter() - t0:.2f} s")
    if out is not None:
        def time_part(label, fn):
            report(label, attempt(label, lambda: timed(fn)))

        time_part("fp8_attention (quantize+graph+convert)", lambda: fa.fp8_attention(q, k, v))
        q8, k8, v8, work = fp8_qkv.quantize_qkv(q, k, v)
        o8 = fa.sdpa_fp8_graph(q8, k8, v8, work)
        time_part("  quantize q, k, v alone", lambda: fp8_qkv.quantize_qkv(q, k, v))
        time_part("  cuDNN fp8 graph alone", lambda: fa.sdpa_fp8_graph(q8, k8, v8, work))
        time_part("  fp8 O -> bf16 alone", lambda: fp8_qkv.dequantize_output(o8, work, torch.bfloat16))
        print("scales (amax q k v | descale q k v | s scale/descale | o scale/descale | amax s, o):",
              [round(x, 6) for x in work[::4].tolist()])
        for graph in attempt("graphs", lambda: fa.describe()["graphs"]) or []:
            print(f"graph: generate_stats={graph['generate_stats']}, workspace {graph['workspace_bytes']} B, "
                  f"plans {graph['plans']}")

    def errors():
        ref32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        if ref_bf16 is not None:
            print(f"rel L2 bf16 SDPA vs fp32: {rel_l2(ref_bf16, ref32):.5f}")
        if out is not None:
            print(f"rel L2 fp8 vs fp32:       {rel_l2(out, ref32):.5f}")
            if ref_bf16 is not None:
                print(f"rel L2 fp8 vs bf16 SDPA:  {rel_l2(out, ref_bf16):.5f}")
            print(f"max abs err fp8 vs fp32 {(out.float() - ref32).abs().max().item():.4f}, "
                  f"max |ref| {ref32.abs().max().item():.4f}, rms ref {ref32.pow(2).mean().sqrt().item():.4f}")

    attempt("errors", errors)
    sys.stdout.flush()

    if out is not None:
        attempt("profile", lambda: profile_step(lambda: fa.fp8_attention(q, k, v), "fp8_attention", "probe"))
        print("quantize_qkv in plain PyTorch ops:")
        attempt("profile torch quant",
                lambda: profile_step(lambda: fp8_qkv.quantize_qkv_reference(q, k, v), "quantize_qkv_reference",
                                     "probe"))


if __name__ == "__main__":
    main()
