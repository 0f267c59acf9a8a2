"""4Diffusion's score distillation as a fit objective, with score models whose answers are known.

Properties: the gradient reaching the rendered images is w(t) (eps_hat - eps) (latents = pixels), and through an
encoder its chain rule (analytic and by finite differences); the std rescale gives its formula's target;
refinement with the exact denoiser of a target scene lowers the SDS objective over iterations and moves the renders
toward that scene; the anchor term alone pulls the anchor-view render toward the anchor video; the rig turns about
the up axis as an orbit's azimuths do; renders are the request's grid, view-major; bad settings are refused.
"""

import math

import pytest
import torch

from mv4d.kernels.cameras import orbit_rig, rotated_about_up
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.multiview_video import MultiviewVideo
from mv4d.kernels.score_distillation import (ScoreDistillation, SDSSettings, sds_weight, timestep_range,
                                             x0_reconstruction)
from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians
from mv4d.kernels.splats.losses import psnr
from mv4d.kernels.splats.rasterize import render
from mv4d.kernels.synthetic_scene import example_multiview_video

SIZE, FRAMES = 32, 4
RIG = orbit_rig(4, 10.0, 2.0, 33.8, SIZE, SIZE)
WHITE = torch.ones(3)


def ldm_linear_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """ImageDream's (and 4DM's) schedule: LDM's linear betas 0.00085 .. 0.012 on the square-root scale."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class PixelScore:
    """Latents are the pixels (B, 3, H, W); the 'model' is a fixed random convolution of the noisy latents."""

    alphas_cumprod = ldm_linear_alphas_cumprod()

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.guided_weight = torch.randn(3, 3, 3, 3, generator=generator) * 0.2
        self.conditional_weight = torch.randn(3, 3, 3, 3, generator=generator) * 0.2

    def encode(self, images):
        return images.permute(0, 3, 1, 2)

    def predict_noise(self, noisy, timestep, request):
        assert noisy.shape[0] == request.grid.cells and not torch.is_grad_enabled()
        guided = torch.nn.functional.conv2d(noisy, self.guided_weight, padding=1) + 0.001 * timestep
        return guided, torch.nn.functional.conv2d(noisy, self.conditional_weight, padding=1)


class LinearEncoderScore(PixelScore):
    """Latents: 4 channels at 1/4 size, a fixed linear map of the images (as a VAE encoder is, locally)."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        self.mix = torch.randn(4, 3, 1, 1, generator=generator)
        self.guided_weight = torch.randn(4, 4, 3, 3, generator=generator) * 0.2
        self.conditional_weight = torch.randn(4, 4, 3, 3, generator=generator) * 0.2

    def encode(self, images):
        return torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2), 4), self.mix)


class ExactDenoiser(PixelScore):
    """The ideal denoiser of one clean multi-view video: the renders of `target` Gaussians at the asked cameras and
    frames. Its x0 is always the target, so SDS with it is plain regression onto the target scene."""

    def __init__(self, target, times):
        self.target, self.times = target, times

    def predict_noise(self, noisy, timestep, request):
        objective = ScoreDistillation(self, request.cameras, self.times, SDSSettings(), WHITE, "torch")
        clean = self.encode(objective.render_window(self.target, request))
        alpha_bar = self.alphas_cumprod[timestep]
        eps = (noisy - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()
        return eps, eps


@pytest.fixture(scope="module")
def scene():
    return example_multiview_video(RIG, FRAMES, perturbation=0.0)


@pytest.fixture(scope="module")
def fitted(scene):
    return fit_dynamic_gaussians(scene, FitSettings(iterations=150, initial_gaussians=300, views_per_step=2, densify=False)).gaussians


def objective_for(score, settings=None, times=None):
    settings = settings or SDSSettings(window_frames=2)
    return ScoreDistillation(score, RIG, torch.linspace(0, 1, FRAMES) if times is None else times, settings, WHITE, "torch")


def drawn_images(objective, seed=0):
    draw = objective.draw(torch.Generator().manual_seed(seed))
    request = objective.request(draw)
    images = torch.rand(request.grid.cells, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    return draw, request, images


def test_the_gradient_reaching_the_rendered_images_is_w_t_times_eps_hat_minus_eps():
    score = PixelScore()
    objective = objective_for(score, SDSSettings(window_frames=2, x0_rescale=0.0))
    for seed in range(3):
        draw, request, images = drawn_images(objective, seed)
        loss, result = objective.sds_of_images(images, request, draw)
        loss.backward()
        # independently: the same noise, the model asked again, SDS's formula
        alpha_bar = score.alphas_cumprod[draw.timestep]
        noise = torch.randn(result.latents.shape, generator=torch.Generator().manual_seed(draw.noise_seed))
        latents = images.detach().permute(0, 3, 1, 2)
        with torch.no_grad():
            eps_hat, _ = score.predict_noise(alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise, draw.timestep, request)
        expected = sds_weight(alpha_bar, len(latents)) * (eps_hat - noise)
        assert float(expected.abs().max()) > 1e-4  # not a vacuous comparison
        torch.testing.assert_close(images.grad.permute(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-7)
        assert abs(float(sds_weight(alpha_bar, 1)) - math.sqrt((1 - float(alpha_bar)) / float(alpha_bar))) < 1e-5


def test_through_an_encoder_the_gradient_is_its_chain_rule_analytically_and_by_finite_differences():
    score = LinearEncoderScore()
    objective = objective_for(score, SDSSettings(window_frames=2, x0_rescale=0.0))
    draw, request, images = drawn_images(objective, 4)
    loss, result = objective.sds_of_images(images, request, draw)
    loss.backward()
    latent_gradient = sds_weight(result.alpha_bar, len(result.latents)) * (result.guided - result.noise)
    leaf = images.detach().clone().requires_grad_(True)
    (chain,) = torch.autograd.grad(score.encode(leaf), leaf, grad_outputs=latent_gradient)
    torch.testing.assert_close(images.grad, chain, rtol=1e-4, atol=1e-8)
    # finite differences of the surrogate 0.5 ||E(x) - sg(x0_hat)||^2 / B along random directions, x0_hat held
    def surrogate(x):
        return 0.5 * (score.encode(x).double() - result.target.double()).pow(2).sum() / len(result.latents)

    for seed in range(3):
        direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(10 + seed))
        step = 1e-3
        with torch.no_grad():
            numeric = (surrogate(images + step * direction) - surrogate(images - step * direction)) / (2 * step)
        analytic = float((images.grad.double() * direction.double()).sum())
        assert abs(float(numeric) - analytic) <= 1e-3 * abs(analytic) + 1e-6, (float(numeric), analytic)


def test_the_std_rescale_gives_its_formulas_target():
    score = PixelScore()
    objective = objective_for(score, SDSSettings(window_frames=2, x0_rescale=0.2))
    draw, request, images = drawn_images(objective, 1)
    loss, result = objective.sds_of_images(images, request, draw)
    loss.backward()
    alpha_bar = result.alpha_bar
    noisy = alpha_bar.sqrt() * result.latents + (1 - alpha_bar).sqrt() * result.noise
    with torch.no_grad():
        guided, conditional = score.predict_noise(noisy, draw.timestep, request)
    x0 = (noisy - (1 - alpha_bar).sqrt() * guided) / alpha_bar.sqrt()
    x0_conditional = (noisy - (1 - alpha_bar).sqrt() * conditional) / alpha_bar.sqrt()
    expected = 0.2 * x0 * x0_conditional.std() / x0.std() + 0.8 * x0
    torch.testing.assert_close(result.target, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(images.grad.permute(0, 3, 1, 2), (result.latents - expected) / len(expected), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(expected, x0_reconstruction(noisy, guided, conditional, alpha_bar, 0.0))


def anchor_video(images, view=0):
    """The anchor: one view's frames with its camera (what the refinement node builds from the input video)."""
    return MultiviewVideo(images[view:view + 1], RIG.select([view]), torch.linspace(0, 1, images.shape[1]))


def refine(start, video, objective, iterations, seed=0):
    settings = FitSettings(iterations=iterations, resolution=0, views_per_step=1, initial_gaussians=start.count,
                           max_gaussians=start.count, densify=False, seed=seed, motion=start.config)
    return fit_dynamic_gaussians(video, settings, start=start, objective=objective).gaussians


def mean_sds(objective, gaussians, draws):
    with torch.no_grad():
        return sum(float(objective.sds_term(gaussians, draw)[0]) for draw in draws) / len(draws)


def test_refinement_with_the_exact_denoiser_of_a_target_scene_lowers_the_sds_objective(scene, fitted):
    times = torch.linspace(0, 1, FRAMES)
    # the target: the fitted scene with its colours turned (a clean video the start does not match)
    target_params = {name: value.clone() for name, value in fitted.params.items()}
    target_params["sh0"] = target_params["sh0"][..., [2, 0, 1]]
    target = type(fitted)(target_params, fitted.config)
    settings = SDSSettings(window_frames=2, anchor_ssim_weight=0.0, x0_rescale=0.0, timestep_min=0.02, timestep_max=0.6, seed=3)
    objective = objective_for(ExactDenoiser(target, times), settings)
    draws = [objective.draw(torch.Generator().manual_seed(100 + k)) for k in range(6)]
    before = mean_sds(objective, fitted, draws)
    refined = refine(fitted, anchor_video(scene.images), objective, 60)
    after = mean_sds(objective, refined, draws)
    blocks = objective.history.means("sds", blocks=4)
    request = objective.request(draws[0])
    with torch.no_grad():
        goal = objective.render_window(target, request)
        closeness = {name: float(psnr(objective.render_window(g, request), goal)) for name, g in (("start", fitted), ("refined", refined))}
    print(f"\nSDS objective on fixed draws: {before:.4f} -> {after:.4f}; per block of the run {[round(b, 4) for b in blocks]}; "
          f"PSNR to the target scene's renders {closeness}")
    assert after < 0.7 * before
    assert blocks[-1] < blocks[0]
    assert closeness["refined"] > closeness["start"] + 1.0


def test_the_anchor_term_pulls_the_anchor_view_render_toward_the_anchor_video(scene, fitted):
    # the anchor video: view 0 of the scene played backwards (the fit learnt it forwards)
    backwards = scene.images.flip(1)
    video = anchor_video(backwards)
    settings = SDSSettings(window_frames=2, sds_weight=0.0, anchor_ssim_weight=100.0)
    objective = objective_for(PixelScore(), settings)

    def anchor_psnr(gaussians):
        world_to_camera, intrinsics = RIG.world_to_camera[:1].float(), RIG.intrinsics[:1].float()
        with torch.no_grad():
            renders = torch.cat([render(gaussians.frame(t), world_to_camera, intrinsics, SIZE, SIZE, WHITE, "torch").colors
                                 for t in video.times])
        return float(psnr(renders, backwards[0]))

    refined = refine(fitted, video, objective, 80)
    before, after = anchor_psnr(fitted), anchor_psnr(refined)
    anchor = objective.history.means("anchor", blocks=4)
    print(f"\nanchor-view PSNR to the anchor video: {before:.2f} -> {after:.2f} dB; anchor loss per block {[round(a, 3) for a in anchor]}")
    assert objective.history.sds == []  # the SDS term was off: nothing but the anchor moved the Gaussians
    assert after > before + 1.0 and anchor[-1] < anchor[0]


def test_the_rig_turns_about_the_up_axis_as_an_orbits_azimuths_do():
    turned = rotated_about_up(RIG, 90.0)
    torch.testing.assert_close(turned.world_to_camera, orbit_rig(4, 10.0, 2.0, 33.8, SIZE, SIZE, 90.0).world_to_camera)
    off_centre = orbit_rig(3, 20.0, 1.5, 40.0, SIZE, SIZE, 0.0, target=(0.3, -0.2, 0.1))
    torch.testing.assert_close(rotated_about_up(off_centre, 45.0, (0.3, -0.2, 0.1)).world_to_camera,
                               orbit_rig(3, 20.0, 1.5, 40.0, SIZE, SIZE, 45.0, target=(0.3, -0.2, 0.1)).world_to_camera)


def test_the_renders_are_the_requests_grid_view_major(fitted):
    objective = objective_for(PixelScore(), SDSSettings(window_frames=3))
    draw = objective.draw(torch.Generator().manual_seed(7))
    request = objective.request(draw)
    assert request.grid.views == 4 and request.grid.frames == 3 and request.frames[0] == draw.first_frame
    assert 0 <= draw.first_frame <= FRAMES - 3 and 0 <= draw.azimuth < 360
    low, high = timestep_range(objective.settings, 1000)
    assert (low, high) == (20, 500) and low <= draw.timestep <= high
    with torch.no_grad():
        grid = objective.render_window(fitted, request)
        view, frame = 2, 1
        single = render(fitted.frame_at(fitted.time_basis(objective.times), request.frames[frame]),
                        request.cameras.world_to_camera[view:view + 1].float(), request.cameras.intrinsics[view:view + 1].float(),
                        SIZE, SIZE, WHITE, "torch").colors[0]
    torch.testing.assert_close(grid[request.grid.index(view, frame)], single)
    assert objective_for(PixelScore(), SDSSettings(window_frames=8)).window == FRAMES  # a short clip: the whole clip


@pytest.mark.parametrize("change, message", [
    ({"timestep_min": 0.6, "timestep_max": 0.5}, "timestep range"),
    ({"iterations": 0}, "at least 1"),
    ({"x0_rescale": 1.5}, "x0_rescale"),
    ({"guidance_scale": -1.0}, "must not be negative"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(InvalidInput, match=message):
        SDSSettings(**change).check()


def test_an_sds_step_the_pytorch_rasteriser_could_not_hold_is_refused_before_anything_runs(monkeypatch):
    from mv4d.kernels import memory

    objective = objective_for(PixelScore(), SDSSettings(window_frames=4))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**30)
    objective.check_memory(1000, "cpu")  # 1000 Gaussians x 16 renders: about 0.6 GiB, fits
    with pytest.raises(InvalidInput, match=r"gaussians: an SDS step of the PyTorch rasteriser with 100000 Gaussians in 4 views x "
                                           r"4 frames needs about .* Fix: lower window_frames"):
        objective.check_memory(100_000, "cpu")
