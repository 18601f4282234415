"""One edit step split over N GPUs (kontext_core/compute/sequence_parallel.py) against the same step on one, in one run.

    torchrun --nproc-per-node 4 bench/pipeline/sequence_parallel_bench.py --e2e --out bench-out/   # a 4-GPU machine
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun ...                   # as the device's KINDS.md asks
    torchrun --nproc-per-node 2 bench/pipeline/sequence_parallel_bench.py --tiny          # CPU, gloo: that it runs

Every process builds the same full-size random bf16 model (bench_step.random_transformer, seeded) and the edit
workload's inputs (8704 tokens: 512 text, a 64x64 target, a 64x64 context). First rank 0 alone times the
plain step while the others wait; then all N time the split step. Printed by rank 0: ms per step both ways,
the speed-up, the split velocity's relative L2 error against the single-GPU one (bf16: expect the order of
bf16's own rounding, ~0.5%), the peak memory of each GPU, and with --e2e a whole 28-step 1024x1024 edit with
the AE both ways. --compile compiles the blocks first (both runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: bench_step, random_weights

from kontext_core import KontextTransformer, TransformerConfig  # noqa: E402
from kontext_core.compute.sequence_parallel import SequenceParallel  # noqa: E402


def tiny_setup(rank_device: str):
    """The tiny model and an edit's inputs on the CPU, identical on every rank (seeded)."""
    from kontext_core import context_tokens, pack_latent, position_ids, text_position_ids

    torch.manual_seed(0)
    model = KontextTransformer(TransformerConfig.tiny()).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    ctx, ctx_ids = context_tokens([randn(1, 16, 12, 10)], (12, 10), "kontext")
    x = {"img": pack_latent(randn(1, 16, 12, 10)), "img_ids": position_ids(12, 10), "txt": randn(1, 9, 48),
         "txt_ids": text_position_ids(1, 9), "t": torch.tensor([0.5]), "y": randn(1, 32),
         "g": torch.tensor([2.5]), "ctx": ctx, "ctx_ids": ctx_ids}
    return model, x


def timed(fn, device: str, iterations: int) -> float:
    """Median ms of one call (CUDA events on GPUs; the wall clock on the CPU)."""
    if device == "cuda":
        from bench_step import cuda_time

        return 1e3 * cuda_time(fn, warmup=2, iterations=iterations)
    fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPUs over gloo")
    parser.add_argument("--compile", action="store_true", help="compile the blocks (both runs)")
    parser.add_argument("--e2e", action="store_true", help="also a whole 28-step 1024x1024 edit with the AE")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out", type=Path, help="a folder for sequence_parallel.json (rank 0)")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("gloo" if args.tiny else "nccl")
    measure(args, device)
    dist.barrier()
    # What the measurement made is freed first (it returned): destroying the group while tensors of its
    # collectives lived sometimes aborted the process on exit under gloo (torch 2.13: 2 runs in 10).
    gc.collect()
    dist.destroy_process_group()


def measure(args: argparse.Namespace, device: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.tiny:
        model, x = tiny_setup(device)
    else:
        from bench_step import WORKLOADS, inputs, random_transformer

        model, x = random_transformer(TransformerConfig()), inputs(TransformerConfig(), WORKLOADS["edit"])
    if args.compile:
        model.compile_blocks()

    def step():
        with torch.no_grad():
            return model.velocity(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"],
                                  x["ctx"], x["ctx_ids"])

    record = {"world": world, "device": torch.cuda.get_device_name() if device == "cuda" else "CPU (gloo)",
              "torch": torch.__version__, "tokens": x["img"].shape[1] + x["ctx"].shape[1] + x["txt"].shape[1],
              "compiled": args.compile}
    single = None
    if rank == 0:
        single = step()
        record["single_ms"] = timed(step, device, args.iterations)
        if args.e2e and device == "cuda":
            from bench_step import end_to_end

            record["single_e2e_s"] = end_to_end(model)[0]
    dist.barrier()

    model.sequence_parallel = SequenceParallel()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    split = step()
    record["split_ms"] = timed(step, device, args.iterations)
    if args.e2e and device == "cuda":
        from bench_step import end_to_end

        record["split_e2e_s"] = end_to_end(model)[0]
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0],
                        device=split.device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        record["split_vs_single_rel_l2"] = ((split.double() - single.double()).norm() / single.double().norm()).item()
        record["speedup"] = record["single_ms"] / record["split_ms"]
        record["peak_gib_per_gpu"] = [round(p.item(), 2) for p in peaks]
        print(json.dumps(record, indent=2), flush=True)
        print(f"| {world} x {record['device']} | {record['single_ms']:.1f} | {record['split_ms']:.1f} | "
              f"{record['speedup']:.2f}x | {record['split_vs_single_rel_l2']:.2e} | "
              f"{max(record['peak_gib_per_gpu']):.1f} GiB |"
              + (f" {record['single_e2e_s']:.2f} s -> {record['split_e2e_s']:.2f} s |" if "split_e2e_s" in record
                 else ""), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "sequence_parallel.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
