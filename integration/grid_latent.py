"""The grid as a ComfyUI LATENT (a views x frames batch, view-major, with its shape recorded under GRID_OPTION) and
its decoding into images: built by the conditioning nodes, sampled by any sampler, decoded by MV4D Decode Grid."""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels.grid import GRID_OPTION, Grid

LATENT_CHANNELS = 4  # SVD, SV3D, SD1.5 / SD2.1 (MVDream, ImageDream, AnimateDiff) share SD's 4-channel latent space
LATENT_SCALE = 8  # ... downscaled 8x


CONTROL_VIEW = "control_view"  # in a LATENT's grid record: its last view is a conditioning slot (ImageDream's pixel controller)


def grid_latent(grid: Grid, height: int, width: int, control_view: bool = False) -> dict:
    """An empty grid LATENT for images of height x width pixels. control_view: the grid's last view carries the
    input image for the model (ImageDream's pixel controller) and is no output image."""
    record = {**grid.as_dict(), **({CONTROL_VIEW: True} if control_view else {})}
    return {"samples": torch.zeros(grid.cells, LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE),
            GRID_OPTION: record}


def image_samples(latent: dict) -> tuple[torch.Tensor, Grid | None]:
    """The latent's items that are images, and the grid the LATENT records for them (None for a plain latent).
    A control view (ImageDream's pixel controller, the last view) is no image and is left out."""
    samples, recorded = latent["samples"], latent.get(GRID_OPTION)
    if recorded is None:
        return samples, None
    grid = Grid(int(recorded["views"]), int(recorded["frames"]))
    if recorded.get(CONTROL_VIEW):
        return grid.rows(samples, 0, grid.views - 1), Grid(grid.views - 1, grid.frames)
    return samples, grid


def has_temporal_decoder(vae) -> bool:
    from comfy.ldm.modules.temporal_ae import VideoDecoder

    return isinstance(getattr(getattr(vae, "first_stage_model", None), "decoder", None), VideoDecoder)


def decode_grid(vae, samples: torch.Tensor, grid: Grid, frames_per_decode: int = 0,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(V, F, H, W, 3) images in [0, 1] of a sampled grid. A temporal decoder (SVD's) decodes each row as its own
    video, frames_per_decode frames at a time (0 = the whole row), so views never mix; other VAEs decode frame by
    frame, batched by ComfyUI to free memory."""
    if has_temporal_decoder(vae):
        part = frames_per_decode or grid.frames
        calls = grid.views * -(-grid.frames // part)
        decoded = []
        for view in range(grid.views):
            for piece in grid.rows(samples, view, view + 1).split(part):
                decoded.append(vae.decode(piece))
                if on_step is not None:
                    on_step(len(decoded), calls)
    else:
        decoded = [vae.decode(samples)]
    return grid.as_matrix(torch.cat(decoded))[..., :3].float().clamp(0, 1)
