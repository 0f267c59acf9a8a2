"""The one V-view x F-frame contract: how a views x frames matrix of images or latents lies in one batch, and the
named folds that model patches use to attend across it.

Cell (v, f) is batch item v * F + f (view-major): row v, one view over time (a video), is the contiguous slice
[v F, (v + 1) F); column f, the views at one time (a multi-view set), is every F-th item from f. A static
multi-view set is a grid of V x 1, a single video a grid of 1 x F.

A UNet call holds b whole grids, one per chunk of ComfyUI's batch (cond and uncond, or several prompts), so a batch
of B items is b = B / (V F) grids; every fold checks that b is whole. Tokens are (B, L, C): L tokens per image.

- views together (multi-view attention, MVDream): the V views of each frame, their tokens concatenated,
  (b v f) l c -> (b f) (v l) c;
- frames together (temporal attention, AnimateDiff): the F frames of each view at each token, (b v f) l c -> (b v l) f c;
- videos at each frame (cross-video attention, CVD): (b v f) l c -> b f v l c, video v's tokens at frame f.

The grid shape reaches model patches through transformer_options[GRID_OPTION].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from .errors import InvalidInput

GRID_OPTION = "mv4d_grid"  # transformer_options key (and LATENT key) holding the grid of the batch


@dataclass(frozen=True)
class Grid:
    views: int
    frames: int

    def __post_init__(self):
        for name in ("views", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(name, f"a grid needs at least 1 {name[:-1]}, got {value!r}", f"give a whole number of {name} >= 1")

    @classmethod
    def of(cls, value) -> Grid:
        """A Grid from a Grid, its dict form ({"views": V, "frames": F}) or anything with views and frames."""
        if isinstance(value, Grid):
            return value
        if isinstance(value, dict):
            return cls(int(value["views"]), int(value["frames"]))
        return cls(int(value.views), int(value.frames))

    @property
    def cells(self) -> int:
        return self.views * self.frames

    def index(self, view: int, frame: int) -> int:
        return view * self.frames + frame

    def chunks(self, batch: int, argument: str = "batch") -> int:
        """b = batch / (V F): how many whole grids a batch of `batch` items holds (cond/uncond chunks)."""
        if batch % self.cells:
            raise InvalidInput(argument, f"a batch of {batch} is not a whole number of {self.views} x {self.frames} grids",
                               f"keep every model call a multiple of {self.cells} items (views x frames)")
        return batch // self.cells

    def as_dict(self) -> dict:
        return {"views": self.views, "frames": self.frames}

    # Whole grids: a (V F, ...) batch and the (V, F, ...) matrix it stands for.

    def as_matrix(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] != self.cells:
            raise InvalidInput("batch", f"{batch.shape[0]} items are not one {self.views} x {self.frames} grid",
                               f"pass exactly {self.cells} items (views x frames, view-major)")
        return batch.reshape(self.views, self.frames, *batch.shape[1:])

    def as_batch(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.cells, *matrix.shape[2:])

    def per_view(self, values: torch.Tensor) -> torch.Tensor:
        """One item per view (V, ...) -> one per cell (V F, ...): each row gets its view's value."""
        return values.repeat_interleave(self.frames, 0)

    def per_frame(self, values: torch.Tensor) -> torch.Tensor:
        """One item per frame (F, ...) -> one per cell (V F, ...): each column gets its frame's value."""
        return values.repeat(self.views, *([1] * (values.ndim - 1)))

    # Rows (videos) and columns (multi-view sets) of one grid, for models that see one of them per group.

    def rows(self, batch: torch.Tensor, first: int, end: int) -> torch.Tensor:
        """Rows first..end-1 as one batch of (end - first) videos, (n F, ...)."""
        return batch[first * self.frames:end * self.frames]

    def columns(self, batch: torch.Tensor, first: int, end: int) -> torch.Tensor:
        """Columns first..end-1 as one batch of (end - first) multi-view sets, column-major (n V, ...)."""
        by_frame = rearrange(batch, "(v f) ... -> f v ...", f=self.frames)
        return rearrange(by_frame[first:end], "f v ... -> (f v) ...")

    def put_columns(self, batch: torch.Tensor, first: int, end: int, columns: torch.Tensor) -> None:
        """Writes column-major columns first..end-1 (as `columns` gives them) back into the view-major batch."""
        by_cell = batch.view(self.views, self.frames, *batch.shape[1:])
        by_cell[:, first:end] = rearrange(columns, "(f v) ... -> v f ...", v=self.views)

    def column_major(self, batch: torch.Tensor) -> torch.Tensor:
        """The whole grid column by column (index f V + v), the order a multi-view model's conditioning is built in."""
        return self.columns(batch, 0, self.frames)

    @property
    def row_grid(self) -> Grid:
        """The grid of one row (a video) as a model sees it: 1 x F."""
        return Grid(1, self.frames)

    @property
    def column_grid(self) -> Grid:
        """The grid of one column (a multi-view set) as a model sees it: V x 1."""
        return Grid(self.views, 1)

    # Folds of token batches (B, L, C), B = b V F, for attention across the grid; each has its inverse.

    def views_together(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b v f) l c -> (b f) (v l) c: one sequence per frame holding every view's tokens (multi-view attention)."""
        self.chunks(tokens.shape[0], "tokens")
        return rearrange(tokens, "(b v f) l c -> (b f) (v l) c", v=self.views, f=self.frames)

    def views_apart(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of views_together."""
        return rearrange(tokens, "(b f) (v l) c -> (b v f) l c", v=self.views, f=self.frames)

    def frames_together(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b v f) l c -> (b v l) f c: one sequence per view and token position holding its frames (temporal attention)."""
        self.chunks(tokens.shape[0], "tokens")
        return rearrange(tokens, "(b v f) l c -> (b v l) f c", v=self.views, f=self.frames)

    def frames_apart(self, tokens: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
        """Inverse of frames_together."""
        return rearrange(tokens, "(b v l) f c -> (b v f) l c", v=self.views, l=tokens_per_image)

    def videos_at_frame(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b v f) l c -> b f v l c: at each frame, every video's (view's) tokens (cross-video attention)."""
        self.chunks(tokens.shape[0], "tokens")
        return rearrange(tokens, "(b v f) l c -> b f v l c", v=self.views, f=self.frames)

    def videos_apart(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of videos_at_frame."""
        return rearrange(tokens, "b f v l c -> (b v f) l c")


def grid_of(options: dict | None) -> Grid:
    """The grid a model call's transformer_options carry, or a 1 x 1 grid when none is set (a plain sampler call:
    every item is its own grid, so folds leave it unchanged)."""
    grid = (options or {}).get(GRID_OPTION)
    return Grid(1, 1) if grid is None else Grid.of(grid)
