"""4Diffusion on one GPU: one 4DM sampling step and one SDS refinement iteration, through the pack's own code.

4DM here is a real-size SD2.1 UNet with ImageDream's camera MLP, resampler and image-prompt projections and 4DM's 21
motion modules (AnimateDiff v2's layout, 32-frame tables), random weights (compute does not depend on the values),
UNet in bf16 on CUDA, as our loader and patches build it (with_multiview_patches + with_motion, ImageDream's schedule).
The image prompts of the `frames` video frames are random CLIP ViT-H/14-shaped hidden states and latents (the
encoders are not part of either step).

(1) One sampling step of the (views + 1) x frames grid at `size` px with CFG (one UNet call of 2 x 40 images at the
    default 4 + 1 views x 8 frames) through core's CFGGuider.
(2) One iteration of MV4D Refine 4D with SDS (integration.score_distillation.refine_with_sds's parts: the fit with
    the SDS objective) on `gaussians` random 4D Gaussians: the anchor render, views x window renders, their encoding
    by a real-size SD VAE (random weights) with gradients, the 4DM call with CFG (no gradients), the backward pass and
    the Adam step.

Reports seconds per step / iteration (after a warm-up; gsplat's first-use compilation is not counted) and the peak
VRAM of each. One JSON line.

    python -P bench/fourdm_step.py                                       # 4 views + 1, 8 frames, 256 px, CUDA
    python -P bench/fourdm_step.py --frames 16                           # beyond 4DM's trained 8
    OMP_NUM_THREADS=1 python -P bench/fourdm_step.py --tiny --frames 2 --size 64 --gaussians 500   # CPU smoke run

Needs a ComfyUI source tree at $COMFYUI_DIR or ~/ComfyUI (its Python requirements installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P leaves this folder off the path
from composition_step import PeakVram, import_host, seconds_per_run_and_peak  # noqa: E402

CLIP_TOKENS, CLIP_WIDTH = 257, 1280  # OpenCLIP ViT-H/14's penultimate hidden states


def build(tiny: bool, dtype, device):
    """4DM as MV4D Load 4DM builds it: ImageDream's patches on a stock SD2.1 UNet, then the motion modules."""
    import comfy.ops
    from multiview_step import build as build_multiview

    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels.models.motion import SD15_CHANNELS, MotionModel, MotionVersion
    from mv4d_tiny_models import TINY_MOTION_CHANNELS, init_weights

    imagedream, context, _ = build_multiview("imagedream", tiny, dtype, device)
    with torch.device(device or "cpu"):
        motion = MotionModel(MotionVersion("4dm", 32, True, False, "4dm"), TINY_MOTION_CHANNELS if tiny else SD15_CHANNELS,
                             operations=comfy.ops.manual_cast)
    init_weights(motion, 2)
    return with_motion(imagedream, motion.to(dtype).requires_grad_(False), sampling=False), context


def sd_vae(tiny: bool):
    """SD's VAE (real-size: ch 128, multipliers 1, 2, 4, 4, two ResBlocks per level), random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from mv4d_tiny_models import init_weights, tiny_vae

    if tiny:
        return tiny_vae()
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    source = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(source, 3)
    return comfy.sd.VAE(sd=source.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def random_gaussians(count: int, frames: int):
    from mv4d.kernels.splats.model import MotionConfig, new_gaussians

    generator = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1)
    means = 0.45 * direction * torch.rand(count, 1, generator=generator) ** (1 / 3)
    gaussians = new_gaussians(means, torch.rand(count, 3, generator=generator), torch.full((count,), 0.01), MotionConfig(), 0.5)
    for name in ("position_motion", "rotation_motion"):
        gaussians.params[name].normal_(0, 0.01, generator=generator)
    return gaussians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--gaussians", type=int, default=100_000, help="4D Gaussians refined by SDS")
    parser.add_argument("--window", type=int, default=8, help="frames per SDS evaluation (4DM: 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed sampling steps / SDS iterations (after a warm-up)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run) instead of the real architecture")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    import_host(cpu=not cuda)
    import comfy.samplers

    from mv4d.integration.multiview_conditioning import ImagePrompts, fourdm_rig
    from mv4d.integration.score_distillation import FourDMScore
    from mv4d.kernels.multiview_video import MultiviewVideo, even_times
    from mv4d.kernels.score_distillation import ScoreDistillation, SDSSettings
    from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians
    from mv4d_tiny_models import IMAGE_HIDDEN

    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    started = time.perf_counter()
    model, context = build(args.tiny, dtype, "cuda" if cuda else None)
    vae = sd_vae(args.tiny)
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "unet_dtype": str(dtype),
              "views": args.views, "model_views": args.views + 1, "frames": args.frames, "size": args.size, "tiny": args.tiny,
              "cfg": True, "build_seconds": round(time.perf_counter() - started, 1)}
    generator = torch.Generator().manual_seed(0)
    latent = args.size // 8
    hidden = torch.randn(args.frames, CLIP_TOKENS, IMAGE_HIDDEN if args.tiny else CLIP_WIDTH, generator=generator)
    prompts = ImagePrompts([[torch.randn(1, 77, context, generator=generator), {}]], [[torch.randn(1, 77, context, generator=generator), {}]],
                           hidden, torch.randn(args.frames, 4, latent, latent, generator=generator), 1.0, "bench")
    rig = fourdm_rig(args.views, args.size, args.size)
    peak = PeakVram() if cuda else None

    positive, negative, grid = prompts.conditioning(rig)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(5.0)
    noise = torch.randn(grid.cells, 4, latent, latent, generator=generator)
    sampler = comfy.samplers.sampler_object("euler")

    def sampling_step():
        with torch.inference_mode():
            guider.sample(noise.clone(), torch.zeros_like(noise), sampler, torch.tensor([14.6, 7.0]), disable_pbar=True, seed=0)

    try:
        result["sampling_seconds_per_step"], result["sampling_peak_vram_gib"] = seconds_per_run_and_peak(sampling_step, args.steps, peak)
    except torch.OutOfMemoryError:
        result["sampling_seconds_per_step"] = "out of memory"

    times = even_times(args.frames)
    start = random_gaussians(args.gaussians, args.frames)
    anchor = MultiviewVideo(torch.rand(1, args.frames, args.size, args.size, 3, generator=generator), rig.select([0]), times)
    settings = SDSSettings(iterations=1, window_frames=args.window)
    score = FourDMScore(model, vae, prompts, settings.guidance_scale)
    objective = ScoreDistillation(score, rig, times, settings, torch.ones(3))
    fit = FitSettings(iterations=1, resolution=0, views_per_step=1, initial_gaussians=start.count, max_gaussians=start.count,
                      densify=False, motion=start.config)
    result.update(gaussians=args.gaussians, sds_window_frames=objective.window, sds_images=args.views * objective.window)

    def sds_iteration():  # one fit iteration with the SDS objective (its set-up is small next to the iteration)
        fit_dynamic_gaussians(anchor, fit, device, start=start, objective=objective)

    try:
        with score.loaded(((args.views + 1) * objective.window, 4, latent, latent)):
            result["sds_seconds_per_iteration"], result["sds_peak_vram_gib"] = seconds_per_run_and_peak(sds_iteration, args.steps, peak)
    except torch.OutOfMemoryError:
        result["sds_seconds_per_iteration"] = "out of memory"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
