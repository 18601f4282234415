"""Hardware counters of sage8's Hopper attention kernel at FLUX Kontext's edit shape, through Nsight Compute.

    ncu --clock-control none -k regex:_attention_kernel --launch-skip 3 --launch-count 1 --set full \
        --import-source no -o OUT/attention python3 bench/attention/attention_counters.py
    python3 bench/attention/attention_counters.py --summarize OUT/attention.ncu-rep
    python3 bench/attention/attention_counters.py --time '' turns=True

The first form launches the Gluon kernel (kontext_kernels/sage_attention_hopper.py) on synthetic operands of
[1, 24, 8704, 128] a few times, for ncu to profile one launch. The second reads the report back with ncu's CLI and
prints what the timings alone cannot say: how busy the tensor, MUFU (xu), FMA and ALU pipes were, how often a
scheduler issued, why warps did not, and, from the sampled program counters, at which instructions (grouped by
opcode) the warps waited. The full CSVs are written beside the report.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: ncu_report

from ncu_report import ncu_csv, ncu_number  # noqa: E402


def _operands(heads: int, length: int, head_dim: int):
    import torch
    from sage_attention_probe import synthetic_inputs

    from kontext_kernels import sage_attention as sa
    from kontext_kernels import sage_attention_hopper as hopper_kernel

    q, k, v = synthetic_inputs(1, heads, length, head_dim, "cuda", seed=1)
    operands = sa.quantize_operands(q, k, v, fp8_pv=True)
    if not hopper_kernel.ready_for(operands):
        raise SystemExit("the Gluon kernel does not take these operands on this GPU (it needs Hopper and Gluon)")
    return operands, torch.empty((1, length, heads, head_dim), dtype=q.dtype, device="cuda")


def launch_kernel(heads: int = 24, length: int = 8704, head_dim: int = 128, launches: int = 5) -> None:
    import torch

    from kontext_kernels import sage_attention_hopper as hopper_kernel

    operands, out = _operands(heads, length, head_dim)
    for _ in range(launches):
        hopper_kernel.launch(operands, out)
    torch.cuda.synchronize()
    print("launched", launches, "times; output finite:", bool(torch.isfinite(out).all()))


def time_variants(variants: list[str], heads: int = 24, length: int = 8704, head_dim: int = 128) -> None:
    """Median ms of the kernel with each set of launch keywords ('name=value,...'; '' for the default), each timed
    twice, interleaved, so that the spread of a repeat shows beside the differences."""
    import triton

    from kontext_kernels import sage_attention_hopper as hopper_kernel

    operands, out = _operands(heads, length, head_dim)
    flops = 4 * heads * length * length * head_dim
    times: dict[str, list[float]] = defaultdict(list)
    keywords = {variant: {name: int(value) if value.lstrip("-").isdigit() else value == "True"
                          for name, value in (part.split("=") for part in variant.split(",") if part)}
                for variant in variants}
    for _ in range(2):
        for variant in variants:
            times[variant].append(triton.testing.do_bench(
                lambda variant=variant: hopper_kernel.launch(operands, out, **keywords[variant]),
                warmup=100, rep=500, return_mode="median"))
    outputs = {}
    for variant in variants:
        out.fill_(float("nan"))
        hopper_kernel.launch(operands, out, **keywords[variant])
        outputs[variant] = out.float().clone()
    first = outputs[variants[0]]
    print(f"| launch keywords | ms (two runs) | TFLOP/s | rel. L2 vs {variants[0] or 'default'!r} |\n"
          "| --- | ---: | ---: | ---: |")
    for variant, ms in times.items():
        difference = ((outputs[variant] - first).norm() / first.norm()).item()
        print(f"| {variant or 'default'} | {ms[0]:.4f} / {ms[1]:.4f} | {flops / min(ms) / 1e9:.0f} | "
              f"{difference:.2e} |")


def summarize(report: Path) -> None:
    raw = ncu_csv(report, "--page", "raw")
    names, units, values = raw[0], raw[1], raw[2]
    wanted = re.compile(r"(pipe_(tensor|xu|fma|alu|fmaheavy|fp16|uniform)[a-z_]*cycles_active"
                        r".*pct_of_peak_sustained_active"
                        r"|inst_executed_pipe_[a-z_]+\.avg\.pct_of_peak_sustained_active"
                        r"|issue_active\.avg\.pct_of_peak_sustained_active"
                        r"|warp_issue_stalled_[a-z_]+_per_warp_active\.pct"
                        r"|^lts__throughput\.avg\.pct_of_peak_sustained_elapsed$|^lts__t_bytes\.sum\.per_second$"
                        r"|^l1tex__m_xbar2l1tex_read_bytes\.sum\.per_second$|^dram__bytes_read\.sum\.per_second$"
                        r"|^lts__t_sector_hit_rate\.pct$"
                        r"|^gpu__time_duration\.sum$|^sm__cycles_elapsed\.avg$|^smsp__cycles_active\.avg$"
                        r"|^smsp__inst_executed\.sum$|^sm__warps_active\.avg\.pct_of_peak_sustained_active$)")
    print("## counters (ncu --page raw)")
    for name, unit, value in zip(names, units, values):
        number = ncu_number(value)
        if wanted.search(name) and number is not None and number > 0.05:
            print(f"{name:90s} {value:>14s} {unit}")

    rows = ncu_csv(report, "--page", "source", "--print-source", "sass")
    header_index = next(i for i, row in enumerate(rows) if "Source" in row)
    header, body = rows[header_index], rows[header_index + 1:]
    source = header.index("Source")
    numeric = [i for i, name in enumerate(header) if i != source and any(ncu_number(r[i]) for r in body[:2000]
                                                                          if len(r) > i)]
    by_opcode: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(header))
    for row in body:
        if len(row) <= source:
            continue
        words = [w for w in row[source].split() if not w.startswith("@")]
        opcode = words[0].split(".")[0] if words else "?"
        totals = by_opcode[opcode]
        for i in numeric:
            totals[i] += ncu_number(row[i]) or 0.0
    sampled = [i for i in numeric if "Sampl" in header[i]]
    key = sampled[0] if sampled else numeric[0]
    print(f"\n## by opcode (ncu --page source), sorted by {header[key]!r}")
    shown = [i for i in numeric if "Sampl" in header[i] or "Executed" in header[i]][:6]
    print(" | ".join(["opcode"] + [header[i] for i in shown]))
    for opcode, totals in sorted(by_opcode.items(), key=lambda item: -item[1][key])[:30]:
        print(" | ".join([opcode] + [f"{totals[i]:.0f}" for i in shown]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", type=Path, metavar="REPORT", help="read an .ncu-rep back and print a summary")
    parser.add_argument("--time", nargs="+", metavar="KEYWORDS",
                        help="time the kernel with these launch keywords instead ('' is the default)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    elif args.time:
        time_variants(args.time)
    else:
        launch_kernel()


if __name__ == "__main__":
    main()
