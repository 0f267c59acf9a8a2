"""3D-aware denoising on a CUDA GPU: the wrapped composed guider in bf16 with gsplat fits, and the reconstruct ->
render step with gsplat's rasteriser. Needs a ComfyUI source tree ($COMFYUI_DIR or ~/ComfyUI) for the first test."""

from __future__ import annotations

import torch

from test_gpu_composition import VIEWS, FRAMES, guider_module, tiny_grid_setup  # noqa: F401  (fixture)


def test_weight_zero_is_the_composed_guider_alone_exactly_on_the_gpu(guider_module):  # noqa: F811
    import comfy.samplers

    from mv4d.integration.aware_guider import aware_guider
    from mv4d.kernels.aware_denoising import AwareSettings
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.splats.fit import FitSettings
    from mv4d_tiny_models import tiny_vae

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    guider = guider_module.ComposedGuider(video, multiview, conditioning, guider_module.GuiderSettings())
    vae, rig = tiny_vae(), orbit_rig(VIEWS, 10.0, 2.0, 33.8, 128, 128, sv3d_order=True)
    euler = comfy.samplers.sampler_object("euler")

    def sample(which):
        with torch.inference_mode():
            return which.sample(noise.clone(), torch.zeros_like(noise), euler, sigmas, disable_pbar=True, seed=0)

    fit = FitSettings(iterations=50, resolution=64, initial_gaussians=2000)
    alone = sample(guider)
    silent = aware_guider(guider, AwareSettings(steps=(1, 2), blend_weight=0.0, fit=fit), vae, rig)
    assert torch.equal(sample(silent), alone)
    records = silent.mv4d_3d_aware.steps
    assert [record.step for record in records] == [1, 2]
    print(f"\nper step on the GPU: {[(round(r.decode, 3), round(r.fit, 3), round(r.render, 3), round(r.encode, 3)) for r in records]} s")
    blended = sample(aware_guider(guider, AwareSettings(steps=(1, 2), blend_weight=1.0, fit=fit), vae, rig))
    assert torch.isfinite(blended).all() and (blended - alone).abs().max().item() > 1e-3
    scene = silent.mv4d_3d_aware.reconstruction
    assert scene.gaussians.device.type == "cpu" and len(scene.frame_times) == FRAMES


def test_own_renders_pass_the_step_nearly_unchanged_with_gsplat():
    from mv4d.kernels.aware_denoising import AwareSettings, reconstruct_and_render
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.splats.fit import FitSettings
    from mv4d.kernels.splats.losses import psnr
    from mv4d.kernels.synthetic_scene import render_scene

    rig = orbit_rig(8, 10.0, 2.0, 33.8, 128, 128, sv3d_order=True)
    settings = AwareSettings(fit=FitSettings(iterations=500, resolution=0, initial_gaussians=5000))
    first = reconstruct_and_render(render_scene(rig, torch.zeros(1), device="cuda")[0].cpu(), rig, settings, device="cuda")
    again = reconstruct_and_render(first.renders, rig, settings, previous=first.fit.gaussians, device="cuda")
    figure = float(psnr(again.renders, first.renders))
    print(f"\nown renders through a warm-started step (gsplat): {figure:.1f} dB")
    assert first.fit.backend == "gsplat" and figure >= 40.0
