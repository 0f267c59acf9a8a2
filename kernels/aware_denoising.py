"""VideoMV's 3D-aware denoising, the math: at chosen sampling steps the predicted clean images of a V-view x F-frame
grid are reconstructed as Gaussians (static for V x 1, dynamic for V x F), rendered back at the grid's cameras and
times, and blended into the prediction. VideoMV (METHODS.md section 4) does it at DDIM steps 20, 30 and 40 of 50
with a feed-forward reconstructor and uses the renders as x0; here our own fitter runs a few hundred iterations,
each step continuing the previous step's Gaussians (a warm start), and the renders are blended with a weight.

The ComfyUI side (decoding and encoding with the VAE, the guider that calls this) is integration/aware_guider.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .cameras import CameraRig
from .errors import InvalidInput
from .grid import Grid
from .multiview_video import MultiviewVideo, even_times
from .splats.fit import FitResult, FitSettings, fit_dynamic_gaussians
from .splats.model import DynamicGaussians, MotionConfig
from .splats.views import render_images

VIDEOMV_STEPS = (20, 30, 40)  # of 50 DDIM steps, 0-based


@dataclass(frozen=True)
class AwareSettings:
    """When a 3D-aware step runs and what it does; the one source of defaults for the node and the benchmark.

    A step runs at sampling step i (0 = the noisiest, as core samplers count) with noise level sigma when i is
    listed in `steps` (an empty list: every step) and sigma_min <= sigma <= sigma_max; at most once per step, at
    the first model evaluation of that step."""

    steps: tuple[int, ...] = VIDEOMV_STEPS
    sigma_min: float = 0.0
    sigma_max: float = math.inf
    blend_weight: float = 1.0  # VideoMV: the renders replace x0; 0 leaves sampling unchanged (the fits still run)
    fit: FitSettings = FitSettings(iterations=300, resolution=256)  # per step; densification schedule per step

    def __post_init__(self):
        if not 0.0 <= self.blend_weight <= 1.0:
            raise InvalidInput("blend_weight", f"{self.blend_weight} is outside [0, 1]",
                               "use 1 to replace x0 by the renders (VideoMV), 0 to leave sampling unchanged")
        if any(step < 0 for step in self.steps):
            raise InvalidInput("steps", f"steps count from 0, got {list(self.steps)}", "list 0-based step indices, e.g. 20, 30, 40")
        if not 0.0 <= self.sigma_min <= self.sigma_max:
            raise InvalidInput("sigma_min", f"the sigma range [{self.sigma_min}, {self.sigma_max}] is empty or negative",
                               "set 0 <= sigma_min <= sigma_max")
        self.fit.check()

    def chooses(self, step: int, sigma: float) -> bool:
        return (not self.steps or step in self.steps) and self.sigma_min <= sigma <= self.sigma_max

    def fit_settings(self, grid: Grid) -> FitSettings:
        """The fit of one step: static Gaussians for a multi-view set (one frame), moving ones for a multi-view video."""
        motion = MotionConfig.static(self.fit.motion.sh_degree) if grid.frames == 1 else self.fit.motion
        return replace(self.fit, motion=motion)


def parse_steps(text: str) -> tuple[int, ...]:
    """'20, 30, 40' -> (20, 30, 40); an empty text: every step (the sigma range alone decides)."""
    try:
        steps = tuple(sorted({int(part) for part in text.replace(",", " ").split()}))
    except ValueError:
        raise InvalidInput("steps", f"{text!r} is not a list of whole numbers", "write step indices like 20, 30, 40") from None
    if any(step < 0 for step in steps):
        raise InvalidInput("steps", f"steps count from 0, got {text!r}", "list 0-based step indices, e.g. 20, 30, 40")
    return steps


def grid_cameras_and_times(cameras: CameraRig, grid: Grid) -> tuple[CameraRig, torch.Tensor]:
    """The camera and the time of every cell, view-major: V cameras (one per view) or V F (one per cell)."""
    times = even_times(grid.frames)
    if len(cameras) == grid.views:
        return cameras.select(torch.arange(grid.views).repeat_interleave(grid.frames)), grid.per_frame(times)
    if len(cameras) == grid.cells:
        return cameras, grid.per_frame(times)
    raise InvalidInput("cameras", f"{len(cameras)} cameras for a grid of {grid.views} views x {grid.frames} frames",
                       f"connect the cameras the grid was conditioned on ({grid.views}, one per view)")


@dataclass
class AwareStep:
    renders: torch.Tensor  # (V, F, H, W, 3) in [0, 1], on the CPU
    fit: FitResult


def reconstruct_and_render(images: torch.Tensor, cameras: CameraRig, settings: AwareSettings,
                           previous: DynamicGaussians | None = None, device: torch.device | str = "cpu",
                           on_step: Callable[[int, int], None] | None = None) -> AwareStep:
    """Gaussians fitted to the grid's images (V, F, H, W, 3) seen by `cameras` (continuing `previous` when given),
    rendered at every cell's camera and time, at the cameras' size. on_step(done, total) is called every fit
    iteration and every render (an interrupt check; it may raise)."""
    grid = Grid(images.shape[0], images.shape[1])
    if tuple(images.shape[2:4]) != (cameras.height, cameras.width):
        raise InvalidInput("cameras", f"the cameras are {cameras.width}x{cameras.height} but the images "
                           f"{images.shape[3]}x{images.shape[2]}", "connect the cameras the grid was conditioned on")
    cell_cameras, cell_times = grid_cameras_and_times(cameras, grid)
    video = MultiviewVideo(images, cameras, even_times(grid.frames))
    fit_settings = settings.fit_settings(grid)
    fit = fit_dynamic_gaussians(video, fit_settings, device, on_step, start=previous)
    renders = render_images(fit.gaussians, cell_cameras, cell_times, torch.tensor(fit_settings.background),
                            fit_settings.backend, on_step)
    return AwareStep(grid.as_matrix(renders), fit)


def blend(prediction: torch.Tensor, renders: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) prediction + weight renders; weight 0 returns the prediction itself (exactly, whatever the
    renders hold), weight 1 the renders."""
    if weight == 0:
        return prediction
    return torch.lerp(prediction, renders.to(prediction), weight)
