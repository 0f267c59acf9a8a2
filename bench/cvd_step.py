"""One sampling step of CVD (SD1.5 + AnimateDiff v3 + CameraCtrl + CVD's synchronisation modules) through our
patches inside ComfyUI, for M videos sampled together.

The SD1.5 UNet, the v3 motion modules, CameraCtrl and CVD's 20 modules are built with the released architectures
and random weights (compute does not depend on the values; CVD's proj_out is random, not zero, so its attention
runs), in bf16. M videos of 16 frames with CFG (a UNet call of 2 M 16 images) are denoised through core's CFGGuider
and euler sampler at 256 px, for each M asked. Paths per M: `cameractrl` (the M videos in one batch, CameraCtrl
only: what CVD adds is the difference), `cvd` (masks built once per level and kept), `cvd_rebuilt` (mask budget 0:
masks rebuilt block by block in every attention call). Reports seconds per step (after a warm-up; a timed run
builds its masks once, in its first step), peak VRAM and the masks kept; then the mask memory at 64 x 64 latents (512 px) per M: bytes per level, whether the default
budget keeps each level, and on a GPU the seconds to build them and the memory they took. One JSON line.

    python -P bench/cvd_step.py                                            # M = 2 and 4 at 256 px, on the GPU
    OMP_NUM_THREADS=1 python -P bench/cvd_step.py --tiny --size 64 --frames 3 --steps 1   # CPU smoke run

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
from composition_step import PeakVram, import_host  # noqa: E402
from motion_step import build as build_motion  # noqa: E402


def build_cvd(tiny: bool, dtype, device):
    import comfy.ops

    from mv4d.kernels.models.cvd import CVDModel
    from mv4d.kernels.models.motion import SD15_CHANNELS
    from mv4d_tiny_models import TINY_MOTION_CHANNELS, init_weights

    with torch.device(device or "cpu"):
        cvd = CVDModel(TINY_MOTION_CHANNELS if tiny else SD15_CHANNELS, operations=comfy.ops.manual_cast)
    init_weights(cvd, 3)
    return cvd.to(dtype).requires_grad_(False)


def trajectories(videos: int, frames: int, size: int):
    """M arcs of one orbit, starting apart, joined video by video."""
    from mv4d.integration.patches.cvd import joined_trajectories
    from mv4d.kernels.cameras import orbit_rig

    return joined_trajectories([orbit_rig(frames, 10.0, 2.0, 45.0, size, size, 360.0 * video / videos, span_deg=90.0 / videos * 2)
                                for video in range(videos)])


def mask_memory(videos: int, frames: int, latent: int, cuda: bool, dtype) -> dict:
    """The dense masks of every level of a latent x latent UNet (4 levels) for M videos: bytes per level, whether the
    default budget keeps it, and on a GPU the build time and the allocation they took."""
    from mv4d.kernels.grid import Grid
    from mv4d.kernels.models.cvd import DEFAULT_MASK_CACHE_BYTES, CrossVideoMasks

    masks = CrossVideoMasks(trajectories(videos, frames, 8 * latent), Grid(videos, frames), "soft", max_dense_bytes=2**62)
    levels, kept = {}, 0
    for level in range(4):
        side = latent >> level
        size_bytes = masks.compact.at_size((side, side)).dense_bytes(dtype)
        fits = kept + size_bytes <= DEFAULT_MASK_CACHE_BYTES
        kept += size_bytes if fits else 0
        entry = {"pairs": masks.compact.num_pairs, "mib": round(size_bytes / 2**20, 1), "kept_by_default_budget": fits}
        if cuda:
            torch.cuda.synchronize()
            before, begin = torch.cuda.memory_allocated(), time.perf_counter()
            masks.at((side, side), "cuda", dtype)
            torch.cuda.synchronize()
            entry.update(build_seconds=round(time.perf_counter() - begin, 3),
                         allocated_mib=round((torch.cuda.memory_allocated() - before) / 2**20, 1))
            masks.clear()
            torch.cuda.empty_cache()
        levels[f"{side}x{side}"] = entry
    total = sum(entry["mib"] for entry in levels.values())
    return {"levels": levels, "total_mib": round(total, 1), "kept_by_default_mib": round(kept / 2**20, 1)}


def time_sampling(model, positive, negative, noise, steps: int, peak) -> dict:
    """Seconds per step of core's CFGGuider + euler (after a warm-up run of 1 step), peak VRAM, and the masks the
    run kept (read just before the run ends and drops them)."""
    import comfy.samplers

    from mv4d.integration.patches.cvd import masks_of

    cuda = torch.cuda.is_available()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(8.5)
    sampler = comfy.samplers.sampler_object("euler")
    masks, kept = masks_of(model), {}
    if masks is not None:
        drop = masks.clear

        def record_then_drop():
            kept.update(mib=round(masks.dense_bytes / 2**20, 1))
            drop()

        masks.clear = record_then_drop

    def sample(count: int) -> float:
        sigmas = torch.linspace(14.6, 0.03, count + 1)
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.inference_mode():
            guider.sample(noise.clone(), torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    sample(1)
    if peak:
        peak.start()
    seconds = sample(steps) / steps
    return {"seconds_per_step": round(seconds, 4), "peak_vram_gib": peak.gib() if peak else None,
            **({"masks_kept_mib": kept.get("mib")} if masks is not None else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (a multiple of 64)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--videos", default="2,4", help="numbers of videos sampled together")
    parser.add_argument("--paths", default="cameractrl,cvd,cvd_rebuilt")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after a warm-up sampling of 1)")
    parser.add_argument("--mask-latent", type=int, default=64, help="latent side for the mask-memory report (64 = 512 px)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run) instead of the real architectures")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    import_host(cpu=not cuda)
    from mv4d.integration.patches.camera_control import with_camera_control
    from mv4d.integration.patches.cvd import with_cvd
    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels.grid import GRID_OPTION, Grid
    from mv4d.kernels.models.cvd import CVDSettings

    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    base, motion, control = build_motion(args.tiny, dtype, "cuda" if cuda else None)
    cvd = build_cvd(args.tiny, dtype, "cuda" if cuda else None)
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "dtype": str(dtype),
              "size": args.size, "frames": args.frames, "tiny": args.tiny, "cfg": True, "mask_mode": "soft",
              "build_seconds": round(time.perf_counter() - started, 1)}
    context = 64 if args.tiny else 768
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, context, generator=generator), {}]]
    negative = [[torch.randn(1, 77, context, generator=generator), {}]]
    video = with_motion(base, motion)
    peak = PeakVram() if cuda else None
    for videos in [int(m) for m in args.videos.split(",")]:
        grid, cameras = Grid(videos, args.frames), trajectories(videos, args.frames, args.size)
        for path in args.paths.split(","):
            if path == "cameractrl":
                model = with_camera_control(video, control, cameras)
                model.model_options.setdefault("transformer_options", {})[GRID_OPTION] = grid
            else:
                model = with_cvd(video, cvd, control, cameras, grid, CVDSettings(mask_cache_mb=0 if path == "cvd_rebuilt" else 1024))
            noise = torch.randn(grid.cells, 4, args.size // 8, args.size // 8, generator=generator)
            result[f"M{videos}/{path}@{args.size}"] = time_sampling(model, positive, negative, noise, args.steps, peak)
            del model
            if cuda:
                torch.cuda.empty_cache()
        result[f"M{videos}/masks@{args.mask_latent}x{args.mask_latent}"] = mask_memory(
            videos, args.frames, args.mask_latent, cuda, torch.bfloat16 if cuda else torch.float32)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
