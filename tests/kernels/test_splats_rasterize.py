"""The PyTorch rasteriser follows gsplat's CUDA rules: checked here against a plain per-pixel loop (the GPU lane
checks it against gsplat itself)."""

import math

import pytest
import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.splats.model import GaussianFrame
from mv4d.kernels.splats.rasterize import ALPHA_THRESHOLD, MAX_ALPHA, MIN_TRANSMITTANCE, TILE_SIZE, project, render


def random_frame(count, sh_degree=1, seed=0, spread=0.5):
    generator = torch.Generator().manual_seed(seed)
    quats = torch.randn(count, 4, generator=generator)
    return GaussianFrame(
        means=(torch.rand(count, 3, generator=generator) - 0.5) * spread,
        quats=quats / quats.norm(dim=-1, keepdim=True),
        scales=0.01 + 0.06 * torch.rand(count, 3, generator=generator),
        opacities=torch.rand(count, generator=generator),
        sh=torch.randn(count, (sh_degree + 1) ** 2, 3, generator=generator) * 0.5,
        sh_degree=sh_degree,
    )


def reference_render(frame, rig, background):
    """gsplat's CUDA algorithm written as plain loops: per pixel, the Gaussians listed in its 16x16 tile, in
    depth order, blended front to back with its alpha rules."""
    viewmats, Ks = rig.world_to_camera.float(), rig.intrinsics.float()
    projected = project(frame, viewmats, Ks, rig.width, rig.height)
    images = torch.zeros(len(rig), rig.height, rig.width, 3)
    for camera in range(len(rig)):
        radii = projected["radii"][camera]
        means2d = projected["means2d"][camera].detach()
        order = [g for g in torch.argsort(projected["depths"][camera], stable=True).tolist() if (radii[g] > 0).all()]
        for row in range(rig.height):
            for col in range(rig.width):
                tile_x, tile_y = col // TILE_SIZE, row // TILE_SIZE
                transmittance, colour = 1.0, torch.zeros(3)
                for g in order:
                    mx, my = means2d[g].tolist()
                    rx, ry = radii[g].tolist()
                    if not (math.floor((mx - rx) / TILE_SIZE) <= tile_x < math.ceil((mx + rx) / TILE_SIZE)
                            and math.floor((my - ry) / TILE_SIZE) <= tile_y < math.ceil((my + ry) / TILE_SIZE)):
                        continue
                    a, b, c = projected["conics"][camera, g].tolist()
                    dx, dy = mx - (col + 0.5), my - (row + 0.5)
                    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                    alpha = min(MAX_ALPHA, float(projected["opacities"][camera, g]) * math.exp(-sigma))
                    if sigma < 0 or alpha < ALPHA_THRESHOLD:
                        continue
                    if transmittance * (1 - alpha) <= MIN_TRANSMITTANCE:
                        break
                    colour += projected["colours"][camera, g].detach() * alpha * transmittance
                    transmittance *= 1 - alpha
                images[camera, row, col] = colour + transmittance * background
    return images


def test_torch_renderer_matches_the_per_pixel_reference():
    rig = orbit_rig(2, elevation_deg=15.0, radius=2.0, fov_deg=40.0, height=20, width=36)
    frame = random_frame(60, sh_degree=2)
    background = torch.tensor([0.2, 0.4, 0.6])
    fast = render(frame, rig.world_to_camera, rig.intrinsics, 36, 20, background, "torch").colors.detach()
    assert torch.allclose(fast, reference_render(frame, rig, background), atol=2e-5)


def test_nearer_gaussians_hide_farther_ones_and_empty_pixels_show_the_background():
    rig = orbit_rig(1, elevation_deg=0.0, radius=2.0, fov_deg=40.0, height=32, width=32)
    # camera on +X looking at the origin: the red Gaussian at x = 0.3 is nearer than the green one at x = -0.3
    means = torch.tensor([[0.3, 0.0, 0.0], [-0.3, 0.0, 0.0]])
    red, green = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    sh = ((torch.stack([red, green]) - 0.5) / 0.28209479177387814)[:, None, :]
    frame = GaussianFrame(means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.1), torch.tensor([0.99, 0.99]), sh, 0)
    output = render(frame, rig.world_to_camera, rig.intrinsics, 32, 32, torch.ones(3), "torch")
    centre = output.colors[0, 16, 16]
    assert centre[0] > 0.95 and centre[1] < 0.05
    assert torch.allclose(output.colors[0, 0, 0], torch.ones(3)) and output.alphas[0, 0, 0, 0] == 0
    assert output.alphas[0, 16, 16, 0] > 0.99


def test_gradients_reach_every_parameter_and_densification_statistics_are_there():
    rig = orbit_rig(3, height=24, width=24)
    frame = random_frame(40)
    leaves = [frame.means, frame.quats, frame.scales, frame.opacities, frame.sh]
    for leaf in leaves:
        leaf.requires_grad_(True)
    output = render(frame, rig.world_to_camera, rig.intrinsics, 24, 24, torch.zeros(3), "torch")
    output.info["means2d"].retain_grad()
    output.colors.square().mean().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert output.info["means2d"].grad.shape == (3, 40, 2)
    assert output.info["radii"].shape == (3, 40, 2) and output.info["n_cameras"] == 3


def test_the_gsplat_backend_is_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rig = orbit_rig(1, height=8, width=8)
    with pytest.raises(InvalidInput, match="needs a CUDA GPU"):
        render(random_frame(3), rig.world_to_camera, rig.intrinsics, 8, 8, torch.zeros(3), "gsplat")
