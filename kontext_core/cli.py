"""Command line: argument parsing only; the work is done by the package's public functions.

    python -m kontext_core edit photo.png --prompt "make it night" -o night.png --models ~/ComfyUI/models
    python -m kontext_core edit photo.png --turns prompts.txt -o session/ --models ...
    python -m kontext_core edit photo.png --mask region.png --feather 8 --prompt "a red car" -o out.png --models ...
    python -m kontext_core t2i --prompt "a red fox" -o fox.png --models ...
    python -m kontext_core inspect flux1-kontext-dev.safetensors
    python -m kontext_core eval compare before.png after.png --mask mask.png
    python -m kontext_core eval drift photo.png --turns 8 --report drift/ --models ...
    torchrun --nproc-per-node 4 -m kontext_core edit photo.png --prompt "..." -o out.png --models ...  # 4 GPUs
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

from .compute.attention import ATTENTION_BACKENDS, get_attention_backend, set_attention_backend
from .checkpoints import CheckpointError, inspect_model, load_autoencoder, load_transformer
from .files_out import write_json_atomic, write_png_atomic
from .image import FIT_MODES, RESIZE_MODES, STITCH_DIRECTIONS
from .launch import Launch, from_environment, process_device, process_group
from .masks import DEFAULT_CONTEXT_MARGIN
from .checkpoints.model_files import ModelFiles, ModelFilesNotFound, find_model_files
from .presets import PRESETS
from .sampling import SAMPLER_MODES, StepInfo
from .step_cache import CACHE_MODES, DEFAULT_THRESHOLDS, OFF, StepCache
from .model.tokens import PLACEMENTS, context_tokens, pack_latent, position_ids, text_position_ids


# Core messages name the option that fixes a problem as Python callers pass it, in backticks; here the flag.
FLAGS_FOR_ARGUMENTS = {
    "`allow_download=True`": "--download",
    "`t5_path`": "--t5",
    "`clip_path`": "--clip",
    "`t5_tokenizer`": "--t5-tokenizer",
    "`clip_tokenizer`": "--clip-tokenizer",
    "`download_dataset(folder)`": "--download",
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
                              placement=args.placement, stitch_direction=_stitch_direction(args),
                              cache=_step_cache(args))


def _stitch_direction(args: argparse.Namespace) -> str:
    """--stitch-direction, which only the stitch placement reads: beside another placement it would be silently
    ignored, so it is refused (before any model loads) instead."""
    if args.stitch_direction is None:
        return STITCH_DIRECTIONS[0]
    if args.placement != "stitch":
        raise SystemExit(f"error: --stitch-direction only applies to --placement stitch (the placement is "
                         f"{args.placement}): add --placement stitch or drop --stitch-direction")
    return args.stitch_direction


def _step_cache(args: argparse.Namespace) -> StepCache | None:
    if args.cache == OFF:
        if args.cache_threshold is not None:
            raise SystemExit("error: --cache-threshold needs a cache: add --cache first-block or --cache teacache")
        return None
    try:
        return StepCache(args.cache, args.cache_threshold)
    except ValueError as exc:
        raise SystemExit(f"error: --cache-threshold {args.cache_threshold}: {exc}")


def _writes(args: argparse.Namespace) -> bool:
    """Whether this process writes files and reports: the only one, or rank 0 of a torchrun launch."""
    return getattr(args, "launch", Launch()).writes


def _report_cache(stats, label: str = "") -> None:
    if stats is not None:  # on stderr: stdout lists the written files
        print(f"step cache{label}: {stats}", file=sys.stderr)


def _progress(total_label: str, shown: bool = True, steps: int | None = None):
    """A step progress bar; given `steps`, it shows them from the start (encoding the inputs comes first and can
    take a while on a CPU), else from the first step on."""
    from tqdm import tqdm

    bar = tqdm(desc=total_label, total=steps, unit="step", leave=False, disable=not shown)

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


def _steps_between(text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 (every step) or a number of steps, e.g. 7")
    return steps


def _pipeline(args: argparse.Namespace, log=print):
    from .build import load_pipeline

    files = _files(args)
    # Merged, except into 8-bit weights (they would round most of a delta away): on the fly there, with the
    # memory that takes counted in the plan.
    # --preset fills in what the flags left at their defaults (kontext_core.presets); the attention backend
    # was set by main() from --attention, which the preset may then change.
    pipeline = load_pipeline(files, dtype=args.dtype, device=args.device, allow_download=args.download,
                             memory=args.memory, ae_tiling=args.ae_tiling, cuda_graphs=args.cuda_graphs,
                             compile=args.compile,
                             loras=[_lora_spec(spec) for spec in args.lora], preset=args.preset, log=log,
                             attention_refresh=args.attention_refresh,
                             process_group="world" if getattr(args, "launch", Launch()).parallel else None)
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
    prompts = _prompt_lines(args.turns) if args.turns else []
    pipeline, files = _pipeline(args)
    output = Path(args.output)
    recorded = {key: (args.mask if key == "mask" else value) for key, value in masking.items()}
    if args.turns:
        session = pipeline.session(images[0], resize=args.resize, settings=settings)
        extra = [pipeline.encode_image(i, args.resize, None, args.fit) for i in images[1:]]
        if _writes(args):
            output.mkdir(parents=True, exist_ok=True)
        for number, prompt in enumerate(prompts, start=1):
            turn = session.edit(prompt, seed=settings.seed + number - 1, extra_references=extra,
                                callback=_progress(f"turn {number}/{len(prompts)}", _writes(args), settings.steps),
                                **masking)
            if not _writes(args):
                continue
            _report_cache(turn.cache_stats, f", turn {number}")
            write_png_atomic(session.image(turn.index), output / f"turn_{number:02d}.png",
                             _metadata(prompt, turn.settings, files, recorded))
            write_json_atomic({"turns": session.history(), "current": session.current}, output / "session.json")
            print(output / f"turn_{number:02d}.png")
        return 0
    result = pipeline.edit(images, args.prompt, settings=settings, size=size, resize=args.resize, fit=args.fit,
                           batch_size=args.batch, callback=_progress("edit", _writes(args), settings.steps), **masking)
    if not _writes(args):
        return 0
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
                                    settings=settings, batch_size=args.batch,
                                    callback=_progress("t2i", _writes(args), settings.steps))
    if not _writes(args):
        return 0
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
                     help="how reference images are placed; stitch joins them into one context image (see "
                          "--stitch-direction)")
    gen.add_argument("--stitch-direction", choices=STITCH_DIRECTIONS, default=None,
                     help="only with --placement stitch (refused with another placement): join the images side by "
                          "side, the others resized to the first's height (right, the default), or one below the "
                          "other, resized to its width (down)")
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
                     help="fast: int8 GEMMs + 8-bit attention + compiled blocks + CUDA graphs + modulation computed "
                          "ahead of the steps + a compiled AE with its attention on fused kernels (faster steps, a few "
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
    run.add_argument("--attention-refresh", type=_steps_between, default=None, metavar="N",
                     help="with sage8 attention: record its K mean and V amax every N steps and reuse them between "
                          "(faster; approximate: compare with 0 on your weights, `kontext eval presets "
                          "--presets fast+refresh=0,fast`); 0: every step (default: the preset's, fast 7; else 0)")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="replay each step from a CUDA graph (CUDA only; for steps the CPU cannot launch fast enough, "
                          "e.g. fp8 with fp8 attention)")


# --- kontext eval: the work is in kontext_core.evaluation ----------------------------------------------

def _log(line: str) -> None:
    print(line, file=sys.stderr)  # stdout is kept for the command's result (JSON, the files written)


def _prompt_lines(path: str) -> list[str]:
    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise SystemExit(f"error: prompts file not found: {path}")
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts (one per line)")
    return prompts


def _run_record(args: argparse.Namespace, files: ModelFiles) -> dict:
    """What a report records beside the generation settings: the model files and how they were run. The
    attention backend is the one in effect after the run (a preset or a fallback may have changed the one
    asked for); `attention_asked` keeps the option."""
    from .compute.attention import get_attention_backend

    return {"transformer": files.transformer.name, "autoencoder": files.autoencoder.name,
            "t5": files.t5.name if files.t5 else None, "clip": files.clip.name if files.clip else None,
            "loras": args.lora, "dtype": args.dtype, "runtime_preset": args.preset, "memory": args.memory,
            "device": args.device, "attention": get_attention_backend(), "attention_asked": args.attention,
            "compile": args.compile, "cuda_graphs": args.cuda_graphs, "resize": args.resize, "fit": args.fit}


def _preset_specs(args: argparse.Namespace):
    from .evaluation import parse_presets

    try:
        return parse_presets(args.presets)
    except ValueError as exc:
        raise SystemExit(f"error: --presets {args.presets}: {exc}")


def _preset_loader(args: argparse.Namespace, files: ModelFiles):
    from .evaluation import pipeline_loader

    return pipeline_loader(files, dtype=args.dtype, preset=args.preset, compile=args.compile, device=args.device,
                           allow_download=args.download, memory=args.memory, ae_tiling=args.ae_tiling,
                           cuda_graphs=args.cuda_graphs, loras=[_lora_spec(spec) for spec in args.lora], log=_log,
                           attention_refresh=args.attention_refresh)


def _eval_compare(args: argparse.Namespace) -> int:
    from .evaluation import compare_images

    reference, other = _open_images([args.reference, args.other])
    mask = _open_images([args.mask])[0] if args.mask else None
    try:
        result = compare_images(reference, other, mask)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    print(json.dumps(result))
    return 0


def _eval_drift(args: argparse.Namespace) -> int:
    from .evaluation import run_drift, write_drift_report

    if args.turns < 1:
        raise SystemExit(f"error: --turns {args.turns}: a drift run needs at least 1 turn")
    image = _open_images([args.image])[0]
    prompts = _prompt_lines(args.prompts) if args.prompts else None
    settings = _settings(args)
    pipeline, files = _pipeline(args, log=_log)
    run = run_drift(pipeline, image, args.turns, prompts, settings=settings, resize=args.resize, fit=args.fit,
                    callback=lambda chain, turn: _progress(f"{chain}, turn {turn}/{args.turns}"))
    written = write_drift_report(run, args.report, _run_record(args, files))
    for name in ("metrics", "plot", "report"):
        if name in written:
            print(written[name])
    return 0


def _unique_names(paths: list[str]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _eval_presets(args: argparse.Namespace) -> int:
    from .evaluation import cases_for, run_presets, write_presets_report

    specs = _preset_specs(args)
    images = dict(zip(_unique_names(args.images), _open_images(args.images)))
    settings = _settings(args)
    files = _files(args)
    record = run_presets(_preset_loader(args, files), specs, cases_for(images, args.prompt), args.report,
                         settings=settings, resize=args.resize, fit=args.fit, lpips_device=args.device,
                         callback=lambda spec, case: _progress(f"{spec.name}: {case.stem}"))
    for note in record["notes"]:
        _log(note)
    written = write_presets_report(record, args.report, _run_record(args, files))
    for name in ("metrics", "plot", "report"):
        if name in written:
            print(written[name])
    return 0


def _eval_bench(args: argparse.Namespace) -> int:
    from .evaluation import download_dataset, read_entries, run_bench, select

    specs = _preset_specs(args)
    if args.download:
        _log(f"fetching black-forest-labs/kontext-bench into {args.dataset} (files already there are kept)")
        try:
            download_dataset(args.dataset)
        except Exception as exc:  # offline, no access, disk full: the hub client's own words, then what to do
            raise SystemExit(f"error: could not fetch black-forest-labs/kontext-bench ({type(exc).__name__}: {exc}); "
                             f"check the connection, or put the dataset in {args.dataset} another way and drop "
                             "--download")
    try:
        entries = select(read_entries(args.dataset), args.category, args.limit)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {in_flags(str(exc))}")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    settings = _settings(args)
    files = _files(args)
    identity = {"transformer": files.transformer.name, "autoencoder": files.autoencoder.name, "loras": args.lora}
    result = run_bench(_preset_loader(args, files), specs, entries, args.out, settings=settings, resize=args.resize,
                       fit=args.fit, identity=identity, lpips_device=args.device, log=_log,
                       callback=lambda spec, entry: _progress(f"{spec.name}: {entry.key}"))
    _log(f"{len(entries)} pairs x {len(specs)} presets: {result['made']} outputs made, {result['kept']} already "
         f"there, {result['failed']} images unreadable")
    out = Path(args.out)
    print(out / "records.jsonl")
    print(out / "summary.json")
    return 0 if result["failed"] == 0 else 1


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize", choices=RESIZE_MODES[:2], default="preferred",
                        help="preferred: nearest Kontext training resolution; keep: the input size, snapped to 16")
    parser.add_argument("--fit", choices=FIT_MODES, default="stretch")


def _add_eval_commands(commands) -> None:
    evaluate = commands.add_parser("eval", help="judge edits and settings: compare images, drift over turns, "
                                                "presets side by side, KontextBench")
    tasks = evaluate.add_subparsers(dest="eval_command", required=True)

    compare = tasks.add_parser(
        "compare", help="print one JSON object: shift_px, scale, delta_e, ssim, psnr, sharpness_ratio of OTHER "
                        "against REF",
        description="psnr is null when the images are identical in 8 bits (infinite; JSON has no infinity). "
                    "With --mask (white: the part allowed to change) everything is measured where the mask is "
                    "black; shift and scale take the mask as a window, zero on it with a smooth edge.")
    compare.add_argument("reference", metavar="REF")
    compare.add_argument("other", metavar="OTHER")
    compare.add_argument("--mask", help="image of the same size: white where the edit may change the image")
    compare.set_defaults(handler=_eval_compare)

    drift = tasks.add_parser(
        "drift", help="run an N-turn session two ways (latent chaining, AE round trip per turn) and measure every "
                      "turn against the start; writes metrics.json, report.html and a plot into --report")
    drift.add_argument("image")
    drift.add_argument("--turns", type=int, required=True, help="number of edit turns")
    drift.add_argument("--prompts", help="text file, one prompt per turn (repeated when shorter); default: an "
                                         "instruction to change nothing")
    drift.add_argument("--report", required=True, help="folder for the report")
    _add_image_options(drift)
    _add_generation_options(drift)
    drift.set_defaults(handler=_eval_drift)

    presets = tasks.add_parser(
        "presets", help="the same edits under several presets, each measured against the first preset's "
                        "(PSNR, SSIM, ΔE, LPIPS when installed) and timed",
        description="--presets: comma-separated; each a dtype (bf16, fp16, fp32, fp8, int8), a runtime preset "
                    "(exact, fast), a step cache (cache=T for First-Block Cache at T, cache=first-block:T, "
                    "cache=teacache:T), or such parts joined by '+' (fp8+cache=0.1). One model is loaded per "
                    "preset, in turn.")
    presets.add_argument("images", nargs="+")
    presets.add_argument("--prompt", action="append", required=True, help="an edit instruction (repeatable)")
    presets.add_argument("--presets", required=True, help="e.g. bf16,int8,fp8,fast,cache=0.1 (the first is the "
                                                          "reference)")
    presets.add_argument("--report", required=True, help="folder for the outputs and the report")
    _add_image_options(presets)
    _add_generation_options(presets)
    presets.set_defaults(handler=_eval_presets)

    bench = tasks.add_parser(
        "bench", help="KontextBench (black-forest-labs/kontext-bench): every pair under every preset, outputs "
                      "per category, records.jsonl; resumable",
        description="DATASET_DIR holds the dataset as published (test/metadata.jsonl, test/images/); --download "
                    "fetches it there through huggingface-hub (and allows model downloads, as for edit). A rerun "
                    "keeps every output recorded with the same settings and makes the rest. Exit status 1 when "
                    "some images could not be read (recorded in records.jsonl, retried by the next run).")
    bench.add_argument("dataset", metavar="DATASET_DIR")
    bench.add_argument("--category", action="append", default=[],
                       help="only this category (repeatable): its name as in the dataset, or a word of it "
                            "(local, global, text, style, character)")
    bench.add_argument("--limit", type=int, help="at most N pairs per category (the first ones)")
    bench.add_argument("--presets", required=True, help="as for eval presets; the first is the reference")
    bench.add_argument("--out", required=True, help="output folder")
    _add_image_options(bench)
    _add_generation_options(bench)
    bench.set_defaults(handler=_eval_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontext", description="FLUX.1 Kontext on kontext_core")
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="edit an image with an instruction (more images: extra references)")
    edit.add_argument("images", nargs="+")
    edit.add_argument("--prompt")
    edit.add_argument("--turns", help="a text file with one prompt per line, applied turn after turn")
    edit.add_argument("-o", "--output", required=True, help="output PNG (a folder with --turns)")
    _add_image_options(edit)
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

    _add_eval_commands(commands)
    return parser


def _launch(args: argparse.Namespace) -> Launch:
    """One process, or torchrun's several (each step split over them): checked before any model is loaded."""
    launch = from_environment()
    if not launch.parallel:
        return launch
    if args.handler not in (_edit, _t2i):
        raise SystemExit("error: only edit and t2i run split over processes; run this command without torchrun")
    args.device = process_device(launch, args.device)
    return launch


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
        args.launch = _launch(args)
        with process_group(args.launch, getattr(args, "device", "cpu")):
            return args.handler(args)
    except (CheckpointError, ModelFilesNotFound) as exc:
        print(f"error: {in_flags(str(exc))}", file=sys.stderr)
        return 2
    finally:
        set_attention_backend(backend_before)  # main() is also called in-process (tests, scripts)


if __name__ == "__main__":
    sys.exit(main())
