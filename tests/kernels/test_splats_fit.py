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
from mv4d.kernels.splats.rasterize import render
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


def test_a_warm_start_continues_from_the_given_gaussians_and_leaves_them_untouched(moving_scene):
    budget = dict(iterations=100, initial_gaussians=300, views_per_step=2, densify=False)
    first = fit_dynamic_gaussians(moving_scene, FitSettings(**budget))
    given = {name: value.clone() for name, value in first.gaussians.params.items()}
    continued = fit_dynamic_gaussians(moving_scene, FitSettings(**budget, seed=1), start=first.gaussians)
    for name, value in first.gaussians.params.items():
        assert torch.equal(value, given[name]), name  # the start is copied, never optimised in place
    assert continued.gaussians.count == first.gaussians.count  # no new carving
    scores = {"first 100": fit_psnr(moving_scene, first.gaussians), "100 more": fit_psnr(moving_scene, continued.gaussians)}
    print(f"\nPSNR on the training views: {scores}")
    assert scores["100 more"] >= scores["first 100"] + 0.5
    with pytest.raises(InvalidInput, match="start: the Gaussians to start from have motion"):
        fit_dynamic_gaussians(moving_scene, FitSettings(**budget, motion=MotionConfig.static()), start=first.gaussians)


def test_the_objective_is_an_object_that_sees_each_iterations_renders(moving_scene):
    seen = []

    class Transparent:
        """Not the images: the Gaussians' coverage, so the result shows whose loss the fit minimised."""

        def loss(self, batch):
            seen.append((batch.step, batch.frame, float(batch.time), len(batch.views), tuple(batch.target.shape)))
            assert batch.output.colors.shape == batch.target.shape and batch.gaussians.count == 300
            return batch.output.alphas.mean()

    settings = FitSettings(iterations=30, initial_gaussians=300, views_per_step=2, densify=False)
    faded = fit_dynamic_gaussians(moving_scene, settings, objective=Transparent())
    plain = fit_dynamic_gaussians(moving_scene, settings)
    assert [entry[0] for entry in seen] == list(range(30))
    assert all(moving_scene.times[frame] == time and views == 2 and shape == (2, 32, 32, 3) for _, frame, time, views, shape in seen)
    coverage = {}
    for name, result in (("transparent", faded), ("photometric", plain)):
        frame = result.gaussians.frame(0.5)
        output = render(frame, RIG.world_to_camera.float(), RIG.intrinsics.float(), 32, 32, torch.ones(3), "torch")
        coverage[name] = float(output.alphas.mean())
    print(f"\nmean alpha of the renders: {coverage}")
    assert coverage["transparent"] < 0.5 * coverage["photometric"]


def test_the_densification_strategy_is_an_object_with_gsplats_interface(moving_scene):
    from gsplat.strategy.ops import remove

    calls = []

    class PruneHalfOnce:
        def initialize_state(self, scene_scale):
            calls.append(("initialize", scene_scale))
            return {"pruned": False}

        def step_pre_backward(self, params, optimizers, state, step, info):
            calls.append(("pre", step))

        def step_post_backward(self, params, optimizers, state, step, info):
            calls.append(("post", step))
            if step == 5:
                remove(params, optimizers, state, torch.arange(len(params["means"])) % 2 == 0)

    settings = FitSettings(iterations=10, initial_gaussians=300, views_per_step=2, densify=True)  # densify: not used
    result = fit_dynamic_gaussians(moving_scene, settings, strategy=PruneHalfOnce())
    assert calls[0][0] == "initialize" and calls[0][1] > 0
    assert calls[1:] == [(kind, step) for step in range(10) for kind in ("pre", "post")]
    assert result.gaussians.count == 150 and all(len(value) == 150 for value in result.gaussians.params.values())
