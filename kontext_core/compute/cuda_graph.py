"""Replaying a whole transformer step as one CUDA graph.

A step makes ~1,500 kernel launches; a captured graph replays them all at once, so the CPU's share of a
step drops to about a millisecond. Where the CPU issues the launches slower than the GPU runs them
(a slow CPU, or the fp8 step with fp8 attention before the host-side work in kontext_kernels/ and ops.py) that
is the step's time; on the H100 of bench/RESULTS.md the host is now ahead, and graphs save 2-4 ms a
step.

Inputs are copied into static buffers, so every step of a sampling run (new latent, new timestep)
replays one graph; a new shape, a moved or replaced weight (or on-the-fly LoRA factors) captures a new
one. Steps that differ in what they run, not in their inputs (sage8's frozen statistics recorded on some steps and
reused on the others: kontext_core/compute/attention.py), each have a graph, the graphs sharing one memory pool. A
model with forward hooks (block offload) is never captured: hooks run Python that a replay would skip.
The model is checked once per sampling run (`prepare`), not per step: host time per step is what
the graph is for.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .attention import get_attention_backend, statistics_mode
from .fused import hooked, lora_factors


# One graph per model, shared by the pipelines built around it (the nodes build one per queue run).
_shared: "weakref.WeakKeyDictionary[nn.Module, GraphedVelocity]" = weakref.WeakKeyDictionary()


class GraphedVelocity:
    """`model.velocity` with the same arguments, replayed from a CUDA graph.

    Call `prepare()` before each sampling run: it says whether the model can be replayed at all (no
    hooks) and forgets a graph whose weights moved. Steps then only compare their inputs' shapes.
    """

    @classmethod
    def of(cls, model: nn.Module) -> "GraphedVelocity":
        """The graph replaying `model`, made on first use and kept as long as the model lives."""
        graphed = _shared.get(model)
        if graphed is None:
            graphed = _shared[model] = cls(model)
        return graphed

    @staticmethod
    def release(model: nn.Module) -> None:
        """Forget `model`'s graph and the memory it holds."""
        _shared.pop(model, None)

    def __init__(self, model: nn.Module, warmup: int = 2):
        # Weakly: `_shared`'s value must not keep its own key (the model, its weights, the graph's memory) alive.
        self._model = weakref.ref(model)
        self.warmup = warmup
        self.captures = 0
        self.reset()

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model this CUDA graph replayed has been freed")
        return model

    def reset(self) -> None:
        """Forget the captured graphs and their memory."""
        self._weights = None
        self._graphs: dict[tuple, tuple] = {}  # signature -> (graph, static inputs, output)
        self._pool = None

    def _weight_addresses(self) -> tuple:
        # LoRA factors with their shapes: freed factors' memory may be reused by new ones of another rank.
        factors = tuple((tensor.data_ptr(), tuple(tensor.shape)) for module in self.model.modules()
                        if (factors := lora_factors(module)) is not None for tensor in factors if tensor is not None)
        return tuple(p.data_ptr() for p in self.model.parameters()) + factors

    def prepare(self) -> str | None:
        """None when steps can be replayed now, else why not (the plain model then runs)."""
        if hooked(self.model):
            self.reset()
            return "forward hooks (block offload) run Python a replay would skip"
        if getattr(self.model, "sequence_parallel", None) is not None:
            self.reset()
            return "the step is split over processes, and capturing its collectives has not been tried on GPUs yet"
        if self._weights is not None and self._weights != self._weight_addresses():
            self.reset()  # the graph reads weights by address: replaced or moved ones need a new capture
        return None

    @staticmethod
    def _signature_of(args) -> tuple:
        # The attention backend and the statistics mode are read when the step is captured: another one needs
        # another graph.
        return (get_attention_backend(), statistics_mode()) + tuple(
            (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("const", a) for a in args)

    def _differs_in_mode_only(self, signature: tuple) -> bool:
        # Graphs kept side by side differ only in the statistics mode; another backend or input shape starts over.
        return all(kept[0] == signature[0] and kept[2:] == signature[2:] for kept in self._graphs)

    def _capture(self, args, signature: tuple) -> None:
        if not self._differs_in_mode_only(signature):
            self.reset()  # moved weights are `prepare`'s to find, once a run
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):  # compilation, cuDNN plans and allocations happen outside the graph
                self.model.velocity(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # One pool for every graph of this model: they replay one at a time, and each output is copied out at once.
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.model.velocity(*inputs)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[signature] = (graph, inputs, output)
        self._weights = self._weight_addresses()
        self.captures += 1

    def __call__(self, *args) -> torch.Tensor:
        if torch.is_grad_enabled() or not all(a.is_cuda for a in args if isinstance(a, torch.Tensor)):
            return self.model.velocity(*args)
        signature = self._signature_of(args)
        if signature not in self._graphs:
            self._capture(args, signature)
        else:
            for static, value in zip(self._graphs[signature][1], args):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
        graph, _, output = self._graphs[signature]
        graph.replay()
        return output.clone()
