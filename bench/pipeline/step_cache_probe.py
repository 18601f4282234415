"""Step caching on a 28-step edit: what a full step costs with the cache's decision in it, what a skipped step
costs, and how many steps each threshold skips (kontext_core/step_cache.py).

    python3 bench/pipeline/step_cache_probe.py                 # CUDA: full-size random weights in bf16, 1024x1024 edit
    python3 bench/pipeline/step_cache_probe.py --compile       # the same with compiled blocks (a minute more)
    python3 bench/pipeline/step_cache_probe.py --tiny          # the tests' tiny model on the CPU: that it runs

One uncached run, then one run per mode and threshold, all on the same weights and inputs. Every step is
timed on its own (a synchronisation after each, in every run alike). The threshold-0 rows compute every step,
so their full steps against the uncached run's are the decision's overhead.

On random weights the skip ratios and the differences from the uncached run say little: a real model's
activations change from step to step in their own way. Judge quality on real weights and images (compare
`kontext edit ... --cache first-block` against the same command without it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from kontext_core import KontextTransformer, TransformerConfig  # noqa: E402
from kontext_core.sampling import TextConditioning, flux_schedule, sample_euler  # noqa: E402
from kontext_core.step_cache import CacheStats, StepCache  # noqa: E402
from kontext_core.model.tokens import context_tokens, pack_latent, position_ids  # noqa: E402
from random_weights import randomize_  # noqa: E402

# TeaCache's polynomial is at least 0.18 a step, so its thresholds start above that (TeaCache4FLUX: 0.25-0.8).
THRESHOLDS = {"first-block": [0.0, 0.05, 0.1, 0.2, 0.3], "teacache": [0.0, 0.25, 0.4, 0.6, 0.8]}


def random_model(config: TransformerConfig, device: str, dtype: torch.dtype) -> KontextTransformer:
    """Weights ~ N(0, 1/fan_in), norm scales 1, biases ~ N(0, 0.02^2): activations of the real model's order."""
    with torch.device("meta"):
        model = KontextTransformer(config)
    model = model.to_empty(device=device).to(dtype)
    randomize_(model, torch.Generator(device=device).manual_seed(0))
    return model.eval().requires_grad_(False)


def edit_inputs(config: TransformerConfig, side: int, text_tokens: int, device: str) -> dict:
    """A target of side x side latent pixels, one context image of the same size, random text embeddings."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    ctx, ctx_ids = context_tokens([randn(1, config.latent_channels, side, side)], (side, side), "kontext")
    return {"x": pack_latent(randn(1, config.latent_channels, side, side)),
            "x_ids": position_ids(side, side, device=device),
            "cond": TextConditioning(randn(1, text_tokens, config.context_in_dim), randn(1, config.vec_in_dim)),
            "context": ctx, "context_ids": ctx_ids, "tokens": (side // 2) ** 2}


def timed_run(model, data: dict, steps: int, cache: StepCache | None) -> dict:
    """One sampling run; seconds of each step, the steps skipped and the final tokens."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    stamps, stats = [], CacheStats()

    def on_step(_info) -> None:
        sync()
        stamps.append(time.perf_counter())

    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = sample_euler(model, data["x"], data["x_ids"], data["cond"], flux_schedule(steps, data["tokens"]),
                           guidance=2.5, context=data["context"], context_ids=data["context_ids"], callback=on_step,
                           step_cache=cache, cache_stats=stats)
    seconds = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return {"seconds": seconds, "skipped": set(stats.skipped_steps), "measures": list(stats.measures.values()),
            "out": out.float()}


def mean_ms(values: list[float]) -> float | None:
    return 1000 * statistics.mean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model on the CPU (float32)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--compile", action="store_true", help="compile the blocks first (CUDA)")
    for mode, values in THRESHOLDS.items():
        parser.add_argument(f"--{mode}", type=float, nargs="*", default=values, metavar="T",
                            help=f"thresholds for {mode} (default {' '.join(map(str, values))})")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()

    if args.tiny:
        config, device, dtype, side, text = TransformerConfig.tiny(), "cpu", torch.float32, 16, 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full-size probe needs a CUDA GPU; run with --tiny to check it on the CPU")
        config, device, dtype, side, text = TransformerConfig(), "cuda", torch.bfloat16, 128, 512
    model = random_model(config, device, dtype)
    if args.compile:
        model.compile_blocks()
    data = edit_inputs(config, side, text, device)
    label = "tiny model, CPU" if args.tiny else f"{torch.cuda.get_device_name()}, bf16"
    print(f"step cache probe: {label}, {args.steps}-step edit, {2 * data['tokens']} image tokens + {text} text"
          f"{', compiled blocks' if args.compile else ''}; random weights: skip ratios say little about quality")

    timed_run(model, data, 2, None)  # warm-up: compilation, cuDNN plans, allocations
    plain = timed_run(model, data, args.steps, None)
    plain_ms = mean_ms(plain["seconds"])
    rows = [{"mode": "off", "threshold": None, "computed": args.steps, "skipped": 0, "full_ms": plain_ms,
             "skipped_ms": None, "total_s": sum(plain["seconds"]), "rel_diff": 0.0}]
    for mode in THRESHOLDS:
        for threshold in getattr(args, mode.replace("-", "_")):
            run = timed_run(model, data, args.steps, StepCache(mode, threshold))
            full = [s for step, s in enumerate(run["seconds"]) if step not in run["skipped"]]
            skipped = [s for step, s in enumerate(run["seconds"]) if step in run["skipped"]]
            difference = ((run["out"] - plain["out"]).norm() / plain["out"].norm()).item()
            rows.append({"mode": mode, "threshold": threshold, "computed": len(full), "skipped": len(skipped),
                         "full_ms": mean_ms(full), "skipped_ms": mean_ms(skipped), "total_s": sum(run["seconds"]),
                         "rel_diff": difference, "measures": run["measures"]})

    def cell(value, form):
        return "-" if value is None else format(value, form)

    print(f"\n{'mode':<12}{'thresh':>7}{'full':>6}{'skip':>6}{'skip%':>7}{'ms/full':>9}{'ms/skip':>9}{'total s':>9}"
          f"{'speedup':>9}{'rel.diff':>10}")
    for row in rows:
        print(f"{row['mode']:<12}{cell(row['threshold'], 'g'):>7}{row['computed']:>6}{row['skipped']:>6}"
              f"{100 * row['skipped'] / args.steps:>6.0f}%{cell(row['full_ms'], '.1f'):>9}"
              f"{cell(row['skipped_ms'], '.1f'):>9}{row['total_s']:>9.2f}{rows[0]['total_s'] / row['total_s']:>8.2f}x"
              f"{row['rel_diff']:>10.4f}")
    for row in rows:
        if row["threshold"] == 0.0 and row["measures"]:  # every step computed: each judged step's own measure
            overhead = row["full_ms"] - plain_ms
            measures = row["measures"]
            print(f"{row['mode']}: decision overhead {overhead:+.2f} ms per full step "
                  f"({100 * overhead / plain_ms:+.1f}%); measure per step min {min(measures):.3f}, median "
                  f"{statistics.median(measures):.3f}, max {max(measures):.3f} (a step under the threshold skips)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": label, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
