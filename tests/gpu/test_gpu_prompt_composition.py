"""The text pair's composition (AnimateDiff rows + MVDream columns) on a CUDA GPU in bf16: automatic chunks equal one
video / multi-view set per call within bf16 tolerance, with the reference row and column kept exactly. Tiny
networks of the real layouts; needs a ComfyUI source tree ($COMFYUI_DIR or ~/ComfyUI)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from test_gpu_composition import guider_module  # noqa: F401  (fixture)

VIEWS, FRAMES, SIZE = 4, 5, 128


def sample_pair(guider_module, per_call: int, dtype=torch.bfloat16, device="cuda", references: bool = True):  # noqa: F811
    import comfy.samplers

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from prompt_composition_step import build

    from mv4d.integration.prompt_grid_conditioning import prompt_grid_conditioning
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.composition import CompositionSchedule, GuiderSettings

    animatediff, mvdream, _, width = build(True, dtype, device)
    generator = torch.Generator().manual_seed(0)
    prompts = [[[torch.randn(1, 77, width, generator=generator), {}]] for _ in range(4)]
    latent = SIZE // 8
    column = torch.randn(VIEWS, 4, latent, latent, generator=generator) if references else None
    row = torch.randn(FRAMES, 4, latent, latent, generator=generator) if references else None
    if references:
        row[0] = column[0]
    with torch.inference_mode():
        conditioning, grid_latent = prompt_grid_conditioning(
            animatediff, mvdream, *prompts, orbit_rig(VIEWS, 15.0, 2.0, 33.8, SIZE, SIZE), FRAMES,
            None if column is None else {"samples": column}, None if row is None else {"samples": row})
    settings = GuiderSettings(CompositionSchedule(), (7.5, 7.5), (7.5, 7.5), per_call, per_call)
    guider = guider_module.ComposedGuider(animatediff, mvdream, conditioning, settings)
    noise = torch.randn(VIEWS * FRAMES, 4, latent, latent, generator=generator)
    sigmas = comfy.samplers.calculate_sigmas(mvdream.get_model_object("model_sampling"), "karras", 4)
    with torch.inference_mode():
        out = guider.sample(noise, grid_latent["samples"], comfy.samplers.sampler_object("euler"), sigmas,
                            denoise_mask=grid_latent.get("noise_mask"), disable_pbar=True, seed=0).float().cpu()
    return out, column, row


def test_fast_path_equals_one_call_per_group_in_bf16_and_keeps_the_references(guider_module):  # noqa: F811
    fast, column, row = sample_pair(guider_module, 0)
    plain, _, _ = sample_pair(guider_module, 1)
    scale = plain.abs().max().item()
    difference = (fast - plain).abs().max().item()
    print(f"fast vs one per call, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
    assert torch.isfinite(fast).all() and scale > 0.1
    assert difference < 2e-2 * scale  # a few bf16 ulps accumulated over 4 steps
    grid = fast.reshape(VIEWS, FRAMES, *fast.shape[1:])
    assert (grid[:, 0] - column).abs().max() < 2e-2 * column.abs().max()  # kept (the bf16 round trip of the latent)
    assert (grid[0] - row).abs().max() < 2e-2 * row.abs().max()
