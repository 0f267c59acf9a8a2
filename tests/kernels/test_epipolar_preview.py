import pytest
import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.epipolar import build_epipolar_mask
from mv4d.kernels.epipolar_preview import PALETTE, pick_query_cells, render_mask_preview
from mv4d.kernels.errors import InvalidInput


def test_preview_marks_the_queries_and_tints_exactly_their_masks():
    rig = orbit_rig(4, height=128, width=128)
    mask = build_epipolar_mask(rig, (16, 16), tau=2.0)
    query = torch.tensor([5 * 16 + 7])  # row 5, column 7
    picture = render_mask_preview(mask, 0, query, panel_height=128)
    assert picture.shape == (128, 2 * 128 + 8, 3)
    assert 0 <= picture.min() and picture.max() <= 1
    # the query dot sits at the cell centre (x = 7.5 * 8, y = 5.5 * 8) in the query colour
    assert torch.allclose(picture[44, 60], PALETTE[0])
    # right panel: every 8x8 block of a cell inside the mask is tinted, every block outside is background
    target = picture[:, 136:]
    inside = mask.dense([0])[0][query[0]].reshape(16, 16)
    background = render_mask_preview(mask, 0, query[:0], panel_height=128)[:, 136:]
    for row in range(16):
        for col in range(16):
            block = target[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
            plain = background[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
            assert bool((block - plain).abs().amax() > 0.05) == bool(inside[row, col]), (row, col)


def test_preview_draws_given_images_and_soft_masks():
    rig = orbit_rig(2, height=64, width=96)
    mask = build_epipolar_mask(rig, (8, 12), mode="soft")
    images = torch.zeros(2, 64, 96, 3)
    images[1, ..., 2] = 1.0  # a blue target view
    picture = render_mask_preview(mask, 1, pick_query_cells(mask, 3, seed=1), images[0], images[1], panel_height=64)
    assert picture.shape == (64, 2 * 96 + 8, 3)
    assert picture[:, 104:, 2].mean() > 0.3  # the blue target shows through


def test_query_cells_are_seeded_and_distinct():
    mask = build_epipolar_mask(orbit_rig(2, height=64, width=64), (8, 8))
    first = pick_query_cells(mask, 6, seed=4)
    assert torch.equal(first, pick_query_cells(mask, 6, seed=4))
    assert len(set(first.tolist())) == 6
    assert not torch.equal(first, pick_query_cells(mask, 6, seed=5))
    with pytest.raises(InvalidInput, match="at least 1"):
        pick_query_cells(mask, 0, seed=0)
    with pytest.raises(InvalidInput, match="pair 7 does not exist"):
        render_mask_preview(mask, 7, first)
