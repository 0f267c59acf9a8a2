"""The reconstruct -> render step of 3D-aware denoising on known scenes (CPU, the PyTorch rasteriser, tiny sizes).

Properties: a perfectly consistent grid (the fitter's own renders) passes the step nearly unchanged; a grid made
inconsistent on purpose (the synthetic scene with per-view perturbations) comes out closer to the ground truth,
static (views x 1) and moving (views x frames); weight 0 returns the prediction itself; steps and sigma choose
where the step runs. Figures are printed (pytest -s).
"""

import math

import pytest
import torch

from mv4d.kernels.aware_denoising import AwareSettings, blend, grid_cameras_and_times, parse_steps, reconstruct_and_render
from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.grid import Grid
from mv4d.kernels.multiview_video import even_times
from mv4d.kernels.splats.fit import FitSettings
from mv4d.kernels.splats.losses import psnr
from mv4d.kernels.splats.views import render_images
from mv4d.kernels.synthetic_scene import perturb_like_generated, render_scene

SIZE = 32
RIG = orbit_rig(6, 10.0, 2.0, 33.8, SIZE, SIZE, sv3d_order=True)
HELD_OUT = orbit_rig(6, 25.0, 2.0, 33.8, SIZE, SIZE, start_azimuth_deg=30.0)  # between the views, another elevation
SETTINGS = AwareSettings(fit=FitSettings(iterations=150, resolution=0, initial_gaussians=500, densify=False))
STRENGTH = 3.0  # perturb_like_generated x 3: +-9% gain, +-4.5% colour cast, ~1 px shifts, 3% noise per image


@pytest.fixture(scope="module")
def scene():
    """Ray-cast ground truth of the synthetic scene at time 0: the grid's views and held-out views."""
    return render_scene(RIG, torch.zeros(1))[0], render_scene(HELD_OUT, torch.zeros(1))[0]


@pytest.fixture(scope="module")
def from_scratch(scene):
    return reconstruct_and_render(scene[0], RIG, SETTINGS)


def test_a_perfectly_consistent_grid_passes_the_step_nearly_unchanged(scene, from_scratch):
    own = from_scratch.renders  # renders of known Gaussians: a grid that is exactly 3D-consistent
    again = reconstruct_and_render(own, RIG, SETTINGS, previous=from_scratch.fit.gaussians)
    figures = {"own renders, warm start": float(psnr(again.renders, own)),
               "ray-cast scene, from scratch": float(psnr(from_scratch.renders, scene[0]))}
    print(f"\nPSNR of the step's output against its input (dB): {figures}")
    assert figures["own renders, warm start"] >= 45.0
    assert figures["ray-cast scene, from scratch"] >= 20.0  # the fitter's own limit at this tiny budget


def test_a_grid_made_inconsistent_on_purpose_comes_out_closer_to_the_truth(scene, from_scratch):
    clean, held_out = scene
    perturbed = perturb_like_generated(clean, torch.Generator().manual_seed(1), STRENGTH)
    step = reconstruct_and_render(perturbed, RIG, SETTINGS)
    figures = {"grid in": float(psnr(perturbed, clean)), "grid out": float(psnr(step.renders, clean))}
    for weight in (0.5,):
        figures[f"blend {weight}"] = float(psnr(blend(perturbed, step.renders, weight), clean))
    times = torch.zeros(len(HELD_OUT))
    figures["held-out views"] = float(psnr(render_images(step.fit.gaussians, HELD_OUT, times, torch.ones(3), "torch"), held_out[:, 0]))
    figures["held-out views, fit to the clean grid"] = float(psnr(
        render_images(from_scratch.fit.gaussians, HELD_OUT, times, torch.ones(3), "torch"), held_out[:, 0]))
    print(f"\nPSNR against the ray-cast ground truth, static 6 x 1 grid (dB): {figures}")
    assert figures["grid out"] >= figures["grid in"] + 1.0
    assert figures["grid in"] < figures["blend 0.5"] < figures["grid out"]


def test_a_moving_grid_made_inconsistent_on_purpose_comes_out_closer_to_the_truth():
    rig, frames = orbit_rig(4, 10.0, 2.0, 33.8, SIZE, SIZE, sv3d_order=True), 3
    clean = render_scene(rig, even_times(frames))[0]
    perturbed = perturb_like_generated(clean, torch.Generator().manual_seed(2), STRENGTH)
    step = reconstruct_and_render(perturbed, rig, SETTINGS)
    assert not step.fit.gaussians.config.is_static and step.renders.shape == clean.shape
    figures = {"grid in": float(psnr(perturbed, clean)), "grid out": float(psnr(step.renders, clean))}
    print(f"\nPSNR against the ray-cast ground truth, moving 4 x 3 grid (dB): {figures}")
    assert figures["grid out"] >= figures["grid in"] + 1.0


def test_weight_zero_returns_the_prediction_itself():
    prediction = torch.randn(6, 4, 8, 8)
    assert blend(prediction, torch.full_like(prediction, float("nan")), 0.0) is prediction
    assert torch.equal(blend(prediction, prediction + 1, 1.0), prediction + 1)
    assert torch.allclose(blend(prediction, prediction + 1, 0.25), prediction + 0.25)


def test_steps_and_the_sigma_range_choose_the_steps():
    assert parse_steps("20, 30,40") == (20, 30, 40) and parse_steps(" ") == ()
    with pytest.raises(InvalidInput, match="steps: 'x' is not a list of whole numbers"):
        parse_steps("x")
    with pytest.raises(InvalidInput, match="steps count from 0"):
        parse_steps("-1")
    videomv = AwareSettings()
    assert [step for step in range(50) if videomv.chooses(step, 1.0)] == [20, 30, 40]
    by_sigma = AwareSettings(steps=(), sigma_min=1.0, sigma_max=10.0)
    assert [by_sigma.chooses(0, s) for s in (0.5, 1.0, 10.0, 11.0)] == [False, True, True, False]
    assert AwareSettings().fit_settings(Grid(4, 1)).motion.is_static
    assert not AwareSettings().fit_settings(Grid(4, 3)).motion.is_static
    with pytest.raises(InvalidInput, match="blend_weight"):
        AwareSettings(blend_weight=1.5)
    assert AwareSettings().sigma_max == math.inf


def test_each_cell_gets_its_views_camera_and_its_frames_time():
    cameras, times = grid_cameras_and_times(RIG, Grid(6, 3))
    assert torch.equal(cameras.world_to_camera[4], RIG.world_to_camera[1]) and times.tolist()[3:6] == [0.0, 0.5, 1.0]
    with pytest.raises(InvalidInput, match="cameras: 6 cameras for a grid of 5 views x 1 frames"):
        grid_cameras_and_times(RIG, Grid(5, 1))
