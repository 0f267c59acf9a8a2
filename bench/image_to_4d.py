"""Image -> 4D end to end, every stage timed: the reference column (SV3D_p) and row (SVD-XT) from one image, the
composed grid (MV4D Composed Guider + rollback Euler), decoding row by row, and the 4D Gaussian fit. Same code
as the nodes (conditioning, guider, decoder logic, fitter), driven without ComfyUI's node API so it runs on a
bare GPU machine. Real-size architectures with random weights (no checkpoints here): it measures time and
memory, never image quality. Reduced steps by default; one JSON line.

    python -P bench/image_to_4d.py --steps 5 --fit-iterations 500            # paper grid, reduced steps (CUDA)
    python -P bench/image_to_4d.py --memory-cap-gib 24                      # as on a 24 GB card
    OMP_NUM_THREADS=1 python -P bench/image_to_4d.py --tiny --views 3 --frames 3 --size 64 --steps 2 --fit-iterations 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P leaves this folder off the path
from composition_step import PeakVram, emulate_card, import_host  # noqa: E402


def real_clip_vision():
    """ComfyUI's CLIP ViT-H/14 image encoder (SVD's and SV3D's), random weights."""
    import os

    import comfy.clip_vision
    from mv4d_tiny_models import init_weights

    clip_vision = comfy.clip_vision.ClipVisionModel(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json"))
    init_weights(clip_vision.model, 5)
    return clip_vision


def real_vae():
    import comfy.sd
    from mv4d_tiny_models import init_weights

    vae = comfy.sd.VAE(sd={"decoder.mid.block_1.mix_factor": torch.zeros(1)})  # SVD's VAE with its temporal decoder
    init_weights(vae.first_stage_model, 3)
    return vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--steps", type=int, default=5, help="sampling steps of every stage (paper: 50)")
    parser.add_argument("--rollback-steps", type=int, default=1, help="(paper: 10 of 50)")
    parser.add_argument("--per-call", default="0,0", help="videos and multi-view sets per UNet call (0: as many as fit)")
    parser.add_argument("--fit-iterations", type=int, default=500, help="(paper: 5000)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run)")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0, help="emulate a card of this size (0: whole GPU)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    holder = emulate_card(args.memory_cap_gib) if cuda and args.memory_cap_gib else None
    guider_module = import_host(cpu=not cuda)
    import importlib

    import comfy.samplers
    from mv4d.kernels.cameras import orbit_rig
    from mv4d.kernels.composition import GuiderSettings, ReferenceSettings, sample_rollback_euler

    ref = ReferenceSettings()
    from mv4d.kernels.multiview_video import MultiviewVideo, even_times
    from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians
    from mv4d.kernels.synthetic_scene import render_scene
    from mv4d_tiny_models import REAL_SIZE, TINY_SIZE, tiny_clip_vision, svd_family_unet, tiny_vae

    conditioning = importlib.import_module("mv4d.integration.grid_conditioning")
    dtype = torch.bfloat16 if cuda else torch.float32
    seconds: dict[str, float] = {}
    peak_gib: dict[str, float] = {}
    peak = PeakVram() if cuda else None

    @contextmanager
    def timed(name):
        """Seconds and CUDA allocation peak of a stage."""
        if cuda:
            torch.cuda.synchronize()
            peak.start()
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
            peak_gib[name] = peak.gib()
        seconds[name] = round(time.perf_counter() - start, 2)

    with timed("build_models"):
        size = TINY_SIZE if args.tiny else REAL_SIZE
        video_model, multiview_model = svd_family_unet("svd", 0, size, dtype), svd_family_unet("sv3d_p", 1, size, dtype)
        clip_vision, vae = (tiny_clip_vision(), tiny_vae()) if args.tiny else (real_clip_vision(), real_vae())
    rig = orbit_rig(args.views, 10.0, 2.0, 33.8, args.size, args.size, sv3d_order=True)
    image = render_scene(rig.select([args.views - 1]), torch.zeros(1))[0][0]  # the input view (last), at time 0
    sigmas = comfy.samplers.calculate_sigmas(video_model.get_model_object("model_sampling"), "karras", args.steps)
    latent = args.size // 8
    generator = torch.Generator().manual_seed(0)
    euler = comfy.samplers.sampler_object("euler")

    def sample(guider, count, sampler=euler):
        noise = torch.randn(count, 4, latent, latent, generator=generator)
        with torch.inference_mode():
            return guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=0)

    elevations, azimuths = conditioning.official_sv3d_angles(rig)
    with timed("reference_column"), torch.inference_mode():
        embedding, encoded = conditioning.encode_references(clip_vision, vae, image, ref.multiview_augmentation)
        guider = comfy.samplers.CFGGuider(multiview_model)
        guider.set_conds(*conditioning.sv3d_conditioning(embedding, encoded, elevations, azimuths, ref.multiview_augmentation))
        guider.set_cfg(2.5)
        reference_views = vae.decode(sample(guider, args.views))
    with timed("reference_row"), torch.inference_mode():
        embedding, encoded = conditioning.encode_references(clip_vision, vae, image, ref.video_augmentation)
        patched = video_model.clone()  # core VideoLinearCFGGuidance: CFG 1.5 -> 3.0 over the frames
        patched.set_model_sampler_cfg_function(lambda a: a["uncond"] + torch.linspace(
            1.5, a["cond_scale"], a["cond"].shape[0], device=a["cond"].device).view(-1, 1, 1, 1) * (a["cond"] - a["uncond"]))
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(*conditioning.with_unconditional(embedding, encoded, {"fps": ref.fps, "motion_bucket_id": ref.motion_bucket_id,
                                                                                "augmentation_level": ref.video_augmentation}))
        guider.set_cfg(3.0)
        reference_frames = vae.decode(sample(guider, args.frames))
    with timed("grid_conditioning"), torch.inference_mode():
        views_encoded = conditioning.encode_references(clip_vision, vae, reference_views, ref.video_augmentation)
        frames_encoded = conditioning.encode_references(clip_vision, vae, reference_frames, ref.multiview_augmentation)
        grid = conditioning.grid_conditioning(*views_encoded, *frames_encoded, elevations, azimuths, ref.fps, ref.motion_bucket_id,
                                              ref.video_augmentation, ref.multiview_augmentation)
    with timed("composed_sampling"):
        per_call = [int(n) for n in args.per_call.split(",")]
        settings = GuiderSettings(videos_per_call=per_call[0], multiview_sets_per_call=per_call[1])
        guider = guider_module.ComposedGuider(video_model, multiview_model, grid, settings)
        rollback = comfy.samplers.KSAMPLER(sample_rollback_euler, extra_options={"rollback_steps": args.rollback_steps})
        grid_latent = sample(guider, args.views * args.frames, rollback)
    with timed("decode_grid"), torch.inference_mode():  # row by row, as MV4D Decode Grid does with a temporal VAE
        images = torch.stack([vae.decode(row) for row in grid_latent.split(args.frames)])[..., :3].float().clamp(0, 1)
    device = "cuda" if cuda else "cpu"
    with timed("fit_4d"):
        video = MultiviewVideo(images.cpu(), rig, even_times(args.frames))
        fit = fit_dynamic_gaussians(video, FitSettings(iterations=args.fit_iterations), device)
    total = sum(value for key, value in seconds.items() if key != "build_models")
    print(json.dumps({"gpu": torch.cuda.get_device_name() if cuda else "cpu", "views": args.views, "frames": args.frames,
                      "size": args.size, "steps": args.steps, "rollback_steps": args.rollback_steps,
                      "fit_iterations": args.fit_iterations, "tiny": args.tiny, "seconds": seconds,
                      "total_seconds_without_building": round(total, 1), "gaussians": fit.history[-1] if fit.history else None,
                      "memory_cap_gib": args.memory_cap_gib or None, "peak_vram_gib_by_stage": peak_gib,
                      "peak_vram_gib": max(peak_gib.values()) if peak_gib else None}))
    if holder:
        holder.kill()


if __name__ == "__main__":
    main()
