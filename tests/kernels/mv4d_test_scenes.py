"""Random cameras and scenes for the kernel tests (an object near the origin seen from around it)."""

import torch

from mv4d.kernels.cameras import CameraRig, look_at


def random_rig(views: int, generator: torch.Generator, height: int = 240, width: int = 320) -> CameraRig:
    """Cameras 1.5-3 units from the origin in random directions, looking near it, with random focal lengths and
    principal points, all seeing the unit cube around the origin."""
    directions = torch.randn(views, 3, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    distance = 1.5 + 1.5 * torch.rand(views, 1, generator=generator, dtype=torch.float64)
    target = 0.1 * torch.randn(3, generator=generator, dtype=torch.float64)
    world_to_camera = torch.cat([look_at(eye[None], target) for eye in directions * distance])
    focal = (0.8 + 0.6 * torch.rand(views, generator=generator, dtype=torch.float64)) * max(height, width)
    intrinsics = torch.zeros(views, 3, 3, dtype=torch.float64)
    intrinsics[:, 0, 0] = focal
    intrinsics[:, 1, 1] = focal * (0.95 + 0.1 * torch.rand(views, generator=generator, dtype=torch.float64))
    intrinsics[:, 0, 2] = width / 2 + 10 * (torch.rand(views, generator=generator, dtype=torch.float64) - 0.5)
    intrinsics[:, 1, 2] = height / 2 + 10 * (torch.rand(views, generator=generator, dtype=torch.float64) - 0.5)
    intrinsics[:, 2, 2] = 1
    return CameraRig(world_to_camera, intrinsics, height, width)


def random_points(count: int, generator: torch.Generator) -> torch.Tensor:
    """Points filling the cube [-0.5, 0.5]^3 around the origin."""
    return torch.rand(count, 3, generator=generator, dtype=torch.float64) - 0.5
