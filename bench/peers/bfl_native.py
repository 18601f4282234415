"""Black Forest Labs' reference FLUX transformer on our weights: the "bfl" rows of bench/bench_step.py.

BFL's code (github.com/black-forest-labs/flux, `src/flux/model.py` and `modules/layers.py`) is imported at
runtime from a copy staged by bench/peers/stage_bfl.sh; none of it is in this repo. The twin is `flux.model.Flux`
with FLUX.1 [dev]'s parameters, holding our model's tensors (our checkpoint keys are BFL's), and it is called
as BFL's Kontext sampler (`flux.sampling.denoise`) calls it: the context tokens appended to the target
tokens, timestep and guidance vectors in the image's dtype, the prediction cut back to the target tokens.

    python3 bench/peers/bfl_native.py --bfl build/bfl     # CPU self-check against our model, tiny config
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from twin_check import assign_weights, compare_with_ours, self_check_main  # noqa: E402

_MODEL_FILE = Path("flux") / "model.py"


def load_bfl(bfl_path) -> types.SimpleNamespace:
    """Import BFL's `flux.model` from a staged copy (or a checkout's src/ folder) at `bfl_path`."""
    path = Path(bfl_path).expanduser().resolve()
    if not (path / _MODEL_FILE).is_file() and (path / "src" / _MODEL_FILE).is_file():
        path = path / "src"
    if not (path / _MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {_MODEL_FILE}: stage BFL's code with bench/peers/stage_bfl.sh "
                                "(give --bfl PATH or set KONTEXT_BFL_PATH)")
    loaded = sys.modules.get("flux.model")
    if loaded is not None and Path(loaded.__file__).resolve() != path / _MODEL_FILE:
        raise RuntimeError(f"another `flux` package is already imported ({loaded.__file__}), not the one at {path}")
    if str(path) not in sys.path:
        sys.path.append(str(path))
    import flux.model

    if Path(flux.model.__file__).resolve() != path / _MODEL_FILE:
        raise RuntimeError(f"`import flux` found {flux.model.__file__}, not BFL's code at {path}")
    return types.SimpleNamespace(path=path, model=flux.model)


def bfl_twin(model, bfl_path):
    """BFL's Flux with our model's config, sharing its weights (same device and dtype)."""
    bfl = load_bfl(bfl_path)
    c = model.config
    params = bfl.model.FluxParams(
        in_channels=c.in_channels, out_channels=c.out_channels, vec_in_dim=c.vec_in_dim,
        context_in_dim=c.context_in_dim, hidden_size=c.hidden_size, mlp_ratio=c.mlp_ratio, num_heads=c.num_heads,
        depth=c.depth, depth_single_blocks=c.depth_single_blocks, axes_dim=list(c.axes_dim), theta=c.theta,
        qkv_bias=c.qkv_bias, guidance_embed=c.guidance_embed)
    with torch.device("meta"):
        twin = bfl.model.Flux(params)
    assign_weights(twin, model.state_dict(), "BFL Flux")
    twin.bfl = bfl
    return twin.eval().requires_grad_(False)


def bfl_step(twin, x: dict):
    """One forward as BFL's Kontext sampler makes it; returns the velocity of the target tokens [B, L, 64]."""
    dtype = next(twin.parameters()).dtype
    img, ids = x["img"], x["img_ids"]
    if x["ctx"] is not None:
        img, ids = torch.cat([img, x["ctx"]], 1), torch.cat([ids, x["ctx_ids"]], 1)
    n = x["img"].shape[1]
    img, txt, y = img.to(dtype), x["txt"].to(dtype), x["y"].to(dtype)
    t, g = x["t"].to(dtype), x["g"].to(dtype)
    return lambda: twin(img=img, img_ids=ids, txt=txt, txt_ids=x["txt_ids"], timesteps=t, y=y, guidance=g)[:, :n]


def self_check(bfl_path, seed: int = 0) -> dict:
    """Tiny float32 model on the CPU: BFL's forward vs our velocity, with and without a context image."""
    twin, errors = compare_with_ours(lambda model: bfl_twin(model, bfl_path), bfl_step, seed)
    return {"rel_err": errors, "bfl": str(twin.bfl.path), "torch": torch.__version__, "python": sys.executable}


if __name__ == "__main__":
    # A package BFL's code imports (einops) may be missing here: exit status 3 names it.
    self_check_main(__doc__, "bfl", "BFL's code staged by stage_bfl.sh (or a checkout)", load_bfl, self_check)
