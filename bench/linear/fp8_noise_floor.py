"""The error e4m3 rounding alone puts on one linear layer, the floor under the fp8 path's velocity error.

One [dev]-sized linear (3072 -> 12288) on Gaussian weights and activations, quantized the way
kontext_core.compute.quant does (weights per output row, activations per token, scaled to e4m3's range), then
dequantized and multiplied in fp32: relative L2 error against the fp32 product, beside bf16's. Runs on
the CPU (the rounding is the same as on the GPU's fp8 tensor cores, which accumulate in fp32).

    python3 bench/linear/fp8_noise_floor.py
"""

from __future__ import annotations

import torch

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def fake_quantize(tensor: torch.Tensor) -> torch.Tensor:
    """Per-row scaled e4m3 round trip."""
    scale = tensor.abs().amax(dim=1, keepdim=True) / E4M3_MAX
    return (tensor / scale).to(torch.float8_e4m3fn).float() * scale


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    in_features, out_features, tokens = 3072, 12288, 1024
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    activations = torch.randn(tokens, in_features, generator=generator)
    reference = activations @ weight.t()

    def relative(result: torch.Tensor) -> float:
        return ((result - reference).norm() / reference.norm()).item()

    bf16 = (activations.bfloat16() @ weight.t().bfloat16()).float()
    weight_only = activations @ fake_quantize(weight).t()
    both = fake_quantize(activations) @ fake_quantize(weight).t()
    print(f"one linear {in_features}->{out_features}, {tokens} tokens, relative L2 error vs fp32: "
          f"bf16 {relative(bf16):.4f}, fp8 weights {relative(weight_only):.4f}, "
          f"fp8 weights and activations {relative(both):.4f}")


if __name__ == "__main__":
    main()
