"""Command line: argument parsing only; the work is done by the package's public functions.

    python -m kontext_core edit photo.png --prompt "make it night" -o night.png --models ~/ComfyUI/models
    python -m kontext_core edit photo.png --turns prompts.txt -o session/ --models ...
    python -m kontext_core edit photo.png --mask region.png --feather 8 --prompt "a red car" -o out.png --models ...
    python -m kontext_core t2i --prompt "a red fox" -o fox.png --models ...
    python -m kontext_core inspect flux1-kontext-dev.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .attention import ATTENTION_BACKENDS, get_attention_backend, set_attention_backend
from .checkpoints import CheckpointError, inspect_model, load_autoencoder, load_transformer
from .files_out import write_json_atomic, write_png_atomic
from .image import FIT_MODES, RESIZE_MODES
from .masks import DEFAULT_CONTEXT_MARGIN
from .model_files import ModelFiles, ModelFilesNotFound, find_model_files
from .presets import PRESETS
from .sampling import SAMPLER_MODES, StepInfo
from .step_cache import CACHE_MODES, DEFAULT_THRESHOLDS, OFF, StepCache
from .tokens import PLACEMENTS, context_tokens, pack_latent, position_ids, text_position_ids


# Core messages name the option that fixes a problem as Python callers pass it, in backticks; here the flag.
FLAGS_FOR_ARGUMENTS = {
    "`allow_download=True`": "--download",
    "`t5_path`": "--t5",
    "`clip_path`": "--clip",
    "`t5_tokenizer`": "--t5-tokenizer",
    "`clip_tokenizer`": "--clip-tokenizer",
}


def in_flags(message: str) -> str:
    """A core error message with the command line's flags in place of the Python arguments it names."""
    for argument, flag in FLAGS_FOR_ARGUMENTS.items():
        message = message.replace(argument, flag)
    return message


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


def _files(args: argparse.Namespace) -> ModelFiles:
    explicit = {"transformer": args.transformer, "autoencoder": args.ae, "t5": args.t5, "clip": args.clip}
    if all(explicit.values()):
        return ModelFiles(Path(args.transformer), Path(args.ae), Path(args.t5), Path(args.clip),
                          args.t5_tokenizer, args.clip_tokenizer)
    found = find_model_files(*args.models, allow_download=args.download)
    for name, value in explicit.items():
        if value:
            setattr(found, name, Path(value))
    found.t5_tokenizer = args.t5_tokenizer or found.t5_tokenizer
    found.clip_tokenizer = args.clip_tokenizer or found.clip_tokenizer
    return found


def _settings(args: argparse.Namespace):
    from .pipeline import GenerationSettings

    return GenerationSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, denoise=args.denoise,
                              sampler=args.sampler, true_cfg=args.true_cfg, negative_prompt=args.negative,
                              placement=args.placement, cache=_step_cache(args))


def _step_cache(args: argparse.Namespace) -> StepCache | None:
    if args.cache == OFF:
        if args.cache_threshold is not None:
            raise SystemExit("error: --cache-threshold needs a cache: add --cache first-block or --cache teacache")
        return None
    try:
        return StepCache(args.cache, args.cache_threshold)
    except ValueError as exc:
        raise SystemExit(f"error: --cache-threshold {args.cache_threshold}: {exc}")


def _report_cache(stats, label: str = "") -> None:
    if stats is not None:  # on stderr: stdout lists the written files
        print(f"step cache{label}: {stats}", file=sys.stderr)


def _progress(total_label: str):
    from tqdm import tqdm

    bar = tqdm(desc=total_label, unit="step", leave=False)

    def on_step(info: StepInfo) -> None:
        bar.total = info.total
        bar.update(1)
        if info.step + 1 == info.total:
            bar.close()

    return on_step


def _lora_spec(spec: str) -> tuple[str, float]:
    """PATH[:STRENGTH] -> (path, strength); a path may itself hold colons (only a number after the last one
    is read as the strength)."""
    path, colon, strength = spec.rpartition(":")
    if colon:
        try:
            value = float(strength)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value):
            raise SystemExit(f"error: --lora {spec}: the strength must be a finite number (e.g. 0.8)")
        return path, value
    return spec, 1.0


def _pipeline(args: argparse.Namespace):
    from .build import load_pipeline

    files = _files(args)
    # Merged, except into 8-bit weights (they would round most of a delta away): on the fly there, with the
    # memory that takes counted in the plan.
    # --preset fills in what the flags left at their defaults (kontext_core.presets); the attention backend
    # was set by main() from --attention, which the preset may then change.
    pipeline = load_pipeline(files, dtype=args.dtype, device=args.device, allow_download=args.download,
                             memory=args.memory, ae_tiling=args.ae_tiling, cuda_graphs=args.cuda_graphs,
                             loras=[_lora_spec(spec) for spec in args.lora], preset=args.preset)
    if args.compile and not pipeline.transformer.blocks_compiled:
        pipeline.transformer.compile_blocks()
    return pipeline, files


def _metadata(prompt: str, settings, files: ModelFiles, extra: dict | None = None) -> dict[str, str]:
    record = {"prompt": prompt, **asdict(settings), "transformer": files.transformer.name,
              "autoencoder": files.autoencoder.name, **(extra or {})}
    return {"parameters": json.dumps(record)}


def _open_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        except FileNotFoundError:
            raise SystemExit(f"error: input image not found: {path}")
        except (UnidentifiedImageError, OSError) as exc:
            raise SystemExit(f"error: {path} is not a readable image ({exc}); use a PNG, JPEG or WebP file")
    return images


def _mask_options(args: argparse.Namespace) -> dict:
    """The masked-edit options, checked before any model is loaded."""
    if args.mask is None:
        given = [name for name, value in (("--grow", args.grow), ("--feather", args.feather),
                                          ("--crop-to-mask", args.crop_to_mask)) if value]
        if given:
            raise SystemExit(f"error: {', '.join(given)} shape a mask: give --mask MASK.png (white = edit)")
        return {}
    if args.width or args.height:
        raise SystemExit("error: a masked edit keeps the input's size: drop --width/--height")
    if args.fit != "stretch":
        raise SystemExit("error: a masked edit maps its result back onto the whole input: drop --fit crop "
                         "(--crop-to-mask edits just the region)")
    if args.turns and args.crop_to_mask:
        raise SystemExit("error: --crop-to-mask works on single edits (--prompt), not on --turns")
    for name in ("grow", "feather", "context_margin"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} is a number of pixels, 0 or more")
    options = dict(mask=_open_images([args.mask])[0], grow=args.grow, feather=args.feather)
    if not args.turns:
        options.update(crop_to_mask=args.crop_to_mask, context_margin=args.context_margin)
    return options


def _edit(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.turns):
        raise SystemExit("error: give either --prompt (one edit) or --turns FILE (one prompt per line)")
    images = _open_images(args.images)
    masking = _mask_options(args)
    size = (args.width, args.height) if args.width and args.height else None
    settings = _settings(args)  # bad generation options fail before minutes of loading
    pipeline, files = _pipeline(args)
    output = Path(args.output)
    recorded = {key: (args.mask if key == "mask" else value) for key, value in masking.items()}
    if args.turns:
        prompts = [line.strip() for line in Path(args.turns).read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"error: {args.turns} holds no prompts (one per line)")
        session = pipeline.session(images[0], resize=args.resize, settings=settings)
        extra = [pipeline.encode_image(i, args.resize, None, args.fit) for i in images[1:]]
        output.mkdir(parents=True, exist_ok=True)
        for number, prompt in enumerate(prompts, start=1):
            turn = session.edit(prompt, seed=settings.seed + number - 1, extra_references=extra,
                                callback=_progress(f"turn {number}/{len(prompts)}"), **masking)
            _report_cache(turn.cache_stats, f", turn {number}")
            write_png_atomic(session.image(turn.index), output / f"turn_{number:02d}.png",
                             _metadata(prompt, turn.settings, files, recorded))
            write_json_atomic({"turns": session.history(), "current": session.current}, output / "session.json")
            print(output / f"turn_{number:02d}.png")
        return 0
    result = pipeline.edit(images, args.prompt, settings=settings, size=size, resize=args.resize, fit=args.fit,
                           batch_size=args.batch, callback=_progress("edit"), **masking)
    _report_cache(result.cache_stats)
    for path, image in zip(_outputs(output, len(result.images)), result.images):
        write_png_atomic(image, path, _metadata(args.prompt, result.settings, files, recorded))
        print(path)
    return 0


def _outputs(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i:02d}{output.suffix or '.png'}") for i in range(count)]


def _t2i(args: argparse.Namespace) -> int:
    settings = replace(_settings(args), placement="kontext")
    pipeline, files = _pipeline(args)
    result = pipeline.text_to_image(args.prompt, width=args.width or 1024, height=args.height or 1024,
                                    settings=settings, batch_size=args.batch, callback=_progress("t2i"))
    _report_cache(result.cache_stats)
    for path, image in zip(_outputs(Path(args.output), len(result.images)), result.images):
        write_png_atomic(image, path, _metadata(args.prompt, result.settings, files))
        print(path)
    return 0


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("model files")
    models.add_argument("--models", action="append", default=[],
                        help="folder to search: flat, a ComfyUI install or models/ folder, or a diffusers repo")
    models.add_argument("--transformer", help="the transformer file or folder (overrides the search)")
    models.add_argument("--ae", help="the autoencoder file (ae.safetensors)")
    models.add_argument("--t5", help="T5-XXL file (t5xxl_fp16.safetensors) or diffusers text_encoder_2/")
    models.add_argument("--clip", help="CLIP-L file (clip_l.safetensors) or diffusers text_encoder/")
    models.add_argument("--t5-tokenizer", help="folder (or Hugging Face repo id) of the T5 tokenizer (default: one "
                                               "beside the weights, else the HF cache's, else the one kontext ships)")
    models.add_argument("--clip-tokenizer", help="folder (or Hugging Face repo id) of the CLIP tokenizer (found as "
                                                 "the T5 one)")
    models.add_argument("--download", action="store_true",
                        help="download missing model files (and a tokenizer named by repo id) from the "
                             "Hugging Face hub")
    models.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]", help="apply a LoRA")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--guidance", type=float, default=2.5, help="distilled guidance (Kontext [dev]: 2.5)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--denoise", type=float, default=1.0, help="below 1 starts from the noised input image")
    gen.add_argument("--sampler", choices=SAMPLER_MODES, default="dev")
    gen.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale (with --sampler true_cfg)")
    gen.add_argument("--negative", default="", help="negative prompt (with --sampler true_cfg)")
    gen.add_argument("--placement", choices=PLACEMENTS, default="kontext",
                     help="how reference images are placed; stitch / stitch_down join them into one context image "
                          "side by side / one below the other")
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--cache", choices=(OFF, *CACHE_MODES), default=OFF,
                     help="skip the blocks on steps whose input barely changed (approximate; compare with an "
                          "uncached run on your weights): first-block (First-Block Cache) or teacache")
    gen.add_argument("--cache-threshold", type=float, default=None,
                     help="how much change still reuses the cache (0: every step computed, exactly as uncached; "
                          f"default {', '.join(f'{m} {t}' for m, t in DEFAULT_THRESHOLDS.items())}; teacache never "
                          "skips below 0.18)")
    run = parser.add_argument_group("runtime")
    run.add_argument("--preset", choices=tuple(PRESETS),
                     help="fast: int8 GEMMs + 8-bit attention + compiled blocks + CUDA graphs (faster steps, a few "
                          "percent of velocity error vs bf16: bench/RESULTS.md); exact: as by default. The flags "
                          "below override the preset's parts; parts this machine cannot run fall back, said once")
    run.add_argument("--dtype", default=None,
                     help="transformer weights: bf16, fp16, fp32, fp8 or int8 (int8 GEMMs on Ampere and newer, "
                          "~3x less rounding than fp8; from a bf16 file) (default: what the memory plan picks)")
    run.add_argument("--memory", default="auto",
                     help="auto (from free VRAM), resident-bf16, resident-fp8, offload-bf16 or offload-fp8")
    run.add_argument("--ae-tiling", choices=("auto", "always", "never"), default="auto")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--compile", action="store_true",
                     help="compile each transformer block (faster steps after a minute of compilation)")
    run.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                     help="attention backend; cudnn-fp8 (Hopper, nvidia-cudnn-frontend) is faster with fp8 error; "
                          "sage8 (Ampere and newer, Triton) is our int8 / fp8 attention kernel, sage8-fp16 the same "
                          "with fp16 P.V (~1%% error per call)")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="replay each step from a CUDA graph (CUDA only; for steps the CPU cannot launch fast enough, "
                          "e.g. fp8 with fp8 attention)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontext", description="FLUX.1 Kontext on kontext_core")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="edit an image with an instruction (more images: extra references)")
    edit.add_argument("images", nargs="+")
    edit.add_argument("--prompt")
    edit.add_argument("--turns", help="a text file with one prompt per line, applied turn after turn")
    edit.add_argument("-o", "--output", required=True, help="output PNG (a folder with --turns)")
    edit.add_argument("--resize", choices=RESIZE_MODES[:2], default="preferred",
                      help="preferred: nearest Kontext training resolution; keep: the input size, snapped to 16")
    edit.add_argument("--fit", choices=FIT_MODES, default="stretch")
    masked = edit.add_argument_group("masked edits")
    masked.add_argument("--mask", metavar="MASK.png",
                        help="edit only where this image is white (gray: partly); elsewhere the output is the input, "
                             "pixel for pixel, at the input's size. Another size than the image is resized")
    masked.add_argument("--grow", type=int, default=0, help="pixels to grow the mask by")
    masked.add_argument("--feather", type=int, default=0,
                        help="pixels over which the edit fades in, inside the mask's border")
    masked.add_argument("--crop-to-mask", action="store_true",
                        help="edit only the mask's box plus --context-margin, at Kontext's size for it (small "
                             "regions get full detail), and paste it back")
    masked.add_argument("--context-margin", type=int, default=DEFAULT_CONTEXT_MARGIN,
                        help=f"pixels of surroundings around the mask's box with --crop-to-mask "
                             f"(default {DEFAULT_CONTEXT_MARGIN})")
    _add_generation_options(edit)
    edit.set_defaults(handler=_edit)

    t2i = commands.add_parser("t2i", help="generate an image from text")
    t2i.add_argument("--prompt", required=True)
    t2i.add_argument("-o", "--output", required=True)
    _add_generation_options(t2i)
    t2i.set_defaults(handler=_t2i)

    inspect = commands.add_parser("inspect", help="say what a model file or folder is; --run evaluates it once")
    inspect.add_argument("path")
    inspect.add_argument("--run", action="store_true", help="load the model and evaluate it once on random inputs")
    inspect.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32, fp8 or int8 (transformer only)")
    inspect.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    inspect.set_defaults(handler=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cuda_graphs", False) and torch.device(args.device).type != "cuda":
        print(f"error: --cuda-graphs needs a CUDA device, not {args.device}; drop it to run there", file=sys.stderr)
        return 2
    backend_before = get_attention_backend()
    try:
        set_attention_backend(getattr(args, "attention", backend_before))
    except RuntimeError as exc:  # a backend this machine cannot run: the message says why and what to do
        print(f"error: --attention {args.attention}: {exc}", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (CheckpointError, ModelFilesNotFound) as exc:
        print(f"error: {in_flags(str(exc))}", file=sys.stderr)
        return 2
    finally:
        set_attention_backend(backend_before)  # main() is also called in-process (tests, scripts)


if __name__ == "__main__":
    sys.exit(main())
