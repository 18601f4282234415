"""What the bench's reference twins (comfyui_native.py, bfl_native.py) share: their CPU self-check against our
model, its command line, and regional compilation of a twin's blocks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def assign_weights(twin: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load `state` into a twin built on the meta device, by assignment (no copy); raise on a missing or unexpected
    key, or on any tensor the state left on the meta device."""
    twin.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    on_meta = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise RuntimeError(f"{name} tensors left without weights: {on_meta[:5]}")


def compile_each_block(twin) -> None:
    """Regional compilation like ours: each double/single block compiled (fullgraph=False)."""
    for block in (*twin.double_blocks, *twin.single_blocks):
        block.compile()


def compare_with_ours(make_twin: Callable, step: Callable, seed: int = 0) -> tuple[object, dict[str, float]]:
    """A tiny float32 model on the CPU, its twin `make_twin(model)`, and `step(twin, x)()` against our velocity
    with and without a context image: (twin, {"edit": rel. error, "t2i": rel. error}), max|diff| / max|ours|."""
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
    twin = make_twin(model)
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
            theirs = step(twin, x)()
            assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
            errors[case] = ((theirs - ours).abs().max() / ours.abs().max()).item()
    return twin, errors


def self_check_main(description: str, option: str, option_help: str, load: Callable, self_check: Callable) -> None:
    """`python3 <twin>.py --<option> PATH`: the self-check's result as one JSON line; exit status 3 with the
    missing package named when the reference code cannot be imported in this environment."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{option}", required=True, help=option_help)
    path = getattr(parser.parse_args(), option)
    try:
        load(path)
    except ImportError as error:
        print(json.dumps({"import_error": f"{type(error).__name__}: {error}", "missing": error.name}))
        sys.exit(3)
    print(json.dumps(self_check(path)))
