"""One step split over processes (kontext_core/compute/sequence_parallel.py): two gloo processes on the CPU against one.

The velocity must equal the single-process one up to float32 summation order (each process attends over the
keys in another order); the CLI under torchrun must write the single-process PNG within one level per pixel,
from rank 0 only. Token counts are chosen so that both the text and the image stream need padding.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import randomize_, reordering_tolerance, rel_l2, tiny_edit_args
from kontext_core import KontextTransformer, TransformerConfig
from kontext_core.compute.sequence_parallel import SequenceParallel, TokenChunks, para_attn_unavailable_reason

pytestmark = pytest.mark.skipif(para_attn_unavailable_reason() is not None or not torch.distributed.is_available(),
                                reason=f"needs torch.distributed and para-attn ({para_attn_unavailable_reason()})")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("length, world", [(7, 2), (75, 2), (8, 4), (5, 8), (4096, 3)])
def test_chunks_hold_every_token_once_in_order(length, world):
    chunks = TokenChunks(length, world)
    x = torch.arange(length).reshape(1, length, 1)
    parts = [chunks.take(x, rank) for rank in range(world)]
    assert all(part.shape[1] == chunks.chunk for part in parts)
    real = torch.cat([part[:, :chunks.real(rank)] for rank, part in enumerate(parts)], dim=1)
    assert torch.equal(real, x)
    assert sum(chunks.real(rank) for rank in range(world)) == length


def test_heads_that_the_processes_do_not_divide_are_refused_with_the_counts_that_work():
    parallel = object.__new__(SequenceParallel)
    parallel.world, parallel.rank = 5, 0
    with pytest.raises(ValueError, match=r"5 does not divide 24: run on 2, 3, 4, 6, 8, 12, 24 processes"):
        parallel.check_heads(24)


def test_without_an_initialised_group_the_error_says_how_to_start_one():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group first, or launch the CLI with torchrun"):
        SequenceParallel()


def _in_group(rank: int, world: int, store_file: str, work, *args) -> None:
    """`work(*args)` in a gloo group of `world` processes; what it made is freed before the group is destroyed
    (destroying it while tensors of its collectives live sometimes aborted the process on exit, torch 2.13)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        work(rank, *args)
    finally:
        gc.collect()
        torch.distributed.destroy_process_group()


def _velocity_worker(rank: int, world: int, store_file: str, inputs_file: str, out_file: str,
                     compiled: bool) -> None:
    _in_group(rank, world, store_file, _split_velocity, inputs_file, out_file, compiled)


def _split_velocity(rank: int, inputs_file: str, out_file: str, compiled: bool) -> None:
    model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=1).eval()
    model.sequence_parallel = SequenceParallel()
    if compiled:  # the all-to-alls traced into each block's graph (fullgraph: no break around them)
        model.compile_blocks()
    args = torch.load(inputs_file)
    with torch.no_grad():
        velocity = model.velocity(*args[:7], context=args[7], context_ids=args[8])
        if compiled:  # a second step reuses the graphs: each forward's new token layout is no recompile
            from torch._dynamo.utils import counters

            graphs = counters["stats"]["unique_graphs"]
            model.velocity(*args[:7], context=args[7], context_ids=args[8])
            assert counters["stats"]["unique_graphs"] == graphs, "the second split step recompiled"
    torch.save(velocity, f"{out_file}.{rank}")


@pytest.mark.parametrize("batch, compiled", [(1, False), (2, False), (1, True)])
def test_two_gloo_processes_give_the_single_process_velocity(tmp_path, batch, compiled):
    # 7 text tokens and 60 + 15 image tokens: both streams' chunks padded over 2 processes.
    args = tiny_edit_args(batch, torch.float32, "cpu")
    torch.save(args, tmp_path / "inputs.pt")
    model = randomize_(KontextTransformer(TransformerConfig.tiny()), seed=1).eval()
    with torch.no_grad():
        reference = model.velocity(*args[:7], context=args[7], context_ids=args[8])

    torch.multiprocessing.spawn(_velocity_worker, nprocs=2, join=True,
                                args=(2, str(tmp_path / "store"), str(tmp_path / "inputs.pt"), str(tmp_path / "v"),
                                      compiled))
    results = [torch.load(tmp_path / f"v.{rank}") for rank in range(2)]
    assert torch.equal(results[0], results[1])  # every process ends with the same velocity
    # Only summation order differs: the longest sums are the MLP's (4x hidden = 512 terms), 8 of them chained
    # through the 2 + 2 blocks' attention and MLPs.
    torch.testing.assert_close(results[0], reference, **reordering_tolerance(reference, terms=512, chained=8))
    assert rel_l2(results[0], reference) < 1e-5


def _cached_edit_worker(rank: int, world: int, store_file: str, spec: str, out_file: str) -> None:
    _in_group(rank, world, store_file, _split_cached_edit, spec, out_file)


def _split_cached_edit(rank: int, spec: str, out_file: str) -> None:
    from tiny_pipeline import edit, make_pipeline

    pipeline = make_pipeline()
    pipeline.transformer.sequence_parallel = SequenceParallel()
    result = edit(pipeline, spec)
    torch.save((result.latents, result.cache_stats), f"{out_file}.{rank}")


@pytest.mark.parametrize("mode", ["first-block", "teacache"])
def test_step_caching_split_takes_the_single_process_decisions(tmp_path, mode):
    """Each process measures the change on its own tokens; the sums are added over the group, so every
    process skips the same steps as one process would, and the result matches."""
    from tiny_pipeline import edit, make_pipeline

    # A threshold between two of the uncached run's measures, so that some steps skip and none sits on it.
    measures = sorted(edit(make_pipeline(), f"{mode}:0").cache_stats.measures.values())
    middle = len(measures) // 2
    spec = f"{mode}:{(measures[middle - 1] + measures[middle]) / 2}"
    single = edit(make_pipeline(), spec)
    assert single.cache_stats.skipped > 0

    torch.multiprocessing.spawn(_cached_edit_worker, nprocs=2, join=True,
                                args=(2, str(tmp_path / "store"), spec, str(tmp_path / "r")))
    results = [torch.load(tmp_path / f"r.{rank}", weights_only=False) for rank in range(2)]
    for latents, stats in results:
        assert stats.skipped_steps == single.cache_stats.skipped_steps
        assert stats.measures.keys() == single.cache_stats.measures.keys()
        for step, measure in stats.measures.items():
            assert measure == pytest.approx(single.cache_stats.measures[step], rel=1e-5)
        assert rel_l2(latents, single.latents) < 1e-5  # float32: summation order only
    assert torch.equal(results[0][0], results[1][0])


@pytest.fixture
def cli_models(models_tree):
    """conftest's tiny models folder with a random photo in place of its flat one (a flat photo would hide a rank
    that misplaces its rows): the edit's arguments."""
    from PIL import Image

    tmp_path, image, common = models_tree
    Image.fromarray(torch.randint(0, 256, (24, 40, 3), dtype=torch.uint8).numpy()).save(image)
    return ["edit", str(image), "--prompt", "make it a snowy night", *common, "--resize", "keep", "--seed", "5"]


def _run(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


def _variant(arguments: list[str], variant: str, tmp_path: Path) -> list[str]:
    from PIL import Image

    if variant == "masked, cached":
        mask = torch.zeros(24, 40, dtype=torch.uint8)
        mask[4:20, 8:30] = 255
        Image.fromarray(mask.numpy()).save(tmp_path / "mask.png")
        return [*arguments, "--mask", str(tmp_path / "mask.png"), "--feather", "2", "--cache", "first-block",
                "--steps", "4"]
    if variant == "t2i":  # no context tokens: the target alone is split
        without_image = [a for a in arguments[2:] if a not in ("--resize", "keep")]
        return ["t2i", *without_image, "--width", "48", "--height", "32"]
    return arguments


@pytest.mark.parametrize("variant", ["edit", "masked, cached", "t2i"])
def test_torchrun_writes_the_single_process_png_from_rank_0_only(cli_models, tmp_path, variant):
    from PIL import Image

    arguments = _variant(cli_models, variant, tmp_path)
    single = _run([sys.executable, "-m", "kontext_core", *arguments, "-o", str(tmp_path / "one.png")], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    split = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                  "-m", "kontext_core", *arguments, "-o", str(split_dir / "two.png")], tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    assert sorted(p.name for p in split_dir.iterdir()) == ["two.png"]  # one file, no leftovers of a second writer
    # Printed once, by rank 0: the memory plan and the file written, as one process prints them.
    assert split.stdout.strip().splitlines() == single.stdout.strip().replace("one.png", "split/two.png").splitlines()
    cache_lines = [[line for line in run.stderr.splitlines() if line.startswith("step cache")]
                   for run in (single, split)]
    assert cache_lines[0] == cache_lines[1] and len(cache_lines[0]) == (variant == "masked, cached")

    with Image.open(tmp_path / "one.png") as one, Image.open(split_dir / "two.png") as two:
        assert one.size == two.size
        difference = (torch.tensor(list(one.getdata()), dtype=torch.int16)
                      - torch.tensor(list(two.getdata()), dtype=torch.int16)).abs()
        assert difference.max().item() <= 1, f"{difference.max().item()} levels apart"
        assert json.loads(two.text["parameters"])["prompt"] == "make it a snowy night"


def test_other_commands_are_refused_under_torchrun(tmp_path, monkeypatch):
    from kontext_core.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="only edit and t2i run split over processes"):
        main(["inspect", str(tmp_path / "missing.safetensors")])


def test_the_benchmark_runs_split_on_two_cpu_processes(tmp_path):
    """bench/pipeline/sequence_parallel_bench.py as the multi-GPU machines will run it, on its tiny CPU setting."""
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "bench/pipeline/sequence_parallel_bench.py", "--tiny", "--iterations", "1", "--out", str(tmp_path)],
                tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "sequence_parallel.json").read_text())
    assert record["world"] == 2 and record["split_ms"] > 0 and record["single_ms"] > 0
    assert record["split_vs_single_rel_l2"] < 1e-5  # float32 on the CPU: summation order only


def test_launch_reads_torchrun_and_gives_each_process_its_own_gpu():
    from kontext_core.launch import Launch, from_environment, process_device

    launch = from_environment({"WORLD_SIZE": "4", "RANK": "6", "LOCAL_RANK": "2"})
    assert launch == Launch(4, 6, 2) and launch.parallel and not launch.writes
    assert from_environment({}) == Launch(1, 0, 0) and Launch().writes
    assert process_device(Launch(), "cuda:3") == "cuda:3"  # one process: the device as given
    assert process_device(launch, "cpu") == "cpu"
    with pytest.raises(SystemExit, match="names one GPU, but torchrun started 4 processes"):
        process_device(launch, "cuda:1")
    with pytest.raises(SystemExit, match="must be integers"):
        from_environment({"WORLD_SIZE": "two"})
