"""An animated, textured analytic scene rendered by ray casting: ground truth for testing and benchmarking the 4D
Gaussian fit without any generative model. It is made of ellipsoids, not Gaussians, so a fit cannot be exact.

World +Z up, objects around the origin within radius ~0.45 (an SV3D orbit at radius 2 and 33.8 degrees sees it):
- a checkered ball going half way round the centre, bobbing once and spinning 0.4 turn;
- a striped tall ellipsoid drifting sideways while turning a quarter turn;
- a static ringed plinth under both.
Over 25 frames at 576 px the surfaces move about 10 px per frame, the order of a generated video's motion.
Shading is Lambertian (view-independent); the background is white, as SV3D renders objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cameras import CameraRig
from .errors import InvalidInput
from .memory import check_memory
from .multiview_video import MultiviewVideo, even_times

_LIGHT = torch.tensor([0.4, 0.3, 0.85])
BACKGROUND = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class _Ellipsoid:
    semi_axes: tuple[float, float, float]

    def pose(self, index: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 3) centres and (T,) spin angles about +Z of object `index` at times t."""
        tau = 2 * math.pi * t
        zeros = torch.zeros_like(t)
        if index == 0:  # ball: half a circle around the centre, bobs once, spins 0.4 turn
            centre = torch.stack([0.15 * torch.cos(tau / 2), 0.15 * torch.sin(tau / 2), 0.02 + 0.06 * torch.sin(tau)], -1)
            return centre, 0.4 * tau
        if index == 1:  # tall ellipsoid: drifts along y and turns a quarter
            centre = torch.stack([zeros - 0.16, -0.1 + 0.15 * t, zeros - 0.06], -1)
            return centre, -0.25 * tau
        return torch.stack([zeros, zeros, zeros - 0.3], -1), zeros  # plinth: static


_OBJECTS = (_Ellipsoid((0.2, 0.2, 0.2)), _Ellipsoid((0.11, 0.08, 0.2)), _Ellipsoid((0.42, 0.42, 0.06)))


def _albedo(index: int, unit: torch.Tensor) -> torch.Tensor:
    """Texture of object `index` at points `unit` (..., 3) of its local unit sphere."""
    x, y, z = unit.unbind(-1)
    if index == 0:  # checker: 8 longitude x 6 latitude cells, warm/cool with a latitude gradient
        longitude = torch.atan2(y, x) / (2 * math.pi) + 0.5
        latitude = torch.asin(z.clamp(-1, 1)) / math.pi + 0.5
        cell = (torch.floor(longitude * 8) + torch.floor(latitude * 6)) % 2
        warm = torch.stack([0.9 * torch.ones_like(z), 0.45 + 0.3 * latitude, 0.15 * torch.ones_like(z)], -1)
        cool = torch.stack([0.15 + 0.2 * latitude, 0.35 * torch.ones_like(z), 0.8 * torch.ones_like(z)], -1)
        return torch.where(cell[..., None] > 0, warm, cool)
    if index == 1:  # horizontal stripes with a twist
        stripe = torch.sin(9 * z + 2 * torch.atan2(y, x)) > 0
        return torch.where(stripe[..., None], unit.new_tensor([0.2, 0.75, 0.3]), unit.new_tensor([0.95, 0.9, 0.3]))
    radius = (x * x + y * y).sqrt()  # rings on the plinth
    ring = torch.sin(28 * radius) > 0
    return torch.where(ring[..., None], unit.new_tensor([0.55, 0.35, 0.25]), unit.new_tensor([0.85, 0.8, 0.72]))


def _rotation_z(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], -1).reshape(*angle.shape, 3, 3)


def _cast(origins: torch.Tensor, directions: torch.Tensor, time: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB (R, 3) and hit mask (R,) of rays at one time."""
    t = origins.new_tensor([time])
    nearest = torch.full(origins.shape[:1], float("inf"), dtype=origins.dtype, device=origins.device)
    colour = origins.new_tensor(BACKGROUND).expand(origins.shape[0], 3)
    light = (_LIGHT / _LIGHT.norm()).to(origins)
    for index, body in enumerate(_OBJECTS):
        centre, angle = body.pose(index, t)
        rotation = _rotation_z(angle)[0]
        axes = origins.new_tensor(body.semi_axes)
        local_origin = ((origins - centre[0]) @ rotation) / axes  # R^T (o - c), scaled to the unit sphere
        local_direction = (directions @ rotation) / axes
        a = (local_direction * local_direction).sum(-1)
        b = 2 * (local_origin * local_direction).sum(-1)
        c = (local_origin * local_origin).sum(-1) - 1
        discriminant = b * b - 4 * a * c
        distance = (-b - discriminant.clamp_min(0).sqrt()) / (2 * a)
        hit = (discriminant > 0) & (distance > 0) & (distance < nearest)
        if not hit.any():
            continue
        unit = local_origin + distance[:, None] * local_direction
        normal = (unit / axes) @ rotation.T
        normal = normal / normal.norm(dim=-1, keepdim=True)
        shade = 0.55 + 0.45 * (normal @ light).clamp_min(0)
        colour = torch.where(hit[:, None], _albedo(index, unit) * shade[:, None], colour)
        nearest = torch.where(hit, distance, nearest)
    return colour, torch.isfinite(nearest)


def render_scene(cameras: CameraRig, times: torch.Tensor, supersample: int = 2, device: torch.device | str = "cpu",
                 on_image: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (V, F, H, W, 3) and object masks (V, F, H, W) of the scene, one camera per view, at the rig's size,
    on `device`. Each pixel averages supersample x supersample rays (anti-aliasing, as a real image is).
    on_image(done, total) is called after each image (progress and interrupt checks)."""
    if supersample < 1:
        raise InvalidInput("supersample", f"must be at least 1, got {supersample}", "use 1 (fast) or 2")
    times = torch.as_tensor(times, dtype=torch.float32).reshape(-1)
    height, width = cameras.height * supersample, cameras.width * supersample
    # images and masks (16 bytes a pixel), and per image the rays being cast (about 200 bytes each: directions,
    # origins and the per-object intersection terms)
    check_memory("cameras", 16 * len(cameras) * len(times) * cameras.height * cameras.width + 200 * height * width,
                 f"{len(cameras)} views x {len(times)} frames of {cameras.width} x {cameras.height}",
                 "use fewer views or frames, or smaller images", device)
    rig = cameras.resized(height, width)
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    pixels = torch.stack([cols, rows, torch.ones_like(rows)], -1).reshape(-1, 3).double()
    images = torch.empty(len(rig), len(times), cameras.height, cameras.width, 3, device=device)
    masks = torch.empty(len(rig), len(times), cameras.height, cameras.width, device=device)
    for view in range(len(rig)):
        directions = pixels @ torch.linalg.inv(rig.intrinsics[view]).T @ rig.rotations[view]  # R^T K^-1 x
        directions = (directions / directions.norm(dim=-1, keepdim=True)).float().to(device)
        origins = rig.centers[view].float().to(device).expand_as(directions)
        for frame, time in enumerate(times.tolist()):
            colour, hit = _cast(origins, directions, time)
            colour = colour.reshape(1, height, width, 3).permute(0, 3, 1, 2)
            hit = hit.reshape(1, 1, height, width).float()
            images[view, frame] = F.avg_pool2d(colour, supersample)[0].permute(1, 2, 0)
            masks[view, frame] = F.avg_pool2d(hit, supersample)[0, 0]
            if on_image is not None:
                on_image(view * len(times) + frame + 1, len(rig) * len(times))
    return images.clamp(0, 1), masks


def perturb_like_generated(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Small per-image inconsistencies of generated frames: exposure gain, colour cast, sub-pixel shift, noise.
    Random numbers come from the (CPU) generator whatever the images' device, so results do not depend on it."""
    flat = images.reshape(-1, *images.shape[-3:])  # (B, H, W, 3)
    count, height, width, _ = flat.shape
    # the sampling grid (8 bytes a pixel), the shifted images, the noise and the result (12 each)
    check_memory("images", 44 * count * height * width, f"perturbing {count} images of {width} x {height}",
                 "set perturbation to 0, or use fewer views or frames", images.device)
    gain = (1 + 0.03 * strength * torch.randn(count, 1, 1, 1, generator=generator)).to(images.device)
    cast = (0.015 * strength * torch.randn(count, 1, 1, 3, generator=generator)).to(images.device)
    shift = 0.3 * strength * torch.randn(count, 2, generator=generator)  # pixels
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * shift[:, 0] / width
    theta[:, 1, 2] = 2 * shift[:, 1] / height
    grid = F.affine_grid(theta, (count, 3, height, width), align_corners=False).to(images.device)
    shifted = F.grid_sample(flat.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False)
    noise = (0.01 * strength * torch.randn(count, height, width, 3, generator=generator)).to(images.device)
    out = shifted.permute(0, 2, 3, 1) * gain + cast + noise
    return out.clamp(0, 1).reshape(images.shape)


def example_multiview_video(cameras: CameraRig, frames: int, seed: int = 0, perturbation: float = 1.0,
                            supersample: int = 2, device: torch.device | str = "cpu",
                            on_image: Callable[[int, int], None] | None = None) -> MultiviewVideo:
    """The scene seen by a fixed rig over `frames` evenly spaced times, perturbed like generated images.
    on_image(done, total) is called after each image is cast (progress and interrupt checks)."""
    if frames < 1:
        raise InvalidInput("frames", f"must be at least 1, got {frames}", "render one or more frames")
    times = even_times(frames)
    images, _ = render_scene(cameras, times, supersample, device, on_image)
    if perturbation > 0:
        images = perturb_like_generated(images, torch.Generator().manual_seed(seed), perturbation)
    return MultiviewVideo(images, cameras, times)
