"""The exact single-token cross-attention shortcut on a CUDA GPU in bf16, through the composed guider: the grid
equals today's path within bf16 tolerance."""

from __future__ import annotations

import torch

from test_gpu_composition import guider_module, sample_grid, tiny_grid_setup  # noqa: F401


def test_the_shortcut_gives_the_same_grid_in_bf16(guider_module):  # noqa: F811
    from mv4d.integration.patches.single_token_attention import with_single_token_attention

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    plain = sample_grid(guider_module, video, multiview, conditioning, noise, sigmas)
    grid = sample_grid(guider_module, *(with_single_token_attention(m) for m in (video, multiview)), conditioning, noise, sigmas)
    scale, difference = plain.abs().max().item(), (grid - plain).abs().max().item()
    print(f"shortcut vs today's path, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
    assert torch.isfinite(grid).all() and difference < 2e-2 * scale
