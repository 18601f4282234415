"""What the double blocks' text stream costs apart from the image stream, at the edit step's shapes, on a CUDA GPU.

    python3 bench/linear/pair_probe.py

A double block runs every op twice: once over the 512 text tokens with the text weights, once over the 8192 image
tokens with the image weights. The text launches are small (four row tiles of an int8 GEMM for 132 SMs), so each
leaves most of the GPU idle for its length. For each op of the int8 fast path this times the two launches as the
block makes them against one launch over all 8704 rows with one weight set: the same work, the bound of what one
launch for both streams (two weight sets, one tile list) could reach. Each from a CUDA graph of 10 calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from bench_step import cuda_time  # noqa: E402
from int8_probe import int8_rows  # noqa: E402

from kontext_kernels import int8_gemm, row_quant  # noqa: E402

TEXT, IMAGE, WIDTH, MLP = 512, 8192, 3072, 12288
DOUBLE_BLOCKS = 19


def _bf16(*shape) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def gemm_cases():
    """(name, fn(rows) -> None, paired() -> outputs, unpaired() -> outputs) for the double block's four int8
    GEMMs as the int8 path calls them; rows 512 and 8192 take the text and the image weights, 8704 the image's."""
    cases = []
    for name, k, n, residual in (("qkv", WIDTH, 3 * WIDTH, False), ("proj + gated residual", WIDTH, WIDTH, True),
                                 ("mlp up", WIDTH, MLP, False), ("mlp down + gated residual", MLP, WIDTH, True)):
        data, scale = int8_rows(_bf16(TEXT + IMAGE, k))
        weights = {}
        for stream in ("text", "image"):
            weight, weight_scale = int8_rows(_bf16(n, k) * k ** -0.5)
            weights[stream] = (weight, weight_scale.reshape(-1).contiguous(), _bf16(n) * 0.02, _bf16(1, 1, n))
        residuals = {rows: _bf16(1, rows, n) for rows in (TEXT, IMAGE, TEXT + IMAGE)}

        def operands(rows, start=0, data=data, scale=scale, weights=weights, residuals=residuals,
                     residual=residual):
            weight, weight_scale, bias, gate = weights["text" if rows == TEXT else "image"]
            part, part_scale = data[start:start + rows], scale[start:start + rows]
            if residual:
                return (part[None], part_scale, weight, weight_scale, bias, gate, residuals[rows])
            return (part, part_scale, weight, weight_scale, bias)

        def call(rows, operands=operands, residual=residual):
            if residual:
                return int8_gemm.int8_linear_gated_residual(*operands(rows))
            return int8_gemm.int8_linear(*operands(rows), torch.bfloat16)

        def paired(operands=operands, residual=residual):
            pair = (operands(TEXT), operands(IMAGE, TEXT))
            if residual:
                return int8_gemm.int8_linear_gated_residual_pair(*pair)
            return int8_gemm.int8_linear_pair(*pair, torch.bfloat16)

        def unpaired(operands=operands, residual=residual):
            pair = (operands(TEXT), operands(IMAGE, TEXT))
            if residual:
                return tuple(int8_gemm.int8_linear_gated_residual(*one) for one in pair)
            return tuple(int8_gemm.int8_linear(*one, torch.bfloat16) for one in pair)
        cases.append((name, call, paired, unpaired))
    return cases


def row_cases():
    """(name, fn(rows) -> None) for the double block's row quantizers."""
    x = _bf16(1, TEXT + IMAGE, WIDTH)
    up = _bf16(1, TEXT + IMAGE, MLP)
    shift, scale = _bf16(1, 1, WIDTH), _bf16(1, 1, WIDTH)
    int8 = torch.int8
    return [
        ("LayerNorm + modulation + int8 (x2 a block)",
         lambda rows: row_quant.layernorm_modulate_quantize(x[:, :rows], shift, scale, dtype=int8)),
        ("GELU(mlp up) + int8", lambda rows: row_quant.gelu_quantize_rows(up[:, :rows], dtype=int8)),
    ]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n| op | text (512 rows), us | image (8192 rows), us | both, two launches, us | both, one paired launch, us "
          "| one launch of 8704 rows (bound), us | paired saves, us a block | ms a step (x19, x2 for LayerNorm) | "
          "paired = unpaired |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    total = 0.0
    for name, fn, *pair in gemm_cases() + [(name, fn, None, None) for name, fn in row_cases()]:
        def timed(*parts, fn=fn):
            return cuda_time(lambda: [fn(rows) for rows in parts], iterations=7, repeat=10, graphed=True)

        text, image, both, joint = timed(TEXT), timed(IMAGE), timed(TEXT, IMAGE), timed(TEXT + IMAGE)
        paired, same = float("nan"), ""
        if pair[0] is not None:
            paired = cuda_time(pair[0], iterations=7, repeat=10, graphed=True)
            same = all(torch.equal(a, b) for a, b in zip(pair[0](), pair[1]()))
        saving = both - (paired if pair[0] is not None else joint)
        per_step = saving * DOUBLE_BLOCKS * (2 if "x2" in name else 1)
        total += per_step
        print(f"| {name} | {text * 1e6:.1f} | {image * 1e6:.1f} | {both * 1e6:.1f} | {paired * 1e6:.1f} | "
              f"{joint * 1e6:.1f} | {saving * 1e6:.1f} | {per_step * 1e3:.2f} | {same} |", flush=True)
    print(f"\nsaving over a step's 19 double blocks (paired GEMMs; the row quantizers' bound): {total * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
