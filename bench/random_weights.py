"""Random weights for the benchmarks, drawn one way for every script, so that their rows compare.

"fan-in": every matrix at std 1/sqrt(fan_in), which keeps activations O(1) through every layer, as trained
weights do; "std0.02": every matrix at std 0.02, as transformer training starts (small activations, larger
relative rounding). Norm scales are 1, biases and other vectors N(0, 0.02^2).
"""

from __future__ import annotations

import torch
from torch import nn

from kontext_core.model.autoencoder import Autoencoder, AutoencoderConfig

INITS = ("fan-in", "std0.02")


def randomize_(module: nn.Module, generator: torch.Generator, init: str = "fan-in") -> nn.Module:
    """Fill `module`'s parameters in place (on their device, from `generator`) and return it."""
    if init not in INITS:
        raise ValueError(f"unknown weight init {init!r}; choose one of {', '.join(INITS)}")
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 2:
                param.normal_(0, 0.02 if init == "std0.02" else param.shape[1] ** -0.5, generator=generator)
            elif name.endswith("scale"):
                param.fill_(1.0)
            else:
                param.normal_(0, 0.02, generator=generator)
    return module


def random_autoencoder(config: AutoencoderConfig | None = None, device: str = "cuda",
                       dtype: torch.dtype = torch.bfloat16) -> Autoencoder:
    """The FLUX AE (full size by default) with random weights: kernels at std 1/sqrt(fan_in), which keeps
    activations O(1); norm weights 1, other vectors N(0, 0.02^2)."""
    with torch.device("meta"):
        ae = Autoencoder(config)
    ae = ae.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, param in ae.named_parameters():
            param.normal_(0, (param[0].numel() ** -0.5) if param.ndim > 1 else 0.02)
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
    return ae.eval()


def rel_l2(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||, in float64."""
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()
