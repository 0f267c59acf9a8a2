"""3D-aware denoising (VideoMV) inside ComfyUI sampling, on tiny models of the real SVD / SV3D / SD layouts.

Properties: with blend weight 0 the wrapped guider samples exactly what the guider alone samples, with the fits
still running (for the composed guider and for a core CFGGuider of a multi-view model, through
SamplerCustomAdvanced); with weight > 0 the result changes; each chosen step runs once, where steps and the sigma
range say, and continues the previous step's Gaussians; ImageDream's control view is no image; the last
reconstruction comes out of MV4D 3D-Aware Reconstruction, for the latent its sampling made; bad input is refused
naming node, input and fix.
"""

from __future__ import annotations

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import tiny_checkpoint, tiny_clip_vision, tiny_multiview_checkpoint, tiny_text_encoder, tiny_vae
from test_host_composition import FixedNoise, composed_guider, grid_conditioning, karras_sigmas, sample

VIEWS, FRAMES, SIZE, STEPS = 4, 3, 64, 4
FIT_ITERATIONS = 15


@pytest.fixture(scope="module")
def models(comfy):
    return {kind: tiny_checkpoint(kind) for kind in ("svd", "sv3d_p")}


@pytest.fixture(scope="module")
def cameras(mv4d_nodes):
    return run_node(mv4d_nodes.OrbitCameras, views=VIEWS, elevation=10.0, radius=2.0, fov=33.8, width=SIZE, height=SIZE,
                    start_azimuth=0.0, order="SV3D: input view last (360 deg)").result[0]


@pytest.fixture(scope="module")
def composed(mv4d_nodes, models, cameras):
    generator = torch.Generator().manual_seed(7)
    references = torch.rand(VIEWS, SIZE, SIZE, 3, generator=generator), torch.rand(FRAMES, SIZE, SIZE, 3, generator=generator)
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    return composed_guider(mv4d_nodes, models, conditioning), latent


@pytest.fixture(scope="module")
def multiview(comfy):
    """Tiny MVDream and ImageDream models with their encoders."""
    from mv4d.integration.multiview_models import build_multiview_model
    from mv4d.kernels.models.multiview import split_checkpoint

    encoders = {"clip": tiny_text_encoder(), "vae": tiny_vae(), "clip_vision": tiny_clip_vision()}
    built = {kind: build_multiview_model(split_checkpoint(tiny_multiview_checkpoint(kind))).model
             for kind in ("mvdream-sd21", "imagedream")}
    return built, encoders


def aware(mv4d_nodes, guider, vae, cameras, **overrides):
    inputs = dict(guider=guider, vae=vae, cameras=cameras, steps="1, 2", fit_iterations=FIT_ITERATIONS, blend_weight=1.0,
                  fit_resolution=32, initial_gaussians=300, sigma_min=0.0, sigma_max=1000.0, background="white", frames_per_decode=0)
    inputs.update(overrides)
    return run_node(mv4d_nodes.AwareDenoising, **inputs).result[0]


def grid_noise(count, seed=3):
    return torch.randn(count, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def multiview_guider(mv4d_nodes, multiview, kind, cameras, cfg=5.0, **conditioning):
    import comfy.samplers

    models, encoders = multiview
    clip = encoders["clip"]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a small robot"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    common = dict(model=models[kind], positive=positive, negative=negative, cameras=cameras, views=len(cameras), width=SIZE, height=SIZE)
    if kind == "imagedream":
        picture = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))
        positive, negative, latent, _ = run_node(mv4d_nodes.ImageDreamConditioning, clip_vision=encoders["clip_vision"],
                                                 vae=encoders["vae"], image=picture, image_prompt_weight=1.0, **common,
                                                 **conditioning).result
    else:
        positive, negative, latent, _ = run_node(mv4d_nodes.MultiviewConditioning, **common).result
    guider = comfy.samplers.CFGGuider(models[kind])
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider, latent


def test_blend_weight_zero_is_the_composed_guider_alone_exactly(mv4d_nodes, models, cameras, composed):
    guider, latent = composed
    vae = models["svd"][2]
    noise = grid_noise(VIEWS * FRAMES)
    alone = sample(guider, noise, latent)
    wrapped = aware(mv4d_nodes, guider, vae, cameras, blend_weight=0.0)
    assert torch.equal(sample(wrapped, noise, latent), alone)
    steps = wrapped.mv4d_3d_aware.steps
    assert [record.step for record in steps] == [1, 2]  # the fits did run
    scene = wrapped.mv4d_3d_aware.reconstruction
    assert not scene.gaussians.config.is_static and len(scene.frame_times) == FRAMES and len(scene.cameras) == VIEWS

    blended = sample(aware(mv4d_nodes, guider, vae, cameras, blend_weight=1.0), noise, latent)
    change = (blended - alone).abs().max().item()
    print(f"\nmax |3D-aware (weight 1) - composed alone| = {change:.3g}")
    assert change > 1e-3
    assert torch.equal(sample(guider, noise, latent), alone)  # the original guider is untouched


def test_blend_weight_zero_is_a_core_cfg_guider_of_mvdream_alone_exactly(mv4d_nodes, multiview):
    import comfy.samplers

    from mv4d.kernels.cameras import orbit_rig

    rig = orbit_rig(VIEWS, 15.0, 2.0, 33.8, SIZE, SIZE)
    guider, latent = multiview_guider(mv4d_nodes, multiview, "mvdream-sd21", rig)
    vae = multiview[1]["vae"]
    noise = grid_noise(VIEWS)
    sampler = comfy.samplers.sampler_object("euler_ancestral")  # draws noise every step: the fits must not disturb it
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", STEPS)
    alone = sample(guider, noise, latent, sampler, sigmas)
    wrapped = aware(mv4d_nodes, guider, vae, rig, blend_weight=0.0)
    assert torch.equal(sample(wrapped, noise, latent, sampler, sigmas), alone)
    assert wrapped.mv4d_3d_aware.reconstruction.gaussians.config.is_static  # a V x 1 grid: static Gaussians
    blended = sample(aware(mv4d_nodes, guider, vae, rig, blend_weight=0.5), noise, latent, sampler, sigmas)
    assert (blended - alone).abs().max().item() > 1e-3


def test_imagedreams_control_view_is_no_image(mv4d_nodes, multiview, monkeypatch):
    import mv4d.integration.aware_guider as aware_guider
    from mv4d.kernels.cameras import orbit_rig

    rig = orbit_rig(VIEWS, 5.0, 2.0, 33.8, SIZE, SIZE, -90.0)
    guider, latent = multiview_guider(mv4d_nodes, multiview, "imagedream", rig, pixel_controller=True)
    assert latent["samples"].shape[0] == VIEWS + 1
    decoded = []
    original = aware_guider.decode_grid
    monkeypatch.setattr(aware_guider, "decode_grid", lambda vae, samples, grid, *args: decoded.append(len(samples)) or original(vae, samples, grid, *args))
    noise = grid_noise(VIEWS + 1)
    alone = sample(guider, noise, latent)
    wrapped = aware(mv4d_nodes, guider, multiview[1]["vae"], rig, blend_weight=0.0)
    assert torch.equal(sample(wrapped, noise, latent), alone)
    assert decoded == [VIEWS, VIEWS] and len(wrapped.mv4d_3d_aware.reconstruction.cameras) == VIEWS


def test_each_chosen_step_runs_once_and_continues_the_previous_steps_gaussians(mv4d_nodes, models, cameras, composed, monkeypatch):
    import comfy.samplers

    import mv4d.kernels.aware_denoising as kernel

    starts = []
    original = kernel.fit_dynamic_gaussians

    def recording(video, settings, device, on_step, start=None):
        result = original(video, settings, device, on_step, start=start)
        starts.append((start, result.gaussians))
        return result

    monkeypatch.setattr(kernel, "fit_dynamic_gaussians", recording)
    guider, latent = composed
    sigmas = karras_sigmas(6)
    inside = [step for step in range(6) if 0.5 <= float(sigmas[step]) <= 50.0]
    wrapped = aware(mv4d_nodes, guider, models["svd"][2], cameras, steps="", sigma_min=0.5, sigma_max=50.0)
    sample(wrapped, grid_noise(VIEWS * FRAMES), latent, comfy.samplers.sampler_object("heun"), sigmas)  # 2 evaluations a step
    assert [record.step for record in wrapped.mv4d_3d_aware.steps] == inside and len(inside) >= 2
    assert starts[0][0] is None  # the first step carves new Gaussians
    for (start, _), (_, previous) in zip(starts[1:], starts[:-1]):
        assert start is previous  # every later one continues the one before

    listed = aware(mv4d_nodes, guider, models["svd"][2], cameras, steps="3, 1, 40")
    sample(listed, grid_noise(VIEWS * FRAMES), latent)
    assert [record.step for record in listed.mv4d_3d_aware.steps] == [1, 3]  # 40 lies beyond the 4-step schedule


def test_the_last_reconstruction_comes_out_for_the_latent_its_sampling_made(mv4d_nodes, models, cameras, composed):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    guider, latent = composed
    wrapped = aware(mv4d_nodes, guider, models["svd"][2], cameras, steps="2")
    inputs = dict(noise=FixedNoise(grid_noise(VIEWS * FRAMES)), guider=wrapped, sampler=comfy.samplers.sampler_object("euler"),
                  sigmas=karras_sigmas(), latent_image=latent)
    if hasattr(SamplerCustomAdvanced, "VALIDATE_CLASS"):
        sampled = run_node(SamplerCustomAdvanced, **inputs).result[0]
    else:
        with torch.inference_mode():
            sampled = SamplerCustomAdvanced().sample(**inputs)[0]
    scene = run_node(mv4d_nodes.AwareReconstruction, guider=wrapped, latent=sampled).result[0]
    assert scene is wrapped.mv4d_3d_aware.reconstruction and scene.gaussians.device.type == "cpu"
    assert scene.gaussians.count > 0 and len(scene.frame_times) == FRAMES

    with pytest.raises(ValueError, match="MV4D 3D-Aware Reconstruction: input 'latent': this latent is not the last one sampled"):
        run_node(mv4d_nodes.AwareReconstruction, guider=wrapped, latent=latent)
    with pytest.raises(ValueError, match="input 'guider': this guider does no 3D-aware denoising"):
        run_node(mv4d_nodes.AwareReconstruction, guider=guider, latent=sampled)
    never = aware(mv4d_nodes, guider, models["svd"][2], cameras, steps="20")
    samples = sample(never, grid_noise(VIEWS * FRAMES), latent)
    with pytest.raises(ValueError, match=r"no 3D-aware step ran in that sampling \(steps \[20\].*Fix: choose steps"):
        run_node(mv4d_nodes.AwareReconstruction, guider=never, latent={"samples": samples})


def test_bad_input_is_refused_naming_node_input_and_fix(mv4d_nodes, models, cameras, composed):
    from mv4d.kernels.cameras import orbit_rig

    guider, latent = composed
    vae = models["svd"][2]
    with pytest.raises(ValueError, match="MV4D 3D-Aware Denoising: input 'steps': 'twenty' is not a list of whole numbers"):
        aware(mv4d_nodes, guider, vae, cameras, steps="twenty")
    with pytest.raises(ValueError, match="MV4D 3D-Aware Denoising: input 'sigma_min': the sigma range"):
        aware(mv4d_nodes, guider, vae, cameras, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="input 'guider': object is no ComfyUI CFGGuider"):
        aware(mv4d_nodes, object(), vae, cameras)
    wrong = aware(mv4d_nodes, guider, vae, orbit_rig(VIEWS + 1, 10.0, 2.0, 33.8, SIZE, SIZE))
    with pytest.raises(ValueError, match="MV4D 3D-Aware Denoising: input 'cameras': 5 cameras for a grid of 4 image views x 3 frames"):
        sample(wrong, grid_noise(VIEWS * FRAMES), latent)
    resized = aware(mv4d_nodes, guider, vae, orbit_rig(VIEWS, 10.0, 2.0, 33.8, 2 * SIZE, 2 * SIZE))
    with pytest.raises(ValueError, match="input 'cameras': the cameras are 128x128 but the images 64x64"):
        sample(resized, grid_noise(VIEWS * FRAMES), latent)


def test_models_lost_on_the_way_are_loaded_back(comfy, monkeypatch):
    import comfy.model_management

    from mv4d.integration import host

    class Patcher:
        def __init__(self, size):
            self.size = size

        def loaded_size(self):
            return self.size

    loads = []
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda models: loads.append(models))
    kept, lost = Patcher(10), Patcher(10)
    with host.models_kept_loaded([kept, lost]):
        pass
    assert loads == []
    with host.models_kept_loaded([kept, lost]):
        lost.size = 4  # e.g. the VAE made ComfyUI offload part of the UNet
    assert loads == [[kept, lost]]
