"""How many results per clock an SM gives for the instructions of sage8's softmax, on this GPU.

    python3 bench/pipe_probe.py            # on a CUDA GPU

The attention kernel's softmax makes each score's probability through exp2 and packs it to e4m3; the CUDA guide's
throughput table lumps conversions together, so this measures them. Each thread runs a loop of independent
chains of one instruction (inline PTX, enough warps to hide latency), and the time is read against a loop of
FFMAs, whose rate is known (128 results a clock per SM on sm_80/sm_90): a row's "per clock" is its results per
clock per SM at that ratio. Rows that mix two instructions say whether they share a pipe: if they do, the mix
takes as long as both alone together. Caveats, from the SASS (tests/test_pipe_probe.py checks each loop's
instruction): the e4m3 rows also run one LOP3 a step (widening the 16-bit result back into the chain); ptxas splits
the iadd row between IADD3 and IMAD.IADD (the ALU and FMA pipes); ex2.f16x2 is two MUFU.EX2.F16 on sm_90.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

CHAINS = 8  # independent chains per thread, so that each warp has instructions to issue while one waits
REPEATS = 64  # instructions per chain per loop trip

# name -> (PTX of one step of chain {r}, which may read the next chain {s}; results one step gives). Steps that
# read {s} keep ptxas from folding a chain of constant operations into one.
STEPS = {
    "ffma": ("fma.rn.f32 {r}, {r}, {s}, {r};", 1),
    "ex2.f32": ("ex2.approx.ftz.f32 {r}, {r};", 1),
    "ex2.f16x2": ("ex2.approx.f16x2 {r}, {r};", 2),
    "ex2.bf16x2": ("ex2.approx.ftz.bf16x2 {r}, {r};", 2),
    "cvt.f16x2.f32": ("cvt.rn.f16x2.f32 {r}, {r}, {s};", 2),
    "cvt.bf16x2.f32": ("cvt.rn.bf16x2.f32 {r}, {r}, {s};", 2),
    "cvt.e4m3x2.f32": ("cvt.rn.satfinite.e4m3x2.f32 h, {r}, {s}; cvt.u32.u16 {r}, h;", 2),
    "cvt.e4m3x2.f16x2": ("cvt.rn.satfinite.e4m3x2.f16x2 h, {r}; cvt.u32.u16 {r}, h;", 2),
    "cvt.f32.s32": ("cvt.rn.f32.s32 {r}, {r};", 1),
    "iadd": ("add.s32 {r}, {r}, {s};", 1),
    "imax": ("max.s32 {r}, {r}, {s};", 1),
    "fmax": ("max.f32 {r}, {r}, {s};", 1),
    "hfma2": ("fma.rn.f16x2 {r}, {r}, {s}, {r};", 2),
    "hadd2": ("add.rn.f16x2 {r}, {r}, {s};", 2),
    "prmt": ("prmt.b32 {r}, {r}, {s}, 0x7632;", 1),
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
                body.append(STEPS[step][0].format(r=chain, s=chains[(index + 1) % CHAINS]))
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
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=32))


def time_steps(steps: list[str], trips: int, sms: int) -> float:
    """Seconds per loop trip of every thread, at 2048 threads per SM."""
    threads = 1024
    asm = loop_asm(steps)
    out = torch.empty(sms * 2 * threads, dtype=torch.int32, device="cuda")
    grid = (sms * 2, )
    _probe_kernel[grid](out, 3, trips, THREADS=threads, ASM=asm, num_warps=32)  # build and warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        _probe_kernel[grid](out, 3, trips, THREADS=threads, ASM=asm, num_warps=32)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best / trips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trips", type=int, default=200)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    per_sm_thread_steps = 2048 * CHAINS * REPEATS  # instruction issues per SM per trip
    ffma = time_steps(["ffma"], args.trips, sms)
    clock_rate = per_sm_thread_steps / 128 / ffma  # clocks per second implied by FFMA at 128 a clock
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs; FFMA implies {clock_rate / 1e9:.2f} GHz")
    print("| instructions | thread-instructions per clock per SM | results per clock per SM |")
    print("| --- | ---: | ---: |")
    for name in STEPS:
        seconds = time_steps([name], args.trips, sms)
        rate = per_sm_thread_steps / seconds / clock_rate
        print(f"| {name} | {rate:.1f} | {rate * STEPS[name][1]:.1f} |")
    for first, second in MIXES:
        seconds = time_steps([first, second], args.trips, sms)
        alone = (time_steps([first], args.trips, sms) + time_steps([second], args.trips, sms)) / 2
        print(f"| {first} + {second} (half each) | {per_sm_thread_steps / seconds / clock_rate:.1f} | "
              f"mix / mean alone = {seconds / alone:.2f} |")


if __name__ == "__main__":
    main()
