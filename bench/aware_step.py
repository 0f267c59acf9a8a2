"""3D-aware denoising steps (VideoMV) at the paper setting, through our actual guider wrapper inside ComfyUI.

A 21-view x 25-frame grid of 576 px (72 x 72 latents) is sampled by MV4D Composed Guider wrapped by MV4D 3D-Aware
Denoising, with 3D-aware steps at steps 1, 2, 3 of a 4-step schedule (three consecutive steps, as VideoMV's 20, 30,
40 of one job, each continuing the previous step's Gaussians). Each step decodes x0 of the whole grid with SVD's
real-size VAE (its temporal decoder; random weights), fits 4D Gaussians, renders all 525 images and encodes them
with the same VAE. The composed guider's UNets are TINY here: a step's UNet cost does not depend on the 3D-aware
part (bench/composition_step.py measures it), and the whole job's added time is the 3D-aware steps' own time
(the wrapper does nothing at other evaluations), measured here as the same sampling with and without them.

The fit sees the synthetic scene (kernels/synthetic_scene.py) instead of what the random-weight VAE decodes
(noise, which would make densification grow without bound and time nothing a real grid does): the decode runs
and is timed, then its output is replaced. Reports seconds per step (decode, fit, render, encode), the added
time, Gaussian counts and peak VRAM, as one JSON line.

With --consistency: no ComfyUI, the reconstruct -> render step alone on the synthetic scene at the same setting,
its grid perturbed per image like generated images (x --strength): PSNR against the ray-cast ground truth of the
grid before and after one step from scratch and one warm-started step, and on held-out views.

    python -P bench/aware_step.py                                   # paper setting, CUDA
    python -P bench/aware_step.py --consistency                     # PSNR before / after at the paper setting
    OMP_NUM_THREADS=1 python -P bench/aware_step.py --tiny --views 3 --frames 2 --size 64 --fit-iterations 10 --initial-gaussians 300
    OMP_NUM_THREADS=1 python -P bench/aware_step.py --consistency --views 4 --frames 2 --size 32 --fit-iterations 20 --initial-gaussians 300

Needs a ComfyUI source tree at $COMFYUI_DIR or ~/ComfyUI (not for --consistency).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P leaves this folder off the path
from composition_step import ROOT, PeakVram, import_host, random_grid_conditioning  # noqa: E402

ELEVATION, RADIUS, FOV = 10.0, 2.0, 33.8


def import_kernels():
    """The repository root as package mv4d, without ComfyUI (for --consistency)."""
    import importlib.util

    if "mv4d" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mv4d"])


def aware_settings(args):
    from mv4d.kernels.aware_denoising import AwareSettings

    defaults = AwareSettings()
    fit = replace(defaults.fit, iterations=args.fit_iterations or defaults.fit.iterations,
                  resolution=defaults.fit.resolution if args.fit_resolution is None else args.fit_resolution,
                  initial_gaussians=args.initial_gaussians or defaults.fit.initial_gaussians)
    return AwareSettings(steps=tuple(range(1, args.aware_steps + 1)), blend_weight=args.blend_weight, fit=fit)


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def compile_gsplat() -> None:
    """gsplat compiles its CUDA kernels at their first call (about a minute on a fresh machine, once per ComfyUI
    installation): a two-iteration fit first, so no step pays for it."""
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians
    from mv4d.kernels.synthetic_scene import example_multiview_video

    video = example_multiview_video(orbit_rig(2, height=32, width=32), 2, supersample=1)
    fit_dynamic_gaussians(video, FitSettings(iterations=2, initial_gaussians=100), "cuda")


def synthetic_grid(args, device):
    """The scene at the grid's cameras and frame times (V, F, H, W, 3), its masks, and the cameras."""
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.multiview_video import even_times
    from mv4d.kernels.synthetic_scene import render_scene

    rig = orbit_rig(args.views, ELEVATION, RADIUS, FOV, args.size, args.size, sv3d_order=True)
    images, masks = render_scene(rig, even_times(args.frames), supersample=2, device=device)
    return images.cpu(), masks.cpu(), rig


def timing(args, cuda: bool) -> dict:
    import_host(cpu=not cuda)
    import comfy.samplers

    import mv4d.integration.aware_guider as aware_guider
    from image_to_4d import real_vae
    from mv4d.integration.composed_guider import ComposedGuider
    from mv4d.kernels.composition import GuiderSettings
    from mv4d_tiny_models import CONTEXT_DIM, TINY_SIZE, svd_family_unet, tiny_vae

    dtype = torch.bfloat16 if cuda else torch.float32
    video_model, multiview_model = svd_family_unet("svd", 0, TINY_SIZE, dtype), svd_family_unet("sv3d_p", 1, TINY_SIZE, dtype)
    vae = tiny_vae() if args.tiny else real_vae()
    latent = args.size // 8
    conditioning = random_grid_conditioning(args.views, args.frames, latent, CONTEXT_DIM)
    guider = ComposedGuider(video_model, multiview_model, conditioning, GuiderSettings())
    scene, _, rig = synthetic_grid(args, "cuda" if cuda else "cpu")

    decode = aware_guider.decode_grid

    def decode_then_scene(vae, samples, grid, *rest):
        decode(vae, samples, grid, *rest)  # the real decode, timed as part of the step
        return scene

    aware_guider.decode_grid = decode_then_scene
    settings = aware_settings(args)
    wrapped = aware_guider.aware_guider(guider, settings, vae, rig, args.frames_per_decode)
    sigmas = comfy.samplers.calculate_sigmas(video_model.get_model_object("model_sampling"), "karras", args.aware_steps + 1)
    noise = torch.randn(args.views * args.frames, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    euler = comfy.samplers.sampler_object("euler")
    if cuda:
        compile_gsplat()
    peak = PeakVram() if cuda else None

    def sample(which) -> float:
        if cuda:
            torch.cuda.synchronize()
            peak.start()
        started = time.perf_counter()
        with torch.inference_mode():
            which.sample(noise.clone(), torch.zeros_like(noise), euler, sigmas, disable_pbar=True, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    sample(guider)  # warm-up: model loading, first calls
    plain = sample(guider)
    with_steps = sample(wrapped)
    aware = wrapped.mv4d_3d_aware
    steps = [{"step": r.step, "decode_s": round(r.decode, 2), "fit_s": round(r.fit, 2), "render_s": round(r.render, 2),
              "encode_s": round(r.encode, 2), "seconds": round(r.seconds, 2), "gaussians": r.gaussians} for r in aware.steps]
    return {
        "benchmark": "aware_step", "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "commit": commit(), "views": args.views, "frames": args.frames, "size": args.size, "tiny_vae": args.tiny,
        "fit": {"iterations": settings.fit.iterations, "resolution": settings.fit.resolution,
                "initial_gaussians": settings.fit.initial_gaussians, "views_per_step": settings.fit.views_per_step},
        "frames_per_decode": args.frames_per_decode, "steps": steps,
        "seconds_per_step_mean": round(sum(s["seconds"] for s in steps) / max(1, len(steps)), 2),
        "sampling_seconds_plain": round(plain, 2), "sampling_seconds_3d_aware": round(with_steps, 2),
        "added_seconds_per_job": round(with_steps - plain, 2), "aware_steps_per_job": len(steps),
        "peak_vram_gib_3d_aware_sampling": peak.gib() if cuda else None,
    }


def consistency(args, device) -> dict:
    import_kernels()
    from mv4d.kernels.aware_denoising import reconstruct_and_render
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.multiview_video import even_times
    from mv4d.kernels.splats.losses import psnr
    from mv4d.kernels.splats.views import render_images
    from mv4d.kernels.synthetic_scene import perturb_like_generated, render_scene

    settings = aware_settings(args)
    if device == "cuda":
        compile_gsplat()
    clean, masks, rig = synthetic_grid(args, device)
    perturbed = perturb_like_generated(clean, torch.Generator().manual_seed(1), args.strength)
    started = time.perf_counter()
    first = reconstruct_and_render(perturbed, rig, settings, device=device)
    second = reconstruct_and_render(perturbed, rig, settings, previous=first.fit.gaussians, device=device)
    seconds = time.perf_counter() - started
    held_rig = orbit_rig(7, ELEVATION + 15.0, RADIUS, FOV, args.size, args.size, start_azimuth_deg=180.0 / args.views)
    times = even_times(args.frames)
    mid = (times[:-1] + times[1:]) / 2 if args.frames > 1 else times
    held, _ = render_scene(held_rig, mid, supersample=2, device=device)
    cameras = held_rig.select(torch.arange(len(held_rig)).repeat_interleave(len(mid)))

    def db(value) -> float:
        return round(float(value), 2)

    def masked(images):
        return db(psnr(images, clean, masks > 0.5))

    held_targets = held.cpu().reshape(-1, *held.shape[2:])
    return {
        "benchmark": "aware_step --consistency", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "commit": commit(), "views": args.views, "frames": args.frames, "size": args.size, "strength": args.strength,
        "fit": {"iterations": settings.fit.iterations, "resolution": settings.fit.resolution, "initial_gaussians": settings.fit.initial_gaussians},
        "psnr_grid_in": db(psnr(perturbed, clean)), "psnr_after_step_1": db(psnr(first.renders, clean)),
        "psnr_after_step_2_warm": db(psnr(second.renders, clean)),
        "psnr_masked_grid_in": masked(perturbed), "psnr_masked_after_step_1": masked(first.renders),
        "psnr_masked_after_step_2_warm": masked(second.renders),
        "psnr_held_out_after_step_2": db(psnr(render_images(second.fit.gaussians, cameras, mid.repeat(len(held_rig)), torch.ones(3)), held_targets)),
        "gaussians": second.fit.gaussians.count, "seconds_two_steps": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--aware-steps", type=int, default=3, help="consecutive 3D-aware steps in one sampling (VideoMV: 3)")
    parser.add_argument("--fit-iterations", type=int, default=0, help="per step (0: the node's default)")
    parser.add_argument("--fit-resolution", type=int, default=None, help="(default: the node's)")
    parser.add_argument("--initial-gaussians", type=int, default=0, help="(0: the node's default)")
    parser.add_argument("--blend-weight", type=float, default=1.0)
    parser.add_argument("--frames-per-decode", type=int, default=14, help="as the image_to_4d workflows decode")
    parser.add_argument("--tiny", action="store_true", help="a tiny VAE instead of SVD's (CPU smoke run)")
    parser.add_argument("--consistency", action="store_true", help="PSNR against ground truth instead of timing")
    parser.add_argument("--strength", type=float, default=1.0, help="--consistency: per-image perturbation, x perturb_like_generated")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.consistency:
        print(json.dumps(consistency(args, "cuda" if cuda else "cpu")))
    else:
        print(json.dumps(timing(args, cuda)))


if __name__ == "__main__":
    main()
