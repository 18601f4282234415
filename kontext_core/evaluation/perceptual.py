"""LPIPS (Zhang et al. 2018), when the optional `lpips` package is installed (the `[eval]` extra).

It is a learned distance: its network weights come with the package, its AlexNet backbone through
torchvision's download on first use. Where either is missing, `load_lpips` says why instead of failing, and
the reports leave the column out with that sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .metrics import as_rgb

INSTALL_HINT = "pip install 'comfyui-kontext[eval]' (or pip install lpips)"


@dataclass
class LpipsMeter:
    network: Any  # lpips.LPIPS
    device: torch.device

    def __call__(self, reference, other) -> float:
        """LPIPS distance (0: identical; larger: further apart) between two images of the same size."""
        def tensor(image) -> torch.Tensor:  # [1, 3, H, W] in [-1, 1], as the network was trained
            rgb = np.ascontiguousarray(as_rgb(image).transpose(2, 0, 1), dtype=np.float32)
            return torch.from_numpy(rgb)[None].to(self.device) * 2 - 1

        with torch.no_grad():
            return float(self.network(tensor(reference), tensor(other)).mean())


def load_lpips(device: str | torch.device = "cpu", net: str = "alex") -> tuple[LpipsMeter | None, str | None]:
    """(meter, None), or (None, the reason there is none)."""
    try:
        import lpips
    except ImportError:
        return None, f"LPIPS not measured: the lpips package is not installed ({INSTALL_HINT})"
    try:
        network = lpips.LPIPS(net=net, verbose=False).eval().to(device)
    except Exception as error:  # the backbone's download (offline), a torchvision mismatch: said, not fatal
        return None, (f"LPIPS not measured: its {net} network could not be loaded ({type(error).__name__}: "
                      f"{error}); it downloads torchvision's backbone weights on first use, so run once online")
    return LpipsMeter(network, torch.device(device)), None
