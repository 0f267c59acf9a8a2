import math

import pytest
import torch

from mv4d.kernels.cameras import (
    CameraRig,
    blend_trajectories,
    look_at,
    orbit_azimuths_deg,
    orbit_rig,
    resample_trajectory,
    sv3d_angles,
)
from mv4d.kernels.errors import InvalidInput

from mv4d_test_scenes import random_rig


def homogeneous(pixels):
    return torch.cat([pixels, torch.ones_like(pixels[..., :1])], dim=-1)


def test_orbit_cameras_look_at_the_centre_from_the_radius():
    rig = orbit_rig(8, elevation_deg=25.0, radius=3.0, fov_deg=40.0, height=240, width=320)
    pixels, depth = rig.project(torch.zeros(1, 3))
    assert torch.allclose(pixels[:, 0], torch.tensor([160.0, 120.0], dtype=pixels.dtype), atol=1e-9)
    assert torch.allclose(depth[:, 0], torch.full((8,), 3.0, dtype=depth.dtype))
    assert torch.allclose(rig.centers.norm(dim=-1), torch.full((8,), 3.0, dtype=depth.dtype))
    assert torch.allclose(torch.tensor(sv3d_angles(rig).elevations_deg, dtype=torch.float64), torch.full((8,), 25.0, dtype=torch.float64))


def test_opencv_axes_and_world_up():
    # A camera on +X looking at the origin (world +Z up): world +Y is on the image's right, +Z at its top.
    rig = orbit_rig(1, elevation_deg=0.0, radius=2.0, fov_deg=60.0, height=100, width=100)
    pixels, depth = rig.project(torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [-1.0, 0.0, 0.0]]))
    assert pixels[0, 0, 0] > 50 and abs(pixels[0, 0, 1] - 50) < 1e-9
    assert pixels[0, 1, 1] < 50 and abs(pixels[0, 1, 0] - 50) < 1e-9
    assert depth[0, 2] > depth[0, 0]  # farther along the viewing direction


def test_sv3d_order_matches_the_official_azimuths():
    # Official SV3D / Diffusion² code: linspace(0, 360, 22)[1:] % 360, relative to the last, and the last set to 2*pi.
    official_deg = [360.0 * k / 21 for k in range(1, 22)]
    rig = orbit_rig(21, elevation_deg=10.0, sv3d_order=True)
    angles = sv3d_angles(rig)
    assert angles.azimuths_deg[-1] == 360.0
    assert angles.azimuths_rad[-1] == 2 * math.pi
    assert max(abs(a - b) for a, b in zip(angles.azimuths_deg, official_deg)) < 1e-9
    assert all(abs(p - math.radians(80.0)) < 1e-12 for p in angles.polars_rad)
    # the input view (start azimuth) is the LAST view in SV3D order and the FIRST in the default order
    default = orbit_rig(21, elevation_deg=10.0)
    assert torch.allclose(rig.world_to_camera[-1], default.world_to_camera[0], atol=1e-12)
    assert torch.allclose(rig.world_to_camera[:-1], default.world_to_camera[1:], atol=1e-12)
    assert orbit_azimuths_deg(4, 30.0, sv3d_order=True) == [120.0, 210.0, 300.0, 390.0]


def test_sv3d_azimuths_follow_the_start_azimuth():
    rig = orbit_rig(6, start_azimuth_deg=47.0, sv3d_order=True)
    assert sv3d_angles(rig).azimuths_deg == pytest.approx([60, 120, 180, 240, 300, 360], abs=1e-9)


def test_resizing_scales_projections_exactly():
    rig = random_rig(3, torch.Generator().manual_seed(1))
    points = torch.randn(20, 3, dtype=torch.float64) * 0.3
    pixels, _ = rig.project(points)
    half, _ = rig.resized(rig.height // 2, rig.width // 4).project(points)
    assert torch.allclose(half, pixels * torch.tensor([0.25, 0.5], dtype=torch.float64), atol=1e-9)


def test_fundamental_matrices_satisfy_the_epipolar_constraint():
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        rig = random_rig(4, generator)
        points = (torch.rand(100, 3, generator=generator, dtype=torch.float64) - 0.5)
        pixels, _ = rig.project(points)
        sources, targets = [0, 1, 2, 3, 0], [1, 0, 3, 2, 2]
        fundamental = rig.fundamental_matrices(sources, targets)
        for F, s, t in zip(fundamental, sources, targets):
            lines = homogeneous(pixels[s]) @ F.T
            distance = (homogeneous(pixels[t]) * lines).sum(-1).abs() / lines[:, :2].norm(dim=-1)
            assert distance.max() < 1e-6  # pixels
        # swapping the views transposes F (up to scale)
        forward, backward = rig.fundamental_matrices([0], [1])[0], rig.fundamental_matrices([1], [0])[0]
        forward, backward = forward / forward.norm(), backward / backward.norm()
        assert min((forward - backward.T).abs().max(), (forward + backward.T).abs().max()) < 1e-9


def test_relative_pose_maps_camera_coordinates():
    rig = random_rig(3, torch.Generator().manual_seed(3))
    points = homogeneous(torch.randn(10, 3, dtype=torch.float64))
    in_first = points @ rig.world_to_camera[0].T
    in_third = points @ rig.world_to_camera[2].T
    assert torch.allclose(in_first @ rig.relative_pose(0, 2).T, in_third, atol=1e-9)


def test_plucker_rays_pass_through_their_pixels():
    rig = random_rig(2, torch.Generator().manual_seed(4), height=12, width=16)
    rays = rig.plucker_rays(dtype=torch.float64)
    assert rays.shape == (2, 6, 12, 16)
    moment, direction = rays[:, :3], rays[:, 3:]
    assert torch.allclose(direction.norm(dim=1), torch.ones(2, 12, 16, dtype=torch.float64))
    # a point along the ray of pixel (row 5, col 9) projects back to that pixel's centre, and X x d = moment
    point = rig.centers[1] + 2.5 * direction[1, :, 5, 9]
    pixel, _ = rig.select([1]).project(point[None])
    assert torch.allclose(pixel[0, 0], torch.tensor([9.5, 5.5], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(torch.cross(point, direction[1, :, 5, 9], dim=0), moment[1, :, 5, 9], atol=1e-9)
    assert rig.plucker_rays(3, 4).shape == (2, 6, 3, 4)


def test_blend_and_resample_trajectories():
    first = orbit_rig(5, elevation_deg=0.0, radius=2.0)
    second = orbit_rig(5, elevation_deg=30.0, radius=2.0)
    # 1e-5: kornia 0.7 (our lower bound) converts rotations with a 1e-8 epsilon; 0.9 is exact to 1e-15
    assert torch.allclose(blend_trajectories(first, second, 0.0).world_to_camera, first.world_to_camera, atol=1e-5)
    assert torch.allclose(blend_trajectories(first, second, 1.0).world_to_camera, second.world_to_camera, atol=1e-5)
    middle = blend_trajectories(first, second, 0.5)
    # the orientation is the geodesic midpoint: equal rotation angles to both ends
    def angle(a, b):
        relative = a[:, :3, :3] @ b[:, :3, :3].transpose(1, 2)
        return torch.arccos(((relative.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
    assert torch.allclose(angle(middle.world_to_camera, first.world_to_camera), angle(middle.world_to_camera, second.world_to_camera), atol=1e-7)
    assert torch.allclose(middle.centers, (first.centers + second.centers) / 2, atol=1e-9)

    resampled = resample_trajectory(first, [0.0, 2.0, 4.0, 1.5])
    assert torch.allclose(resampled.world_to_camera[:3], first.world_to_camera[[0, 2, 4]], atol=1e-5)
    assert torch.allclose(resampled.centers[3], (first.centers[1] + first.centers[2]) / 2, atol=1e-9)


def rigid(n=2):
    return look_at(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])[:n])


K = torch.tensor([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]])


@pytest.mark.parametrize(
    "make, argument, words",
    [
        (lambda: CameraRig(rigid() * torch.tensor(float("nan")), K, 100, 100), "world_to_camera", "NaN"),
        (lambda: CameraRig(rigid() * torch.tensor([2.0, 2, 2, 1])[:, None], K, 100, 100), "world_to_camera", "not a rotation"),
        (lambda: CameraRig(rigid() @ torch.diag(torch.tensor([-1.0, 1, 1, 1], dtype=torch.float64)), K, 100, 100), "world_to_camera", "det"),
        (lambda: CameraRig(rigid(), K * torch.tensor([-1.0, 1, 1])[:, None], 100, 100), "intrinsics", "focal"),
        (lambda: CameraRig(rigid(), torch.zeros(3, 3), 100, 100), "intrinsics", ""),
        (lambda: CameraRig(rigid(), K.expand(3, 3, 3), 100, 100), "intrinsics", "3 intrinsic matrices for 2 cameras"),
        (lambda: CameraRig(torch.zeros(0, 4, 4), K, 100, 100), "world_to_camera", "N >= 1"),
        (lambda: CameraRig(rigid(), K, 0, 100), "image_size", "positive"),
        (lambda: orbit_rig(0), "views", "at least 1"),
        (lambda: orbit_rig(4, elevation_deg=90.0), "elevation", "between -90 and 90"),
        (lambda: orbit_rig(4, radius=-1.0), "radius", "positive"),
        (lambda: orbit_rig(4, height=0), "image_size", "positive"),
        (lambda: resample_trajectory(orbit_rig(3), [2.5]), "positions", "[0, 2]"),
        (lambda: blend_trajectories(orbit_rig(3), orbit_rig(4), 0.5), "trajectories", "3 cameras at 576x576 with 4"),
    ],
)
def test_bad_cameras_are_refused_with_the_argument_and_a_fix(make, argument, words):
    with pytest.raises(InvalidInput) as error:
        make()
    assert error.value.argument == argument
    assert words in error.value.problem
    assert "Fix:" in str(error.value) and error.value.fix
