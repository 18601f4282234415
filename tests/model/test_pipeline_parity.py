"""Full sampling runs against diffusers' FluxKontextPipeline and the reference's golden trajectory."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import golden_dir, rel_error
from kontext_core import load_transformer, save_autoencoder, save_transformer
from kontext_core.masks import LatentInpaint
from kontext_core.pipeline import GenerationSettings, KontextPipeline
from kontext_core.sampling import TextConditioning, flux_schedule, sample_euler
from kontext_core.model.tokens import context_tokens, pack_latent

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-time reference (pip install diffusers)")


def test_schedules_equal_the_reference_for_several_resolutions(golden_meta):
    for tokens, reference in golden_meta["schedules_28_steps_by_target_tokens"].items():
        assert flux_schedule(28, int(tokens)) == pytest.approx(reference, abs=1e-7), tokens


def test_golden_sampling_trajectory_is_reproduced():
    directory = golden_dir()
    sampling = load_file(directory / "sampling.safetensors")
    forward = load_file(directory / "forward.safetensors")
    model = load_transformer(directory / "transformer_tiny.safetensors", dtype="fp64")
    schedule = flux_schedule(4, 24)
    assert schedule == pytest.approx(sampling["schedule"].tolist(), abs=1e-12)
    ctx, ctx_ids = context_tokens([forward["context_latent"]], (8, 12), "kontext", torch.float64)
    with torch.no_grad():
        out = sample_euler(model, sampling["noise_packed"], forward["img_ids"],
                           TextConditioning(forward["txt"], forward["y"]), schedule, guidance=2.5,
                           context=ctx, context_ids=ctx_ids)
    assert rel_error(out, sampling["final_packed"]) <= 1e-6


def _diffusers_pipeline(kind, transformer, autoencoder, folder):
    """diffusers' pipeline `kind` on our tiny models, saved by our converter in the diffusers layout."""
    save_transformer(transformer, folder / "transformer", layout="diffusers")
    save_autoencoder(autoencoder, folder / "vae", layout="diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return kind(
        scheduler=scheduler,
        vae=diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=diffusers.FluxTransformer2DModel.from_pretrained(folder / "transformer").eval(),
    )


@pytest.fixture
def pipelines(tiny_transformer, tiny_autoencoder, tmp_path):
    theirs = _diffusers_pipeline(diffusers.FluxKontextPipeline, tiny_transformer, tiny_autoencoder, tmp_path)
    return KontextPipeline(tiny_transformer, tiny_autoencoder), theirs


@pytest.mark.parametrize("with_image", [True, False], ids=["edit", "t2i"])
def test_full_sampling_matches_flux_kontext_pipeline(pipelines, with_image):
    ours, theirs = pipelines
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    width, height, steps, guidance = 48, 32, 4, 2.5  # tiny AE: 2x downsampling, so latent 16x24
    txt = torch.randn(1, 7, 48, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    noise = torch.randn(1, 16, height // 2, width // 2, generator=generator)
    image = Image.fromarray((torch.rand(height, width, 3, generator=generator).numpy() * 255).astype(np.uint8))
    settings = GenerationSettings(steps=steps, guidance=guidance)
    context = [ours.encode_image(image, resize="keep")] if with_image else []
    with torch.no_grad():
        latent = ours.generate(TextConditioning(txt, pooled), settings, context_latents=context,
                               latent_size=(height // 2, width // 2), noise=noise)
        reference = theirs(
            image=image if with_image else None, prompt_embeds=txt, pooled_prompt_embeds=pooled,
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
            latents=pack_latent(noise), max_area=height * width, _auto_resize=False, output_type="latent",
        ).images
    assert reference.shape == (1, 8 * 12, 64)
    assert rel_error(pack_latent(latent), reference) < 1e-4


def test_masked_sampling_matches_flux_kontext_inpaint_pipeline(tiny_transformer, tiny_autoencoder, tmp_path):
    """The latent blending of a masked edit against diffusers' FluxKontextInpaintPipeline at strength 1.0:
    float32, same noise, rel. error < 1e-4 (as the unmasked parity above).

    diffusers binarizes the mask image and shrinks it to the latent by nearest interpolation; a mask that is
    constant over each latent pixel's 2x2 block (the tiny AE downsamples 2x) gives both sides the same
    latent mask, which ours then takes directly. diffusers draws the noise itself from a seeded generator (given
    `latents=`, it re-packs the already packed noise it blends with), and so do we, from the same seed."""
    theirs = _diffusers_pipeline(diffusers.FluxKontextInpaintPipeline, tiny_transformer, tiny_autoencoder, tmp_path)
    ours = KontextPipeline(tiny_transformer, tiny_autoencoder)
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    width, height, steps, guidance = 48, 32, 4, 2.5
    txt = torch.randn(1, 7, 48, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    image = Image.fromarray((torch.rand(height, width, 3, generator=generator).numpy() * 255).astype(np.uint8))
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    noise = torch.randn(1, 16, height // 2, width // 2, generator=torch.Generator().manual_seed(seed))
    latent_mask = torch.zeros(1, 1, height // 2, width // 2)
    latent_mask[..., 3:11, 5:17] = 1.0
    latent_mask[..., 0, :] = 1.0  # along the top border too
    mask_image = Image.fromarray((latent_mask[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()
                                  * 255).astype(np.uint8), "L")
    context = ours.encode_image(image, resize="keep")
    with torch.no_grad():
        latent = ours.generate(TextConditioning(txt, pooled), GenerationSettings(steps=steps, guidance=guidance),
                               context_latents=[context], latent_size=(height // 2, width // 2), noise=noise,
                               inpaint=LatentInpaint(latent_mask, context))
        reference = theirs(
            image=image, mask_image=mask_image, strength=1.0, prompt_embeds=txt, pooled_prompt_embeds=pooled,
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed), max_area=height * width, _auto_resize=False,
            output_type="latent",
        ).images
    assert reference.shape == (1, 8 * 12, 64)
    assert rel_error(pack_latent(latent), reference) < 1e-4
    # The mask did something: outside it both are the image's latent, inside they moved away from it.
    kept = (latent_mask == 0).expand_as(context)
    assert torch.equal(latent[kept], context[kept]) and rel_error(latent[~kept], context[~kept]) > 0.1
