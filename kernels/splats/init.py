"""Initial Gaussians from the multi-view video itself, with no point cloud or depth model.

The cameras say where the object is (the point nearest to all optical axes) and how big the region they all
see is. When the images have a plain background, candidate points are carved to the visual hull: a point is kept
when, at some frame, every view that sees it shows foreground there, and takes the images' mean colour at that
frame. Without usable silhouettes the points fill the whole ball.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..cameras import CameraRig
from ..errors import InvalidInput
from ..multiview_video import MultiviewVideo
from .model import DynamicGaussians, MotionConfig, new_gaussians

FOREGROUND_THRESHOLD = 0.08  # largest channel difference from the background that still counts as background
MIN_CARVED_FRACTION = 0.002  # fewer survivors than this means the silhouettes are not usable
CARVE_BATCH = 1 << 18  # candidates tested at a time: carving holds (candidates x views x frames) colours


def scene_sphere(cameras: CameraRig) -> tuple[torch.Tensor, float]:
    """(centre (3,), radius): the point nearest to all optical axes, and the radius of the ball every camera sees
    (distance x tan of half the smaller field of view, for the nearest camera)."""
    centres = cameras.centers
    axes = cameras.rotations[:, 2, :]  # camera z (viewing direction) in world coordinates
    projectors = torch.eye(3, dtype=axes.dtype) - axes[:, :, None] * axes[:, None, :]
    system = projectors.sum(0)
    if len(cameras) > 1 and torch.linalg.matrix_rank(system) == 3:
        centre = torch.linalg.solve(system, (projectors @ centres[:, :, None]).sum(0))[:, 0]
    else:  # parallel axes (one camera, or a forward-facing trajectory): look one scene unit ahead
        centre = centres.mean(0) + axes.mean(0) * max(1.0, float((centres - centres.mean(0)).norm(dim=-1).max()))
    distance = (centres - centre).norm(dim=-1)
    half_fov = torch.atan(torch.minimum(cameras.width / 2 / cameras.intrinsics[:, 0, 0], cameras.height / 2 / cameras.intrinsics[:, 1, 1]))
    radius = float((distance * torch.tan(half_fov)).min())
    return centre.float(), max(radius, 1e-3)


def camera_extent(cameras: CameraRig) -> float:
    """3DGS's scene scale: 1.1 x the largest distance of a camera from the cameras' mean position (at least the
    distance to the scene centre, so a single camera still gets a scale)."""
    centre, _ = scene_sphere(cameras)
    spread = (cameras.centers - cameras.centers.mean(0)).norm(dim=-1).max()
    to_scene = (cameras.centers.float() - centre).norm(dim=-1).max()
    return 1.1 * float(max(spread, to_scene))


def initial_gaussians(video: MultiviewVideo, count: int, config: MotionConfig, background: torch.Tensor | None,
                      generator: torch.Generator, device: torch.device | str = "cpu", time_window: float = 0.0,
                      on_batch: Callable[[], None] | None = None) -> DynamicGaussians:
    """`count` Gaussians inside the scene sphere (carved to the visual hull when `background` is given). With
    temporal opacity and time_window > 0, each starts visible around the frame it was carved at (that std in
    clip units); otherwise over the whole clip, so the fit has to move it rather than switch it on and off.
    Candidates are tested CARVE_BATCH at a time; on_batch() is called after each batch (an interrupt check)."""
    if count < 1:
        raise InvalidInput("initial_gaussians", f"must be at least 1, got {count}", "start from e.g. 20000 Gaussians")
    centre, radius = scene_sphere(video.cameras)

    def sample(number: int) -> torch.Tensor:
        direction = torch.randn(number, 3, generator=generator)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        return centre + radius * direction * torch.rand(number, 1, generator=generator) ** (1 / 3)

    points = None
    kept_fraction = 1.0
    if background is not None:
        kept_points, kept_frames, kept_colours, tried = [], [], [], 0
        while sum(len(p) for p in kept_points) < count and tried < 16 * count:  # the hull may fill little of the ball
            candidates = sample(min(4 * count, CARVE_BATCH))
            tried += len(candidates)
            inside, colours_at = _carve(video, candidates, background.float().cpu())
            if on_batch is not None:
                on_batch()
            keep = inside.any(1).nonzero()[:, 0]
            if len(keep) == 0:
                continue
            choice = torch.multinomial(inside[keep].float(), 1, generator=generator)[:, 0]  # one of its frames, at random
            kept_points.append(candidates[keep])
            kept_frames.append(choice)
            kept_colours.append(colours_at[keep, choice])
        survivors = sum(len(p) for p in kept_points)
        if survivors >= max(1, MIN_CARVED_FRACTION * tried):
            kept_fraction = survivors / tried
            order = torch.randperm(survivors, generator=generator)[:count]
            points, best_frame, colours = torch.cat(kept_points)[order], torch.cat(kept_frames)[order], torch.cat(kept_colours)[order]
    if points is None:  # no usable silhouettes: fill the ball
        points = sample(count)
        best_frame = torch.full((count,), video.num_frames // 2)
        colours = _mean_colours(video, points, best_frame)
    spacing = (kept_fraction * 4 / 3 * math.pi * radius**3 / len(points)) ** (1 / 3)
    gaussians = new_gaussians(points, colours, torch.full((len(points),), 0.5 * spacing), config).to(device)
    if config.temporal_opacity and video.num_frames > 1 and time_window > 0:
        gaussians.params["opacity_center"] = video.times[best_frame].to(device)
        gaussians.params["opacity_log_width"] = torch.full((len(points),), math.log(time_window), device=device)
    return gaussians


def _project(video: MultiviewVideo, points: torch.Tensor, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel colours (V, P, 3) under the points at one frame, and whether each view sees the point (V, P), on the
    images' device (geometry in float64 on the CPU; only pixel indices travel, never the images)."""
    views = torch.arange(video.num_views)
    cameras = video.cameras.select(video.camera_indices(views, torch.full_like(views, frame)))
    pixels, depth = cameras.project(points.double())
    cols = pixels[..., 0].floor().long()
    rows = pixels[..., 1].floor().long()
    seen = (depth > 0) & (cols >= 0) & (cols < video.width) & (rows >= 0) & (rows < video.height)
    device = video.images.device
    images = video.images[:, frame]
    colours = images[views[:, None].to(device), rows.clamp(0, video.height - 1).to(device), cols.clamp(0, video.width - 1).to(device)]
    return colours.float(), seen.to(device)


def _mean_colours(video, points, frames) -> torch.Tensor:
    colours = torch.full((len(points), 3), 0.5)
    for frame in frames.unique().tolist():
        for part in (frames == frame).nonzero()[:, 0].split(CARVE_BATCH):
            sampled, seen = _project(video, points[part], frame)
            weights = seen.float()[..., None]
            colours[part] = ((sampled * weights).sum(0) / weights.sum(0).clamp_min(1)).cpu()
    return colours


def _carve(video, points, background) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, F) whether each point lies in the visual hull at each frame, and (P, F, 3) its mean colour there."""
    inside = torch.zeros(len(points), video.num_frames, dtype=torch.bool)
    colours = torch.zeros(len(points), video.num_frames, 3)
    background = background.to(video.images.device)
    for frame in range(video.num_frames):
        sampled, seen = _project(video, points, frame)
        foreground = (sampled - background).abs().amax(-1) > FOREGROUND_THRESHOLD
        inside[:, frame] = ((foreground | ~seen).all(0) & seen.any(0)).cpu()
        weights = (seen & foreground).float()[..., None]
        colours[:, frame] = ((sampled * weights).sum(0) / weights.sum(0).clamp_min(1)).cpu()
    return inside, colours
