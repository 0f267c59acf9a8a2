"""Exact savings and fused kernels on a CUDA GPU in bf16, through the composed guider: the single-token
cross-attention shortcut (on by default) and MV4D Fuse Elementwise each give the grid of the path without them within
bf16 tolerance."""

from __future__ import annotations

import torch

from test_gpu_composition import guider_module, tiny_grid_setup  # noqa: F401


def test_the_shortcut_gives_the_same_grid_in_bf16(guider_module):  # noqa: F811
    import comfy.samplers

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    grids = []
    for shortcut in (False, True):
        guider = guider_module.ComposedGuider(video, multiview, conditioning, guider_module.GuiderSettings(single_token_shortcut=shortcut))
        with torch.inference_mode():
            grids.append(guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                                       disable_pbar=True, seed=0).float())
    scale, difference = grids[0].abs().max().item(), (grids[1] - grids[0]).abs().max().item()
    print(f"shortcut vs without, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
    assert torch.isfinite(grids[1]).all() and difference < 2e-2 * scale


def test_fused_elementwise_gives_the_same_grid_in_bf16(guider_module):  # noqa: F811
    """MV4D Fuse Elementwise's inductor kernels on the GPU: the composed grid equals the eager one within bf16
    tolerance (the kernels compute in float32 inside and round once)."""
    import comfy.samplers
    from mv4d.integration.patches.fused_elementwise import fused_module_count, with_fused_elementwise

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    fused = (with_fused_elementwise(video), with_fused_elementwise(multiview))
    assert all(fused_module_count(model) > 0 for model in fused)
    grids = []
    for models in ((video, multiview), fused):
        guider = guider_module.ComposedGuider(*models, conditioning, guider_module.GuiderSettings())
        with torch.inference_mode():
            grids.append(guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                                       disable_pbar=True, seed=0).float())
    scale, difference = grids[0].abs().max().item(), (grids[1] - grids[0]).abs().max().item()
    print(f"fused elementwise vs eager, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
    assert torch.isfinite(grids[1]).all() and difference < 2e-2 * scale
