"""Would fusing sage8's quantization into the QK-norm + RoPE pass pay? Each kernel's GPU time at the edit shape.

    python3 bench/attention/sage_quant_breakdown.py    # on a CUDA GPU: one attention call of a 1024² edit (8704 tokens)
    python3 bench/attention/sage_quant_breakdown.py --fused 64x8 32x8    # and the fused pass (kontext_kernels/sage_qkv.py)
    python3 bench/attention/sage_quant_breakdown.py --frozen 32x4:4:32x4 64x4:8:64x4    # and the frozen-statistics pass
    TRITON_INTERPRET=1 python3 bench/attention/sage_quant_breakdown.py --tiny   # on a CPU: that it runs

The QK-norm + RoPE kernel writes q, k, v in bf16; sage8's quantization (kontext_kernels/sage_attention.py) then
reads them back in four launches: K's column sums and V's amax, V to e4m3, q to int8, k (centred) to int8.
The QK-norm + RoPE pass could take over the column statistics (atomics, as fp8_qkv does for V's amax) and q's
int8 (per-token scales need no other token), but not k's or V's: those need statistics over every token
first. So the most a fusion saves is the column-statistics and q launches (their memory traffic and launch
gaps), less what the fused kernel's own extra stores and atomics cost; this prints that upper bound per step
(57 attention calls: 19 double and 38 single blocks), from the device times of one profiled call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--tiny" in sys.argv:  # before Triton is imported: the kernels are built for the interpreter at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from kontext_core import TransformerConfig  # noqa: E402
from kontext_kernels import qk_norm_rope, sage_attention, sage_qkv  # noqa: E402

ATTENTION_CALLS_PER_STEP = 57
FUSABLE = ("_column_stats_kernel", "_quantize_int8_kernel[q]")


def kernel_times(fn, repeats: int) -> dict[str, float]:
    """Mean device microseconds per call of each kernel `fn` launches (the two int8 launches told apart by order)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    int8_seen = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.split("(")[0]
        if name == "_quantize_int8_kernel":  # q first, then k (_quantize_triton's order)
            name += "[q]" if int8_seen % 2 == 0 else "[k]"
            int8_seen += 1
        totals[name] = totals.get(name, 0.0) + event.device_time / repeats
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fused", nargs="*", default=[], metavar="TOKENSxWARPS",
                        help="also time sage_qkv's fused pass at these tiles (tokens per program x warps)")
    parser.add_argument("--frozen", nargs="*", default=[], metavar="QxWARPS:KWARPS:VxWARPS",
                        help="also time sage_qkv's pass with frozen statistics at these launch shapes: q's tokens "
                             "per program x warps, k's warps, v's tokens x warps")
    args = parser.parse_args()

    config = TransformerConfig.tiny() if args.tiny else TransformerConfig()
    length = 61 if args.tiny else 512 + 2 * 64 * 64
    device = "cpu" if args.tiny else "cuda"
    heads, head_dim = config.num_heads, config.head_dim
    generator = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(1, length, 3 * heads * head_dim, generator=generator, device=device).bfloat16()
    q_scale = 1 + 0.1 * torch.randn(head_dim, generator=generator, device=device)
    k_scale = 1 + 0.1 * torch.randn(head_dim, generator=generator, device=device)
    angles = torch.rand(1, 1, length, head_dim // 2, generator=generator, device=device) * 6.2832
    cos, sin = angles.cos(), angles.sin()

    def norm_rope():
        return qk_norm_rope.joint_qkv_norm_rope([(qkv, q_scale, k_scale)], cos, sin, heads)

    q, k, v = norm_rope()
    fp8_pv = sage_attention.fp8_tensor_cores(q.device)

    def quantize():
        return sage_attention.quantize_operands(q, k, v, fp8_pv=fp8_pv)

    if args.tiny:  # the interpreter has no device timeline: that both passes run and agree with the references
        ours = quantize()
        reference = sage_attention.quantize_operands_reference(q, k, v, fp8_pv=fp8_pv,
                                                               permute_keys=ours.keys_permuted)
        assert torch.equal(ours.q8, reference.q8)
        print(f"ran at [1, {heads}, {length}, {head_dim}] under the interpreter")
        return

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; one call at [1, {heads}, {length}, {head_dim}], "
          f"P·V in {'e4m3' if fp8_pv else 'fp16'}", flush=True)
    bytes_per_tensor = length * heads * head_dim * 2
    rows = {**kernel_times(norm_rope, args.repeats), **kernel_times(quantize, args.repeats)}
    for name, micros in rows.items():
        print(f"  {name:34s} {micros:8.1f} us", flush=True)
    quantization = sum(micros for name, micros in rows.items() if name != "_qkv_norm_rope_kernel")
    fusable = sum(rows.get(name, 0.0) for name in FUSABLE)
    print(f"  quantization, all launches         {quantization:8.1f} us "
          f"({ATTENTION_CALLS_PER_STEP * quantization / 1e3:.2f} ms per step)")
    print(f"  fusable at most (stats + q)        {fusable:8.1f} us "
          f"({ATTENTION_CALLS_PER_STEP * fusable / 1e3:.2f} ms per step, an upper bound)")
    unfused = sum(rows.values())
    print(f"  unfused, every launch              {unfused:8.1f} us "
          f"({ATTENTION_CALLS_PER_STEP * unfused / 1e3:.2f} ms per step)")
    for tile in args.fused:
        sage_qkv.BLOCK_L, sage_qkv.WARPS = map(int, tile.split("x"))
        fused = kernel_times(lambda: sage_qkv.joint_sage_operands([(qkv, q_scale, k_scale)], cos, sin, heads, fp8_pv),
                             args.repeats)
        total = sum(fused.values())
        print(f"  fused {tile:6s} every launch         {total:8.1f} us "
              f"({ATTENTION_CALLS_PER_STEP * total / 1e3:.2f} ms "
              f"per step): " + ", ".join(f"{name} {micros:.1f}" for name, micros in fused.items()), flush=True)
    if args.frozen:  # the frozen pass is e4m3 P·V's
        _, statistics = sage_qkv.record_sage_operands([(qkv, q_scale, k_scale)], cos, sin, heads, fp8_pv=True)
    for shape in args.frozen:
        q_shape, k_shape, v_shape = shape.split(":")
        sage_qkv.FROZEN_Q = tuple(map(int, q_shape.split("x")))
        sage_qkv.FROZEN_K_WARPS = int(k_shape)
        sage_qkv.FROZEN_V = tuple(map(int, v_shape.split("x")))
        frozen = kernel_times(lambda: sage_qkv.frozen_sage_operands([(qkv, q_scale, k_scale)], cos, sin, heads,
                                                                    statistics), args.repeats)
        total = sum(frozen.values())
        print(f"  frozen {shape:22s} every launch {total:8.1f} us ({ATTENTION_CALLS_PER_STEP * total / 1e3:.2f} ms "
              f"per step): " + ", ".join(f"{name} {micros:.1f}" for name, micros in frozen.items()), flush=True)
    print(f"  one bf16 q/k/v tensor: {bytes_per_tensor / 1e6:.1f} MB; at 4.0 TB/s a read takes "
          f"{bytes_per_tensor / 4.0e12 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
