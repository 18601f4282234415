"""The CLI under torchrun: one process per GPU, each step split over them (kontext_core/compute/sequence_parallel.py).

    torchrun --nproc-per-node 4 -m kontext_core edit photo.png --prompt "..." -o out.png --models ~/ComfyUI/models

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. Every process runs the same command on the same inputs: each
loads the whole model onto its own GPU (LOCAL_RANK), computes its share of each step's tokens, and ends with
the same images. Rank 0 writes the files and prints; the others stay quiet except for their own errors.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the outputs and prints: rank 0, or the only process."""
        return self.rank == 0


def from_environment(environ: dict[str, str] | None = None) -> Launch:
    """The launch torchrun's variables describe (one process when they are absent)."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise SystemExit(f"error: WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them): {exc}")
    return Launch(world, rank, local_rank)


def process_device(launch: Launch, device: str) -> str:
    """This process's device: with several processes, --device cuda means each process's own GPU."""
    if not launch.parallel:
        return device
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None:
            raise SystemExit(f"error: --device {device} names one GPU, but torchrun started {launch.world} "
                             "processes, one per GPU: give --device cuda (each process takes GPU LOCAL_RANK)")
        if launch.local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: process {launch.rank} would use GPU {launch.local_rank}, but this machine "
                             f"shows {torch.cuda.device_count()}: start at most that many processes per node")
        torch.cuda.set_device(launch.local_rank)
        return f"cuda:{launch.local_rank}"
    if kind.type != "cpu":
        raise SystemExit(f"error: several processes run on CUDA GPUs (NCCL) or on the CPU (gloo), not on {device}")
    return device


@contextlib.contextmanager
def process_group(launch: Launch, device: str):
    """The default process group for the command's duration (NCCL for CUDA, gloo for the CPU); nothing with
    one process. Processes other than rank 0 print nothing to stdout and show no warnings meanwhile."""
    if not launch.parallel:
        yield
        return
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    quiet = contextlib.ExitStack()
    if not launch.writes:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
    try:
        with quiet:
            yield
    finally:
        # What the command built is gone by now; collected before the group goes, since destroying a gloo
        # group while tensors of its collectives live sometimes aborted the process on exit (torch 2.13).
        gc.collect()
        dist.destroy_process_group()
