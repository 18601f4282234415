"""Black Forest Labs' reference FLUX transformer on our weights: the "bfl" rows of bench/bench_step.py.

BFL's code (github.com/black-forest-labs/flux, `src/flux/model.py` and `modules/layers.py`) is imported at
runtime from a copy staged by bench/stage_bfl.sh; none of it is in this repo. The twin is `flux.model.Flux`
with FLUX.1 [dev]'s parameters, holding our model's tensors (our checkpoint keys are BFL's), and it is called
as BFL's Kontext sampler (`flux.sampling.denoise`) calls it: the context tokens appended to the target
tokens, timestep and guidance vectors in the image's dtype, the prediction cut back to the target tokens.

    python3 bench/bfl_native.py --bfl build/bfl     # CPU self-check against our model, tiny config
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_MODEL_FILE = Path("flux") / "model.py"


def load_bfl(bfl_path) -> types.SimpleNamespace:
    """Import BFL's `flux.model` from a staged copy (or a checkout's src/ folder) at `bfl_path`."""
    path = Path(bfl_path).expanduser().resolve()
    if not (path / _MODEL_FILE).is_file() and (path / "src" / _MODEL_FILE).is_file():
        path = path / "src"
    if not (path / _MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {_MODEL_FILE}: stage BFL's code with bench/stage_bfl.sh "
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
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True, assign=True)  # raises on any missing or unexpected key
    on_meta = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise RuntimeError(f"BFL Flux tensors left without weights: {on_meta[:5]}")
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


def compile_blocks(twin) -> None:
    """Regional compilation like ours: each double/single block compiled."""
    for block in (*twin.double_blocks, *twin.single_blocks):
        block.compile()


def self_check(bfl_path, seed: int = 0) -> dict:
    """Tiny float32 model on the CPU: BFL's forward vs our velocity, with and without a context image."""
    from kontext_core import KontextTransformer, TransformerConfig
    from kontext_core.tokens import context_tokens, pack_latent, position_ids, text_position_ids

    torch.manual_seed(seed)
    config = TransformerConfig.tiny()
    model = KontextTransformer(config)
    with torch.no_grad():  # non-trivial norms and biases, matrices at a scale that keeps activations O(1)
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            elif name.endswith("scale"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.05)
    model.eval().requires_grad_(False)
    twin = bfl_twin(model, bfl_path)
    generator = torch.Generator().manual_seed(seed)
    batch, (th, tw), (ch, cw) = 2, (6, 10), (8, 6)  # a non-square target and a context of another size
    x = {"img": pack_latent(torch.randn(batch, 16, th, tw, generator=generator)),
         "img_ids": position_ids(th, tw, batch=batch),
         "txt": torch.randn(batch, 7, config.context_in_dim, generator=generator),
         "txt_ids": text_position_ids(batch, 7), "t": torch.rand(batch, generator=generator),
         "y": torch.randn(batch, config.vec_in_dim, generator=generator),
         "g": 1.0 + 3.0 * torch.rand(batch, generator=generator)}
    ctx, ctx_ids = context_tokens([torch.randn(batch, 16, ch, cw, generator=generator)], (th, tw), "kontext")
    errors = {}
    with torch.no_grad():
        for case, (c, c_ids) in {"edit": (ctx, ctx_ids), "t2i": (None, None)}.items():
            x.update(ctx=c, ctx_ids=c_ids)
            ours = model.velocity(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"], c, c_ids)
            theirs = bfl_step(twin, x)()
            assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
            errors[case] = ((theirs - ours).abs().max() / ours.abs().max()).item()
    return {"rel_err": errors, "bfl": str(twin.bfl.path), "torch": torch.__version__, "python": sys.executable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bfl", required=True, help="BFL's code staged by stage_bfl.sh (or a checkout)")
    args = parser.parse_args()
    try:
        load_bfl(args.bfl)
    except ImportError as error:  # a package BFL's code imports (einops) is missing in this environment
        print(json.dumps({"import_error": f"{type(error).__name__}: {error}", "missing": error.name}))
        sys.exit(3)
    print(json.dumps(self_check(args.bfl)))


if __name__ == "__main__":
    main()
