"""Regional compilation (KontextTransformer.compile_blocks) on the CPU, traced with the "aot_eager" backend.

What is checked here is the bookkeeping, which needs no GPU: one compiled graph per block class shared by
all its instances, outputs equal to the eager model, a deep copy computing with its own weights, and
uncompile_blocks. (The speed and the GPU kernels inside compiled blocks: tests/test_fused_model.py.)
"""

from __future__ import annotations

import copy

import torch

from conftest import randomize_, rel_error, tiny_edit_args
from kontext_core import KontextTransformer, TransformerConfig


def _counting_backend():
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return backend, graphs


def test_one_graph_per_block_class_and_eager_equal_outputs():
    model = randomize_(KontextTransformer(TransformerConfig.tiny(depth=3, depth_single_blocks=4)), seed=2).eval()
    args = tiny_edit_args(1, torch.float32, "cpu")
    torch._dynamo.reset()
    backend, graphs = _counting_backend()
    with torch.no_grad():
        eager = model.velocity(*args)
        model.compile_blocks(backend=backend)
        assert model.blocks_compiled
        compiled = model.velocity(*args)
        again = model.velocity(*tiny_edit_args(1, torch.float32, "cpu"))  # fresh values, same shapes
    assert len(graphs) == 2  # one double-block graph, one single-block graph: no recompilation per instance
    assert rel_error(compiled, eager) < 1e-5 and again.shape == eager.shape

    twin = copy.deepcopy(model)  # the copy runs the shared compiled code on its own weights
    with torch.no_grad():
        for parameter in twin.single_blocks[0].parameters():
            parameter.mul_(1.5)
        changed = twin.velocity(*args)
        assert rel_error(model.velocity(*args), eager) < 1e-5
    assert rel_error(changed, eager) > 1e-3
    assert len(graphs) == 2

    model.uncompile_blocks()
    assert not model.blocks_compiled
    torch._dynamo.reset()
