"""Memory plans: the byte arithmetic for the real [dev] model, the choice at each card size, overrides,
and the pipeline built by a plan (offloaded blocks on the CPU equal the resident pipeline exactly)."""

from __future__ import annotations

import pytest
import torch

from conftest import FakeEncoders
from kontext_core.placement import memory
from kontext_core.model.config import TransformerConfig
from kontext_core.placement.memory import (EDIT_TOKENS, GIB, TEXT_ENCODER_BYTES, MemoryPlan, OffloadedTextEncoders,
                                 activation_bytes, choose_plan, spread_resident, transformer_bytes)
from kontext_core.placement.offload import BlockOffloader
from kontext_core.pipeline import KontextPipeline

DEV = TransformerConfig()
DEV_PARAMETERS = 11_901_408_320  # tests/model/test_full_size.py


def test_weight_bytes_of_the_real_model():
    outside, blocks = transformer_bytes(DEV, "bf16")
    assert len(blocks) == 19 + 38 and len(set(blocks[:19])) == 1 and len(set(blocks[19:])) == 1
    assert outside + sum(blocks) == 2 * DEV_PARAMETERS  # 23.8 GB
    fp8_outside, fp8_blocks = transformer_bytes(DEV, "fp8")
    assert fp8_outside == outside  # embedders and the final layer stay bf16
    assert 0.49 < sum(fp8_blocks) / sum(blocks) < 0.51  # one byte per weight, bf16 biases, fp32 row scales


def test_activation_estimate_is_the_stated_formula():
    # tokens x hidden x 2 bytes x rows (32 for bf16, 48 with fp8 matmuls): 1.6 / 2.4 GiB for an edit.
    assert activation_bytes(DEV, EDIT_TOKENS, "bf16") == 8704 * 3072 * 2 * 32
    assert activation_bytes(DEV, EDIT_TOKENS, "fp8") == 8704 * 3072 * 2 * 48
    assert activation_bytes(DEV, EDIT_TOKENS, "bf16", batch=2) == 2 * activation_bytes(DEV, EDIT_TOKENS, "bf16")


@pytest.mark.parametrize("free_gib, text, expected", [
    (80, True, "resident-bf16"),
    (40, True, "resident-bf16"),
    (32, False, "resident-bf16"),
    (32, True, "resident-fp8"),
    (24, False, "resident-fp8"),
    (16, False, "resident-fp8"),
    (16, True, "offload-fp8"),
    (12, False, "offload-fp8"),
    (12, True, "offload-fp8"),
    (8, True, "offload-fp8"),
])
def test_the_plan_for_each_card(free_gib, text, expected):
    plan = choose_plan(free_gib * GIB, DEV, text_encoder_bytes=TEXT_ENCODER_BYTES if text else 0)
    assert plan.name == expected
    assert plan.expected_peak_bytes <= free_gib * GIB
    line = plan.describe()
    assert "\n" not in line and expected in line and f"of {free_gib:.1f} GiB free" in line


def test_twelve_gib_streams_part_of_the_fp8_blocks():
    plan = choose_plan(12 * GIB, DEV, text_encoder_bytes=TEXT_ENCODER_BYTES)
    assert plan.offload and plan.storage == "fp8" and plan.prefetch == 2
    assert 0 < len(plan.resident_blocks) < plan.total_blocks == 57
    _, blocks = transformer_bytes(DEV, "fp8")
    assert plan.streamed_bytes == sum(blocks) - sum(blocks[i] for i in plan.resident_blocks)
    assert plan.text_encoders == "offload"  # T5 visits the GPU while the blocks' caches are released
    assert "streamed from pinned RAM" in plan.describe() and "resident-fp8 needs" in plan.describe()


def test_more_memory_never_streams_more():
    streamed = [choose_plan(gib * GIB, DEV, text_encoder_bytes=0, storage="fp8").streamed_bytes
                for gib in (8, 10, 12, 14, 16, 20)]
    assert streamed == sorted(streamed, reverse=True) and streamed[-1] == 0


def test_overrides_by_name_and_dtype():
    assert choose_plan(80 * GIB, DEV, name="offload-fp8").offload
    forced = choose_plan(12 * GIB, DEV, storage="bf16", text_encoder_bytes=0)
    assert forced.name == "offload-bf16" and forced.streamed_blocks > 0
    assert choose_plan(None, DEV, device="cpu").name == "resident-bf16"
    assert choose_plan(None, DEV, device="cpu", storage="fp32").storage == "fp32"
    with pytest.raises(ValueError, match="unknown memory plan"):
        choose_plan(12 * GIB, DEV, name="offload-int4")
    with pytest.raises(ValueError, match="stores weights in fp8"):
        choose_plan(12 * GIB, DEV, name="offload-fp8", storage="bf16")
    with pytest.raises(MemoryError, match="GiB of cuda memory is free"):
        choose_plan(2 * GIB, DEV)


def _meta_lora(config: TransformerConfig, rank: int):
    """A LoRA of `rank` on every block linear of a full-size model, its factors on the meta device (only
    their shapes matter to the plan)."""
    from kontext_core.adapters.lora import LoraPart, LoraWeights
    from kontext_core.model.transformer import KontextTransformer

    with torch.device("meta"):
        model = KontextTransformer(config)
    layers = {name: [LoraPart(torch.empty(rank, module.in_features, device="meta"),
                              torch.empty(module.out_features, rank, device="meta"), None, name)]
              for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))}
    return LoraWeights(layers, name=f"rank {rank}")


def test_loras_on_fp8_weights_count_as_less_free_memory():
    # The CLI applies LoRAs on the fly to fp8 weights (factors and GEMM columns beside the weights) and
    # merges them into others: the plan must count the first and not the second.
    lora = _meta_lora(DEV, 64)
    held = memory.lora_bytes(DEV, "fp8", [lora])
    assert memory.lora_bytes(DEV, "bf16", [lora]) == 0 and memory.lora_bytes(DEV, "fp8", []) == 0
    assert 1 * GIB < held < 2 * GIB  # rank 64 on all 304 block linears, each row-fed one as a 128-wide tile
    assert memory.lora_bytes(DEV, "fp8", [lora, lora]) > held  # stacked ranks widen the columns
    reserve = 1 * GIB
    for free_gib in (12, 16, 20, 23, 24, 26):
        free = free_gib * GIB
        with_lora = choose_plan(free, DEV, reserve_bytes=reserve, loras=[lora])
        smaller_card = choose_plan(free - held, DEV, reserve_bytes=reserve)
        assert (with_lora.name, with_lora.resident_blocks) == (smaller_card.name, smaller_card.resident_blocks)
        assert with_lora.expected_peak_bytes == smaller_card.expected_peak_bytes + held
    # Where the LoRA tips the choice: resident-fp8 without it, blocks offloaded with it.
    assert choose_plan(23 * GIB, DEV, reserve_bytes=reserve).name == "resident-fp8"
    assert choose_plan(23 * GIB, DEV, reserve_bytes=reserve, loras=[_meta_lora(DEV, 256)]).name == "offload-fp8"


def test_ae_tiling_is_planned_when_the_full_decode_cannot_fit():
    big = choose_plan(24 * GIB, DEV, text_encoder_bytes=0)
    assert not big.ae_tiling
    small = choose_plan(8 * GIB, DEV, text_encoder_bytes=0, image_size=(2048, 2048))
    assert small.ae_tiling and "AE decodes in tiles" in small.describe()


def test_spread_resident_keeps_what_fits_and_spaces_the_streamed_blocks():
    sizes = [10] * 12
    assert spread_resident(sizes, 1000) == tuple(range(12))
    kept = spread_resident(sizes, 80)
    assert len(kept) == 8 and sum(sizes[i] for i in kept) <= 80
    streamed = sorted(set(range(12)) - set(kept))
    assert [b - a for a, b in zip(streamed, streamed[1:])] == [3, 3, 3]
    assert spread_resident(sizes, 5) == ()


def test_make_room_releases_reclaimable_caches_only_when_needed(monkeypatch):
    class Holder:
        device = torch.device("cuda", 0)
        released = 0

        def release(self):
            Holder.released += 1
            free["bytes"] += 6 * GIB
            return 6 * GIB

    free = {"bytes": 4 * GIB}
    monkeypatch.setattr(memory, "free_device_memory", lambda device: free["bytes"])
    holder = Holder()
    memory.register_reclaimable(holder)
    assert memory.make_room("cuda:0", 2 * GIB) == 4 * GIB and Holder.released == 0
    assert memory.make_room("cuda:0", 8 * GIB) == 10 * GIB and Holder.released == 1
    assert memory.make_room("cuda:1", 20 * GIB) == 10 * GIB and Holder.released == 1  # another GPU's caches stay


def test_offloaded_text_encoders_visit_the_device_only_to_encode(monkeypatch):
    class Encoders(FakeEncoders):
        def __init__(self):
            super().__init__(8, 4)
            self.device, self.offloads, self._cache = torch.device("cpu"), 0, {}

        def encode(self, prompts):
            self._cache.update(dict.fromkeys(prompts))
            return super().encode(prompts)

        def offload(self, device="cpu"):
            self.offloads += 1

    rooms = []
    monkeypatch.setattr(memory, "make_room", lambda device, needed: rooms.append(needed))
    wrapped = OffloadedTextEncoders(Encoders(), "cpu", needed_bytes=123)
    txt, pooled = wrapped.encode(["a red hat"])
    assert txt.shape == (1, 6, 8) and wrapped.offloads == 1 and rooms == [123]
    wrapped.encode("a red hat")  # cached: nothing has to move
    assert rooms == [123] and wrapped.calls == 2


def test_a_plan_that_offloads_gives_the_resident_pipelines_edit(tiny_transformer, tiny_autoencoder):
    """The offload plan's transformer (blocks streamed through a ring, some cached) edits exactly as the resident
    one."""
    import copy

    from PIL import Image

    config = tiny_transformer.config
    encoders = FakeEncoders(config.context_in_dim, config.vec_in_dim)
    resident = KontextPipeline(copy.deepcopy(tiny_transformer), tiny_autoencoder, encoders)
    BlockOffloader(tiny_transformer, "cpu", prefetch=1, resident=(1,))
    offloaded = KontextPipeline(tiny_transformer, tiny_autoencoder, encoders)
    offloaded.ae_tiling = "never"
    image = Image.new("RGB", (32, 24), (200, 40, 90))
    a = resident.edit(image, "make it blue", steps=2, seed=3, resize="keep")
    b = offloaded.edit(image, "make it blue", steps=2, seed=3, resize="keep")
    assert torch.equal(a.latents, b.latents) and a.images[0].tobytes() == b.images[0].tobytes()


def test_load_pipeline_follows_a_plan_and_reports_it_once(tiny_transformer, tiny_autoencoder, tmp_path):
    from kontext_core import save_autoencoder, save_transformer
    from kontext_core.build import load_pipeline, plan_memory
    from kontext_core.checkpoints.model_files import ModelFiles

    save_transformer(tiny_transformer, tmp_path / "k.safetensors")
    save_autoencoder(tiny_autoencoder, tmp_path / "ae.safetensors")
    files = ModelFiles(tmp_path / "k.safetensors", tmp_path / "ae.safetensors")
    assert plan_memory(files, "cpu").name == "resident-bf16"
    lines = []
    pipe = load_pipeline(files, device="cpu", dtype="fp32", log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("memory plan resident-fp32") and pipe.offloader is None
    plan = MemoryPlan("offload-fp32", "fp32", "cpu", offload=True, prefetch=1, resident_blocks=(0,),
                      total_blocks=4, text_encoders="none")
    pipe = load_pipeline(files, device="cpu", memory=plan, log=lines.append)
    assert isinstance(pipe.offloader, BlockOffloader) and pipe.memory_plan is plan and len(lines) == 2
    assert pipe.offloader.blocks[0].resident and not pipe.offloader.blocks[1].resident


def test_load_pipeline_applies_loras_after_reading_them_first(tiny_transformer, tiny_autoencoder, tmp_path):
    from safetensors.torch import save_file

    from conftest import random_block_lora_file
    from kontext_core import save_autoencoder, save_transformer
    from kontext_core.build import load_pipeline
    from kontext_core.checkpoints import CheckpointError
    from kontext_core.adapters.lora import active_loras, load_lora
    from kontext_core.checkpoints.model_files import ModelFiles

    save_transformer(tiny_transformer, tmp_path / "k.safetensors")
    save_autoencoder(tiny_autoencoder, tmp_path / "ae.safetensors")
    save_file(random_block_lora_file(tiny_transformer, seed=3), tmp_path / "style.safetensors")
    files = ModelFiles(tmp_path / "k.safetensors", tmp_path / "ae.safetensors")
    lora = load_lora(tmp_path / "style.safetensors")
    for dtype, mode in (("fp32", "merge"), ("fp8", "on_the_fly")):
        pipe = load_pipeline(files, device="cpu", dtype=dtype, log=None,
                             loras=[(tmp_path / "style.safetensors", 0.8), (lora, -0.5)])
        assert [(h.mode, h.strength) for h in active_loras(pipe.transformer)] == [(mode, 0.8), (mode, -0.5)]
    # A file that is no LoRA fails before the model is read (the transformer file given twice by mistake).
    read = []
    import kontext_core.build as build
    real_load = build.load_transformer
    build.load_transformer = lambda *args, **kwargs: read.append(args) or real_load(*args, **kwargs)
    try:
        with pytest.raises(CheckpointError, match="not a LoRA|LoRA"):
            load_pipeline(files, device="cpu", log=None, loras=[(tmp_path / "k.safetensors", 1.0)])
    finally:
        build.load_transformer = real_load
    assert read == []
