"""Rendering a 4D scene for people: a turntable (the camera circles while time runs) or given cameras at given
times, image by image with a progress callback."""

from __future__ import annotations

from typing import Callable

import torch

from ..cameras import CameraRig, orbit_rig
from ..errors import InvalidInput
from ..memory import check_memory
from ..multiview_video import even_times
from .init import scene_sphere
from .model import DynamicGaussians, Splats4D
from .rasterize import Backend, render


def turntable(scene: Splats4D, frames: int, elevation_deg: float, radius: float, fov_deg: float, height: int, width: int,
              turns: float = 1.0) -> tuple[CameraRig, torch.Tensor]:
    """One camera per output frame, circling `turns` times around the scene centre while time runs from 0 to 1.
    The centre is where the scene's cameras look (the origin when it has none)."""
    if frames < 1:
        raise InvalidInput("frames", f"must be at least 1, got {frames}", "render one or more frames")
    target = scene_sphere(scene.cameras)[0].tolist() if scene.cameras is not None and len(scene.cameras) > 1 else (0.0, 0.0, 0.0)
    rig = orbit_rig(frames, elevation_deg, radius, fov_deg, height, width, target=target, span_deg=360.0 * turns)
    return rig, even_times(frames)


def render_images(gaussians: DynamicGaussians, cameras: CameraRig, times: torch.Tensor, background: torch.Tensor,
                  backend: Backend = "auto", on_image: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(B, H, W, 3) images of camera b at times[b], on the CPU; consecutive images at one time share a call."""
    times = torch.as_tensor(times, dtype=torch.float32).reshape(-1)
    if len(times) != len(cameras):
        raise InvalidInput("times", f"{len(times)} times for {len(cameras)} cameras", "give one time per camera")
    # the float32 images, and half as much again for what is made of them (ComfyUI's 8-bit preview copies)
    check_memory("images", 1.5 * 12 * len(cameras) * cameras.height * cameras.width,
                 f"{len(cameras)} images of {cameras.width} x {cameras.height}", "render fewer frames or smaller images")
    images = torch.empty(len(cameras), cameras.height, cameras.width, 3)
    world_to_camera, intrinsics = cameras.world_to_camera.float(), cameras.intrinsics.float()
    start = 0
    with torch.no_grad():
        while start < len(times):
            stop = start + 1
            while stop < len(times) and times[stop] == times[start] and stop - start < 8:
                stop += 1
            output = render(gaussians.frame(times[start]), world_to_camera[start:stop], intrinsics[start:stop],
                            cameras.width, cameras.height, background, backend)
            images[start:stop] = output.colors.clamp(0, 1).cpu()
            start = stop
            if on_image is not None:
                on_image(stop, len(times))
    return images


def grid_request(cameras: CameraRig, times: torch.Tensor) -> tuple[CameraRig, torch.Tensor]:
    """Every camera at every time, view-major (camera c, time f at index c * T + f)."""
    count = len(cameras) * len(times)
    # per image: its camera's matrices (float64) and, to come, the image itself (see render_images)
    check_memory("images", count * (25 * 8 + 1.5 * 12 * cameras.height * cameras.width),
                 f"{len(cameras)} cameras x {len(times)} times = {count} images of {cameras.width} x {cameras.height}",
                 "render fewer frames, or connect fewer cameras")
    indices = torch.arange(len(cameras)).repeat_interleave(len(times))
    return cameras.select(indices), times.repeat(len(cameras))
