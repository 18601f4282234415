"""The memory-bound kernels around the fast preset's GEMMs and attention, at the edit step's shapes, against the
GPU's copy bandwidth, at a few launch settings each.

    python3 bench/linear/row_quant_probe.py            # on a CUDA GPU
    python3 bench/linear/row_quant_probe.py --defaults # each kernel at its default setting only
    TRITON_INTERPRET=1 python3 bench/linear/row_quant_probe.py --tiny   # on a CPU: that it runs

Each kernel is timed from a CUDA graph of 10 calls (no host in the way), as the compiled step replays it:
- the 8-bit row quantizers of kontext_kernels/row_quant.py, as the int8 step calls them (8704 tokens: the single
  block's [attention, GELU(mlp)] rows, the double block's GELU rows and attention rows for each stream, and
  every block's LayerNorm + modulation rows), at chunk sizes and warps per program;
- sage8's column statistics (K's sums over tokens, V's amax) at token tiles and programs per SM.
"Floor" is the bytes a call must move at the bandwidth of a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if "--tiny" in sys.argv:  # before Triton is imported: the kernels are built for the interpreter at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from kontext_kernels import row_quant, sage_attention  # noqa: E402
from kontext_kernels.runtime import import_triton  # noqa: E402

triton, tl = import_triton()

TOKENS, TXT, WIDTH, MLP, HEADS = 8704, 512, 3072, 12288, 24


def timed(fn, tiny: bool) -> float:
    """Seconds per call: a CUDA graph of 10 calls, median of 5 replays (one plain call on the CPU)."""
    if tiny:
        fn()
        return float("nan")
    from bench_step import cuda_time

    return cuda_time(fn, warmup=2, iterations=5, repeat=10, graphed=True)


def copy_bandwidth(tiny: bool, device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    if tiny:
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), tiny)


def row_cases(tokens: int, txt: int, width: int, mlp: int, device: str):
    """(name, calls per step, fn, bytes moved per call) for the int8 step's row quantizers."""
    def bf16(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    linear1 = bf16(1, tokens, 3 * width + mlp)
    attended = bf16(1, tokens, width)
    image, text = tokens - txt, txt
    up_img, up_txt = bf16(1, image, mlp), bf16(1, text, mlp)
    att_img, att_txt = bf16(1, image, width), bf16(1, text, width)
    x = bf16(1, tokens, width)
    shift, scale = bf16(1, 1, width), bf16(1, 1, width)
    shift_txt, scale_txt = bf16(1, 1, width), bf16(1, 1, width)
    x_img, x_txt = bf16(1, image, width), bf16(1, text, width)
    int8 = torch.int8
    return [
        ("single: [attention, GELU(mlp)] (concat_gelu_quantize_rows)", 38,
         lambda: row_quant.concat_gelu_quantize_rows(attended, linear1[..., 3 * width:], dtype=int8),
         tokens * (width + mlp) * 3),
        ("double: GELU(mlp up), image + text", 19,
         lambda: (row_quant.gelu_quantize_rows(up_img, dtype=int8), row_quant.gelu_quantize_rows(up_txt, dtype=int8)),
         tokens * mlp * 3),
        ("double: GELU(mlp up), image + text in one launch", 19,
         lambda: row_quant.gelu_quantize_rows_stacked(up_img, up_txt, dtype=int8), tokens * mlp * 3),
        ("double: GELU(mlp up), image alone", 19, lambda: row_quant.gelu_quantize_rows(up_img, dtype=int8),
         image * mlp * 3),
        ("double: attention rows, image + text", 19,
         lambda: (row_quant.quantize_rows(att_img, dtype=int8), row_quant.quantize_rows(att_txt, dtype=int8)),
         tokens * width * 3),
        ("double: attention rows, image + text in one launch", 19,
         lambda: row_quant.quantize_rows_stacked(att_img, att_txt, dtype=int8), tokens * width * 3),
        ("LayerNorm + modulation (114 calls a step, as 76 of 8704 rows)", 76,
         lambda: row_quant.layernorm_modulate_quantize(x, shift, scale, dtype=int8), tokens * width * 3),
        ("double: LayerNorm + modulation, image + text", 38,
         lambda: (row_quant.layernorm_modulate_quantize(x_img, shift, scale, dtype=int8),
                  row_quant.layernorm_modulate_quantize(x_txt, shift_txt, scale_txt, dtype=int8)), tokens * width * 3),
        ("double: LayerNorm + modulation, image + text in one launch", 38,
         lambda: row_quant.layernorm_modulate_quantize_stacked(x_img, shift, scale, x_txt, shift_txt, scale_txt,
                                                               dtype=int8), tokens * width * 3),
    ]


@triton.jit
def _layernorm_quantize_loop_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, row_scale_ptr, length, channels, eps,
    stride_xb, stride_xl, stride_shift_b, stride_scale_b, stride_out,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):
    # A candidate for the LayerNorm + modulation + int8 kernel: a program walks ROWS rows of one batch one at a time,
    # each row a 1-D tile (its reductions stay in the program's warps), and loads the batch's shift and scale once
    # instead of once a row.
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < channels
    shift = tl.load(shift_ptr + batch * stride_shift_b + cols, mask=inside, other=0.0).to(tl.float32)
    factor = 1.0 + tl.load(scale_ptr + batch * stride_scale_b + cols, mask=inside, other=0.0).to(tl.float32)
    for i in range(ROWS):
        token = tl.program_id(0) * ROWS + i
        if token < length:
            x = tl.load(x_ptr + batch * stride_xb + token * stride_xl + cols, mask=inside, other=0.0).to(tl.float32)
            mean = tl.sum(x, 0) / channels
            centred = tl.where(inside, x - mean, 0.0)
            normed = centred * tl.rsqrt(tl.sum(centred * centred, 0) / channels + eps)
            out = tl.where(inside, factor * normed + shift, 0.0)
            amax = tl.maximum(tl.max(tl.abs(out), 0), 1e-12)
            row = batch * length + token
            inverse = tl.math.div_rn(127.0, amax)
            tl.store(out_ptr + row * stride_out + cols, row_quant.int8_grid(out, inverse).to(tl.int8), mask=inside)
            tl.store(row_scale_ptr + row, tl.math.div_rn(amax, 127.0))


def layernorm_quantize_loop(x, shift, scale, rows: int, warps: int):
    batch, length, channels = x.shape
    x, shift, scale = row_quant.modulation_operands(x, shift, scale)
    data = torch.empty((batch, length, channels), dtype=torch.int8, device=x.device)
    row_scale = torch.empty((batch * length, 1), dtype=torch.float32, device=x.device)
    _layernorm_quantize_loop_kernel[(row_quant.cdiv(length, rows), batch)](
        x, shift, scale, data, row_scale, length, channels, 1e-6,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), channels,
        BLOCK_C=row_quant.next_power_of_2(channels), ROWS=rows, num_warps=warps)
    return data, row_scale


def layernorm_loop_rows(tokens: int, width: int, device: str, tiny: bool, bandwidth: float) -> None:
    """The looping LayerNorm + modulation + int8 candidate against the kernel in use, and how far its output is."""
    x = torch.randn(1, tokens, width, device=device, dtype=torch.bfloat16)
    shift, scale = (torch.randn(1, 1, width, device=device, dtype=torch.bfloat16) for _ in range(2))
    data, row_scale = row_quant.layernorm_modulate_quantize(x, shift, scale, dtype=torch.int8)
    moved = tokens * width * 3
    for rows, warps in ((1, 1), (4, 1), (8, 1), (16, 1), (4, 2), (8, 2), (16, 2), (8, 4), (32, 1)):
        candidate, candidate_scale = layernorm_quantize_loop(x, shift, scale, rows, warps)
        steps = (candidate.int() - data.int()).abs().max().item()
        scales = ((candidate_scale - row_scale).abs() / row_scale).max().item()
        seconds = timed(lambda rows=rows, warps=warps: layernorm_quantize_loop(x, shift, scale, rows, warps), tiny)
        print(f"| LayerNorm + modulation, looping over {rows} rows, {warps} warps (int8 steps from the kernel in use "
              f"{steps}, scales {scales:.1e}) | | {seconds * 1e6:.1f} | {moved / seconds / 1e12:.2f} | "
              f"{seconds * bandwidth / moved:.2f} | {seconds * 76e3:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--layernorm", action="store_true",
                        help="the LayerNorm + modulation + int8 kernel and its looping candidate only")
    parser.add_argument("--defaults", action="store_true", help="the row quantizers at their default settings only")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    sizes = (40, 8, 48, 96, 2) if args.tiny else (TOKENS, TXT, WIDTH, MLP, HEADS)
    tokens, txt, width, mlp, heads = sizes
    bandwidth = copy_bandwidth(args.tiny, device)
    if not args.tiny:
        print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e12:.2f} TB/s")

    print("\n| kernel | setting | us / call | TB/s | x floor | ms / step |\n| --- | --- | ---: | ---: | ---: | ---: |")
    chunks = (32,) if args.tiny else (2048, 4096, 8192, 16384)
    warps = (2, 4, 8)
    default = row_quant.ROW_CHUNK
    plan = (row_quant.rows_per_program, row_quant.row_warps)
    for name, calls, fn, moved in row_cases(tokens, txt, width, mlp, device):
        layernorm = "LayerNorm" in name
        if args.layernorm and not layernorm:
            continue
        settings = [(None, None)] + ([] if args.defaults else
                                     list(itertools.product((1, 2, 4), (1, 2, 4, 8)) if layernorm
                                          else itertools.product(chunks, warps)))
        for first, second in settings:
            if first is not None:  # rows per program or values per chunk; warps
                row_quant.row_warps = lambda _, w=second: w
                if layernorm:
                    row_quant.rows_per_program = lambda _, r=first: r
                else:
                    row_quant.ROW_CHUNK = first
            seconds = timed(fn, args.tiny)
            row_quant.ROW_CHUNK = default
            row_quant.rows_per_program, row_quant.row_warps = plan
            label = ("default" if first is None else f"{first} rows a program, {second} warps" if layernorm
                     else f"chunk {first}, {second} warps")
            print(f"| {name} | {label} | {seconds * 1e6:.1f} | {moved / seconds / 1e12:.2f} | "
                  f"{seconds * bandwidth / moved:.2f} | {seconds * calls * 1e3:.2f} |", flush=True)
        if "GELU" in name and not args.tiny and not args.defaults:
            # The GELU form that tanh.approx replaced as the default: exp2 and a division.
            row_quant.GELU_ON_GPU = row_quant.GELU_EXP
            seconds = timed(fn, args.tiny)
            row_quant.GELU_ON_GPU = row_quant.GELU_TANH_APPROX
            print(f"| {name} | default, GELU through exp2 and a division | {seconds * 1e6:.1f} | "
                  f"{moved / seconds / 1e12:.2f} | {seconds * bandwidth / moved:.2f} | {seconds * calls * 1e3:.2f} |",
                  flush=True)

    if args.defaults:
        return
    layernorm_loop_rows(tokens, width, device, args.tiny, bandwidth)
    if args.layernorm:
        return

    k, v = (torch.randn(1, tokens, heads, 128, device=device, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    q = torch.randn_like(k)
    moved = 2 * k.numel() * 2
    settings = [(sage_attention._STATS_BLOCK_L, sage_attention._STATS_PROGRAMS_PER_SM)]
    if not args.tiny:
        settings += list(itertools.product((64, 128, 256), (1, 2, 4)))
    default = settings[0]
    for tile, per_sm in settings:
        sage_attention._STATS_BLOCK_L, sage_attention._STATS_PROGRAMS_PER_SM = tile, per_sm
        # The whole quantization pass; its other launches do not depend on these settings.
        seconds = timed(lambda: sage_attention.quantize_operands(q, k, v), args.tiny)
        print(f"| sage8 quantization (column stats: {tile} tokens a tile, {per_sm} programs per SM) | | "
              f"{seconds * 1e6:.1f} | | | {seconds * 57e3:.2f} |", flush=True)
    sage_attention._STATS_BLOCK_L, sage_attention._STATS_PROGRAMS_PER_SM = default


if __name__ == "__main__":
    main()
