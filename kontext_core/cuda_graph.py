"""Replaying a whole transformer step as one CUDA graph.

A step launches a few thousand kernels; on an H100 the CPU needs ~20 ms more to launch them than the
GPU needs to run them at 1024x1024 (measured with bench/bench_step.py --profile). A captured graph
replays them with one launch. Inputs are copied into static buffers, so any step of a sampling run
(new latent, new timestep) replays the same graph; a new shape captures a new one.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphedVelocity:
    def __init__(self, velocity: Callable[..., torch.Tensor], warmup: int = 2):
        self.velocity = velocity
        self.warmup = warmup
        self._signature = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list = []
        self._output: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the captured graph (the model's weights or hooks changed)."""
        self._signature = self._graph = self._output = None
        self._inputs = []

    @staticmethod
    def _describe(args) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("const", a)
                     for a in args)

    def _capture(self, args) -> None:
        self._inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):  # compilation, cuDNN plans and allocations happen outside the graph
                self.velocity(*self._inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._output = self.velocity(*self._inputs)

    def __call__(self, *args) -> torch.Tensor:
        signature = self._describe(args)
        if signature != self._signature:
            self._capture(args)
            self._signature = signature
        else:
            for static, value in zip(self._inputs, args):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
        self._graph.replay()
        return self._output.clone()
