"""Packing, position ids and reference placement, against their definitions."""

from __future__ import annotations

import pytest
import torch

from kontext_core import context_tokens, pack_latent, position_ids, reference_placements, unpack_tokens
from kontext_core.model.tokens import Placement


@pytest.mark.parametrize("height,width", [(8, 12), (7, 9), (1, 1), (6, 5)])
def test_pack_then_unpack_restores_any_latent(height, width):
    latent = torch.randn(3, 16, height, width)
    tokens = pack_latent(latent)
    rows, cols = (height + 1) // 2, (width + 1) // 2
    assert tokens.shape == (3, rows * cols, 64)
    assert torch.equal(unpack_tokens(tokens, height, width), latent)


def test_token_features_are_channel_major_within_a_patch():
    latent = torch.randn(1, 16, 4, 6)
    tokens = pack_latent(latent)
    row, col, channel, dy, dx = 1, 2, 5, 1, 0
    assert tokens[0, row * 3 + col, channel * 4 + dy * 2 + dx] == latent[0, channel, 2 * row + dy, 2 * col + dx]


def test_position_ids_are_index_row_col():
    ids = position_ids(4, 6, index=2, row_offset=3, col_offset=5, batch=2)
    assert ids.shape == (2, 6, 3)
    assert ids[1, 4].tolist() == [2.0, 3.0 + 1, 5.0 + 1]


def test_offset_placement_tiles_references_without_overlap():
    sizes = [(8, 12), (6, 8), (10, 4)]
    placements = reference_placements((8, 12), sizes, "offset")
    assert placements[0] == Placement(1, 0, 0)
    boxes = [(p.row_offset, p.col_offset, p.row_offset + h, p.col_offset + w) for p, (h, w) in zip(placements, sizes)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
            assert not overlap, (a, b)


def test_index_and_uxo_placements():
    assert [p.index for p in reference_placements((8, 12), [(8, 12), (6, 8)], "index")] == [1, 2]
    uxo = reference_placements((8, 12), [(8, 12), (6, 8)], "uxo")
    assert uxo == [Placement(0, 8, 12), Placement(0, 16, 24)]


def test_context_tokens_concatenate_references_in_order():
    refs = [torch.randn(2, 16, 4, 6), torch.randn(2, 16, 2, 2)]
    tokens, ids = context_tokens(refs, (4, 6), "index")
    assert tokens.shape == (2, 6 + 1, 64) and ids.shape == (2, 7, 3)
    assert torch.equal(tokens[:, 6:], pack_latent(refs[1]))
    assert ids[:, :6, 0].eq(1).all() and ids[:, 6:, 0].eq(2).all()


def test_bad_placements_are_explained():
    with pytest.raises(ValueError, match="unknown reference placement 'tiles'"):
        reference_placements((8, 8), [(8, 8)], "tiles")
    with pytest.raises(ValueError, match="takes one reference image"):
        reference_placements((8, 8), [(8, 8), (8, 8)], "kontext")
    with pytest.raises(ValueError, match="at least one reference"):
        context_tokens([], (8, 8))


def test_the_stitch_placement_takes_its_one_joined_latent_where_kontext_puts_a_reference():
    assert reference_placements((8, 12), [(10, 6)], "stitch") == reference_placements((8, 12), [(10, 6)], "kontext")
    with pytest.raises(ValueError, match="'stitch' placement joins the images before encoding"):
        reference_placements((8, 8), [(8, 8), (8, 8)], "stitch")
    # The direction is a setting of the one stitch placement (GenerationSettings.stitch_direction), not a placement.
    with pytest.raises(ValueError, match="unknown reference placement 'stitch_down'"):
        reference_placements((8, 8), [(8, 8)], "stitch_down")
