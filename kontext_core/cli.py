"""Command line: argument parsing only; the work is done by the package's public functions."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .checkpoints import CheckpointError, inspect_model, load_autoencoder, load_transformer
from .tokens import context_tokens, pack_latent, position_ids, text_position_ids


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_model(args.path)
    print(json.dumps(report, indent=2))
    if not args.run:
        return 0
    if report.get("kind") == "autoencoder":
        ae = load_autoencoder(args.path, dtype=args.dtype, device=args.device)
        image = torch.rand(1, 3, 64, 64, device=args.device) * 2 - 1
        with torch.no_grad():
            latent = ae.encode(image.to(ae.dtype))
            decoded = ae.decode(latent)
        print(f"encode {list(image.shape)} -> {list(latent.shape)}, decode -> {list(decoded.shape)}")
        return 0
    model = load_transformer(args.path, dtype=args.dtype, device=args.device)
    config, device, dtype = model.config, model.device, model.dtype
    generator = torch.Generator().manual_seed(0)
    height = width = 8  # a 64x64 image's latent

    def noise(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    ctx, ctx_ids = context_tokens([noise(1, config.latent_channels, height, width)], (height, width), "kontext")
    with torch.no_grad():
        velocity = model.velocity(
            pack_latent(noise(1, config.latent_channels, height, width)), position_ids(height, width, device=device),
            noise(1, 16, config.context_in_dim), text_position_ids(1, 16, device=device),
            torch.tensor([1.0], device=device), noise(1, config.vec_in_dim),
            torch.tensor([2.5], device=device) if config.guidance_embed else None, ctx, ctx_ids,
        )
    finite = bool(torch.isfinite(velocity).all())
    print(f"one Kontext velocity evaluation: {list(velocity.shape)}, finite={finite}, "
          f"std={velocity.float().std().item():.4f}")
    return 0 if finite else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontext_core", description="FLUX.1 Kontext on kontext_core")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="say what a model file or folder is; --run evaluates it once")
    inspect.add_argument("path")
    inspect.add_argument("--run", action="store_true", help="load the model and evaluate it once on random inputs")
    inspect.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32 or fp8 (transformer only)")
    inspect.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    inspect.set_defaults(handler=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
