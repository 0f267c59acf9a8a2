"""What handing the decoded grid to the 4D fit costs, stage by stage, at the paper setting (21 x 25 images at 576 px).

MV4D Decode Grid gets each decoded row back from ComfyUI's VAE in CPU memory (ComfyUI's intermediate device) and
MV4D Fit 4D Gaussians starts from those images. This times, on one GPU:
- the rows' copy to the CPU (21 rows of 25 float32 images, as the VAE hands them over);
- the fit's targets (resized, quantised to uint8, on the device) built the way the fit does now (`fit_targets`:
  each view copied to the device, converted there) and the way it did before (converted on the CPU, then copied);
- the initial Gaussians carved from the images (on the CPU, where the images are).

    python -P bench/fit_handover.py
    python -P bench/fit_handover.py --resolution 512     # a fit at a lower resolution than the images
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "mv4d" not in sys.modules:  # the repository root is the package mv4d
    spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["mv4d"])

from mv4d.kernels.cameras import orbit_rig  # noqa: E402
from mv4d.kernels.multiview_video import MultiviewVideo, even_times  # noqa: E402
from mv4d.kernels.splats.fit import fit_size, fit_targets  # noqa: E402
from mv4d.kernels.splats.init import initial_gaussians  # noqa: E402
from mv4d.kernels.splats.losses import resize_images  # noqa: E402
from mv4d.kernels.splats.model import MotionConfig  # noqa: E402


def seconds(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def targets_converted_on_the_cpu(video: MultiviewVideo, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The fit's targets as they were built before fit_targets (the comparison of this benchmark)."""
    targets = torch.empty(video.num_views, video.num_frames, height, width, 3, dtype=torch.uint8, device=device)
    for view in range(video.num_views):
        targets[view] = (resize_images(video.images[view], height, width).clamp(0, 1) * 255).round().to(device, torch.uint8)
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--resolution", type=int, default=576, help="the fit's resolution (its default: 576)")
    parser.add_argument("--initial-gaussians", type=int, default=20000)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    # Smooth random images in [0, 1], made on the device as the VAE makes them.
    decoded = torch.rand(args.views, args.frames, args.size // 16, args.size // 16, 3, device=device, generator=generator)
    decoded = resize_images(decoded, args.size, args.size).clamp(0, 1)
    rows = []
    handover = seconds(lambda: rows.extend(row.cpu() for row in decoded), device)  # one row per VAE call
    video = MultiviewVideo(torch.stack(rows), orbit_rig(args.views, 10.0, 2.0, 33.8, args.size, args.size), even_times(args.frames))
    height, width = fit_size(video, args.resolution)
    fit_targets(video, height, width, device)  # warm-up (kernels, allocator)
    on_device = seconds(lambda: fit_targets(video, height, width, device), device)
    on_cpu = seconds(lambda: targets_converted_on_the_cpu(video, height, width, device), device)
    levels_apart = (fit_targets(video, height, width, device).int() - targets_converted_on_the_cpu(video, height, width, device).int()).abs()
    carve = seconds(lambda: initial_gaussians(video, args.initial_gaussians, MotionConfig(), torch.ones(3), torch.Generator().manual_seed(0),
                                              device, 0.1), device)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "images": [args.views, args.frames, args.size, args.size], "fit_size": [height, width],
        "seconds": {"rows_to_cpu": round(handover, 3), "targets_converted_on_device": round(on_device, 3),
                    "targets_converted_on_cpu": round(on_cpu, 3), "initial_gaussians": round(carve, 3)},
        "targets_levels_apart": {"max": int(levels_apart.max()), "share_nonzero": float((levels_apart > 0).float().mean())},
    }))


if __name__ == "__main__":
    main()
