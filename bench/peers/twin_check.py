"""What the bench's reference twins (comfyui_native.py, bfl_native.py) share: their CPU self-check against our
model, its command line, and regional compilation of a twin's blocks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository


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


def random_case(seed: int = 0, config=None) -> tuple[object, dict[str, dict]]:
    """A random float32 model on the CPU (`config`, default the tiny one) and its inputs with and without a
    context image: (model, {"edit": x, "t2i": x}), x as the bench's step functions take it."""
    from kontext_core import KontextTransformer, TransformerConfig
    from kontext_core.model.tokens import context_tokens, pack_latent, position_ids, text_position_ids

    torch.manual_seed(seed)
    config = config or TransformerConfig.tiny()
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
    generator = torch.Generator().manual_seed(seed)
    batch, (th, tw), (ch, cw) = 2, (6, 10), (8, 6)  # a non-square target and a context of another size
    x = {"img": pack_latent(torch.randn(batch, 16, th, tw, generator=generator)),
         "img_ids": position_ids(th, tw, batch=batch),
         "txt": torch.randn(batch, 7, config.context_in_dim, generator=generator),
         "txt_ids": text_position_ids(batch, 7), "t": torch.rand(batch, generator=generator),
         "y": torch.randn(batch, config.vec_in_dim, generator=generator),
         "g": 1.0 + 3.0 * torch.rand(batch, generator=generator)}
    ctx, ctx_ids = context_tokens([torch.randn(batch, 16, ch, cw, generator=generator)], (th, tw), "kontext")
    return model, {"edit": {**x, "ctx": ctx, "ctx_ids": ctx_ids}, "t2i": {**x, "ctx": None, "ctx_ids": None}}


def compare_with_ours(make_twin: Callable, step: Callable, seed: int = 0,
                      reference: Callable | None = None) -> tuple[object, dict[str, float]]:
    """A tiny float32 model on the CPU, its twin `make_twin(model)`, and `step(twin, x)()` against our velocity
    with and without a context image: (twin, {"edit": rel. error, "t2i": rel. error}), max|diff| / max|ours|.
    `reference(model)`: the model of ours to compare with instead (e.g. ours loaded from the file the twin
    read), given the random one."""
    model, cases = random_case(seed)
    twin = make_twin(model)
    ours_model = reference(model) if reference is not None else model
    errors = {}
    with torch.no_grad():
        for case, x in cases.items():
            ours = ours_model.velocity(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"],
                                       x["ctx"], x["ctx_ids"])
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
