"""Pipeline behaviour on tiny random models: sessions, branching, determinism, settings, images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_core.image import preferred_size, prepare_image, to_rgb_array
from kontext_core.pipeline import GenerationSettings, make_noise
from kontext_core.sampling import denoise_schedule, flux_schedule


def _image(seed: int, size=(40, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


FAST = dict(steps=3)


def test_three_turn_session_equals_manual_chaining(pipeline):
    start = _image(1)
    session = pipeline.session(start, resize="keep", settings=GenerationSettings(**FAST))
    prompts = ["make it red", "add a hat", "night time"]
    for seed, prompt in enumerate(prompts):
        session.edit(prompt, seed=seed)

    latent = pipeline.encode_image(start, resize="keep")
    for seed, prompt in enumerate(prompts):
        latent = pipeline.edit(None, prompt, context_latents=[latent], seed=seed, decode=False, **FAST).latents
    assert torch.equal(session.latent, latent)
    assert [t.prompt for t in session.turns] == ["", *prompts]
    assert [t.parent for t in session.turns] == [None, 0, 1, 2]


def test_branching_edits_from_an_earlier_turn(pipeline):
    session = pipeline.session(_image(2), resize="keep", settings=GenerationSettings(**FAST))
    first = session.edit("a", seed=1)
    session.edit("b", seed=2)
    session.branch(first.index)
    branched = session.edit("c", seed=3)
    assert branched.parent == first.index and len(session.turns) == 4
    direct = pipeline.edit(None, "c", context_latents=[first.latent], seed=3, decode=False, **FAST).latents
    assert torch.equal(branched.latent, direct)
    with pytest.raises(IndexError, match="no turn 9"):
        session.branch(9)


def test_session_export_writes_images_and_history(pipeline, tmp_path):
    session = pipeline.session(_image(3), resize="keep", settings=GenerationSettings(**FAST))
    session.edit("one", seed=5)
    paths = session.export(tmp_path / "out")
    assert [p.name for p in paths] == ["turn_00.png", "turn_01.png"]
    history = json.loads((tmp_path / "out" / "session.json").read_text())
    assert history["turns"][1]["prompt"] == "one" and history["turns"][1]["settings"]["seed"] == 5
    assert Image.open(paths[1]).text["kontext"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_same_seed_same_bytes_on_cpu(pipeline):
    runs = [pipeline.edit(_image(4), "x", seed=11, resize="keep", **FAST) for _ in range(2)]
    assert torch.equal(runs[0].latents, runs[1].latents)
    assert runs[0].images[0].tobytes() == runs[1].images[0].tobytes()
    other = pipeline.edit(_image(4), "x", seed=12, resize="keep", **FAST)
    assert not torch.equal(other.latents, runs[0].latents)


def test_noise_comes_from_the_cpu_generator():
    expected = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(42))
    assert torch.equal(make_noise(42, 2, 16, 4, 6), expected)


def test_denoise_starts_from_the_noised_image(pipeline):
    image = _image(5)
    start = pipeline.encode_image(image, resize="keep")
    # A tiny denoise barely moves the image; full denoise ignores where it started.
    gentle = pipeline.edit(image, "x", resize="keep", denoise=0.05, decode=False, **FAST).latents
    full = pipeline.edit(image, "x", resize="keep", denoise=1.0, decode=False, **FAST).latents
    assert (gentle - start).abs().mean() < 0.5 * (full - start).abs().mean()
    schedule = denoise_schedule(3, 100, 0.5)
    assert len(schedule) == 4 and schedule == flux_schedule(6, 100)[-4:]


def test_distilled_sampler_uses_the_unshifted_schedule(pipeline, monkeypatch):
    seen = {}
    import kontext_core.pipeline as module

    original = module.sample_euler

    def spy(*args, **kwargs):
        seen["timesteps"] = args[4]
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "sample_euler", spy)
    pipeline.text_to_image("x", width=32, height=32, sampler="distilled", steps=4, decode=False)
    assert seen["timesteps"] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_true_cfg_batches_positive_and_negative(pipeline, tiny_transformer, monkeypatch):
    batches = []
    original = tiny_transformer.forward
    monkeypatch.setattr(tiny_transformer, "forward",
                        lambda img, *a, **k: batches.append(img.shape[0]) or original(img, *a, **k))
    cfg = pipeline.text_to_image("x", width=32, height=32, sampler="true_cfg", true_cfg=3.0,
                                 negative_prompt="blurry", steps=2, decode=False).latents
    assert batches == [2, 2]
    plain = pipeline.text_to_image("x", width=32, height=32, steps=2, decode=False).latents
    assert not torch.allclose(cfg, plain)


def test_bad_settings_are_explained(pipeline):
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        GenerationSettings(sampler="ddim")
    with pytest.raises(TypeError, match="unknown setting.*stepz"):
        pipeline.text_to_image("x", stepz=3)
    with pytest.raises(ValueError, match="at least 4x4 pixels"):
        pipeline.text_to_image("x", width=2, height=2)
    with pytest.raises(ValueError, match="denoise must be in"):
        denoise_schedule(4, 100, 1.5)
    with pytest.raises(ValueError, match="true_cfg must be a finite"):
        GenerationSettings(true_cfg=float("inf"))
    with pytest.raises(ValueError, match="unknown stitch direction 'left'; choose one of right, down"):
        GenerationSettings(placement="stitch", stitch_direction="left")
    with pytest.raises(ValueError, match="unknown placement 'stitch_down'"):  # a direction now, not a placement
        GenerationSettings(placement="stitch_down")


def test_a_non_finite_result_is_an_error_not_a_black_image(pipeline):
    # A transformer that overflows (fp16 activations, say): its output goes non-finite mid-way.
    with torch.no_grad():
        pipeline.transformer.final_layer.linear.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="NaN or infinite.*bf16 or fp8"):
        pipeline.text_to_image("x", width=32, height=32, steps=2)


def test_preferred_resolution_and_image_modes():
    assert preferred_size(1920, 1080) == (1392, 752)
    assert preferred_size(1000, 1000) == (1024, 1024)
    assert prepare_image(_image(6, (1920, 1080))).shape == (1, 3, 752, 1392)
    assert prepare_image(_image(6, (70, 50)), mode="keep").shape == (1, 3, 48, 64)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb_array(rgba)[0, 0].tolist() == [1.0, 1.0, 1.0]  # transparent -> white
    gray16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb_array(gray16.convert("I;16"))[0, 0].tolist() == [1.0, 1.0, 1.0]
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 255, 0] * 256)
    assert to_rgb_array(palette)[0, 0].tolist() == [0.0, 1.0, 0.0]
    assert to_rgb_array(Image.new("L", (2, 2), 128))[0, 0].tolist() == pytest.approx([128 / 255] * 3)


def test_batch_of_prompts_equals_one_call_per_prompt(pipeline):
    prompts = ["make it red", "add a hat"]
    image = _image(7)
    batched = pipeline.edit(image, prompts, resize="keep", seed=3, decode=False, **FAST).latents
    assert batched.shape[0] == 2
    # One noise tensor [2, ...] from the seed, as ComfyUI batches; item i uses row i of it.
    noise = make_noise(3, 2, 16, *batched.shape[-2:])
    context = [pipeline.encode_image(image, resize="keep")]
    for i, prompt in enumerate(prompts):
        single = pipeline.generate(pipeline.encode_prompt(prompt), GenerationSettings(seed=3, **FAST),
                                   context_latents=context, noise=noise[i:i + 1])
        assert torch.allclose(batched[i:i + 1], single, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        pipeline.edit(image, "x", conditioning=pipeline.encode_prompt(prompts), batch_size=3, decode=False)


def test_loras_apply_for_one_call_only(pipeline, tiny_transformer, tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    down = torch.randn(4, 128, generator=generator) * 0.3
    up = torch.randn(384, 4, generator=generator) * 0.3
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up}, tmp_path / "style.safetensors")
    before = {k: v.clone() for k, v in tiny_transformer.state_dict().items()}
    plain = pipeline.text_to_image("x", width=32, height=32, decode=False, **FAST).latents
    styled = pipeline.text_to_image("x", width=32, height=32, decode=False,
                                    loras=[(tmp_path / "style.safetensors", 1.0)], **FAST).latents
    assert not torch.allclose(plain, styled)
    again = pipeline.text_to_image("x", width=32, height=32, decode=False, **FAST).latents
    assert torch.equal(plain, again)
    assert all(torch.equal(v, before[k]) for k, v in tiny_transformer.state_dict().items())


def test_roundtrip_option_reencodes_the_decoded_turn(pipeline):
    session = pipeline.session(_image(8), resize="keep", settings=GenerationSettings(**FAST))
    chained = session.edit("a", seed=1)
    session.branch(chained.index)
    roundtrip = session.edit("b", seed=2, roundtrip=True)
    reencoded = pipeline.encode_image(pipeline.decode(chained.latent)[0], resize="keep")
    direct = pipeline.edit(None, "b", context_latents=[reencoded], seed=2, decode=False, **FAST).latents
    assert torch.equal(roundtrip.latent, direct)
    latent_chained = pipeline.edit(None, "b", context_latents=[chained.latent], seed=2, decode=False, **FAST).latents
    assert not torch.equal(roundtrip.latent, latent_chained)


def test_compiled_blocks_give_the_eager_result(tiny_transformer):
    from kontext_core.model.tokens import pack_latent, position_ids

    generator = torch.Generator().manual_seed(0)
    args = (pack_latent(torch.randn(1, 16, 4, 4, generator=generator)), position_ids(4, 4),
            torch.randn(1, 3, 48, generator=generator), torch.zeros(1, 3, 3), torch.tensor([0.5]),
            torch.randn(1, 32, generator=generator), torch.tensor([2.5]))
    with torch.no_grad():
        eager = tiny_transformer(*args)
        tiny_transformer.single_blocks[0].compile(fullgraph=True, backend="eager")
        compiled = tiny_transformer(*args)
    assert torch.allclose(compiled, eager, atol=1e-5)
