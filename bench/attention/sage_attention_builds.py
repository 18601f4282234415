"""Build the 8-bit attention kernel (kontext_kernels/sage_attention.py) for sm_90 / sm_89 / sm_80 on a machine with no
GPU, and say what each build holds: registers, spills, shared memory, its tensor-core instructions, and the
instruction mix of its main loop.

    python3 bench/attention/sage_attention_builds.py                  # every config of the kernel's lists
    python3 bench/attention/sage_attention_builds.py --loop 90 tma e4m3 128 128 8 2

Triton compiles for a target it is told (triton.compile with a GPUTarget) and ships ptxas and cuobjdump, so the
SASS of a build can be read without the GPU: whether Q·Kᵀ and P·V became wgmma (IGMMA / QGMMA / HGMMA on
Hopper) or mma.sync (IMMA / QMMA / HMMA), whether registers spill (LDL / STL, a stack frame), and how many
instructions one key block issues. What it cannot say is how fast the kernel runs:
bench/attention/sage_attention_probe.py times it on a GPU. The builds get the alignments the launches give (16-byte pointers, sizes divisible by 16, as
at FLUX's 8704 tokens); without them Triton's pipeliner does not multi-buffer the pointer loads.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kontext_kernels import sage_attention as sa  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SIXTEEN = ("q_src", "k_src", "v_src", "q_scale_ptr", "k_scale_ptr", "v_scale_ptr", "out_ptr", "length_q", "length_k",
           "full_end", "padded_q", "padded_k", "length_bucket", "stride_ob", "stride_oh", "stride_ol")
COUNTED = ("IGMMA", "QGMMA", "HGMMA", "IMMA", "QMMA", "HMMA", "LDL", "STL", "UTMALDG", "LDGSTS", "MUFU.EX2")


def build(capability: int, tma: bool, fp8_pv: bool, block_m: int, block_n: int, warps: int, stages: int,
          k_rows: int | None = None, head_dim: int = 128, scores: int = sa.SCORES_DEFAULT):
    """The attention kernel compiled for `capability` (90, 89, 80) at one config; bf16 output."""
    channels = sa.padded_head_dim(head_dim)
    v_type = "fp8e4nv" if fp8_pv else "fp16"
    if tma:
        signature = {"q_src": f"tensordesc<i8[{block_m}, {channels}]>",
                     "k_src": f"tensordesc<i8[{block_n}, {channels}]>",
                     "v_src": f"tensordesc<{v_type}[{channels}, {block_n}]>"}
    else:
        signature = {"q_src": "*i8", "k_src": "*i8", "v_src": f"*{v_type}"}
    signature |= {"q_scale_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "out_ptr": "*bf16"}
    signature |= {name: "i32" for name in ("heads", "length_q", "length_k", "full_end", "padded_q", "padded_k",
                                           "length_bucket", "stride_ob", "stride_oh", "stride_ol")}
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=channels, Q_ROWS=sa.Q_ROWS,
                     K_ROWS=sa.default_k_rows(fp8_pv) if k_rows is None else k_rows, FP8_PV=fp8_pv,
                     SPLIT_ACCUMULATOR=fp8_pv, EXACT_ROUNDING=False, TMA=tma, SCORES=scores, BLOCK_M=block_m,
                     BLOCK_N=block_n)
    signature |= {name: "constexpr" for name in constants}
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in SIXTEEN
             if not signature[name].startswith("tensordesc")}
    source = ASTSource(fn=sa._attention_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(TOOLS / name), *args], capture_output=True, text=True, check=True).stdout


def describe(kernel) -> tuple[str, str]:
    """(one line: registers, stack, shared memory, instruction counts; the SASS)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as file:
        file.write(kernel.asm["cubin"])
    try:
        usage, sass = _tool("cuobjdump", "-res-usage", file.name), _tool("cuobjdump", "-sass", file.name)
    finally:
        os.unlink(file.name)
    registers = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    counts = {op: len(re.findall(r"\b" + re.escape(op), sass)) for op in COUNTED}
    line = (f"regs {registers:>3s} stack {stack:>4s} smem {kernel.metadata.shared // 1024:3d} KB  "
            + " ".join(f"{op}={n}" for op, n in counts.items() if n))
    return line, sass


def main_loop_mix(sass: str) -> collections.Counter:
    """Instruction counts of the key-block loop: the shortest span of a backward branch holding both an int8
    MMA (Q·Kᵀ) and exp2 (the softmax); the loops around it hold more, the epilogue's fewer of the two."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    code = [(int(address, 16), text) for address, text in lines]
    best = collections.Counter()
    for address, text in code:
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if not target or int(target.group(1), 16) >= address:
            continue
        body = [t for a, t in code if int(target.group(1), 16) <= a <= address]
        if not (any(op in t for t in body for op in ("IGMMA", "IMMA")) and any("MUFU.EX2" in t for t in body)):
            continue
        mix = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
        if not best or sum(mix.values()) < sum(best.values()):
            best = mix
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loop", nargs=7, metavar=("CAP", "tma|ptr", "e4m3|fp16", "BM", "BN", "WARPS", "STAGES"),
                        help="one build, with its main loop's instruction mix")
    parser.add_argument("--scores", type=int, default=sa.SCORES_DEFAULT,
                        choices=(sa.SCORES_CONVERT, sa.SCORES_FOLDED),
                        help="how the kernel makes float32 scores of the int32 dots (sage_attention.SCORES_*)")
    args = parser.parse_args()
    if args.loop:
        capability, loads, pv, *sizes = args.loop
        kernel = build(int(capability), loads == "tma", pv == "e4m3", *map(int, sizes), scores=args.scores)
        line, sass = describe(kernel)
        mix = main_loop_mix(sass)
        print(line)
        print(f"main loop: {sum(mix.values())} instructions per thread per key block: "
              + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))
        return
    lists = [(90, True, sa._TMA_CONFIGS), (89, False, sa._POINTER_CONFIGS), (80, False, sa._POINTER_CONFIGS)]
    for capability, tma, configs in lists:
        for fp8_pv in (True, False) if capability >= 89 else (False,):
            for config in configs:
                label = (f"sm_{capability} {'tma' if tma else 'ptr'} {'e4m3' if fp8_pv else 'fp16'} "
                         f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} "
                         f"s{config.num_stages}")
                try:
                    kernel = build(capability, tma, fp8_pv, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"],
                                   config.num_warps, config.num_stages)
                    print(f"{label:34s} {describe(kernel)[0]}", flush=True)
                except Exception as error:  # a config that does not build is reported, not fatal
                    print(f"{label:34s} FAILED {type(error).__name__}: {str(error)[:200]}", flush=True)


if __name__ == "__main__":
    main()
