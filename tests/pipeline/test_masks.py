"""Masked edits: the mask math (kontext_core/masks.py) and masked edits, crops and session turns on tiny models.

The promise checked throughout: wherever the (grown) mask is 0, the output's 8-bit pixels are the input's.
References: brute-force distances for grow and feather, torch's bilinear interpolation (ComfyUI's
comfy.utils.reshape_mask uses it for masks), the unmasked pipeline for all-1 masks.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kontext_core.image import stitch_images, target_size, unit_images
from kontext_core.masks import (Box, LatentInpaint, MaskedEdit, as_mask, composite, crop_box, distance_to,
                                feather_weights, fit_mask, grow_region, mask_from_image)
from kontext_core.pipeline import GenerationSettings
from test_pipeline import _image

FAST = dict(steps=2, resize="keep")


def _rect(size, left, top, right, bottom, batch: int = 1) -> torch.Tensor:
    width, height = size
    mask = torch.zeros(batch, height, width)
    mask[:, top:bottom, left:right] = 1.0
    return mask


def _outside(plan_mask, grow=0, feather=0, size=None) -> np.ndarray:
    """Where the grown mask is 0 (bool [B, H, W])."""
    plan = MaskedEdit.prepare(plan_mask, size or tuple(reversed(plan_mask.shape[-2:])), grow=grow, feather=feather)
    return (plan.weights == 0).numpy()


def _assert_outside_exact(result_images, source: Image.Image, outside: np.ndarray) -> None:
    source_pixels = np.asarray(source.convert("RGB"))
    for index, image in enumerate(result_images):
        assert image.size == source.size
        pixels = np.asarray(image)
        keep = outside[min(index, outside.shape[0] - 1)]
        assert keep.any()
        assert np.array_equal(pixels[keep], source_pixels[keep]), f"item {index}: outside pixels changed"


def _brute_distance(targets: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from every pixel to the nearest True pixel, by trying them all."""
    batch, height, width = targets.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    out = torch.full((batch, height, width), float("inf"))
    for b in range(batch):
        points = torch.nonzero(targets[b]).float()
        if len(points):
            d = ((ys[..., None] - points[:, 0]) ** 2 + (xs[..., None] - points[:, 1]) ** 2).min(-1).values
            out[b] = d.sqrt()
    return out


# --- the mask as given ----------------------------------------------------------------------------

def test_masks_come_in_comfyuis_shapes_and_as_images():
    assert as_mask(torch.ones(5, 7)).shape == (1, 5, 7)  # MASK [H, W]
    assert as_mask(torch.ones(2, 5, 7)).shape == (2, 5, 7)  # MASK [B, H, W]
    assert as_mask(torch.ones(2, 1, 5, 7)).shape == (2, 5, 7)  # a LATENT's noise_mask
    assert as_mask(np.zeros((5, 7), dtype=np.float32)).shape == (1, 5, 7)
    picture = Image.new("L", (7, 5), 0)
    picture.putpixel((3, 2), 255)
    mask = mask_from_image(picture.convert("RGB"))
    assert mask.shape == (1, 5, 7) and mask.sum() == 1 and mask[0, 2, 3] == 1
    assert torch.equal(as_mask(picture), mask)


@pytest.mark.parametrize("mask, message", [
    (torch.full((4, 4), 255.0), "0..255"),
    (torch.full((4, 4), -0.5), "0 \\(keep\\) to 1"),
    (torch.full((4, 4), float("nan")), "NaN"),
    (torch.zeros(1, 3, 4, 4), "mask \\[height, width\\]"),
    (torch.zeros(0, 4), "no side 0"),
    ("mask.png", "expected a mask"),
])
def test_bad_masks_are_explained(mask, message):
    with pytest.raises((ValueError, TypeError), match=message):
        as_mask(mask)


def test_a_mask_of_another_size_is_resized_bilinearly_with_a_warning():
    mask = torch.rand(2, 8, 10)
    with pytest.warns(UserWarning, match="10x8 pixels but the image 41x35"):
        fitted = fit_mask(mask, (41, 35))
    # ComfyUI's reshape_mask: F.interpolate(mode="bilinear") on [B, 1, H, W]
    reference = F.interpolate(mask[:, None], size=(35, 41), mode="bilinear")[:, 0]
    assert torch.equal(fitted, reference.clamp(0, 1))
    assert fit_mask(mask, (10, 8)) is mask  # the image's size: used as it is, no warning


# --- grow and feather -----------------------------------------------------------------------------

def test_distance_is_exact_up_to_the_cap():
    generator = torch.Generator().manual_seed(3)
    targets = torch.rand(2, 23, 31, generator=generator) > 0.97
    targets[1] = False
    targets[1, 0, 30] = True  # one target in a corner: long distances
    exact = _brute_distance(targets)
    for cap in (1, 4, 9):
        ours = distance_to(targets, cap)
        within = exact <= cap
        assert torch.allclose(ours[within], exact[within], atol=1e-5)
        assert (ours[~within] > cap).all()
    assert torch.isinf(distance_to(torch.zeros(1, 4, 5, dtype=torch.bool), 3)).all()


def test_grow_adds_every_pixel_within_the_distance():
    region = torch.zeros(1, 20, 25, dtype=torch.bool)
    region[0, 8:11, 9:13] = True
    region[0, 0, 0] = True  # at a corner: grows into the image only
    grown = grow_region(region, 3)
    assert torch.equal(grown, _brute_distance(region) <= 3)
    assert torch.equal(grow_region(region, 0), region)


def test_feathering_stays_inside_the_mask_and_rises_with_the_distance_from_its_border():
    region = torch.zeros(1, 30, 40, dtype=torch.bool)
    region[0, 5:25, 0:30] = True  # touching the left edge
    weights = feather_weights(region, 4)
    assert (weights <= region.float()).all() and (weights[~region] == 0).all()
    inside = _brute_distance(~region)[region]
    assert torch.allclose(weights[region], (inside / 5).clamp(max=1), atol=1e-6)
    # Monotone along any line inward from the border, and 1 from feather + 1 pixels in.
    row = weights[0, 15, :30]
    assert (row[:-1] >= row[1:]).all() and row[0] == 1  # the image's left edge is no border
    column = weights[0, 5:15, 10]
    assert (column[1:] >= column[:-1]).all() and column[0] == pytest.approx(1 / 5) and column[4] == 1
    # A region covering the whole image has no border: weight 1 everywhere.
    assert torch.equal(feather_weights(torch.ones(1, 6, 7, dtype=torch.bool), 3), torch.ones(1, 6, 7))


def test_prepare_binarizes_grows_then_feathers():
    mask = torch.zeros(1, 12, 12)
    mask[0, 4:8, 4:8] = 0.6
    mask[0, 0, 0] = 0.4  # below the threshold: kept
    plan = MaskedEdit.prepare(mask, (12, 12), grow=1, feather=1)
    assert plan.region[0, 0, 0] == 0
    assert plan.region.sum() == 16 + 4 * 4  # the 4x4 square grown by 1: its sides, not its corners
    assert (plan.weights <= plan.region.float()).all() and (plan.weights[plan.region] > 0).all()
    with pytest.raises(ValueError, match="grow is a number of pixels"):
        MaskedEdit.prepare(mask, (12, 12), grow=-1)


# --- boxes, latent masks, compositing -------------------------------------------------------------

@pytest.mark.parametrize("rect, margin, expected", [
    ((10, 6, 20, 12), 3, Box(7, 3, 23, 15)),
    ((0, 0, 4, 5), 8, Box(0, 0, 12, 13)),  # clamped at the top-left corner
    ((35, 30, 41, 35), 8, Box(27, 22, 41, 35)),  # clamped at the bottom-right corner (odd size)
    ((3, 3, 5, 5), 100, Box(0, 0, 41, 35)),  # a margin larger than the image: the whole image
])
def test_crop_box_arithmetic_clamps_at_the_image_borders(rect, margin, expected):
    region = _rect((41, 35), *rect) > 0
    box = crop_box(region, margin)
    assert box == expected
    assert region[:, box.top:box.bottom, box.left:box.right].sum() == region.sum()


def test_crop_box_covers_every_item_of_a_batch():
    region = torch.cat([_rect((30, 20), 2, 3, 5, 6), _rect((30, 20), 20, 10, 25, 15)]) > 0
    assert crop_box(region, 0) == Box(2, 3, 25, 15)


@pytest.mark.parametrize("size, latent_hw", [((40, 24), (12, 20)), ((41, 35), (16, 20)), ((13, 9), (4, 6))])
def test_latent_mask_covers_every_pixel_of_the_region(size, latent_hw):
    generator = torch.Generator().manual_seed(5)
    mask = (torch.rand(1, size[1], size[0], generator=generator) > 0.93).float()
    plan = MaskedEdit.prepare(mask, size)
    latent = plan.latent_mask(latent_hw)
    assert latent.shape == (1, 1, *latent_hw) and set(latent.unique().tolist()) <= {0.0, 1.0}
    height, width = size[1], size[0]
    for y, x in torch.nonzero(plan.region[0]).tolist():
        # adaptive pooling's windows: cell i covers pixels floor(i*H/h) .. ceil((i+1)*H/h) - 1
        rows = [i for i in range(latent_hw[0]) if math.floor(i * height / latent_hw[0]) <= y
                < math.ceil((i + 1) * height / latent_hw[0])]
        cols = [j for j in range(latent_hw[1]) if math.floor(j * width / latent_hw[1]) <= x
                < math.ceil((j + 1) * width / latent_hw[1])]
        assert all(latent[0, 0, i, j] == 1 for i in rows for j in cols)
    assert latent.sum() < latent.numel()  # and it is not everything


def test_composite_is_exact_at_weights_0_and_1():
    original, edited = torch.rand(2, 5, 6, 3), torch.rand(2, 5, 6, 3)
    weights = torch.zeros(2, 5, 6)
    weights[:, 2:, 3:] = 1.0
    weights[:, 0, 0] = 0.25
    out = composite(original, edited, weights)
    assert torch.equal(out[weights == 0], original[weights == 0])
    assert torch.equal(out[weights == 1], edited[weights == 1])
    assert torch.allclose(out[:, 0, 0], 0.75 * original[:, 0, 0] + 0.25 * edited[:, 0, 0])


def test_latent_inpaint_blends_the_noised_original_and_ends_on_it():
    mask = torch.zeros(1, 1, 4, 6)
    mask[..., 1:3, 2:5] = 1
    original, noise, tokens = torch.randn(1, 16, 4, 6), torch.randn(2, 16, 4, 6), torch.randn(2, 6, 64)
    from kontext_core.model.tokens import pack_latent, unpack_tokens

    blend = LatentInpaint(mask, original).step_blend(noise, torch.device("cpu"))
    half = unpack_tokens(blend(tokens, 0.5), 4, 6)
    expected = (1 - mask) * (0.5 * original + 0.5 * noise) + mask * unpack_tokens(tokens, 4, 6)
    assert torch.allclose(half, expected, atol=1e-6)
    last = unpack_tokens(blend(tokens, 0.0), 4, 6)
    assert torch.equal(last[(mask == 0).expand_as(last)], original.expand(2, -1, -1, -1)[(mask == 0).expand_as(last)])
    assert torch.equal(LatentInpaint(mask, original).composite(unpack_tokens(tokens, 4, 6))[..., 0, 0],
                       original.expand(2, -1, -1, -1)[..., 0, 0])
    assert pack_latent(original).shape == (1, 6, 64)


# --- masked edits on tiny models ------------------------------------------------------------------

@pytest.mark.parametrize("size, rect", [
    ((40, 24), (8, 4, 24, 16)),  # inside
    ((40, 24), (0, 0, 14, 10)),  # touching the top-left borders
    ((41, 35), (25, 20, 41, 35)),  # odd size, touching the bottom-right borders
    ((41, 35), (0, 10, 41, 20)),  # a band from border to border
])
def test_masked_edit_keeps_the_outside_exactly(pipeline, size, rect):
    image = _image(1, size)
    mask = _rect(size, *rect)
    result = pipeline.edit(image, "make it red", mask=mask, grow=1, feather=2, seed=3, **FAST)
    outside = _outside(mask, grow=1, feather=2)
    _assert_outside_exact(result.images, image, outside)
    inside = ~outside[0]
    assert (np.asarray(result.images[0])[inside] != np.asarray(image)[inside]).mean() > 0.5  # it did edit
    # The latent too: outside the latent mask it is the input's latent, exactly.
    original = pipeline.encode_image(image, resize="keep")
    latent_mask = MaskedEdit.prepare(mask, size, grow=1, feather=2).latent_mask(tuple(original.shape[-2:]))
    kept = (latent_mask == 0).expand_as(original)
    assert kept.any() and torch.equal(result.latents[kept], original[kept])


def test_masked_edit_with_rgba_and_gray_inputs_keeps_their_rgb_conversion(pipeline):
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 40, 4), dtype=np.uint8), "RGBA")
    mask = _rect((40, 24), 10, 5, 20, 15)
    result = pipeline.edit(rgba, "x", mask=mask, seed=1, **FAST)
    from kontext_core.image import to_rgb_image

    _assert_outside_exact(result.images, to_rgb_image(rgba), _outside(mask))


def test_batch_of_two_with_a_mask_each(pipeline):
    image = _image(3, (41, 35))
    masks = torch.cat([_rect((41, 35), 0, 0, 20, 20), _rect((41, 35), 15, 10, 41, 35)])
    result = pipeline.edit(image, ["make it red", "add a hat"], mask=masks, feather=3, seed=4, **FAST)
    assert len(result.images) == 2 and result.latents.shape[0] == 2
    _assert_outside_exact(result.images, image, _outside(masks, feather=3))
    with pytest.raises(ValueError, match="the mask has a batch of 2 but the edit a batch of 3"):
        pipeline.edit(image, "x", batch_size=3, mask=masks, **FAST)


def test_an_all_0_mask_returns_the_input_without_sampling(pipeline, monkeypatch):
    image = _image(4, (41, 35))

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(pipeline, "generate", no_sampling)
    result = pipeline.edit(image, "x", mask=torch.zeros(35, 41), grow=4, batch_size=2, **FAST)
    assert [i.tobytes() for i in result.images] == [image.tobytes()] * 2
    assert torch.equal(result.latents, pipeline.encode_image(image, resize="keep").expand(2, -1, -1, -1))


def test_an_all_1_mask_is_the_plain_edit(pipeline):
    image = _image(5, (41, 35))
    plain = pipeline.edit(image, "x", seed=6, **FAST)
    masked = pipeline.edit(image, "x", seed=6, mask=torch.ones(1, 35, 41), feather=5, **FAST)
    assert torch.equal(masked.latents, plain.latents)
    assert masked.images[0].tobytes() == plain.images[0].tobytes()
    assert masked.images[0].size == (40, 32)  # the plain edit's working size


def test_a_mask_of_another_size_is_resized_to_the_image(pipeline):
    image = _image(6, (41, 35))
    small = torch.zeros(1, 7, 8)
    small[:, 2:5, 3:6] = 1
    with pytest.warns(UserWarning, match="8x7 pixels but the image 41x35"):
        result = pipeline.edit(image, "x", mask=small, seed=1, **FAST)
    fitted = F.interpolate(small[:, None], size=(35, 41), mode="bilinear")[:, 0]
    with pytest.warns(UserWarning):
        _assert_outside_exact(result.images, image, _outside(small, size=(41, 35)))
    assert (fitted < 0.5).numpy().sum() == _outside(fitted).sum()


def test_masked_edit_refuses_what_would_move_the_outside(pipeline):
    image, mask = _image(7), _rect((40, 24), 5, 5, 10, 10)
    with pytest.raises(ValueError, match="drop size="):
        pipeline.edit(image, "x", mask=mask, size=(32, 32), **FAST)
    with pytest.raises(ValueError, match="fit='stretch'"):
        pipeline.edit(image, "x", mask=mask, fit="crop", **FAST)
    with pytest.raises(ValueError, match="crop_to_mask.*give images="):
        pipeline.edit(None, "x", context_latents=[pipeline.encode_image(image, resize="keep")], mask=mask,
                      crop_to_mask=True, **FAST)


def test_the_sampler_blends_in_the_noised_original_at_each_step(pipeline, monkeypatch):
    """After every step the latent outside the mask is the original noised to that step's t_next."""
    import kontext_core.pipeline as module

    image = _image(8)
    mask = _rect((40, 24), 10, 4, 30, 20)
    original = pipeline.encode_image(image, resize="keep")
    latent_mask = MaskedEdit.prepare(mask, (40, 24)).latent_mask(tuple(original.shape[-2:]))
    noise = module.make_noise(9, 1, 16, *original.shape[-2:])
    seen = []
    from kontext_core.model.tokens import unpack_tokens

    pipeline.edit(image, "x", mask=mask, seed=9, steps=3, resize="keep",
                  callback=lambda info: seen.append((info.t_next, unpack_tokens(info.latent, *original.shape[-2:]))))
    kept = (latent_mask == 0).expand_as(original)
    for t_next, latent in seen:
        expected = (1 - t_next) * original + t_next * noise
        assert torch.allclose(latent[kept], expected[kept], atol=1e-6), t_next
    assert seen[-1][0] == 0.0


# --- crop and stitch ------------------------------------------------------------------------------

@pytest.mark.parametrize("size, rect, margin", [
    ((64, 48), (20, 14, 30, 26), 6),
    ((41, 35), (0, 0, 9, 7), 8),  # at the corner: the box is clamped
    ((41, 35), (30, 27, 41, 35), 5),  # odd size, at the opposite corner
])
def test_crop_and_stitch_keeps_the_outside_and_edits_the_box_at_its_own_working_size(pipeline, monkeypatch, size,
                                                                                       rect, margin):
    image = _image(10, size)
    mask = _rect(size, *rect)
    sampled_sizes = []
    generate = pipeline.generate

    def spy(*args, **kwargs):
        sampled_sizes.append(kwargs["latent_size"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", spy)
    result = pipeline.edit(image, "x", mask=mask, crop_to_mask=True, context_margin=margin, feather=1, seed=2,
                           **FAST)
    _assert_outside_exact(result.images, image, _outside(mask, feather=1))
    plan = MaskedEdit.prepare(mask, size, feather=1, crop_to_mask=True, context_margin=margin)
    box = plan.box
    assert box.left >= 0 and box.top >= 0 and box.right <= size[0] and box.bottom <= size[1]
    # The cut-out was sampled at the working size "keep" gives the box (snapped to the AE's multiple of 4).
    assert sampled_sizes == [(box.height // 4 * 4 // 2, box.width // 4 * 4 // 2)]
    # The latents are the whole result's, at the whole image's working size.
    assert result.latents.shape[-2:] == pipeline.encode_image(image, resize="keep").shape[-2:]


def test_crop_to_mask_samples_a_small_region_at_the_preferred_size(pipeline, monkeypatch):
    """A small region under resize='preferred' is edited at a trained resolution: full detail for it."""
    image, mask = _image(11, (200, 120)), _rect((200, 120), 90, 50, 100, 60)
    seen = {}

    def capture(picture, resize="preferred", size=None, fit="stretch"):
        seen.update(size=picture.size, resize=resize)
        raise RuntimeError("stop")  # a 1024x1024 encode is slow on the CPU

    monkeypatch.setattr(pipeline, "encode_image", capture)
    with pytest.raises(RuntimeError, match="stop"):
        pipeline.edit(image, "x", mask=mask, crop_to_mask=True, context_margin=5, steps=1)
    assert seen == {"size": (20, 20), "resize": "preferred"}  # the 10x10 region and 5 pixels around it
    assert target_size(20, 20, "preferred") == (1024, 1024)


def test_stitch_images_matches_heights_or_widths():
    first, second = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (10, 10), "blue")
    right = stitch_images([first, second], "right")
    assert right.size == (60, 20) and right.getpixel((59, 19)) == (0, 0, 255)
    down = stitch_images([first, second], "down")
    assert down.size == (40, 60) and down.getpixel((0, 59)) == (0, 0, 255)
    with pytest.raises(ValueError, match="unknown stitch direction"):
        stitch_images([first], "left")


@pytest.mark.parametrize("direction", ["right", "down"])
def test_stitch_placement_joins_the_images_into_one_context(pipeline, direction):
    image, style = _image(12, (40, 24)), _image(13, (20, 20))
    result = pipeline.edit([image, style], "in this style", placement="stitch", stitch_direction=direction, seed=5,
                           decode=False, **FAST)
    assert result.settings.placement == "stitch" and result.settings.stitch_direction == direction
    stitched = stitch_images([image, style], direction)
    assert stitched.size == ((40 + 24, 24) if direction == "right" else (40, 24 + 40))  # the style made 24 / 40 wide
    context = pipeline.encode_image(stitched, resize="keep")
    first = pipeline.encode_image(image, resize="keep")
    settings = GenerationSettings(steps=2, seed=5, placement="stitch", stitch_direction=direction)
    expected = pipeline.generate(pipeline.encode_prompt("in this style"), settings, context_latents=[context],
                                 latent_size=tuple(first.shape[-2:]))
    assert torch.equal(result.latents, expected) and result.latents.shape[-2:] == first.shape[-2:]
    # With latents instead of images, they are decoded, stitched and encoded again.
    style_latent = pipeline.encode_image(style, "keep")
    latents = pipeline.edit(None, "in this style", context_latents=[first, style_latent], placement="stitch",
                            stitch_direction=direction, seed=5, decode=False, **FAST).latents
    decoded = [pipeline.decode(first)[0], pipeline.decode(style_latent)[0]]
    context = pipeline.encode_image(stitch_images(decoded, direction), resize="keep")
    expected = pipeline.generate(pipeline.encode_prompt("in this style"), settings, context_latents=[context],
                                 latent_size=tuple(first.shape[-2:]))
    assert torch.equal(latents, expected)


def test_the_stitch_direction_changes_the_edit_and_other_placements_ignore_it(pipeline):
    image, style = _image(16, (40, 24)), _image(17, (24, 32))
    edits = {(placement, direction): pipeline.edit([image, style], "x", placement=placement,
                                                   stitch_direction=direction, seed=3, decode=False,
                                                   **FAST).latents
             for placement in ("stitch", "offset") for direction in ("right", "down")}
    assert not torch.equal(edits["stitch", "right"], edits["stitch", "down"])
    assert torch.equal(edits["offset", "right"], edits["offset", "down"])


def test_masked_edit_with_a_stitched_reference(pipeline):
    image, style = _image(14, (41, 35)), _image(15, (20, 30))
    mask = _rect((41, 35), 5, 5, 25, 25)
    result = pipeline.edit([image, style], "x", mask=mask, placement="stitch", crop_to_mask=True, context_margin=4,
                           seed=1, **FAST)
    _assert_outside_exact(result.images, image, _outside(mask))


# --- masked turns in a session --------------------------------------------------------------------

def test_masked_turns_in_a_three_turn_session_with_branching(pipeline, tmp_path):
    session = pipeline.session(_image(20, (41, 35)), resize="keep", settings=GenerationSettings(steps=2))
    width, height = session.pixel_size
    assert (width, height) == (40, 32)
    first = session.edit("make it red", seed=1)
    mask = _rect((width, height), 4, 4, 20, 18)
    second = session.edit("add a hat", seed=2, mask=mask, feather=2)
    third = session.edit("night time", seed=3)
    assert [t.parent for t in session.turns] == [None, 0, 1, 2] and second.mask is not None and third.mask is None

    # Latents: outside the latent mask the masked turn is its parent's, exactly.
    latent_mask = MaskedEdit.prepare(mask, (width, height), feather=2).latent_mask(tuple(first.latent.shape[-2:]))
    kept = (latent_mask == 0).expand_as(first.latent)
    assert torch.equal(second.latent[kept], first.latent[kept])
    assert not torch.equal(second.latent[~kept], first.latent[~kept])

    # Images: the masked turn's is its parent's wherever the mask is 0 (exported files too).
    outside = _outside(mask, feather=2)
    _assert_outside_exact([session.image(2)], session.image(1), outside)
    paths = session.export(tmp_path / "out")
    exported = [np.asarray(Image.open(p)) for p in paths]
    assert np.array_equal(exported[2][outside[0]], exported[1][outside[0]])
    assert session.image(3).tobytes() == pipeline.decode(third.latent)[0].tobytes()

    # Branch back to turn 1 and edit another region: outside it, turn 1 again; turn 2 is untouched.
    session.branch(1)
    other = _rect((width, height), 20, 10, 40, 32)  # touching the right and bottom borders
    branched = session.edit("snow", seed=4, mask=other)
    assert branched.parent == 1 and len(session.turns) == 5
    kept = (MaskedEdit.prepare(other, (width, height)).latent_mask(tuple(first.latent.shape[-2:])) == 0)
    assert torch.equal(branched.latent[kept.expand_as(first.latent)], first.latent[kept.expand_as(first.latent)])
    _assert_outside_exact([session.image(4)], session.image(1), _outside(other))
    # A masked turn on a masked turn: the chain of composites keeps each parent's pixels.
    session.branch(2)
    fifth = session.edit("stars", seed=5, mask=other, grow=1)
    _assert_outside_exact([session.image(fifth.index)], session.image(2), _outside(other, grow=1))


def test_session_masks_all_0_all_1_and_roundtrip(pipeline):
    session = pipeline.session(_image(21, (40, 24)), resize="keep", settings=GenerationSettings(steps=2))
    start = session.latent
    unchanged = session.edit("x", seed=1, mask=torch.zeros(24, 40))
    assert torch.equal(unchanged.latent, start) and session.image(1).tobytes() == session.image(0).tobytes()
    full = session.edit("y", seed=2, mask=torch.ones(24, 40))
    session.branch(1)
    plain = session.edit("y", seed=2)
    assert full.mask is None and torch.equal(full.latent, plain.latent)
    # With roundtrip the context is re-encoded, but what the mask keeps is still the current latent itself.
    session.branch(0)
    mask = _rect((40, 24), 0, 0, 10, 24)
    turn = session.edit("z", seed=3, mask=mask, roundtrip=True)
    kept = (MaskedEdit.prepare(mask, (40, 24)).latent_mask(tuple(start.shape[-2:])) == 0).expand_as(start)
    assert torch.equal(turn.latent[kept], start[kept])


def test_session_turn_with_a_stitched_reference(pipeline, tmp_path):
    """A stitched turn's context is the current turn's image and the reference, decoded and joined in the chosen
    direction, encoded at the session's resize: the turn equals sampling with that hand-made context."""
    session = pipeline.session(_image(22, (40, 24)), resize="keep", settings=GenerationSettings(steps=2))
    style = pipeline.encode_image(_image(23, (24, 32)), resize="keep")
    start = session.latent
    turns = {}
    for direction in ("right", "down"):
        session.branch(0)
        turns[direction] = session.edit("in this style", seed=1, extra_references=[style], placement="stitch",
                                        stitch_direction=direction)
        stitched = stitch_images([pipeline.decode(start)[0], pipeline.decode(style)[0]], direction)
        assert stitched.size == ((40 + 18, 24) if direction == "right" else (40, 24 + 53))  # heights / widths matched
        context = pipeline.encode_image(stitched, resize="keep")
        settings = GenerationSettings(steps=2, seed=1, placement="stitch", stitch_direction=direction)
        expected = pipeline.generate(pipeline.encode_prompt("in this style"), settings, context_latents=[context],
                                     latent_size=tuple(start.shape[-2:]))
        turn = turns[direction]
        assert turn.parent == 0 and turn.latent.shape == start.shape
        assert torch.equal(turn.latent, expected.cpu())
        assert turn.settings.placement == "stitch" and turn.settings.stitch_direction == direction
    assert not torch.equal(turns["right"].latent, turns["down"].latent)
    # The direction is part of each turn's record: the history and the exported files' metadata.
    assert [t["settings"]["stitch_direction"] for t in session.history()[1:]] == ["right", "down"]
    paths = session.export(tmp_path / "stitched")
    recorded = [json.loads(Image.open(p).text["kontext"])["settings"] for p in paths[1:]]
    assert [(r["placement"], r["stitch_direction"]) for r in recorded] == [("stitch", "right"), ("stitch", "down")]


def test_source_pixels_are_the_8bit_levels():
    image = _image(24, (5, 3))
    assert np.array_equal((unit_images([image]) * 255).round().to(torch.uint8)[0].numpy(), np.asarray(image))


def test_a_chain_of_masked_turns_decodes_each_turn_once(pipeline, monkeypatch):
    """Each masked turn's image builds on its parent's: asking for every turn's image (the CLI does, turn by
    turn) decodes each latent once, not the whole chain again for each turn."""
    session = pipeline.session(_image(21, (40, 32)), resize="keep", settings=GenerationSettings(steps=1))
    width, height = session.pixel_size
    decodes = []
    for original in ("decode", "decode_unit"):
        monkeypatch.setattr(pipeline, original,
                            lambda latents, _f=getattr(pipeline, original): decodes.append(1) or _f(latents))
    for number in range(4):
        turn = session.edit(f"turn {number}", seed=number, mask=_rect((width, height), 2 * number, 2, 30, 20))
        first = session.image(turn.index)
        assert session.image(turn.index) is first  # kept, not made again
    assert len(decodes) == len(session.turns)  # the start image and each of the 4 turns, once
