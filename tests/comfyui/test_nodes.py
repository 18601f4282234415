"""The ComfyUI nodes without ComfyUI: type conversions, the model cache, and every node's run() on tiny models.

ComfyUI's side (model folders, progress bar, Cancel, previews) is the `comfy` fixture, which replaces the
functions of nodes/comfy_adapter.py (tests/fake_comfy_adapter.py, with `models`). References: the core's
KontextPipeline and EditSession run on the same loaded models (bit-exact on the CPU), ComfyUI's
latent_formats.Flux for the LATENT scaling.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import FakeEncoders, rel_error
from kontext_core import GenerationSettings, KontextPipeline, TextConditioning, save_transformer
from kontext_core import CheckpointError, KontextTransformer, TransformerConfig
from kontext_core.image import prepare_image
from kontext_core.compute.fused import hooked
from kontext_core.adapters.lora import active_loras
from kontext_core.sampling import StepInfo
from kontext_core.model.tokens import pack_latent
from fake_comfy_adapter import Interrupted  # and the fixtures `comfy` and `models`, which conftest registers
from node_pack import COMFYUI, load_pack, nodes_module

nodes = nodes_module()
convert = nodes_module("convert")
adapter = nodes_module("comfy_adapter")
model_cache = nodes_module("model_cache")
resolve = nodes_module("resolve")
progress = nodes_module("progress")

FAST = dict(steps=2, resize="keep")


class FakeComfyVae:
    """ComfyUI's VAE interface (IMAGE in, raw latents out) around our tiny AE."""

    latent_channels = 16
    downscale_ratio = 2

    def __init__(self, ae):
        self.ae = ae

    def encode(self, image):
        with torch.no_grad():
            return convert.scaled_to_raw(self.ae.encode(convert.image_to_pixels(image)))

    def decode(self, raw):
        with torch.no_grad():
            return convert.pixels_to_image(self.ae.decode(convert.raw_to_scaled(raw)))


def _image(seed: int, size=(40, 24), batch: int = 1) -> torch.Tensor:
    """An 8-bit IMAGE [B, H, W, 3], as Load Image gives."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (batch, size[1], size[0], 3)).astype(np.float32) / 255.0)


def _pil(image: torch.Tensor):
    return convert.image_to_pil(image)[0]


def _prompt(models, text: str):
    return nodes.KontextPrompt.run(models.text, text).outputs[0]


def _comfy_flux_format():
    """ComfyUI's own latent_formats.Flux when ~/ComfyUI is there (the file imports only torch)."""
    path = COMFYUI / "comfy" / "latent_formats.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("comfy_latent_formats_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Flux()


# --- conversions ---------------------------------------------------------------------------------

def test_image_to_pil_and_back_is_exact_for_8bit_images():
    image = _image(1, batch=2)
    pictures = convert.image_to_pil(image)
    assert len(pictures) == 2 and pictures[0].size == (40, 24) and pictures[0].mode == "RGB"
    assert torch.equal(convert.pil_to_image(pictures), image)


def test_image_to_pil_keeps_alpha_and_gray():
    rgba = torch.rand(1, 8, 8, 4)
    assert convert.image_to_pil(rgba)[0].mode == "RGBA"
    assert convert.image_to_pil(torch.rand(1, 8, 8, 1))[0].mode == "L"
    with pytest.raises(ValueError, match="ComfyUI IMAGE"):
        convert.image_to_pil(torch.rand(3, 8, 8))


def test_pixels_and_image_invert_each_other():
    image = torch.rand(2, 6, 10, 3)
    pixels = convert.image_to_pixels(image)
    assert pixels.shape == (2, 3, 6, 10) and pixels.min() >= -1 and pixels.max() <= 1
    assert (convert.pixels_to_image(pixels) - image).abs().max() < 1e-6
    assert convert.image_to_pixels(torch.rand(1, 4, 4, 1)).shape == (1, 3, 4, 4)


def test_latent_scaling_is_comfyuis_flux_formula_and_inverts():
    raw = torch.randn(2, 16, 5, 7) * 3
    scaled = convert.raw_to_scaled(raw)
    assert torch.equal(scaled, (raw - 0.1159) * 0.3611)
    comfy_flux = _comfy_flux_format()
    if comfy_flux is not None:  # the formula as ComfyUI 0.8 computes it
        assert torch.equal(scaled, comfy_flux.process_in(raw))
        assert torch.equal(convert.scaled_to_raw(scaled), comfy_flux.process_out(scaled))
    assert (convert.scaled_to_raw(scaled) - raw).abs().max() < 1e-5
    latent = convert.latent_to_comfy(scaled)
    assert set(latent) == {"samples"}
    assert (convert.latent_from_comfy(latent) - scaled).abs().max() < 1e-6


def test_a_latent_noise_mask_is_reported_where_it_is_ignored(caplog):
    latent = {"samples": torch.randn(1, 16, 4, 4), "noise_mask": torch.ones(1, 1, 32, 32)}
    with caplog.at_level("WARNING", logger="comfyui-kontext"):
        assert torch.equal(convert.latent_from_comfy(latent, "context"), convert.raw_to_scaled(latent["samples"]))
    assert "noise mask" in caplog.text and "ignored" in caplog.text and "mask input" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="comfyui-kontext"):
        convert.latent_from_comfy(latent, "target", honors_mask=True)  # Kontext Edit's target: used as the mask
    assert caplog.text == "" and convert.noise_mask(latent) is latent["noise_mask"]


def test_latent_from_comfy_explains_wrong_latents():
    with pytest.raises(ValueError, match="4 channels.*Empty SD3 Latent Image"):
        convert.latent_from_comfy({"samples": torch.zeros(1, 4, 8, 8)}, "target")
    with pytest.raises(ValueError, match="LATENT"):
        convert.latent_from_comfy(torch.zeros(1, 16, 8, 8))


def test_conditioning_round_trip_and_comfyui_extras():
    txt, pooled = torch.randn(1, 6, 48), torch.randn(1, 32)
    comfy_cond = convert.conditioning_to_comfy(TextConditioning(txt, pooled))
    assert "guidance" not in comfy_cond[0][1]
    parsed = convert.conditioning_from_comfy(comfy_cond, text_features=48)
    assert torch.equal(parsed.text.txt, txt) and torch.equal(parsed.text.y, pooled)
    assert parsed.guidance is None and parsed.reference_latents == [] and parsed.reference_method is None

    # What FluxGuidance, ReferenceLatent (chained twice, one a batch of 2) and the reference-method node add.
    refs = [torch.randn(1, 16, 4, 6), torch.randn(2, 16, 6, 4)]
    native = [[txt, {"pooled_output": pooled, "guidance": 4.0, "reference_latents": refs,
                     "reference_latents_method": "uxo/uno"}]]
    parsed = convert.conditioning_from_comfy(native)
    assert parsed.guidance == 4.0 and parsed.reference_method == "uxo"
    assert len(parsed.reference_latents) == 3
    assert torch.equal(parsed.reference_latents[0], convert.raw_to_scaled(refs[0]))
    assert torch.equal(parsed.reference_latents[2], convert.raw_to_scaled(refs[1][1:]))


@pytest.mark.parametrize("conditioning, message", [
    ([], "non-empty"),
    ([[torch.zeros(1, 6, 48), {"pooled_output": torch.zeros(1, 32)}]] * 2, "Conditioning Combine"),
    ([[torch.zeros(1, 6, 48), {}]], "pooled CLIP"),
    ([[torch.zeros(1, 6, 2048), {"pooled_output": torch.zeros(1, 32)}]], "width 2048.*T5-XXL"),
    ([[torch.zeros(1, 6, 48), {"pooled_output": torch.zeros(1, 32),
                                "reference_latents_method": "index_timestep_zero"}]],
     "not supported"),
    # SD3's triple CLIP loader: T5 text of the right width, CLIP-G's 1280-wide (here 64) pooled output
    ([[torch.randn(1, 6, 48), {"pooled_output": torch.randn(1, 64)}]], "pooled CLIP output of shape.*CLIP-L"),
    ([[torch.randn(1, 0, 48), {"pooled_output": torch.randn(1, 32)}]], "at least one token"),
    ([[torch.randn(6, 48), {"pooled_output": torch.randn(1, 32)}]], r"\[batch, tokens, width\]"),
    ([[torch.randn(1, 6, 48), {"pooled_output": torch.randn(2, 32)}]], "2 pooled outputs for 1 texts"),
    ([[torch.full((1, 6, 48), float("nan")), {"pooled_output": torch.randn(1, 32)}]], "NaN"),
    ([[torch.randn(1, 6, 48), {"pooled_output": torch.randn(1, 32), "guidance": float("nan")}]], "finite guidance"),
])
def test_conditioning_errors_name_the_problem(conditioning, message):
    with pytest.raises(ValueError, match=message):
        convert.conditioning_from_comfy(conditioning, text_features=48, pooled_features=32)


@pytest.mark.parametrize("image, message", [
    (torch.zeros(0, 8, 8, 3), "empty"),
    (torch.full((1, 8, 8, 3), float("nan")), "NaN"),
    (torch.full((1, 8, 8, 3), 200.0), "0..255"),
    (torch.full((1, 8, 8, 3), 200, dtype=torch.uint8), "floats from 0 to 1"),
    (torch.zeros(1, 8, 8, 2), "1, 3 or 4"),
])
def test_image_errors_name_the_problem(image, message):
    with pytest.raises(ValueError, match=message):
        convert.check_image(image, "image")


def test_bad_settings_and_zero_size_latents_are_refused(models):
    cond = _prompt(models, "x")
    with pytest.raises(ValueError, match="none of them 0"):
        nodes.KontextEdit.run(models.model, models.vae, cond, target={"samples": torch.zeros(1, 16, 0, 0)}, **FAST)
    with pytest.raises(ValueError, match="guidance must be a finite"):
        nodes.KontextEdit.run(models.model, models.vae, cond, image=_image(1), **{**FAST, "guidance": float("nan")})
    with pytest.raises(ValueError, match="seed must be an integer from 0 to 2"):
        nodes.KontextEdit.run(models.model, models.vae, cond, image=_image(1), **{**FAST, "seed": 2**64})
    with pytest.raises(ValueError, match="empty"):
        nodes.KontextStartSession.run(models.model, models.vae, torch.zeros(0, 8, 8, 3), resize="keep")


def test_preview_latent_is_the_denoised_guess():
    x0, noise = torch.randn(1, 16, 4, 6), torch.randn(1, 16, 4, 6)
    t = 0.3
    info = StepInfo(0, 3, 0.5, t, pack_latent((1 - t) * x0 + t * noise), pack_latent(noise - x0))
    assert (progress.denoised_latent(info, 4, 6) - x0).abs().max() < 1e-5


# --- the model cache -----------------------------------------------------------------------------

def test_cache_returns_the_same_object_and_releases():
    cache = model_cache.ModelCache()
    loads = []

    def load():
        loads.append(1)
        return torch.nn.Linear(2, 2)

    first = cache.get(("a",), load)
    assert cache.get(("a",), load) is first and len(loads) == 1
    assert cache.release(("a",)) == 1 and ("a",) not in cache
    assert cache.get(("a",), load) is not first and len(loads) == 2
    cache.get(("b",), load)
    assert cache.release() == 2 and not cache.models


def test_loader_node_caches_across_runs_and_release_frees_the_model(models, comfy):
    again = nodes.KontextModelLoader.run("kontext_tiny.safetensors").outputs[0]
    assert again == models.model  # the wire value: a small reference, equal run to run
    loaded = resolve.transformer(again)
    assert loaded is resolve.transformer(models.model)
    gone = weakref.ref(loaded)
    del loaded
    models.pipeline = None
    model_cache.CACHE.release(models.model.key)
    assert gone() is None  # nothing else (no wire, no node output) held it
    assert resolve.transformer(models.model) is not None  # and the next use loads it again


def test_loader_nodes_read_the_files(models, tiny_transformer, tiny_autoencoder):
    assert models.model.dtype == "fp32" and models.model.device == "cpu"  # 'default' on the CPU
    loaded = resolve.transformer(models.model)
    for name, tensor in tiny_transformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert models.vae.dtype == "fp32"
    conv_out = resolve.autoencoder(models.vae).decoder.conv_out.weight
    assert torch.equal(conv_out, tiny_autoencoder.decoder.conv_out.weight)


def test_default_weight_dtype_keeps_fp8_files_in_fp8(comfy, tiny_transformer):
    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "tiny_fp8.safetensors", layout="comfy",
                     weights="fp8_e4m3fn")
    ref = nodes.KontextModelLoader.run("tiny_fp8.safetensors").outputs[0]
    assert ref.dtype == "fp8"
    assert nodes.KontextModelLoader.run("tiny_fp8.safetensors", weight_dtype="fp32").outputs[0].dtype == "fp32"


def test_int8_weight_dtype_loads_int8_block_weights(comfy, tiny_transformer):
    from kontext_core.compute.quant import QuantizedLinear

    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "tiny.safetensors")
    ref = nodes.KontextModelLoader.run("tiny.safetensors", weight_dtype="int8").outputs[0]
    assert ref.dtype == "int8"
    loaded = resolve.transformer(ref)
    assert isinstance(loaded.single_blocks[0].linear1, QuantizedLinear)
    assert loaded.single_blocks[0].linear1.weight.dtype == torch.int8
    assert type(loaded.single_blocks[0].modulation.lin) is torch.nn.Linear  # kept in the compute dtype


def test_fast_preset_on_the_cpu_falls_back_and_says_so(comfy, tiny_transformer, caplog):
    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "tiny.safetensors")
    with caplog.at_level("WARNING"):
        ref = nodes.KontextModelLoader.run("tiny.safetensors", preset="fast").outputs[0]
    assert (ref.dtype, ref.attention, ref.compile, ref.cuda_graphs) == ("fp32", "auto", False, False)
    assert not ref.batched_modulation
    assert "preset fast: int8 weights: int8 GEMMs need a CUDA GPU" in caplog.text


def test_fast_preset_parts_reach_the_model_reference(comfy, tiny_transformer, monkeypatch):
    from kontext_core import presets

    # Where every part can run (faked here: CPU tensors through the int8 reference), the reference carries them.
    monkeypatch.setattr(presets, "_resolve", lambda name, device: (presets.PRESETS[name], {}))
    monkeypatch.setattr(nodes_module("loaders"), "_check_compile", lambda device: None)
    monkeypatch.setattr(nodes_module("loaders"), "set_attention_backend", lambda name: None)
    monkeypatch.setattr(resolve, "set_attention_backend", lambda name: None)
    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "tiny.safetensors")
    ref = nodes.KontextModelLoader.run("tiny.safetensors", preset="fast").outputs[0]
    fast = presets.PRESETS["fast"]
    assert (ref.dtype, ref.attention, ref.compile, ref.cuda_graphs) == (fast.dtype, fast.attention, True, True)
    assert ref.batched_modulation
    # ... and the pipeline the sampling nodes build from it.
    monkeypatch.setattr(resolve, "transformer", lambda model: tiny_transformer)
    monkeypatch.setattr(resolve, "autoencoder", lambda vae: None)
    assert resolve.pipeline(ref, vae=None).batched_modulation
    explicit = nodes.KontextModelLoader.run("tiny.safetensors", weight_dtype="fp32", preset="fast").outputs[0]
    assert explicit.dtype == "fp32" and explicit.cuda_graphs
    # sage8's statistics period: the preset's (-1), or the one set, which reaches the pipeline.
    assert ref.attention_statistics_refresh == fast.attention_statistics_refresh > 0
    every_step = nodes.KontextModelLoader.run("tiny.safetensors", preset="fast", attention_refresh=0).outputs[0]
    assert every_step.attention_statistics_refresh == 0
    custom = nodes.KontextModelLoader.run("tiny.safetensors", attention="sage8", attention_refresh=3).outputs[0]
    assert custom.attention_statistics_refresh == 3
    assert resolve.pipeline(custom, vae=None).attention_statistics_refresh == 3


def test_attention_refresh_without_sage8_is_off_and_says_so(comfy, tiny_transformer, caplog):
    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "tiny.safetensors")
    with caplog.at_level("WARNING"):
        ref = nodes.KontextModelLoader.run("tiny.safetensors", attention="sdpa", attention_refresh=5).outputs[0]
    assert ref.attention_statistics_refresh == 0
    assert "attention refresh 5: only sage8 attention has statistics to reuse, not sdpa" in caplog.text


def test_loader_errors_speak_to_the_person(comfy):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        nodes.KontextModelLoader.run("missing.safetensors")
    # FLUX Fill (384 input channels for 64 out) is a FLUX transformer Kontext cannot run: refused at the loader.
    fill = KontextTransformer(replace(TransformerConfig.tiny(), in_channels=384))
    save_transformer(fill, comfy.root / "diffusion_models" / "flux_fill.safetensors")
    with pytest.raises(CheckpointError, match="Fill, Depth or Canny.*flux1-kontext-dev"):
        nodes.KontextModelLoader.run("flux_fill.safetensors")
    # A whole SD checkpoint (UNet + VAE in one file) goes to ComfyUI's Load Checkpoint, not to models/vae.
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)},
              str(comfy.root / "diffusion_models" / "sd15.safetensors"))
    with pytest.raises(CheckpointError, match="models/checkpoints") as refused:
        nodes.KontextModelLoader.run("sd15.safetensors")
    assert "models/vae" not in str(refused.value)
    (comfy.root / "diffusion_models" / "x.safetensors").write_bytes(b"")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(RuntimeError, match="flash-attn"):
            nodes.KontextModelLoader.run("x.safetensors", attention="flash-attn")


def test_compile_option_is_checked_on_the_loader_and_applied_to_the_shared_model(comfy, tiny_transformer):
    from dataclasses import replace

    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "tiny.safetensors", layout="comfy")
    with pytest.raises(RuntimeError, match="compile needs a CUDA GPU.*set compile to off"):
        nodes.KontextModelLoader.run("tiny.safetensors", compile="on")  # ComfyUI runs on the CPU here
    ref = nodes.KontextModelLoader.run("tiny.safetensors").outputs[0]
    assert ref.compile is False
    model = resolve.transformer(ref)
    assert not model.blocks_compiled
    assert resolve.transformer(replace(ref, compile=True)) is model and model.blocks_compiled
    assert resolve.transformer(ref) is model and not model.blocks_compiled


def test_text_encoders_loader(comfy, monkeypatch):
    for name in ("t5xxl_fp16.safetensors", "clip_l.safetensors"):
        (comfy.root / "text_encoders" / name).write_bytes(b"0")
    monkeypatch.setattr(adapter, "tokenizer_folders", lambda: (comfy.root / "t5_tok", comfy.root / "clip_tok"))
    calls = []

    def fake_load(t5, clip, **kwargs):
        calls.append((t5, clip, kwargs))
        return FakeEncoders(48, 32)

    monkeypatch.setattr(model_cache, "load_text_encoders", fake_load)
    ref = nodes.KontextTextEncodersLoader.run("t5xxl_fp16.safetensors", "clip_l.safetensors").outputs[0]
    nodes.KontextTextEncodersLoader.run("t5xxl_fp16.safetensors", "clip_l.safetensors")
    assert len(calls) == 1  # cached across runs
    t5, clip, kwargs = calls[0]
    assert t5.endswith("t5xxl_fp16.safetensors") and clip.endswith("clip_l.safetensors")
    assert kwargs["dtype"] == "fp32" and kwargs["t5_tokenizer"].endswith("t5_tok")
    assert ref.clip_tokenizer.endswith("clip_tok")
    with pytest.raises(ValueError, match="same file"):
        nodes.KontextTextEncodersLoader.run("clip_l.safetensors", "clip_l.safetensors")


# --- prompt, image prep, encode / decode ---------------------------------------------------------

def test_prompt_node_makes_comfyui_conditioning(models):
    conditioning = _prompt(models, "make it red")
    txt, pooled = FakeEncoders(48, 32).encode(["make it red"])
    assert len(conditioning) == 1 and torch.equal(conditioning[0][0], txt)
    assert torch.equal(conditioning[0][1]["pooled_output"], pooled) and "guidance" not in conditioning[0][1]


def test_image_prep_picks_kontext_sizes_and_reports_them():
    image, second = _image(1), _image(2, size=(30, 30))
    result = nodes.KontextImagePrep.run(image, resize="preferred", fit="crop", image_2=second)
    prepared, prepared_2, prepared_3, width, height = result.outputs
    assert (width, height) == (1328, 800) and prepared.shape == (1, 800, 1328, 3)
    assert prepared_2.shape == (1, 1024, 1024, 3) and prepared_3 is None
    expected = convert.pixels_to_image(prepare_image(_pil(image), "preferred", None, "crop"))
    assert torch.equal(prepared, expected)
    assert "40x24 -> 1328x800" in result.ui["text"][0] and "image_2: 30x30 -> 1024x1024" in result.ui["text"][0]
    kept = nodes.KontextImagePrep.run(_image(3, size=(41, 35)), resize="keep", fit="stretch").outputs
    assert kept[0].shape == (1, 32, 32, 3)


def test_encode_and_decode_nodes_match_the_core(models):
    image = _image(4)
    latent = nodes.KontextEncode.run(models.vae, image, resize="keep").outputs[0]
    expected = models.pipeline.encode_image(_pil(image), resize="keep")
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))
    decoded = nodes.KontextDecode.run(models.vae, latent).outputs[0]
    with torch.no_grad():
        reference = convert.pixels_to_image(models.pipeline.autoencoder.decode(convert.latent_from_comfy(latent)))
    assert decoded.shape == (1, 24, 40, 3) and torch.equal(decoded, reference)


# --- Kontext Edit --------------------------------------------------------------------------------

def test_edit_node_equals_the_pipeline_and_reports_progress(models, comfy):
    image = _image(1)
    latent, out_image = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "make it red"), seed=3,
                                              image=image, steps=3, resize="keep").outputs
    expected = models.pipeline.edit(_pil(image), "make it red", seed=3, steps=3, resize="keep", decode=False).latents
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))
    assert torch.equal(out_image, resolve.decode_image(models.pipeline.autoencoder, expected))
    h, w = expected.shape[-2:]
    assert comfy.bars == [(1, 3, (1, 16, h, w)), (2, 3, (1, 16, h, w)), (3, 3, (1, 16, h, w))]
    assert comfy.checks == 3  # Cancel is looked at every step


def test_a_failed_compile_says_to_set_compile_off(models, monkeypatch):
    from dataclasses import replace

    from kontext_core import KontextTransformer

    def broken_backend(graph_module, example_inputs):
        raise OSError("no C compiler found")  # what a machine without a toolchain gives inductor

    compile_blocks = KontextTransformer.compile_blocks
    monkeypatch.setattr(KontextTransformer, "compile_blocks", lambda self: compile_blocks(self, backend=broken_backend))
    compiled_ref = replace(models.model, compile=True)  # as the loader makes it on a CUDA machine with Triton
    torch._dynamo.reset()
    try:
        with pytest.raises(RuntimeError, match="no C compiler found.*set compile to off on Load Kontext Model"):
            nodes.KontextEdit.run(compiled_ref, models.vae, _prompt(models, "red"), image=_image(1), **FAST)
        assert not resolve.transformer(models.model).blocks_compiled  # compile off again: the shared model
        nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "red"), image=_image(1), **FAST)
    finally:
        torch._dynamo.reset()


def test_edit_node_takes_native_flux_conditioning(models):
    """CLIPTextEncodeFlux / FluxGuidance / ReferenceLatent output: guidance and reference latents are used."""
    image, style = _image(1), _image(2, size=(24, 24))
    txt, pooled = models.encoders.encode(["in this style"])
    style_raw = convert.scaled_to_raw(models.pipeline.encode_image(_pil(style), resize="keep"))
    native = [[txt, {"pooled_output": pooled, "guidance": 4.0, "reference_latents": [style_raw]}]]
    latent = nodes.KontextEdit.run(models.model, models.vae, native, seed=1, guidance=2.5, image=image,
                                   **FAST).outputs[0]
    context = [models.pipeline.encode_image(_pil(image), resize="keep"), convert.raw_to_scaled(style_raw)]
    expected = models.pipeline.generate(TextConditioning(txt, pooled),
                                        GenerationSettings(steps=2, guidance=4.0, seed=1, placement="offset"),
                                        context_latents=context, latent_size=tuple(context[0].shape[-2:]))
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))


def test_edit_node_text_to_image_from_an_empty_latent(models):
    target = {"samples": torch.zeros(2, 16, 6, 8)}  # what Empty SD3 Latent Image makes (batch 2)
    latent, image = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "a fox"), seed=5, target=target,
                                          **FAST).outputs
    cond = models.pipeline.encode_prompt("a fox")
    expected = models.pipeline.generate(TextConditioning(cond.txt.expand(2, -1, -1), cond.y.expand(2, -1)),
                                        GenerationSettings(steps=2, seed=5), latent_size=(6, 8))
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected)) and image.shape == (2, 12, 16, 3)


def test_edit_node_denoise_starts_from_the_target(models):
    start = models.pipeline.encode_image(_pil(_image(6)), resize="keep")
    target = convert.latent_to_comfy(start)
    latent = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "sharper"), seed=2, denoise=0.5,
                                   target=target, image=_image(6), **FAST).outputs[0]
    init = convert.latent_from_comfy(target)
    expected = models.pipeline.generate(models.pipeline.encode_prompt("sharper"),
                                        GenerationSettings(steps=2, seed=2, denoise=0.5),
                                        context_latents=[start], latent_size=tuple(init.shape[-2:]), init_latent=init)
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))


def test_edit_node_true_cfg_uses_the_negative(models):
    image = _image(1)
    positive, negative = _prompt(models, "red"), _prompt(models, "blurry")
    latent = nodes.KontextEdit.run(models.model, models.vae, positive, seed=1, sampler="true_cfg", true_cfg=3.0,
                                   negative=negative, image=image, **FAST).outputs[0]
    context = models.pipeline.encode_image(_pil(image), resize="keep")
    expected = models.pipeline.generate(models.pipeline.encode_prompt("red"),
                                        GenerationSettings(steps=2, seed=1, sampler="true_cfg", true_cfg=3.0),
                                        context_latents=[context], latent_size=tuple(context.shape[-2:]),
                                        negative=models.pipeline.encode_prompt("blurry"))
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))
    with pytest.raises(ValueError, match="true_cfg needs a negative"):
        nodes.KontextEdit.run(models.model, models.vae, positive, sampler="true_cfg", image=image, **FAST)


def test_edit_node_context_latents_are_references(models):
    image, other = _image(1), _image(7)
    context = nodes.KontextEncode.run(models.vae, other, resize="keep").outputs[0]
    with_latent = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "mix"), seed=1, image=image,
                                        context=context, **FAST).outputs[0]
    with_image = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "mix"), seed=1, image=image,
                                       image_2=other, **FAST).outputs[0]
    assert rel_error(with_latent["samples"], with_image["samples"]) < 1e-5


def test_edit_node_errors_name_the_fix(models):
    cond = _prompt(models, "x")
    with pytest.raises(ValueError, match="nothing sets the output size"):
        nodes.KontextEdit.run(models.model, models.vae, cond, **FAST)
    with pytest.raises(ValueError, match="Empty SD3 Latent Image"):
        nodes.KontextEdit.run(models.model, models.vae, cond, target={"samples": torch.zeros(1, 4, 8, 8)}, **FAST)
    with pytest.raises(TypeError, match="Load Kontext Model"):
        nodes.KontextEdit.run(object(), models.vae, cond, image=_image(1), **FAST)


def test_cancel_stops_sampling_between_steps(models, comfy):
    comfy.interrupt_at = 2
    with pytest.raises(Interrupted):
        nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "x"), image=_image(1), steps=4, resize="keep")
    assert [value for value, _, _ in comfy.bars] == [1]


def test_edit_node_accepts_comfyuis_vae(models):
    image = _image(1)
    cond = _prompt(models, "make it red")
    ours = nodes.KontextEdit.run(models.model, models.vae, cond, seed=3, image=image, **FAST).outputs
    theirs = nodes.KontextEdit.run(models.model, FakeComfyVae(models.pipeline.autoencoder), cond, seed=3,
                                   image=image, **FAST).outputs
    assert rel_error(theirs[0]["samples"], ours[0]["samples"]) < 1e-4
    assert (theirs[1] - ours[1]).abs().max() < 1e-4
    wrong = FakeComfyVae(models.pipeline.autoencoder)
    wrong.latent_channels = 4
    with pytest.raises(ValueError, match="FLUX VAE"):
        nodes.KontextDecode.run(wrong, {"samples": torch.zeros(1, 16, 4, 4)})


def _lora_file(model, path, seed: int = 5):
    """A BFL-format LoRA on a few layers of the tiny model."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in ("img_in", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        module = model.get_submodule(layer)
        tensors[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator)
        tensors[f"diffusion_model.{layer}.lora_B.weight"] = 0.1 * torch.randn(module.out_features, 4,
                                                                               generator=generator)
        tensors[f"diffusion_model.{layer}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))


def test_lora_node_merges_the_lora_and_keeps_it_until_a_run_asks_for_others(models, comfy):
    transformer = models.pipeline.transformer
    _lora_file(transformer, comfy.root / "loras" / "style.safetensors")
    with pytest.raises(ValueError, match="finite"):  # through the queue API: refused on this node, not later
        nodes.KontextLoRA.run(models.model, "style.safetensors", strength=float("nan"))
    with_lora = nodes.KontextLoRA.run(models.model, "style.safetensors", strength=0.8).outputs[0]
    assert with_lora.loras[0].strength == 0.8 and models.model.loras == ()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    image, cond = _image(1), _prompt(models, "x")
    # The references, from the core with the LoRA on the fly, before any node has merged anything.
    expected = models.pipeline.edit(_pil(image), "x", seed=1, steps=2, resize="keep", decode=False,
                                    loras=[(with_lora.loras[0].path, 0.8)]).latents
    stronger = models.pipeline.edit(_pil(image), "x", seed=1, steps=2, resize="keep", decode=False,
                                    loras=[(with_lora.loras[0].path, 1.0)]).latents
    without = models.pipeline.edit(_pil(image), "x", seed=1, steps=2, resize="keep", decode=False).latents
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
    assert rel_error(expected, without) > 1e-2  # the LoRA's effect, far above the tolerances below

    latent = nodes.KontextEdit.run(with_lora, models.vae, cond, seed=1, image=image, **FAST).outputs[0]["samples"]
    # Merged (float64 sum, rounded once) vs on the fly (a separate float32 GEMM): rounding apart.
    assert rel_error(latent, convert.scaled_to_raw(expected)) < 1e-5
    merged = active_loras(transformer)
    assert [h.mode for h in merged] == ["merge"] and not hooked(transformer)
    assert not torch.equal(transformer.state_dict()["single_blocks.0.linear1.weight"],
                           before["single_blocks.0.linear1.weight"])

    # The same LoRAs again: nothing merged anew, the same result.
    again = nodes.KontextEdit.run(with_lora, models.vae, cond, seed=1, image=image, **FAST).outputs[0]["samples"]
    assert active_loras(transformer) == merged and torch.equal(again, latent)

    # Another strength: the old merge comes off, the new one goes on.
    at_one = nodes.KontextLoRA.run(models.model, "style.safetensors", strength=1.0).outputs[0]
    stronger_latent = nodes.KontextEdit.run(at_one, models.vae, cond, seed=1, image=image, **FAST).outputs[0]
    assert rel_error(stronger_latent["samples"], convert.scaled_to_raw(stronger)) < 1e-5
    assert active_loras(transformer) == merged and merged[0].strength == 1.0  # re-merged from the kept originals

    # A run without LoRAs gets the original weights back, bit for bit.
    plain = nodes.KontextEdit.run(models.model, models.vae, cond, seed=1, image=image, **FAST).outputs[0]
    assert torch.equal(plain["samples"], convert.scaled_to_raw(without))
    assert active_loras(transformer) == []
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
    with pytest.raises(FileNotFoundError):
        nodes.KontextLoRA.run(models.model, "missing.safetensors")


def test_lora_without_memory_for_the_merge_runs_on_the_fly(models, comfy, monkeypatch, caplog):
    transformer = models.pipeline.transformer
    _lora_file(transformer, comfy.root / "loras" / "style.safetensors")
    with_lora = nodes.KontextLoRA.run(models.model, "style.safetensors", strength=1.0).outputs[0]
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    image, cond = _image(1), _prompt(models, "x")
    expected = models.pipeline.edit(_pil(image), "x", seed=1, steps=2, resize="keep", decode=False,
                                    loras=[(with_lora.loras[0].path, 1.0)]).latents
    real_apply = resolve.apply_lora

    def apply(model, weights, strength, mode):
        if mode == "merge":  # as the CPU allocator says it when the originals' copy does not fit
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 24 GB")
        return real_apply(model, weights, strength, mode=mode)

    monkeypatch.setattr(resolve, "apply_lora", apply)
    latent = nodes.KontextEdit.run(with_lora, models.vae, cond, seed=1, image=image, **FAST).outputs[0]
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))  # on the fly, as the core does
    assert [h.mode for h in active_loras(transformer)] == ["on_the_fly"] and "no memory to merge" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())

    def broken(model, weights, strength, mode):
        raise RuntimeError("a bug, not memory")

    monkeypatch.setattr(resolve, "apply_lora", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        nodes.KontextEdit.run(with_lora, models.vae, cond, seed=1, image=image, **FAST)


def fp8_model_with_lora(comfy, tiny_transformer):
    """An fp8 file loaded by the loader node -> (its reference, the transformer, the reference with a LoRA)."""
    save_transformer(tiny_transformer, comfy.root / "diffusion_models" / "tiny_fp8.safetensors", layout="comfy",
                     weights="fp8_e4m3fn")
    fp8 = nodes.KontextModelLoader.run("tiny_fp8.safetensors").outputs[0]
    transformer = resolve.transformer(fp8)
    _lora_file(transformer, comfy.root / "loras" / "style.safetensors")
    return fp8, transformer, nodes.KontextLoRA.run(fp8, "style.safetensors", strength=1.0).outputs[0]


def test_lora_node_on_fp8_weights_applies_on_the_fly_and_keeps_it(models, comfy, tiny_transformer):
    fp8, transformer, with_lora = fp8_model_with_lora(comfy, tiny_transformer)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    image, cond = _image(1), _prompt(models, "x")
    seen = []
    original_sample = KontextPipeline._sample

    def sample(self, *args, **kwargs):  # the LoRAs sampling runs with
        seen.append([h.mode for h in active_loras(self.transformer)])
        return original_sample(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KontextPipeline, "_sample", sample)
        latent = nodes.KontextEdit.run(with_lora, models.vae, cond, seed=1, image=image, **FAST).outputs[0]
    kept = active_loras(transformer)
    assert seen == [["on_the_fly"]] and [h.mode for h in kept] == ["on_the_fly"]  # kept for the next run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KontextPipeline, "_sample", sample)
        again = nodes.KontextEdit.run(with_lora, models.vae, cond, seed=1, image=image, **FAST).outputs[0]
    assert active_loras(transformer) == kept and seen[-1] == ["on_the_fly"]  # the same handle, not re-applied
    assert torch.equal(again["samples"], latent["samples"])
    plain = nodes.KontextEdit.run(fp8, models.vae, cond, seed=1, image=image, **FAST).outputs[0]
    assert active_loras(transformer) == []
    assert not torch.equal(latent["samples"], plain["samples"])
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


# --- sessions ------------------------------------------------------------------------------------

def _start(models, image=None, **kwargs):
    kwargs.setdefault("text_encoders", models.text)
    return nodes.KontextStartSession.run(models.model, models.vae, image if image is not None else _image(1),
                                         resize="keep", **kwargs)


def test_two_turns_through_the_nodes_equal_edit_session(models):
    image = _image(1)
    start = _start(models, image)
    state0, image0, latent0 = start.outputs
    first = nodes.KontextEditTurn.run(state0, "add a hat", seed=1, steps=2).outputs[0]
    second = nodes.KontextEditTurn.run(first, "night time", seed=2, steps=2)
    state2, image2, latent2 = second.outputs

    session = models.pipeline.session(_pil(image), resize="keep")
    session.edit("add a hat", seed=1, steps=2)
    session.edit("night time", seed=2, steps=2)
    assert torch.equal(state2.turns[-1].latent, session.latent)
    assert torch.equal(latent2["samples"], convert.scaled_to_raw(session.latent))
    assert torch.equal(image2, resolve.decode_image(models.pipeline.autoencoder, session.latent))
    assert [t.prompt for t in state2.turns] == ["", "add a hat", "night time"]
    assert [t.parent for t in state2.turns] == [None, 0, 1] and state2.current == 2
    assert torch.equal(image0, resolve.decode_image(models.pipeline.autoencoder, session.turns[0].latent))
    # Nodes never change a state they were given: ComfyUI may hand it to several nodes.
    assert len(state0.turns) == 1 and len(first.turns) == 2
    assert second.ui["kontext_turns"][2] == {"turn": 2, "parent": 1, "prompt": "night time", "current": True}
    assert second.ui["kontext_images"] == ["preview_0", "preview_1", "preview_2"]


def test_pick_turn_branches_like_edit_session(models):
    image = _image(2)
    state = _start(models, image).outputs[0]
    state = nodes.KontextEditTurn.run(state, "a", seed=1, steps=2).outputs[0]
    state = nodes.KontextEditTurn.run(state, "b", seed=2, steps=2).outputs[0]
    picked, picked_image, _ = nodes.KontextPickTurn.run(state, turn=1).outputs
    assert picked.current == 1 and torch.equal(picked_image, state.images[1])
    branched = nodes.KontextEditTurn.run(picked, "c", seed=3, steps=2).outputs[0]

    session = models.pipeline.session(_pil(image), resize="keep")
    session.edit("a", seed=1, steps=2)
    session.edit("b", seed=2, steps=2)
    session.branch(1)
    session.edit("c", seed=3, steps=2)
    assert torch.equal(branched.turns[-1].latent, session.latent)
    assert branched.turns[-1].parent == 1 and len(branched.turns) == 4
    with pytest.raises(ValueError, match="no turn 7.*0 to 2"):
        nodes.KontextPickTurn.run(state, turn=7)


def test_loop_node_returns_every_turn(models, comfy):
    state0 = _start(models).outputs[0]
    comfy.bars.clear()
    result = nodes.KontextEditLoop.run(state0, "add a hat\n\n  night time  \nsnow", seed=10, steps=2)
    state, images = result.outputs
    assert images.shape[0] == 4 and len(state.turns) == 4  # the start and one turn per line
    # One progress bar over all turns.
    assert [value for value, _, _ in comfy.bars] == [1, 2, 3, 4, 5, 6] and {t for _, t, _ in comfy.bars} == {6}
    chained = state0
    for number, prompt in enumerate(["add a hat", "night time", "snow"]):
        chained = nodes.KontextEditTurn.run(chained, prompt, seed=10 + number, steps=2).outputs[0]
    for ours, reference in zip(state.turns, chained.turns):
        assert torch.equal(ours.latent, reference.latent)
    assert torch.equal(images, torch.cat(chained.images))
    assert [t["turn"] for t in result.ui["kontext_turns"]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="one instruction per line"):
        nodes.KontextEditLoop.run(state0, " \n ")


def test_turn_refuses_text_encoders_of_another_width_before_sampling(models, tmp_path):
    # A CLIP twice as wide as the model reads: named at once, not a shape error inside the first block.
    from kontext_core.text.text_encoders import TextEncoders, load_clip_tokenizer, load_t5_tokenizer
    from tiny_encoders import clip_tokenizer_dir, t5_tokenizer_dir, tiny_clip, tiny_t5

    config = models.pipeline.transformer.config
    wrong = TextEncoders(tiny_t5(d_model=config.context_in_dim), tiny_clip(hidden_size=2 * config.vec_in_dim),
                         load_t5_tokenizer(t5_tokenizer_dir(tmp_path / "t5")),
                         load_clip_tokenizer(clip_tokenizer_dir(tmp_path / "clip")))
    text = model_cache.TextEncodersRef("t5xxl_fp16.safetensors", "clip_b.safetensors", "fp32", "cpu")
    model_cache.CACHE.put(text.key, wrong)
    state = _start(models, text_encoders=text).outputs[0]
    with pytest.raises(CheckpointError, match=rf"CLIP with hidden size {2 * config.vec_in_dim}, .*this transformer "
                                              rf"reads: a {config.vec_in_dim}-wide pooled vector .*clip_l.safetensors"):
        nodes.KontextEditTurn.run(state, "a", seed=1, steps=2)


def test_turn_with_conditioning_and_without_text_encoders(models):
    state = _start(models, text_encoders=None).outputs[0]
    with pytest.raises(ValueError, match="Load Kontext Text Encoders"):
        nodes.KontextEditTurn.run(state, "a", steps=2)
    by_prompt = nodes.KontextEditTurn.run(state, "a", seed=1, steps=2, text_encoders=models.text).outputs[0]
    by_cond = nodes.KontextEditTurn.run(state, "", seed=1, steps=2, conditioning=_prompt(models, "a")).outputs[0]
    assert torch.equal(by_prompt.turns[-1].latent, by_cond.turns[-1].latent)


def test_session_turns_use_the_models_loras(models, comfy):
    transformer = models.pipeline.transformer
    _lora_file(transformer, comfy.root / "loras" / "style.safetensors")
    with_lora = nodes.KontextLoRA.run(models.model, "style.safetensors", strength=1.0).outputs[0]
    image = _image(3)
    state = nodes.KontextStartSession.run(with_lora, models.vae, image, resize="keep",
                                          text_encoders=models.text).outputs[0]
    # The reference first: once a turn has run, the LoRA stays merged into the shared model.
    expected = models.pipeline.edit(_pil(image), "a", seed=1, steps=2, resize="keep", decode=False,
                                    loras=[(with_lora.loras[0].path, 1.0)]).latents
    turn = nodes.KontextEditTurn.run(state, "a", seed=1, steps=2).outputs[0]
    assert rel_error(turn.turns[-1].latent, expected) < 1e-5
    assert [h.mode for h in active_loras(transformer)] == ["merge"]


# --- Kontext Step Cache ----------------------------------------------------------------------------

def test_step_cache_node_feeds_the_edit_node(models, caplog):
    # At threshold 0 every step is computed: the node's output equals the uncached pipeline's bit for bit.
    image = _image(1)
    exact = nodes.KontextStepCache.run("teacache", 0.0).outputs[0]
    with caplog.at_level("INFO", logger="comfyui-kontext"):
        latent = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "make it red"), seed=3, image=image,
                                       steps=4, resize="keep", cache=exact).outputs[0]
    expected = models.pipeline.edit(_pil(image), "make it red", seed=3, steps=4, resize="keep", decode=False).latents
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))
    assert "Kontext Edit, step cache teacache:0: 4 of 4 steps computed" in caplog.text

    skipping = nodes.KontextStepCache.run("first-block", 10.0).outputs[0]
    latent = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "make it red"), seed=3, image=image,
                                   steps=4, resize="keep", cache=skipping).outputs[0]
    cached = models.pipeline.edit(_pil(image), "make it red", seed=3, steps=4, resize="keep", decode=False,
                                  cache="first-block:10")
    assert cached.cache_stats.skipped == 2 and torch.equal(latent["samples"], convert.scaled_to_raw(cached.latents))


def test_step_cache_on_session_turns_and_loops(models, caplog):
    state0 = _start(models).outputs[0]
    skipping = nodes.KontextStepCache.run("first-block", 10.0).outputs[0]
    with caplog.at_level("INFO", logger="comfyui-kontext"):
        turn = nodes.KontextEditTurn.run(state0, "a hat", seed=1, steps=3, cache=skipping).outputs[0]
    assert turn.turns[-1].cache_stats.skipped == 1 and "turn 1, step cache first-block:10" in caplog.text
    session = models.pipeline.session(_pil(_image(1)), resize="keep")
    session.edit("a hat", seed=1, steps=3, cache="first-block:10")
    assert torch.equal(turn.turns[-1].latent, session.latent)

    looped = nodes.KontextEditLoop.run(state0, "a hat\nsnow", seed=1, steps=3, cache=skipping).outputs[0]
    assert [t.cache_stats.skipped for t in looped.turns[1:]] == [1, 1]
    assert torch.equal(looped.turns[1].latent, session.latent)
    plain = nodes.KontextEditTurn.run(state0, "a hat", seed=1, steps=3).outputs[0]
    assert plain.turns[-1].cache_stats is None and plain.turns[-1].settings.cache == "off"


# --- masks ---------------------------------------------------------------------------------------

def _mask(size, left, top, right, bottom, batch: int = 1) -> torch.Tensor:
    """A MASK [B, H, W] (what Load Image's mask output and the mask nodes give)."""
    mask = torch.zeros(batch, size[1], size[0])
    mask[:, top:bottom, left:right] = 1.0
    return mask


def _outside(mask, size, **options) -> torch.Tensor:
    from kontext_core.masks import MaskedEdit

    return MaskedEdit.prepare(mask, size, **options).weights == 0  # [B, H, W]


@pytest.mark.parametrize("size, rect, options", [
    ((40, 24), (0, 0, 16, 12), dict(grow=1, feather=2)),  # touching the top-left borders
    ((41, 35), (20, 18, 41, 35), dict(feather=3)),  # odd size, touching the bottom-right borders
    ((41, 35), (6, 5, 30, 25), dict(crop_to_mask=True, context_margin=4)),
])
def test_edit_node_with_a_mask_keeps_the_image_outside_it_exactly(models, size, rect, options):
    image, mask = _image(1, size), _mask(size, *rect)
    latent, out = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "make it red"), seed=3,
                                        image=image, mask=mask, **FAST, **options).outputs
    assert out.shape == image.shape
    outside = _outside(mask, size, **options)
    assert torch.equal(out[outside], image[outside])  # the IMAGE's own float values
    assert not torch.equal(out[~outside], image[~outside])
    expected = models.pipeline.edit(_pil(image), "make it red", seed=3, mask=mask, **FAST, **options)
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected.latents))
    assert convert.image_to_pil(out)[0].tobytes() == expected.images[0].tobytes()


def test_edit_node_mask_batch_of_two_and_a_gray_image(models):
    image = _image(2, (41, 35))
    gray = image.mean(-1, keepdim=True)  # a 1-channel IMAGE: its gray level repeated
    masks = torch.cat([_mask((41, 35), 0, 0, 20, 20), _mask((41, 35), 15, 10, 41, 35)])
    txt, pooled = models.encoders.encode(["red", "blue"])
    cond = [[txt, {"pooled_output": pooled}]]
    out = nodes.KontextEdit.run(models.model, models.vae, cond, seed=1, image=gray, mask=masks, feather=2,
                                **FAST).outputs[1]
    assert out.shape == (2, 35, 41, 3)
    outside = _outside(masks, (41, 35), feather=2)
    for index in range(2):
        assert torch.equal(out[index][outside[index]], gray[0].expand(-1, -1, 3)[outside[index]])


def test_edit_node_all_0_and_all_1_masks(models, monkeypatch, caplog):
    image, cond = _image(3, (41, 35)), _prompt(models, "x")
    plain = nodes.KontextEdit.run(models.model, models.vae, cond, seed=2, image=image, **FAST).outputs
    full = nodes.KontextEdit.run(models.model, models.vae, cond, seed=2, image=image, mask=torch.ones(35, 41),
                                 feather=4, **FAST).outputs
    assert torch.equal(full[0]["samples"], plain[0]["samples"]) and torch.equal(full[1], plain[1])

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(KontextPipeline, "generate", no_sampling)
    with caplog.at_level("WARNING", logger="comfyui-kontext"):
        latent, out = nodes.KontextEdit.run(models.model, models.vae, cond, seed=2, image=image,
                                            mask=torch.zeros(1, 35, 41), **FAST).outputs
    assert torch.equal(out, image) and "the mask is empty" in caplog.text
    assert torch.equal(latent["samples"], convert.scaled_to_raw(models.pipeline.encode_image(_pil(image), "keep")))


def test_edit_node_takes_the_targets_noise_mask(models):
    """Set Latent Noise Mask on the target: the same as connecting the mask."""
    image, cond = _image(4), _prompt(models, "x")
    mask = _mask((40, 24), 5, 5, 25, 20)
    by_mask = nodes.KontextEdit.run(models.model, models.vae, cond, seed=1, image=image, mask=mask, **FAST).outputs
    target = dict(convert.latent_to_comfy(models.pipeline.encode_image(_pil(image), "keep")),
                  noise_mask=mask.reshape(-1, 1, 24, 40))  # what SetLatentNoiseMask stores
    by_noise_mask = nodes.KontextEdit.run(models.model, models.vae, cond, seed=1, image=image, target=target,
                                          **FAST).outputs
    assert torch.equal(by_mask[1], by_noise_mask[1]) and torch.equal(by_mask[0]["samples"], by_noise_mask[0]["samples"])


def test_edit_node_latent_mask_without_an_image(models):
    """ComfyUI's latent workflow (VAE Encode -> Set Latent Noise Mask -> target, the image as a ReferenceLatent):
    outside the latent mask the result is the target's latent, exactly."""
    image = _image(5)
    encoded = models.pipeline.encode_image(_pil(image), "keep")
    txt, pooled = models.encoders.encode(["x"])
    native = [[txt, {"pooled_output": pooled, "reference_latents": [convert.scaled_to_raw(encoded)]}]]
    small = _mask((20, 12), 0, 0, 8, 6)  # another size than the 40x24 image: resized, with a warning
    target = dict(convert.latent_to_comfy(encoded), noise_mask=small[:, None])
    with pytest.warns(UserWarning, match="20x12 pixels but the image 40x24"):
        latent = nodes.KontextEdit.run(models.model, models.vae, native, seed=1, target=target, **FAST).outputs[0]
    from kontext_core.masks import MaskedEdit

    with pytest.warns(UserWarning):
        latent_mask = MaskedEdit.prepare(small, (40, 24)).latent_mask(tuple(encoded.shape[-2:]))
    kept = (latent_mask == 0).expand_as(encoded)
    result = convert.raw_to_scaled(latent["samples"])
    assert kept.any() and (result[kept] - encoded[kept]).abs().max() < 1e-6  # raw <-> scaled rounding only
    assert (result[~kept] - encoded[~kept]).abs().max() > 0.1
    with pytest.raises(ValueError, match="crop_to_mask cuts the masked region out of the image"):
        nodes.KontextEdit.run(models.model, models.vae, native, target=target, crop_to_mask=True, **FAST)


def test_edit_node_empty_latent_mask_passes_the_target_through_and_says_so(models, monkeypatch, caplog):
    # The same warning as with an image: an empty mask edits nothing, on either path.
    image = _image(5)
    encoded = models.pipeline.encode_image(_pil(image), "keep")
    txt, pooled = models.encoders.encode(["x"])
    native = [[txt, {"pooled_output": pooled, "reference_latents": [convert.scaled_to_raw(encoded)]}]]
    target = dict(convert.latent_to_comfy(encoded), noise_mask=torch.zeros(1, 1, 24, 40))

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(KontextPipeline, "generate", no_sampling)
    with caplog.at_level("WARNING", logger="comfyui-kontext"):
        latent = nodes.KontextEdit.run(models.model, models.vae, native, seed=1, target=target, **FAST).outputs[0]
    assert "the mask is empty" in caplog.text and "the target latent passes through" in caplog.text
    assert torch.equal(latent["samples"], target["samples"])


@pytest.mark.parametrize("direction", ["right", "down"])
def test_edit_node_stitch_placement_equals_the_core(models, direction):
    image, style = _image(6), _image(7, size=(24, 24))
    latent = nodes.KontextEdit.run(models.model, models.vae, _prompt(models, "style"), seed=2, image=image,
                                   image_2=style, placement="stitch", stitch_direction=direction, **FAST).outputs[0]
    expected = models.pipeline.edit([_pil(image), _pil(style)], "style", seed=2, placement="stitch",
                                    stitch_direction=direction, decode=False, **FAST).latents
    assert torch.equal(latent["samples"], convert.scaled_to_raw(expected))


def test_edit_turn_stitch_placement_equals_the_session(models):
    image, style = _image(30, (40, 32)), _image(31, (32, 48))
    state = _start(models, image).outputs[0]
    # The reference comes as a ReferenceLatent does, at its own size (the reference socket would encode it at the
    # preferred ~1 megapixel size: far too big for the tiny autoencoder's attention on the CPU).
    reference = models.pipeline.encode_image(_pil(style), "keep")
    txt, pooled = models.encoders.encode(["in this style"])
    native = [[txt, {"pooled_output": pooled, "reference_latents": [convert.scaled_to_raw(reference)]}]]
    turned, turned_image, turned_latent = nodes.KontextEditTurn.run(
        state, "", seed=4, steps=2, conditioning=native, placement="stitch", stitch_direction="down").outputs

    session = models.pipeline.session(_pil(image), resize="keep")
    received = convert.raw_to_scaled(convert.scaled_to_raw(reference))  # what the node reads off the wire
    expected = session.edit("", seed=4, steps=2, conditioning=TextConditioning(txt, pooled),
                            extra_references=[received], placement="stitch", stitch_direction="down")
    assert torch.equal(turned.turns[-1].latent, expected.latent)
    assert torch.equal(turned_latent["samples"], convert.scaled_to_raw(expected.latent))
    assert torch.equal(turned_image, resolve.decode_image(models.pipeline.autoencoder, expected.latent))
    settings = turned.turns[-1].settings
    assert (settings.placement, settings.stitch_direction) == ("stitch", "down")
    # The direction reached the stitching: joined side by side, the same turn is another one.
    beside = nodes.KontextEditTurn.run(state, "", seed=4, steps=2, conditioning=native, placement="stitch",
                                       stitch_direction="right").outputs[0]
    assert not torch.equal(beside.turns[-1].latent, expected.latent)


def test_edit_turn_stitches_a_reference_image_in_pixels(models, monkeypatch):
    # A reference IMAGE under stitch joins the turn's image as it is: never encoded on its own (which the tiny AE
    # would do at ~1 megapixel, then decode again for the stitching), the same turn as the session given the image.
    image, style = _image(32, (40, 32)), _image(33, (24, 40))
    state = _start(models, image).outputs[0]
    txt, pooled = models.encoders.encode(["in this style"])
    native = [[txt, {"pooled_output": pooled}]]

    def not_encoded(*args, **kwargs):
        raise AssertionError("a stitched reference was encoded on its own")

    monkeypatch.setattr(resolve, "encode_images", not_encoded)
    turned = nodes.KontextEditTurn.run(state, "", seed=5, steps=2, conditioning=native, reference=style,
                                       placement="stitch", stitch_direction="down").outputs[0]
    session = models.pipeline.session(_pil(image), resize="keep")
    expected = session.edit("", seed=5, steps=2, conditioning=TextConditioning(txt, pooled),
                            extra_references=[_pil(style)], placement="stitch", stitch_direction="down")
    assert torch.equal(turned.turns[-1].latent, expected.latent)


def test_masked_turns_through_the_session_nodes(models):
    image = _image(8, (41, 35))
    state = _start(models, image).outputs[0]
    first = nodes.KontextEditTurn.run(state, "a", seed=1, steps=2).outputs[0]
    width, height = first.images[0].shape[2], first.images[0].shape[1]
    mask = _mask((width, height), 0, 0, 20, 16)  # at the top-left corner
    second, second_image, _ = nodes.KontextEditTurn.run(first, "b", seed=2, steps=2, mask=mask, feather=2).outputs
    third = nodes.KontextEditTurn.run(second, "c", seed=3, steps=2).outputs[0]
    outside = _outside(mask, (width, height), feather=2)[0]
    assert torch.equal(second_image[0][outside], first.images[1][0][outside])  # turn 1's pixels, exactly
    assert not torch.equal(second_image[0][~outside], first.images[1][0][~outside])

    session = models.pipeline.session(_pil(image), resize="keep")
    session.edit("a", seed=1, steps=2)
    session.edit("b", seed=2, steps=2, mask=mask, feather=2)
    session.edit("c", seed=3, steps=2)
    assert all(torch.equal(ours.latent, theirs.latent) for ours, theirs in zip(third.turns, session.turns))
    # Branch back to turn 1 with Pick Turn, then a masked turn from there: turn 1's pixels outside again.
    picked = nodes.KontextPickTurn.run(third, turn=1).outputs[0]
    other = _mask((width, height), 10, 10, 40, 32)
    branched = nodes.KontextEditTurn.run(picked, "d", seed=4, steps=2, mask=other).outputs
    outside = _outside(other, (width, height))[0]
    assert branched[0].turns[-1].parent == 1
    assert torch.equal(branched[1][0][outside], third.images[1][0][outside])
    # The loop node takes one mask for every turn.
    looped = nodes.KontextEditLoop.run(state, "e\nf", seed=5, steps=2, mask=other).outputs[1]
    assert torch.equal(looped[2][outside], looped[1][outside]) and torch.equal(looped[1][outside], looped[0][outside])


# --- declarations, package, ComfyUI adapter ------------------------------------------------------

def test_every_node_declares_what_its_run_takes():
    ids = [node.spec().node_id for node in nodes.NODES]
    assert len(set(ids)) == len(ids) == 14 and all(i.startswith("Kontext") for i in ids)
    for node in nodes.NODES:
        spec = node.spec()
        assert spec.category == "Kontext" and spec.display_name and spec.description
        parameters = inspect.signature(node.run).parameters
        assert set(parameters) == {i.name for i in spec.inputs}, spec.node_id  # V3 passes inputs by name
        for item in spec.inputs:
            default = parameters[item.name].default
            if item.optional:
                assert default is None, (spec.node_id, item.name)
            elif item.is_widget and default is not inspect.Parameter.empty:
                assert default == item.default, (spec.node_id, item.name)
            if item.type == "COMBO" and not callable(item.options) and item.default is not None:
                assert item.default in item.choices(), (spec.node_id, item.name)
        assert len({o.name for o in spec.outputs}) == len(spec.outputs)


def test_pack_root_is_a_v3_entry_point_without_importing_comfyui():
    root = load_pack()
    assert root.WEB_DIRECTORY == "./js" and inspect.iscoroutinefunction(root.comfy_entrypoint)
    assert not hasattr(root, "NODE_CLASS_MAPPINGS")  # ComfyUI would prefer it over comfy_entrypoint
    assert "comfy_api" not in sys.modules and "folder_paths" not in sys.modules


@pytest.mark.skipif(adapter.available(), reason="checks the fallbacks used when ComfyUI is not importable")
def test_adapter_without_comfyui(tmp_path):
    assert adapter.compute_device().type in ("cpu", "cuda")
    assert adapter.filenames("vae") == [] and adapter.latent_previewer() is None
    assert adapter.preview_images(torch.zeros(1, 4, 4, 3)) is None
    assert adapter.tokenizer_folders() == (None, None)
    adapter.check_interrupted()
    adapter.progress_bar(3).update_absolute(1, 3, None)
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"")
    assert adapter.full_path("vae", str(existing)) == str(existing)
    with pytest.raises(FileNotFoundError, match="not in the vae folder"):
        adapter.full_path("vae", "ae.safetensors")


def test_unload_models_in_comfyui_releases_our_cache(monkeypatch):
    calls = []
    fake = types.ModuleType("comfy.model_management")
    fake.unload_all_models = lambda: calls.append("comfy")
    package = types.ModuleType("comfy")
    package.model_management = fake
    monkeypatch.setitem(sys.modules, "comfy", package)
    monkeypatch.setitem(sys.modules, "comfy.model_management", fake)
    monkeypatch.setattr(adapter, "_unload_callbacks", [])
    cache = model_cache.ModelCache()
    cache.put(("x",), object())
    adapter.on_unload_models(cache.release)
    adapter.on_unload_models(lambda: calls.append("second"))  # wraps only once
    fake.unload_all_models()
    assert calls == ["comfy", "second"] and not cache.models
