"""4D Gaussian fit on the synthetic animated scene (kernels/synthetic_scene.py), Diffusion²'s setting by default:
21 orbit views x 25 frames at 576 px, perturbed like generated images, 5000 iterations. Held-out views are
never trained on: azimuths halfway between training views, another elevation, and times halfway between frames.
Reports object-masked PSNR / SSIM, fit time, Gaussian count and peak GPU memory as one JSON line.

    python -P bench/fit_4d.py                       # paper setting, CUDA
    python -P bench/fit_4d.py --static              # the same budget without motion (time-independent)
    OMP_NUM_THREADS=1 python -P bench/fit_4d.py --device cpu --views 6 --frames 4 --size 48 --iterations 200
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "mv4d" not in sys.modules:  # the repository root is the package mv4d
    spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["mv4d"])

from mv4d.kernels.cameras import orbit_rig  # noqa: E402
from mv4d.kernels.multiview_video import MultiviewVideo, even_times  # noqa: E402
from mv4d.kernels.splats.fit import FitSettings, fit_dynamic_gaussians  # noqa: E402
from mv4d.kernels.splats.losses import ssim_map  # noqa: E402
from mv4d.kernels.splats.model import MotionConfig  # noqa: E402
from mv4d.kernels.splats.views import render_images  # noqa: E402
from mv4d.kernels.synthetic_scene import perturb_like_generated, render_scene  # noqa: E402

ELEVATION, RADIUS, FOV = 10.0, 2.0, 33.8


def masked_metrics(render: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Object-masked PSNR (dB) and SSIM over a batch (B, H, W, 3) with masks (B, H, W) in [0, 1]."""
    weights = mask[..., None].expand_as(render)
    mse = (((render - target) ** 2) * weights).sum() / weights.sum().clamp_min(1)
    ssim = ssim_map(render.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)).mean(1)
    return float(-10 * torch.log10(mse)), float((ssim * mask).sum() / mask.sum().clamp_min(1))


def tracer(path: str, first: int = 3000, steps: int = 50):
    """on_step that records iterations first..first+steps-1 with torch.profiler and writes its summary table."""
    from torch.profiler import ProfilerActivity, profile

    recorder = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    marks = {}

    def on_step(done: int, total: int) -> None:
        if done == first:
            torch.cuda.synchronize()
            marks["start"] = time.perf_counter()
            recorder.__enter__()
        elif done == first + steps:
            torch.cuda.synchronize()
            recorder.__exit__(None, None, None)
            wall = (time.perf_counter() - marks["start"]) / steps * 1000
            events = recorder.key_averages()
            table = events.table(sort_by="self_cuda_time_total", row_limit=25)
            gpu = sum(getattr(event, "self_device_time_total", 0) for event in events) / steps / 1000
            with open(path, "w") as handle:
                handle.write(f"wall per iteration {wall:.2f} ms (profiled), GPU busy per iteration {gpu:.2f} ms\n{table}\n")

    return on_step


def held_out(args, device) -> dict[str, tuple]:
    """name -> (cameras, times, images, masks): clean renders the fit never sees."""
    step = 360.0 / args.views
    mid_times = even_times(args.frames)[:-1] + 0.5 / max(1, args.frames - 1)
    frame_times = even_times(args.frames)
    sets = {
        "between_azimuths": orbit_rig(7, ELEVATION, RADIUS, FOV, args.size, args.size, start_azimuth_deg=step / 2 + 3 * step),
        "other_elevation": orbit_rig(7, ELEVATION + 15.0, RADIUS, FOV, args.size, args.size, start_azimuth_deg=step / 3),
        "training_azimuths": orbit_rig(7, ELEVATION, RADIUS, FOV, args.size, args.size, start_azimuth_deg=0.0),
    }
    result = {}
    for name, rig in sets.items():
        for label, times in (("mid_frames", mid_times[:: max(1, len(mid_times) // 6)]), ("frames", frame_times[:: max(1, len(frame_times) // 6)])):
            if name == "training_azimuths" and label == "frames":
                continue  # those are training images
            images, masks = render_scene(rig, times, supersample=2, device=device)
            result[f"{name}@{label}"] = (rig, times, images, masks)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--views-per-step", type=int, default=3)
    parser.add_argument("--initial-gaussians", type=int, default=20000)
    parser.add_argument("--max-gaussians", type=int, default=1_000_000)
    parser.add_argument("--sh-degree", type=int, default=1)
    parser.add_argument("--position-degree", type=int, default=3)
    parser.add_argument("--fourier-terms", type=int, default=2)
    parser.add_argument("--static", action="store_true", help="no motion at all (time-independent Gaussians)")
    parser.add_argument("--perturbation", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--densify-stop", type=float, default=0.6)
    parser.add_argument("--opacity-reset-every", type=int, default=2000)
    parser.add_argument("--grow-grad2d", type=float, default=0.0002)
    parser.add_argument("--initial-time-window", type=float, default=0.1)
    parser.add_argument("--no-temporal-opacity", action="store_true")
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--trace", help="write torch.profiler's table of iterations 3000-3049 (CPU and GPU time) to this file")
    parser.add_argument("--profile", help="write a cProfile summary of the fit (Python time by function) to this file")
    args = parser.parse_args()
    device = torch.device(args.device)

    train_rig = orbit_rig(args.views, ELEVATION, RADIUS, FOV, args.size, args.size, sv3d_order=True)
    times = even_times(args.frames)
    clean, _ = render_scene(train_rig, times, supersample=2, device=device)
    images = perturb_like_generated(clean, torch.Generator().manual_seed(args.seed), args.perturbation)
    video = MultiviewVideo(images, train_rig, times)
    tests = held_out(args, device)

    motion = MotionConfig.static(args.sh_degree) if args.static else MotionConfig(
        args.position_degree, args.fourier_terms, 1, not args.no_temporal_opacity, args.sh_degree)
    settings = FitSettings(
        iterations=args.iterations, views_per_step=args.views_per_step, initial_gaussians=args.initial_gaussians,
        max_gaussians=args.max_gaussians, motion=motion, seed=args.seed, densify_stop=args.densify_stop,
        opacity_reset_every=args.opacity_reset_every, grow_grad2d=args.grow_grad2d,
        initial_time_window=args.initial_time_window,
    )
    if device.type == "cuda":
        import gsplat.rendering  # noqa: F401  (imported once per ComfyUI session, not part of a fit's time)
        import gsplat.strategy  # noqa: F401

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        memory_before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    setup: dict[str, int] = {}
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(fit_dynamic_gaussians, video, settings, device)
        with open(args.profile, "w") as handle:
            stats = pstats.Stats(profiler, stream=handle).sort_stats("tottime")
            stats.print_stats(30)
            stats.print_callers("compile")
    else:
        steps = [tracer(args.trace)] if args.trace else []
        if device.type == "cuda":
            def mark_setup_peak(done: int, total: int) -> None:  # after initialisation and the first steps
                if done == 10:
                    setup["peak"] = torch.cuda.max_memory_allocated(device)
            steps.append(mark_setup_peak)
        result = fit_dynamic_gaussians(video, settings, device, on_step=lambda done, total: [step(done, total) for step in steps])
    fit_seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) - memory_before) / 2**30 if device.type == "cuda" else None

    metrics = {}
    background = torch.ones(3)
    for name, (rig, test_times, targets, masks) in tests.items():
        cameras = rig.select(torch.arange(len(rig)).repeat_interleave(len(test_times)))
        renders = render_images(result.gaussians, cameras, test_times.repeat(len(rig)), background).to(device)
        flat_targets = targets.reshape(-1, *targets.shape[2:])
        flat_masks = masks.reshape(-1, *masks.shape[2:])
        psnr, ssim = masked_metrics(renders, flat_targets, flat_masks)
        metrics[name] = {"psnr_masked": round(psnr, 2), "ssim_masked": round(ssim, 4)}
    held = [value["psnr_masked"] for key, value in metrics.items() if not key.startswith("training_azimuths@frames")]
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    print(json.dumps({
        "benchmark": "fit_4d", "label": args.label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "commit": commit,
        "setting": {"views": args.views, "frames": args.frames, "size": args.size, "perturbation": args.perturbation},
        "fit": {**{k: v for k, v in asdict(settings).items() if k != "motion"}, "motion": asdict(motion)},
        "backend": result.backend,
        "fit_seconds": round(fit_seconds, 2),
        "fit_seconds_inner": round(result.seconds, 2),
        "gaussians": result.gaussians.count,
        "peak_memory_gib": round(peak, 3) if peak is not None else None,
        "peak_memory_first_10_steps_gib": round((setup["peak"] - memory_before) / 2**30, 3) if device.type == "cuda" and "peak" in setup else None,
        "held_out_psnr_masked_mean": round(sum(held) / len(held), 2),
        "held_out": metrics,
        "loss_every_100": [round(v, 4) for v in result.losses[:: max(1, len(result.losses) // 10)]],
        "gaussians_every_100": result.history[:: max(1, len(result.history) // 10)],
    }))


if __name__ == "__main__":
    main()
