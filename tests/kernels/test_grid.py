"""The V x F grid contract: view-major layout, rows and columns, and the folds model patches attend over."""

import pytest
import torch

from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.grid import GRID_OPTION, Grid, grid_of


def numbered_tokens(grid: Grid, chunks: int, tokens: int = 3, channels: int = 2) -> torch.Tensor:
    """(b V F, L, C) tokens whose value encodes (chunk, view, frame, token): each fold must move them exactly."""
    b, v, f, token, c = torch.meshgrid(torch.arange(chunks), torch.arange(grid.views), torch.arange(grid.frames),
                                   torch.arange(tokens), torch.arange(channels), indexing="ij")
    return (b * 10000 + v * 1000 + f * 100 + token * 10 + c).reshape(chunks * grid.cells, tokens, channels).float()


def test_rows_and_columns_are_the_view_major_grid():
    views, frames = 3, 4
    grid = Grid(views, frames)
    batch = torch.arange(views * frames).float()[:, None]  # item v * F + f holds its own index
    assert grid.rows(batch, 1, 3).flatten().tolist() == list(range(4, 12))
    assert grid.columns(batch, 1, 3).flatten().tolist() == [1, 5, 9, 2, 6, 10]  # column-major: f * V + v
    assert sorted(grid.columns(batch, 0, frames).flatten().tolist()) == list(range(views * frames))
    assert grid.index(2, 1) == 9 and grid.as_matrix(batch)[2, 1].item() == 9


def test_put_columns_inverts_columns_and_per_view_per_frame_fill_rows_and_columns():
    grid = Grid(3, 4)
    batch = torch.randn(grid.cells, 2)
    rebuilt = torch.zeros_like(batch)
    for first, end in ((0, 1), (1, 4)):
        grid.put_columns(rebuilt, first, end, grid.columns(batch, first, end))
    assert torch.equal(rebuilt, batch)
    views, frames = torch.arange(3.0), torch.arange(4.0)
    assert grid.as_matrix(grid.per_view(views)).tolist() == [[v] * 4 for v in range(3)]
    assert grid.as_matrix(grid.per_frame(frames)).tolist() == [list(range(4))] * 3


@pytest.mark.parametrize("views, frames, chunks", [(4, 1, 2), (1, 5, 2), (3, 4, 2), (2, 3, 1)])
def test_views_together_holds_every_view_of_one_frame_and_inverts(views, frames, chunks):
    grid = Grid(views, frames)
    tokens = numbered_tokens(grid, chunks)
    folded = grid.views_together(tokens)
    assert folded.shape == (chunks * frames, views * 3, 2)
    for sequence in range(folded.shape[0]):
        b, f = divmod(sequence, frames)
        codes = folded[sequence, :, 0]
        assert set((codes // 10000).long().tolist()) == {b} and set((codes // 100 % 10).long().tolist()) == {f}
        assert sorted(set((codes // 1000 % 10).long().tolist())) == list(range(views))
    assert torch.equal(grid.views_apart(folded), tokens)


@pytest.mark.parametrize("views, frames, chunks", [(4, 1, 2), (1, 5, 2), (3, 4, 2)])
def test_frames_together_never_mixes_views_or_token_positions_and_inverts(views, frames, chunks):
    grid = Grid(views, frames)
    tokens = numbered_tokens(grid, chunks)
    folded = grid.frames_together(tokens)
    assert folded.shape == (chunks * views * 3, frames, 2)
    codes = folded[..., 0]
    for name, divisor in (("chunk", 10000), ("view", 1000), ("token", 10)):
        part = (codes // divisor % 10).long()
        assert bool((part == part[:, :1]).all()), f"a temporal sequence mixes {name}s"
    assert ((codes // 100 % 10).long() == torch.arange(frames)).all()  # frames in order
    assert torch.equal(grid.frames_apart(folded, 3), tokens)


def test_videos_at_frame_lines_up_the_same_frame_of_every_video():
    grid = Grid(3, 4)
    tokens = numbered_tokens(grid, 2)
    folded = grid.videos_at_frame(tokens)
    assert folded.shape == (2, 4, 3, 3, 2)
    assert folded[1, 2, 0, 1, 0].item() == 1 * 10000 + 0 * 1000 + 2 * 100 + 1 * 10
    assert torch.equal(grid.videos_apart(folded), tokens)


def test_batches_that_are_not_whole_grids_and_bad_shapes_are_refused():
    grid = Grid(4, 2)
    assert grid.chunks(16) == 2
    with pytest.raises(InvalidInput, match="not a whole number of 4 x 2 grids"):
        grid.views_together(torch.zeros(12, 3, 2))
    with pytest.raises(InvalidInput, match="views"):
        Grid(0, 3)
    with pytest.raises(InvalidInput, match="not one 4 x 2 grid"):
        grid.as_matrix(torch.zeros(16, 1))


def test_grid_of_reads_transformer_options_or_treats_each_item_alone():
    assert grid_of({GRID_OPTION: Grid(4, 3)}) == Grid(4, 3)
    assert grid_of({GRID_OPTION: {"views": 2, "frames": 5}}) == Grid(2, 5)
    assert grid_of({}) == Grid(1, 1)
