"""Regional compilation (KontextTransformer.compile_blocks) on the CPU, traced with the "aot_eager" backend.

What is checked here is the bookkeeping, which needs no GPU: one compiled graph per block class shared by
all its instances, outputs equal to the eager model, a deep copy computing with its own weights, and
uncompile_blocks. (The speed and the GPU kernels inside compiled blocks: tests/compute/test_fused_model.py.)
"""

from __future__ import annotations

import copy

import torch

from conftest import compiled_graphs, randomize_, rel_error, tiny_edit_args
from kontext_core import KontextTransformer, TransformerConfig


def test_one_graph_per_block_class_and_eager_equal_outputs():
    model = randomize_(KontextTransformer(TransformerConfig.tiny(depth=3, depth_single_blocks=4)), seed=2).eval()
    args, fresh = tiny_edit_args(1, torch.float32, "cpu"), tiny_edit_args(1, torch.float32, "cpu")
    torch._dynamo.reset()
    before = compiled_graphs()
    try:
        with torch.no_grad():
            eager, eager_fresh = model.velocity(*args), model.velocity(*fresh)
            model.compile_blocks(backend="aot_eager")
            assert model.blocks_compiled
            compiled, compiled_fresh = model.velocity(*args), model.velocity(*fresh)  # new values, same shapes
        # One double-block graph, one single-block graph: no recompilation per instance or per input.
        assert compiled_graphs() - before == 2
        assert rel_error(compiled, eager) < 1e-5 and rel_error(compiled_fresh, eager_fresh) < 1e-5

        twin = copy.deepcopy(model)  # the copy runs the shared compiled code on its own weights
        with torch.no_grad():
            for parameter in twin.single_blocks[0].parameters():
                parameter.mul_(1.5)
            changed = twin.velocity(*args)
            assert rel_error(model.velocity(*args), eager) < 1e-5
        assert rel_error(changed, eager) > 1e-3
        assert compiled_graphs() - before == 2

        model.uncompile_blocks()
        assert not model.blocks_compiled
    finally:
        torch._dynamo.reset()
