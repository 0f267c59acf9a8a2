"""How a composed model sees the grid (its layout), whether two models' predictions can be combined (their
prediction spaces), and how the weights of a model outside its noise range go to the other."""

from __future__ import annotations

import pytest
import torch

from mv4d.kernels.composition import (COLUMNS, FLOW_NOISE, ROWS, VE_NOISE, PredictionSpace, covering_weights,
                                      model_weights, CompositionSchedule, reconcile)
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.grid import Grid

GRID = Grid(4, 3)


def labelled() -> torch.Tensor:
    """A view-major batch whose item v * F + f holds 10 v + f."""
    return torch.tensor([10.0 * v + f for v in range(GRID.views) for f in range(GRID.frames)]).view(-1, 1)


def test_rows_and_columns_take_what_the_grid_calls_rows_and_columns():
    batch = labelled()
    assert torch.equal(ROWS.take(GRID, batch, [1, 2]), GRID.rows(batch, 1, 3))
    assert torch.equal(COLUMNS.take(GRID, batch, [0, 1]), GRID.columns(batch, 0, 2))
    assert torch.equal(ROWS.order(GRID, batch), batch) and torch.equal(COLUMNS.order(GRID, batch), GRID.column_major(batch))
    assert COLUMNS.take(GRID, batch, [2, 0]).flatten().tolist() == [2, 12, 22, 32, 0, 10, 20, 30]  # any groups, in order
    assert (ROWS.groups(GRID), COLUMNS.groups(GRID)) == (4, 3)
    assert (ROWS.group_grid(GRID), COLUMNS.group_grid(GRID)) == (Grid(1, 3), Grid(4, 1))


@pytest.mark.parametrize("layout, groups", [(ROWS, [3, 1, 0]), (ROWS, [1, 2]), (COLUMNS, [2, 0]), (COLUMNS, [1, 2])])
def test_put_writes_back_exactly_what_take_took(layout, groups):
    """Any groups, in any order; consecutive ones (the usual chunks) are written through a slice."""
    batch, out = labelled(), torch.zeros(GRID.cells, 1)
    layout.put(GRID, out, groups, layout.take(GRID, batch, groups))
    taken = torch.zeros(GRID.cells, dtype=torch.bool)
    layout.put(GRID, taken.view(-1, 1), groups, torch.ones(len(groups) * layout.group_grid(GRID).cells, 1, dtype=torch.bool))
    assert torch.equal(out[taken], batch[taken]) and not out[~taken].any()
    assert int(taken.sum()) == len(groups) * layout.group_grid(GRID).cells


def test_items_are_where_the_groups_lie_in_the_layouts_order():
    ordered = COLUMNS.order(GRID, labelled())
    for groups in ([1], [0, 1, 2], [0, 2]):
        assert torch.equal(ordered[COLUMNS.items(GRID, groups)], COLUMNS.take(GRID, labelled(), groups))
    assert COLUMNS.items(GRID, [1, 2]) == slice(4, 12)  # consecutive groups: a slice (no copy)


def test_open_groups_leave_out_groups_whose_every_cell_is_kept():
    unknown = torch.ones(GRID.views, GRID.frames, 2, 2)
    unknown[0] = 0  # the reference row
    unknown[:, 0] = 0  # the reference column
    unknown = GRID.as_batch(unknown)
    assert ROWS.open_groups(GRID, unknown) == [1, 2, 3] and COLUMNS.open_groups(GRID, unknown) == [1, 2]
    assert ROWS.open_groups(GRID, None) == [0, 1, 2, 3]
    one_cell = torch.zeros(GRID.cells, 2, 2)
    one_cell[GRID.index(2, 1), 0, 1] = 0.5  # a soft mask: anything above 0 is denoised
    assert ROWS.open_groups(GRID, one_cell) == [2] and COLUMNS.open_groups(GRID, one_cell) == [1]


def test_each_layout_takes_its_share_of_the_schedule():
    video, multiview = model_weights(CompositionSchedule("constant", weight=0.6), 0, 10, [90.0, 180.0, 270.0, 360.0])
    assert torch.equal(ROWS.share(video, multiview), video) and torch.equal(COLUMNS.share(video, multiview), multiview)


def space(prediction="eps", noise=VE_NOISE, schedule="LDM linear", low=0.0292, high=14.61, latents="SD15 (4 channels)"):
    return PredictionSpace(prediction, noise, schedule, low, high, latents)


def test_eps_v_and_edm_models_of_one_latent_space_combine_where_their_noise_levels_overlap():
    spaces = {"video_model": space("eps", schedule="sqrt_linear", high=25.15), "multiview_model": space("eps"),
              "other": space("v", schedule="EDM", low=0.002, high=700.0)}
    assert reconcile(spaces) == (0.0292, 14.61)
    assert space(high=14.61).covers(14.61 * (1 + 1e-5)) and not space(high=14.61).covers(14.7)
    assert space().covers(0.0292) and not space().covers(0.002)


@pytest.mark.parametrize("other, problem", [
    (space(noise=FLOW_NOISE, prediction="flow velocity"), "sigma means another noise level"),
    (space(latents="SDXL (4 channels, scale 0.13025)"), "its latents are SDXL"),
    (space(noise=None, prediction="image to image"), "has no noise levels"),
    (space(low=30.0, high=40.0), "do not overlap"),
])
def test_pairs_that_cannot_be_matched_are_refused_naming_the_model_and_why(other, problem):
    with pytest.raises(InvalidInput) as caught:
        reconcile({"video_model": space(), "multiview_model": other})
    assert caught.value.argument == "multiview_model" and problem in caught.value.problem and caught.value.fix


def test_a_model_outside_its_noise_range_gives_its_weight_to_the_other():
    video, multiview = torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([0.9, 0.6], dtype=torch.float64)
    assert covering_weights([video, multiview], [True, True]) == [video, multiview]  # unchanged, not renormalised
    alone = covering_weights([video, multiview], [True, False])
    assert torch.equal(alone[0], torch.ones(2, dtype=torch.float64)) and not alone[1].any()
    zero_share = covering_weights([torch.zeros(2, dtype=torch.float64), multiview], [True, False])  # s = 1, then video alone
    assert torch.equal(zero_share[0], torch.ones(2, dtype=torch.float64))
    assert covering_weights([video, multiview], [False, False]) == [video, multiview]  # refused before sampling
