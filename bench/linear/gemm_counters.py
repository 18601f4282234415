"""Hardware counters of the int8 GEMM beside cuBLAS's fp8 GEMM at one of FLUX's shapes, through Nsight Compute.

    ncu --clock-control none --set full --import-source no -k regex:'int8_linear_pingpong|gemm|xmma|sm90' \
        --launch-skip 4 --launch-count 2 -o OUT/gemm python3 bench/linear/gemm_counters.py [--shape linear1]
    python3 bench/linear/gemm_counters.py --summarize OUT/gemm.ncu-rep

The first form launches our warp-specialised int8 GEMM (kontext_kernels/int8_gemm_hopper.py) and cuBLAS's fp8
`_scaled_mm` alternately on the shape's operands, for ncu to profile one launch of each. The second prints the two
side by side: the launch (grid, block, cluster, registers, shared memory, cuBLAS's kernel name, which names its
tile), and what bounds each: the tensor pipe's activity, L2 and DRAM throughput, issue activity and the warp
stall reasons.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: ncu_report

from ncu_report import ncu_csv, ncu_number  # noqa: E402

SHAPES = {"qkv": (8192, 3072, 9216), "proj": (8192, 3072, 3072), "mlp up": (8192, 3072, 12288),
          "mlp down": (8192, 12288, 3072), "linear1": (8704, 3072, 21504), "linear2": (8704, 15360, 3072),
          "text qkv": (512, 3072, 9216)}


def launch(shape: str, rounds: int = 6) -> None:
    import torch

    from int8_probe import int8_rows
    from kontext_core.compute import quant
    from kontext_kernels import int8_gemm_hopper

    m, k, n = SHAPES[shape]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.02
    data, scale = int8_rows(x)
    w_data, w_scale = int8_rows(w)
    x8 = quant.quantize_rows(x)
    w8, w8_scale = quant.quantize_weight(w, per_row=True)
    for _ in range(rounds):
        int8_gemm_hopper.launch(data, scale.reshape(-1).contiguous(), w_data, w_scale.reshape(-1).contiguous(), bias,
                                torch.bfloat16)
        torch._scaled_mm(x8.data, w8.t(), scale_a=x8.scale, scale_b=w8_scale.reshape(1, -1).contiguous(), bias=bias,
                         out_dtype=torch.bfloat16, use_fast_accum=True)
    torch.cuda.synchronize()
    print(f"launched both GEMMs {rounds} times at {shape} (M, K, N = {m}, {k}, {n})")


WANTED = re.compile(
    r"^(gpu__time_duration\.sum|launch__(grid_size|block_size|cluster_.*|registers_per_thread|shared_mem_per_block.*"
    r"|occupancy_limit_.*|waves_per_multiprocessor)"
    r"|sm__throughput\.avg\.pct_of_peak_sustained_elapsed|gpu__compute_memory_throughput.*pct.*"
    r"|lts__throughput\.avg\.pct_of_peak_sustained_elapsed|lts__t_bytes\.sum\.per_second|lts__t_sector_hit_rate\.pct"
    r"|dram__throughput\.avg\.pct_of_peak_sustained_elapsed|dram__bytes_read\.sum\.per_second"
    r"|l1tex__data_pipe_lsu_wavefronts_mem_shared.*pct.*|smsp__issue_active\.avg\.pct_of_peak_sustained_active"
    r"|sm__cycles_elapsed\.avg\.per_second"
    r"|sm__pipe_tensor.*pct_of_peak_sustained_(active|elapsed)|sm__inst_executed_pipe_tensor.*pct.*"
    r"|smsp__average_warps_issue_stalled_[a-z_]+_per_issue_active\.ratio"
    r"|smsp__warp_issue_stalled_[a-z_]+_per_warp_active\.pct)$")


def summarize(report: Path) -> None:
    rows = ncu_csv(report, "--page", "raw")
    names, units, kernels = rows[0], rows[1], rows[2:]
    name_column = names.index("Kernel Name")
    labels = [kernel[name_column][:60] for kernel in kernels]
    print("| counter | unit | " + " | ".join(labels) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in labels) + " |")
    for i, (name, unit) in enumerate(zip(names, units)):
        values = [kernel[i] if i < len(kernel) else "" for kernel in kernels]
        numbers = [ncu_number(value) for value in values]
        if WANTED.match(name) and any(number is not None and abs(number) > 0.05 for number in numbers):
            print(f"| {name} | {unit} | " + " | ".join(values) + " |")
    for label, kernel in zip(labels, kernels):
        print(f"\nfull name: {kernel[name_column]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="linear1", choices=sorted(SHAPES))
    parser.add_argument("--summarize", type=Path, help="an ncu report of the launches, to print side by side")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        launch(args.shape)


if __name__ == "__main__":
    main()
