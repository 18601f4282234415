"""How many results per clock an SM gives for the instructions of sage8's softmax, on this GPU.

    python3 bench/pipeline/pipe_probe.py            # on a CUDA GPU

The attention kernel's softmax makes each score's probability through exp2 and packs it to e4m3; the CUDA guide's
throughput table lumps conversions together, so this measures them. Each thread runs a loop of independent
chains of one instruction (inline PTX, enough warps to hide latency), and the time is read against a loop of
FFMAs, whose rate is known (128 results a clock per SM on sm_80/sm_90): a row's "per clock" is its results per
clock per SM at that ratio. Rows that mix two instructions say whether they share a pipe: if they do, the mix
takes as long as both alone together. `STEPS` says which SASS instruction each step becomes, and how many;
tests/benchmarks/test_pipe_probe.py checks that on offline sm_90 builds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

CHAINS = 8  # independent chains per thread, so that each warp has instructions to issue while one waits
REPEATS = 64  # instructions per chain per loop trip


class Step(NamedTuple):
    ptx: str  # one step of chain {r}; steps that read the next chain {s} keep ptxas from folding a constant chain
    results: int  # values one step computes
    sass: str | None  # the SASS instruction a step becomes (None: ptxas splits it between two)
    sass_per_step: int = 1


STEPS = {
    "ffma": Step("fma.rn.f32 {r}, {r}, {s}, {r};", 1, "FFMA"),
    "ex2.f32": Step("ex2.approx.ftz.f32 {r}, {r};", 1, "MUFU.EX2"),
    # sm_90 has no packed exp2: each half is its own MUFU operation
    "ex2.f16x2": Step("ex2.approx.f16x2 {r}, {r};", 2, "MUFU.EX2.F16", 2),
    "ex2.bf16x2": Step("ex2.approx.ftz.bf16x2 {r}, {r};", 2, "MUFU.EX2.BF16", 2),
    "cvt.f16x2.f32": Step("cvt.rn.f16x2.f32 {r}, {r}, {s};", 2, "F2FP.F16.F32.PACK_AB"),
    "cvt.bf16x2.f32": Step("cvt.rn.bf16x2.f32 {r}, {r}, {s};", 2, "F2FP.BF16.F32.PACK_AB"),
    # the e4m3 steps widen their 16-bit result back into the chain: one LOP3 more a step
    "cvt.e4m3x2.f32": Step("cvt.rn.satfinite.e4m3x2.f32 h, {r}, {s}; cvt.u32.u16 {r}, h;", 2,
                           "F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C"),
    "cvt.e4m3x2.f16x2": Step("cvt.rn.satfinite.e4m3x2.f16x2 h, {r}; cvt.u32.u16 {r}, h;", 2,
                             "F2FP.SATFINITE.E4M3.F16.UNPACK_B_MERGE_C"),
    "cvt.f32.s32": Step("cvt.rn.f32.s32 {r}, {r};", 1, "I2FP.F32.S32"),
    "iadd": Step("add.s32 {r}, {r}, {s};", 1, None),  # IADD3 and IMAD.IADD: the ALU and FMA pipes
    "imax": Step("max.s32 {r}, {r}, {s};", 1, "VIMNMX"),
    "fmax": Step("max.f32 {r}, {r}, {s};", 1, "FMNMX"),
    "hfma2": Step("fma.rn.f16x2 {r}, {r}, {s}, {r};", 2, None),  # HFMA2 and HFMA2.MMA
    "hadd2": Step("add.rn.f16x2 {r}, {r}, {s};", 2, None),  # HADD2 and HFMA2.MMA
    "prmt": Step("prmt.b32 {r}, {r}, {s}, 0x7632;", 1, "PRMT"),
}
MIXES = [("ex2.f32", "cvt.f16x2.f32"), ("ex2.f32", "cvt.e4m3x2.f32"), ("ex2.f16x2", "cvt.f16x2.f32"),
         ("ex2.f32", "ffma"), ("ex2.f32", "iadd"), ("ex2.f32", "cvt.f32.s32"), ("cvt.f16x2.f32", "cvt.e4m3x2.f16x2"),
         ("ex2.f32", "fmax"), ("ex2.f32", "prmt")]


def loop_asm(steps: list[str]) -> str:
    """PTX: CHAINS registers seeded from $1, REPEATS rounds of `steps` on each, a loop of $2 trips; $0 their xor."""
    chains = [f"c{i}" for i in range(CHAINS)]
    body = []
    for _ in range(REPEATS // len(steps)):
        for step in steps:
            for index, chain in enumerate(chains):
                body.append(STEPS[step].ptx.format(r=chain, s=chains[(index + 1) % CHAINS]))
    seeds = " ".join(f"add.u32 {c}, $1, {i};" for i, c in enumerate(chains))
    fold = " ".join(f"xor.b32 $0, $0, {c};" for c in chains)
    return ("{ .reg .pred p; .reg .b16 h; .reg .b32 trips, " + ", ".join(chains) + "; " + seeds + " mov.u32 trips, 0; "
            "PROBE_LOOP: " + " ".join(body) + " add.u32 trips, trips, 1; setp.lt.u32 p, trips, $2; "
            "@p bra PROBE_LOOP; mov.u32 $0, 0; " + fold + " }")


@triton.jit
def _probe_kernel(out_ptr, seed, trips, THREADS: tl.constexpr, ASM: tl.constexpr):
    offsets = tl.program_id(0) * THREADS + tl.arange(0, THREADS)
    start = tl.full([THREADS], 0, tl.int32) + seed + offsets
    value = tl.inline_asm_elementwise(ASM, "=r,r,r", [start, tl.full([THREADS], 0, tl.int32) + trips],
                                      dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + offsets, value)


def build_offline(steps: list[str], capability: int = 90):
    """The probe kernel for `steps` compiled for `capability` without a GPU (the tests read its SASS)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=_probe_kernel, signature={"out_ptr": "*i32", "seed": "i32", "trips": "i32",
                                                    "THREADS": "constexpr", "ASM": "constexpr"},
                       constexprs={"THREADS": 1024, "ASM": loop_asm(steps)})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 32})


def time_steps(steps: list[str], trips: int, sms: int) -> float:
    """Seconds per loop trip of every thread, at 2048 threads per SM."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step
    from bench_step import cuda_time

    threads = 1024
    out = torch.empty(sms * 2 * threads, dtype=torch.int32, device="cuda")
    asm = loop_asm(steps)
    seconds = cuda_time(lambda: _probe_kernel[(sms * 2, )](out, 3, trips, THREADS=threads, ASM=asm, num_warps=32),
                        warmup=1, iterations=5)
    return seconds / trips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trips", type=int, default=200)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    per_sm_thread_steps = 2048 * CHAINS * REPEATS  # instruction issues per SM per trip
    alone = {name: time_steps([name], args.trips, sms) for name in STEPS}
    clock_rate = per_sm_thread_steps / 128 / alone["ffma"]  # clocks per second implied by FFMA at 128 a clock
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs; FFMA implies {clock_rate / 1e9:.2f} GHz")
    print("| instruction | steps per clock per SM | SASS instructions per clock per SM | results per clock per SM |")
    print("| --- | ---: | ---: | ---: |")
    for name, step in STEPS.items():
        rate = per_sm_thread_steps / alone[name] / clock_rate
        sass = f"{rate * step.sass_per_step:.1f} {step.sass}" if step.sass else "(two instructions)"
        print(f"| {name} | {rate:.1f} | {sass} | {rate * step.results:.1f} |")
    print("\n| mix (half each) | steps per clock per SM | mix / mean alone |")
    print("| --- | ---: | ---: |")
    for first, second in MIXES:
        seconds = time_steps([first, second], args.trips, sms)
        mean_alone = (alone[first] + alone[second]) / 2
        print(f"| {first} + {second} | {per_sm_thread_steps / seconds / clock_rate:.1f} | {seconds / mean_alone:.2f} |")


if __name__ == "__main__":
    main()
