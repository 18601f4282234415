"""A sampling run's modulation vectors computed ahead of it (KontextTransformer.modulation_table, the fast
preset's `batched_modulation`), against the per-step path of the same tiny random model, float32 on the CPU.

The table's GEMMs take every step's rows at once, so the two agree up to float32 reordering: the bound below
is ~100x float32's epsilon, far under any real change (a wrong step's row moves the velocity by O(1)).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FakeEncoders, rel_error, tiny_edit_args
from kontext_core.pipeline import KontextPipeline
from kontext_core.placement.offload import BlockOffloader
from kontext_core.presets import apply_preset_options
from kontext_core.model.tokens import position_ids
from kontext_core.sampling import TextConditioning, flux_schedule, sample_euler

TOLERANCE = 1e-5


def test_each_step_of_the_table_gives_that_steps_velocity(tiny_transformer):
    args = tiny_edit_args(2, torch.float32, "cpu")
    img, ids, txt, txt_ids, _, y, guidance, ctx, ctx_ids = args
    times = torch.rand(4)
    with torch.no_grad():
        table = tiny_transformer.modulation_table(times, y, guidance)
        assert table.shape == (4, 2, sum(tiny_transformer.modulation_widths()))
        for step, t in enumerate(times):
            t_vec = t.expand(2).clone()
            plain = tiny_transformer.velocity(img, ids, txt, txt_ids, t_vec, y, guidance, ctx, ctx_ids)
            tabled = tiny_transformer.velocity(img, ids, txt, txt_ids, t_vec, y, guidance, ctx, ctx_ids, table[step])
            assert rel_error(tabled, plain) <= TOLERANCE, step
        # Another step's row gives another velocity: a row taken from the wrong step would be seen above.
        first = times[0].expand(2).clone()
        wrong = tiny_transformer.velocity(img, ids, txt, txt_ids, first, y, guidance, ctx, ctx_ids, table[1])
        right = tiny_transformer.velocity(img, ids, txt, txt_ids, first, y, guidance, ctx, ctx_ids)
        assert rel_error(wrong, right) > 1e-3


def _run(model, batched: bool, **options):
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 20 * 12 // 4, 64, generator=generator)
    cond = TextConditioning(torch.randn(1, 7, 48, generator=generator), torch.randn(1, 32, generator=generator))
    with torch.no_grad():
        return sample_euler(model, noise, position_ids(20, 12, batch=1), cond, flux_schedule(5, noise.shape[1]),
                            batched_modulation=batched, **options)


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "true-cfg"])
def test_a_run_with_the_table_matches_the_per_step_run(tiny_transformer, monkeypatch, cfg):
    options = {}
    if cfg:  # positive and negative rows in one batch: the table has both
        negative = TextConditioning(torch.randn(1, 7, 48), torch.randn(1, 32))
        options = dict(negative=negative, true_cfg=3.0)
    calls = []
    original = tiny_transformer.modulation_table
    monkeypatch.setattr(tiny_transformer, "modulation_table", lambda *a: calls.append(a) or original(*a))
    plain = _run(tiny_transformer, False, **options)
    assert calls == []
    batched = _run(tiny_transformer, True, **options)
    assert len(calls) == 1 and calls[0][0].shape == (5,)
    assert rel_error(batched, plain) <= TOLERANCE


def test_step_caching_and_offloaded_blocks_compute_each_step(tiny_transformer, monkeypatch):
    def refuse(*_):
        raise AssertionError("the table was computed")

    plain = _run(tiny_transformer, False, step_cache="first-block:0")
    monkeypatch.setattr(tiny_transformer, "modulation_table", refuse)
    assert torch.equal(_run(tiny_transformer, True, step_cache="first-block:0"), plain)
    offloader = BlockOffloader(tiny_transformer, torch.device("cpu"), prefetch=0)
    try:
        _run(tiny_transformer, True)  # hooks on the blocks: their weights may not be where the table runs
    finally:
        offloader.detach()
    with pytest.raises(ValueError, match="modulation or step_cache"):
        args = tiny_edit_args(1, torch.float32, "cpu")
        tiny_transformer.forward(*args[:7], step_cache=object(), modulation=torch.zeros(1, 1))


def test_the_fast_preset_turns_it_on_and_the_pipeline_passes_it(tiny_transformer, tiny_autoencoder, monkeypatch):
    import kontext_core.presets as presets

    # On a GPU fast takes it and exact does not; on a CPU fast falls back to exact (it saves nothing there).
    monkeypatch.setattr(presets, "_int8_gemm_reason", lambda device: None)
    monkeypatch.setattr(presets, "_attention_reason", lambda backend, device: None)
    options = dict(dtype=None, attention="auto", compile=False, cuda_graphs=False)
    assert apply_preset_options("fast", "cuda", **options)[0]["batched_modulation"]
    assert not apply_preset_options("exact", "cuda", **options)[0]["batched_modulation"]
    assert not apply_preset_options("fast", "cpu", **options)[0]["batched_modulation"]

    import kontext_core.pipeline as pipeline_module

    seen = []
    original = pipeline_module.sample_euler
    monkeypatch.setattr(pipeline_module, "sample_euler",
                        lambda *a, **k: seen.append(k["batched_modulation"]) or original(*a, **k))
    config = tiny_transformer.config
    pipe = KontextPipeline(tiny_transformer, tiny_autoencoder, FakeEncoders(config.context_in_dim, config.vec_in_dim))
    settings = dict(width=32, height=32, steps=2, decode=False)
    pipe.text_to_image("x", **settings)
    pipe.batched_modulation = True
    pipe.text_to_image("x", **settings)
    assert seen == [False, True]
