"""Fitting dynamic Gaussians on the CPU with the PyTorch rasteriser, on a tiny moving scene."""

import pytest
import torch

from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.multiview_video import MultiviewVideo
from mv4d.kernels.splats import fit as fit_module
from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians
from mv4d.kernels.splats.init import initial_gaussians
from mv4d.kernels.splats.losses import psnr
from mv4d.kernels.splats.model import MotionConfig
from mv4d.kernels.splats.views import grid_request, render_images
from mv4d.kernels.synthetic_scene import example_multiview_video

RIG = orbit_rig(4, height=32, width=32, sv3d_order=True)


@pytest.fixture(scope="module")
def moving_scene():
    return example_multiview_video(RIG, 4, perturbation=0.0)


def fit_psnr(video, gaussians):
    cameras, times = grid_request(video.cameras, video.times)
    images = render_images(gaussians, cameras, times, torch.ones(3), "torch")
    return float(psnr(images, video.images.reshape(-1, *video.images.shape[2:])))


def test_fitting_beats_the_start_and_a_static_fit_of_the_same_budget(moving_scene):
    budget = dict(iterations=300, initial_gaussians=300, views_per_step=2, densify=False)
    dynamic = fit_dynamic_gaussians(moving_scene, FitSettings(**budget, motion=MotionConfig()))
    static = fit_dynamic_gaussians(moving_scene, FitSettings(**budget, motion=MotionConfig.static()))
    start = initial_gaussians(moving_scene, 300, MotionConfig(), torch.ones(3), torch.Generator().manual_seed(0), time_window=0.1)
    scores = {name: fit_psnr(moving_scene, g) for name, g in
              (("start", start), ("static", static.gaussians), ("dynamic", dynamic.gaussians))}
    print(f"\nPSNR on the training views: {scores}")
    assert scores["dynamic"] >= scores["start"] + 5.0
    assert scores["dynamic"] >= scores["static"] + 1.5
    assert dynamic.backend == "torch" and dynamic.losses[-1] < dynamic.losses[0]


def test_a_cpu_fit_is_deterministic_including_densification(moving_scene):
    settings = FitSettings(iterations=40, initial_gaussians=150, views_per_step=2, densify=True, densify_start=0.1,
                           densify_stop=1.0, densify_every=10, grow_grad2d=1e-6, opacity_reset_every=30, seed=3)
    first = fit_dynamic_gaussians(moving_scene, settings)
    second = fit_dynamic_gaussians(moving_scene, settings)
    assert first.gaussians.count != 150  # densification changed the count
    assert set(first.gaussians.params) == set(second.gaussians.params)
    for name, value in first.gaussians.params.items():
        assert torch.equal(value, second.gaussians.params[name]), name
    other = fit_dynamic_gaussians(moving_scene, FitSettings(**{**settings.__dict__, "seed": 4}))
    assert not torch.equal(other.gaussians.params["means"][:10], first.gaussians.params["means"][:10])


def test_opacity_reset_happens_despite_gsplats_precedence_bug():
    strategy, state = fit_module._strategy(FitSettings(iterations=100, opacity_reset_every=50, densify_stop=1.0), 1.0)
    params = {name: torch.nn.Parameter(value) for name, value in {
        "means": torch.zeros(4, 3), "scales": torch.zeros(4, 3), "quats": torch.tensor([[1.0, 0, 0, 0]] * 4),
        "opacities": torch.full((4,), 5.0)}.items()}
    optimizer = torch.optim.Adam([{"params": [p], "lr": 0.1, "name": n} for n, p in params.items()])
    optimizers = {group["name"]: fit_module._OneGroup(optimizer, group) for group in optimizer.param_groups}
    info = {"means2d": torch.zeros(1, 4, 2, requires_grad=True), "radii": torch.ones(1, 4, 2, dtype=torch.int32),
            "width": 8, "height": 8, "n_cameras": 1, "gaussian_ids": None}
    info["means2d"].grad = torch.zeros(1, 4, 2)
    for step in (49, 50):
        fit_module._densify(strategy, params, optimizers, state, step, info, FitSettings(iterations=100, opacity_reset_every=50))
        if step == 49:
            assert torch.sigmoid(params["opacities"]).min() > 0.99  # untouched before the reset step
    assert torch.sigmoid(params["opacities"]).max() <= 2 * strategy.prune_opa + 1e-6


def test_bad_fit_input_is_refused(moving_scene):
    with pytest.raises(InvalidInput, match="iterations: must be at least 1"):
        fit_dynamic_gaussians(moving_scene, FitSettings(iterations=0))
    constant = MultiviewVideo(torch.full_like(moving_scene.images, 0.5), moving_scene.cameras, moving_scene.times)
    with pytest.raises(InvalidInput, match="every pixel has the same value"):
        fit_dynamic_gaussians(constant, FitSettings(iterations=5))
    broken = moving_scene.images.clone()
    broken[1, 2, 3, 4, 0] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        fit_dynamic_gaussians(MultiviewVideo(broken, moving_scene.cameras, moving_scene.times), FitSettings(iterations=5))
    with pytest.raises(InvalidInput, match="densify_start <= densify_stop"):
        FitSettings(densify_start=0.8, densify_stop=0.2).check()
