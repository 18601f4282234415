"""Memory plans on a CUDA GPU: step time, peak VRAM and output error of each plan under VRAM caps.

    python3 bench/bench_memory.py [--caps 12 16 24] [--iterations 5] [--prefetch 2] [--ae] [--out DIR]

One transformer step of a 1024x1024 edit with a 1024x1024 context (8704 tokens), random full-size weights
(bench_step.random_transformer). Baselines run uncapped: resident bf16 and resident fp8. Then, for each cap
(GiB, through torch.cuda.set_per_process_memory_fraction), each plan is sized by kontext_core.placement.memory
(resident-bf16, resident-fp8, offload-bf16, offload-fp8; "auto" marks the one choose_plan picks) and run;
a plan that cannot fit under the cap is skipped with the reason. Errors are max|out - ref| / max|ref|
against the resident plan of the same storage and against resident bf16. --ae adds the AE: untiled and
tiled 1024x1024 decode/encode (random weights), time, peak and the tiled output's error.

Targets (the issue): 12 GiB cap at most 1.6x the resident bf16 step; 24 GiB cap with fp8 storage at most
1.15x resident fp8; every plan's output equal to its resident plan's within dtype tolerance.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import WORKLOADS, inputs, ours_step, random_transformer  # noqa: E402
from random_weights import random_autoencoder  # noqa: E402
from kontext_core import TransformerConfig  # noqa: E402
from kontext_core.placement.memory import EDIT_TOKENS, GIB, PLAN_NAMES, choose_plan  # noqa: E402
from kontext_core.placement.offload import BlockOffloader  # noqa: E402
from kontext_core.compute.quant import quantize_model  # noqa: E402


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def step_time(fn, warmup: int, iterations: int) -> float:
    """Median seconds per call; the wall clock around a synchronize, so copy-stream waits count."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def h2d_bandwidth(gib: float = 1.0) -> float:
    """GB/s of a pinned host-to-device copy."""
    host = torch.empty(int(gib * GIB), dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    seconds = step_time(lambda: device.copy_(host, non_blocking=True), 1, 5)
    return gib * GIB / seconds / 1e9


def cap(gib: float | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total))


def clean() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def run_plan(model, plan, x, warmup, iterations) -> dict:
    """Place `model` (on the CPU) as `plan` says, time a step, and put it back on the CPU."""
    offloader = None
    torch.cuda.reset_peak_memory_stats()
    if plan.offload:
        offloader = BlockOffloader(model, "cuda", prefetch=plan.prefetch, resident=plan.resident_blocks)
    else:
        model.to("cuda")
    fn = ours_step(model, x)
    try:
        with torch.no_grad():
            out = fn().float().cpu()  # the first step also fills the cached blocks
            first = offloader.bytes_copied if offloader is not None else 0
            seconds = step_time(fn, warmup, iterations)
        copied = (offloader.bytes_copied - first) / (warmup + iterations) if offloader is not None else 0
        return {"ms": seconds * 1e3, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                "reserved_gib": torch.cuda.max_memory_reserved() / GIB, "out": out,
                "copied_gib_per_step": copied / GIB}
    finally:
        if offloader is not None:
            offloader.detach()
        model.to("cpu")
        del fn
        clean()


def bench_transformer(args, record) -> None:
    config = TransformerConfig()
    x = inputs(config, WORKLOADS["edit"])
    tokens = x["img"].shape[1] + x["ctx"].shape[1] + WORKLOADS["edit"]["text"]
    assert tokens == EDIT_TOKENS
    models = {"bf16": random_transformer(config)}
    references, baselines = {}, {}
    for storage in ("bf16", "fp8"):
        if storage == "fp8":
            models["fp8"] = quantize_model(random_transformer(config))  # same seed: the same weights, in e4m3
        model = models[storage]
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            references[storage] = ours_step(model, x)().float().cpu()
            seconds = step_time(ours_step(model, x), args.warmup, args.iterations)
        baselines[storage] = seconds
        row = {"cap_gib": None, "plan": f"resident-{storage}", "ms": seconds * 1e3,
               "peak_gib": torch.cuda.max_memory_allocated() / GIB, "rel_err_vs_resident_same_storage": 0.0,
               "rel_err_vs_resident_bf16": rel_error(references[storage], references["bf16"]), "baseline": True}
        record["results"].append(row)
        print(f"uncapped  resident-{storage:5s} {row['ms']:8.1f} ms  peak {row['peak_gib']:5.1f} GiB  "
              f"vs bf16 {row['rel_err_vs_resident_bf16']:.2e}", flush=True)
        model.to("cpu")
        clean()

    for cap_gib in args.caps:
        auto = choose_plan(cap_gib * GIB, config, tokens, text_encoder_bytes=0, prefetch=args.prefetch)
        for name in PLAN_NAMES:
            storage = name.split("-")[1]
            row = {"cap_gib": cap_gib, "plan": name, "auto": name == auto.name}
            try:
                plan = choose_plan(cap_gib * GIB, config, tokens, name=name, text_encoder_bytes=0,
                                   prefetch=args.prefetch, strict=True)
            except MemoryError as reason:
                row["skipped"] = str(reason)
                record["results"].append(row)
                print(f"cap {cap_gib:4.0f}  {name:14s} skipped: {row['skipped']}", flush=True)
                continue
            cap(cap_gib)
            try:
                result = run_plan(models[storage], plan, x, args.warmup, args.iterations)
            except torch.cuda.OutOfMemoryError as error:
                row["failed"] = (f"out of memory under the cap (expected peak {plan.expected_peak_gib:.1f} GiB): "
                                 f"{error}")[:300]
                record["results"].append(row)
                print(f"cap {cap_gib:4.0f}  {name:14s} FAILED: {row['failed']}", flush=True)
                clean()
                continue
            finally:
                cap(None)
            out = result.pop("out")
            row.update(result)
            row.update(expected_peak_gib=plan.expected_peak_gib, resident_blocks=len(plan.resident_blocks),
                       streamed_gib_per_step=plan.streamed_bytes / GIB, prefetch=plan.prefetch,
                       describe=plan.describe(),
                       x_resident_bf16=result["ms"] / 1e3 / baselines["bf16"],
                       x_resident_same_storage=result["ms"] / 1e3 / baselines[storage],
                       rel_err_vs_resident_same_storage=rel_error(out, references[storage]),
                       rel_err_vs_resident_bf16=rel_error(out, references["bf16"]))
            record["results"].append(row)
            marker = "*" if row["auto"] else " "
            print(f"cap {cap_gib:4.0f} {marker}{name:14s} {row['ms']:8.1f} ms  {row['x_resident_bf16']:4.2f}x bf16  "
                  f"{row['x_resident_same_storage']:4.2f}x resident-{storage}  peak {row['peak_gib']:5.1f} GiB "
                  f"(expected {row['expected_peak_gib']:4.1f})  cached {row['resident_blocks']:2d}/57  "
                  f"streamed {row['copied_gib_per_step']:4.1f} GiB/step  err vs resident-{storage} "
                  f"{row['rel_err_vs_resident_same_storage']:.1e}, vs bf16 {row['rel_err_vs_resident_bf16']:.1e}",
                  flush=True)
    del models
    clean()


def bench_autoencoder(args, record) -> None:
    from kontext_core.placement import tiling
    from kontext_core.placement.memory import ae_decode_bytes, ae_encode_bytes

    ae = random_autoencoder()
    generator = torch.Generator(device="cuda").manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 1024, device="cuda"), torch.linspace(-1, 1, 1024, device="cuda"),
                          indexing="ij")
    gradient = (0.9 * torch.stack([x, y, (x + y) / 2])[None]).to(torch.bfloat16)
    latent = torch.randn(1, 16, 128, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
    for label, full, tiled, source, estimate in (
            ("decode", ae.decode, lambda s: tiling.decode_tiled(ae, s), latent, ae_decode_bytes(ae.config, 1024, 1024)),
            ("encode", ae.encode, lambda s: tiling.encode_tiled(ae, s), gradient,
             ae_encode_bytes(ae.config, 1024, 1024))):
        rows = {}
        for kind, fn in (("full", full), ("tiled", tiled)):
            clean()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                out = fn(source)
                seconds = step_time(lambda: fn(source), 1, 3)
            rows[kind] = (out.float(), seconds, (torch.cuda.max_memory_allocated() - base) / GIB)
        error = rel_error(rows["tiled"][0], rows["full"][0])
        # The same in fp32: what tiling itself changes, apart from bf16's rounding (which a random,
        # untrained network can amplify), and bf16's own distance from fp32 as the yardstick.
        ae.float()
        with torch.no_grad():
            full32 = full(source.float()).float()  # `full` and `tiled` are bound to `ae`, now in fp32
            tiled32 = tiled(source.float()).float()
        ae.to(torch.bfloat16)
        row = {"ae": label, "full_ms": rows["full"][1] * 1e3, "tiled_ms": rows["tiled"][1] * 1e3,
               "full_peak_gib": rows["full"][2], "tiled_peak_gib": rows["tiled"][2],
               "estimated_full_gib": estimate / GIB, "tiled_rel_err": error,
               "bf16_vs_fp32_rel_err": rel_error(rows["full"][0], full32),
               "tiled_fp32_rel_err": rel_error(tiled32, full32)}
        record["autoencoder"].append(row)
        print(f"AE {label} 1024x1024 bf16: full {row['full_ms']:.0f} ms peak {row['full_peak_gib']:.2f} GiB "
              f"(estimated {row['estimated_full_gib']:.2f}); tiled 64/16 {row['tiled_ms']:.0f} ms peak "
              f"{row['tiled_peak_gib']:.2f} GiB; tiled vs full {error:.2e}; bf16 full vs fp32 full "
              f"{row['bf16_vs_fp32_rel_err']:.2e}; in fp32, tiled vs full {row['tiled_fp32_rel_err']:.2e} "
              "(random weights)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--caps", nargs="+", type=float, default=[12, 16, 24], help="VRAM caps in GiB")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--ae", action="store_true", help="also time untiled vs tiled AE decode/encode")
    parser.add_argument("--ae-only", action="store_true", help="only the AE rows (no transformer plans)")
    parser.add_argument("--out", default=None, help="folder for memory.json")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    bandwidth = h2d_bandwidth()
    record = {"gpu": gpu, "torch": torch.__version__, "h2d_pinned_gbps": bandwidth, "results": [], "autoencoder": []}
    print(f"{gpu}, torch {torch.__version__}: pinned host-to-device {bandwidth:.1f} GB/s", flush=True)
    if not args.ae_only:
        bench_transformer(args, record)
    if args.ae or args.ae_only:
        bench_autoencoder(args, record)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "memory.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
