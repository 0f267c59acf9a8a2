"""The exact savings and MV4D Compile Blocks on a CUDA GPU in bf16, through the composed guider: the grid with the
single-token shortcut, and with the blocks compiled by inductor, equals today's path within bf16 tolerance."""

from __future__ import annotations

import torch

from test_gpu_composition import guider_module, sample_grid, tiny_grid_setup  # noqa: F401


def test_shortcut_and_compiled_blocks_give_the_same_grid_in_bf16(guider_module, tmp_path):  # noqa: F811
    from mv4d.integration.compiled_regions import use_persistent_caches, with_compiled_regions
    from mv4d.integration.patches.single_token_attention import with_single_token_attention

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    plain = sample_grid(guider_module, video, multiview, conditioning, noise, sigmas)
    shortcut = [with_single_token_attention(model) for model in (video, multiview)]
    use_persistent_caches(tmp_path)
    compiled = [with_compiled_regions(model, persistent_cache=False) for model in shortcut]
    scale = plain.abs().max().item()
    for name, models in (("shortcut", shortcut), ("shortcut + compiled blocks", compiled)):
        grid = sample_grid(guider_module, *models, conditioning, noise, sigmas)
        difference = (grid - plain).abs().max().item()
        print(f"{name} vs today's path, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
        assert torch.isfinite(grid).all() and difference < 2e-2 * scale
    assert any(tmp_path.rglob("*")), "inductor wrote no compiled code into the cache folder"
