"""The exact single-token cross-attention shortcut on a CUDA GPU in bf16, through the composed guider (on by
default): the grid equals the path without it within bf16 tolerance."""

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
