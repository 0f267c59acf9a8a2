"""The composed guider on a CUDA GPU in bf16: the fast path (many videos / multi-view sets per UNet call) equals
the plain reference (one per call) within bf16 tolerance. Needs a ComfyUI source tree ($COMFYUI_DIR or ~/ComfyUI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HOST = Path(os.environ.get("COMFYUI_DIR", Path.home() / "ComfyUI"))
VIEWS, FRAMES, LATENT = 6, 5, 16


@pytest.fixture(scope="module")
def guider_module():
    if not (HOST / "comfy").is_dir():
        pytest.skip(f"no ComfyUI source tree at {HOST} (set COMFYUI_DIR)")
    sys.path.insert(0, str(HOST))
    sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "host"))
    from mv4d_tiny_models import composed_guider_module

    return composed_guider_module()


def test_fast_path_equals_one_call_per_video_in_bf16(guider_module):
    import comfy.samplers
    from mv4d.kernels.composition import CompositionSchedule
    from mv4d_tiny_models import svd_family_unet

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from composition_step import random_grid_conditioning

    video, multiview = svd_family_unet("svd", 0, dtype=torch.bfloat16), svd_family_unet("sv3d_p", 1, dtype=torch.bfloat16)
    conditioning = random_grid_conditioning(VIEWS, FRAMES, LATENT, 32)
    noise = torch.randn(VIEWS * FRAMES, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(2))
    sigmas = comfy.samplers.calculate_sigmas(video.get_model_object("model_sampling"), "karras", 4)
    grids = {}
    for per_call in (0, 1):
        settings = guider_module.GuiderSettings(CompositionSchedule(), (1.5, 3.0), (2.5, 2.5), per_call, per_call)
        guider = guider_module.ComposedGuider(video, multiview, conditioning, settings)
        with torch.inference_mode():
            grids[per_call] = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                                            sigmas, disable_pbar=True, seed=0).float()
    scale = grids[1].abs().max().item()
    difference = (grids[0] - grids[1]).abs().max().item()
    print(f"fast vs plain, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
    assert torch.isfinite(grids[0]).all() and scale > 0.1
    assert difference < 2e-2 * scale  # a few bf16 ulps (2^-8 relative) accumulated over 4 steps
