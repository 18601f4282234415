"""CUDA-graph replay of a step equals the eager step (needs a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_error
from kontext_core.cuda_graph import GraphedVelocity
from kontext_core.tokens import pack_latent, position_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_replay_matches_eager_for_changing_inputs(tiny_transformer):
    model = tiny_transformer.cuda()
    graphed = GraphedVelocity(model.velocity)
    ids = position_ids(6, 8, device="cuda")
    txt_ids = torch.zeros(1, 5, 3, device="cuda")
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        img = pack_latent(torch.randn(1, 16, 6, 8, generator=generator)).cuda()
        txt = torch.randn(1, 5, 48, generator=generator).cuda()
        y = torch.randn(1, 32, generator=generator).cuda()
        t = torch.rand(1, generator=generator).cuda()
        g = torch.tensor([2.5], device="cuda")
        with torch.no_grad():
            expected = model.velocity(img, ids, txt, txt_ids, t, y, g)
            replayed = graphed(img, ids, txt, txt_ids, t, y, g)
        assert rel_error(replayed, expected) < 1e-5
    assert graphed._graph is not None
