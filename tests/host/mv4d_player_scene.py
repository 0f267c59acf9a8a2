"""A known 4D scene for the player tests, built so that a wrong projection, wrong colours or a wrong depth order
each change the picture a lot: overlapping layers of nearly opaque Gaussians of different colours at different
depths (order), thin rotated ellipses (covariance and Jacobian), view-dependent colour (SH degree 1 and the
camera centre), and every kind of motion the model has (polynomial and Fourier position, rotation over time,
Gaussians fading in and out). The cameras have off-centre principal points and non-square images."""

from __future__ import annotations

import math

import torch

from mv4d.kernels.cameras import CameraRig, look_at
from mv4d.kernels.splats.model import DynamicGaussians, MotionConfig, Splats4D, parameter_shapes, rgb_to_sh_dc

WIDTH, HEIGHT = 192, 144
FRAMES = 5
MOTION = MotionConfig(position_degree=3, fourier_terms=2, rotation_degree=1, temporal_opacity=True, sh_degree=1)


def player_cameras() -> CameraRig:
    azimuths = torch.tensor([20.0, 110.0, 200.0, 290.0]) * math.pi / 180
    elevation = 25 * math.pi / 180
    eyes = 2.6 * torch.stack([math.cos(elevation) * azimuths.cos(), math.cos(elevation) * azimuths.sin(),
                              torch.full_like(azimuths, math.sin(elevation))], dim=1)
    intrinsics = torch.tensor([[[210.0, 0, 101.3], [0, 205.0, 68.7], [0, 0, 1]]]).repeat(4, 1, 1)
    intrinsics[1, 0, 2], intrinsics[2, 1, 2] = 90.2, 75.9
    return CameraRig(look_at(eyes, target=(0.05, -0.02, 0.0)), intrinsics, HEIGHT, WIDTH)


def player_scene(seed: int = 0) -> Splats4D:
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    layers = []  # three stacked, slightly offset sheets of large, nearly opaque Gaussians: red, green, blue
    for index, colour in enumerate([(0.9, 0.15, 0.1), (0.1, 0.8, 0.2), (0.15, 0.2, 0.95)]):
        grid = torch.stack(torch.meshgrid(torch.linspace(-0.45, 0.45, 6), torch.linspace(-0.45, 0.45, 6), indexing="ij"), -1).reshape(-1, 2)
        means = torch.cat([grid + 0.12 * index, torch.full((len(grid), 1), 0.25 * (index - 1))], dim=1)
        layers.append((means, torch.tensor(colour).expand(len(grid), 3), torch.full((len(grid),), 0.09), 0.97))
    count = 160  # a cloud of thin, rotated, coloured ellipses
    layers.append((uniform(count, 3, low=-0.7, high=0.7), uniform(count, 3, low=0.15, high=0.85), uniform(count, low=0.02, high=0.06), 0.8))

    means = torch.cat([layer[0] for layer in layers])
    colours = torch.cat([layer[1] for layer in layers])
    sizes = torch.cat([layer[2] for layer in layers])
    opacity = torch.cat([torch.full((len(layer[0]),), layer[3]) for layer in layers])
    total = len(means)
    shapes = parameter_shapes(MOTION)
    params = {name: torch.zeros(total, *shape) for name, shape in shapes.items()}
    params["means"] = means.float()
    params["quats"] = torch.randn(total, 4, generator=generator)
    params["scales"] = (sizes[:, None] * torch.tensor([1.0, 0.35, 0.6])).log()  # anisotropic
    params["scales"][-count:] *= uniform(count, 3, low=0.8, high=1.25)
    params["opacities"] = torch.logit(opacity)
    params["sh0"] = rgb_to_sh_dc(colours)[:, None, :]
    params["shN"] = 0.12 * torch.randn(total, 3, 3, generator=generator)  # view-dependent colour, clearly visible
    params["position_motion"] = 0.08 * torch.randn(total, shapes["position_motion"][0], 3, generator=generator)
    params["rotation_motion"] = 0.4 * torch.randn(total, 1, 4, generator=generator)
    params["opacity_center"] = torch.full((total,), 0.5)
    params["opacity_log_width"] = torch.full((total,), 1.0)  # the sheets stay; the cloud fades in and out
    params["opacity_center"][-count:] = uniform(count, low=-0.2, high=1.2)
    params["opacity_log_width"][-count:] = uniform(count, low=-1.2, high=0.5)
    return Splats4D(DynamicGaussians(params, MOTION), torch.linspace(0, 1, FRAMES), player_cameras())


def reference_image(scene: Splats4D, camera: int, frame: int, background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """(H, W, 3) in [0, 1]: the torch rasteriser's image of the scene through one of its cameras at one frame."""
    from mv4d.kernels.splats.rasterize import render

    rig = scene.cameras
    with torch.no_grad():
        output = render(scene.gaussians.frame(scene.frame_times[frame]), rig.world_to_camera[camera:camera + 1].float(),
                        rig.intrinsics[camera:camera + 1].float(), rig.width, rig.height, torch.tensor(background), backend="torch")
    return output.colors[0].clamp(0, 1)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    error = ((image.float() - reference.float()) ** 2).mean().item()
    return float("inf") if error == 0 else 10 * math.log10(1.0 / error)
