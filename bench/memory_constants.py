"""The constants behind the memory checks, measured: bytes per (pixel, listed Gaussian) entry of the PyTorch
rasteriser with and without gradients (kernels/splats/rasterize.py GRAD_BYTES_PER_ENTRY; `count` Gaussians in one
16 x 16 tile), and bytes per ordered view pair while building epipolar masks (kernels/epipolar.py
BUILD_BYTES_PER_PAIR). Each measurement runs in a fresh process (peak resident memory is a high-water mark) and
the constant is the slope between two sizes. Prints one JSON line.

    OMP_NUM_THREADS=1 python -P bench/memory_constants.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORT_PACK = """
import importlib.util, resource, sys, torch
spec = importlib.util.spec_from_file_location("mv4d", {root!r} + "/__init__.py", submodule_search_locations=[{root!r}])
sys.modules["mv4d"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(sys.modules["mv4d"])
torch.set_num_threads(1)
"""

MASKS_RUN = IMPORT_PACK + """
from mv4d.kernels.cameras import orbit_rig
from mv4d.kernels.epipolar import build_epipolar_mask
rig = orbit_rig({count}, height=64, width=64)
build_epipolar_mask(orbit_rig(3, height=64, width=64), (8, 8))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
build_epipolar_mask(rig, (32, 32))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""

RASTER_RUN = IMPORT_PACK + """
from mv4d.kernels.splats.model import GaussianFrame
from mv4d.kernels.splats.rasterize import render
count, grad = {count}, {grad}
generator = torch.Generator().manual_seed(0)
means = (torch.rand(count, 3, generator=generator) - 0.5) * 0.01 + torch.tensor([0.0, 0.0, 2.0])
fields = [means, torch.tensor([[1.0, 0, 0, 0]]).repeat(count, 1), torch.full((count, 3), 0.05), torch.full((count,), 0.01),
          torch.rand(count, 1, 3, generator=generator)]
fields = [field.requires_grad_(grad) for field in fields]
frame = GaussianFrame(*fields, sh_degree=0)
intrinsics = torch.tensor([[[50.0, 0, 8], [0, 50.0, 8], [0, 0, 1]]])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.set_grad_enabled(grad):
    output = render(frame, torch.eye(4)[None], intrinsics, 16, 16, torch.ones(3), "torch")
    if grad:
        output.colors.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def peak_bytes(program: str, **values) -> int:
    result = subprocess.run([sys.executable, "-c", program.format(root=str(ROOT), **values)], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="20000,80000", help="two Gaussian counts in one tile")
    parser.add_argument("--views", default="200,600", help="two rig sizes (ordered pairs: V(V-1))")
    args = parser.parse_args()
    low, high = (int(count) for count in args.counts.split(","))
    result = {"gaussians_in_one_tile": [low, high]}
    for name, grad in (("rasteriser_with_gradients", True), ("rasteriser_without_gradients", False)):
        peaks = [peak_bytes(RASTER_RUN, count=count, grad=grad) for count in (low, high)]
        result[name] = {"peak_bytes": peaks, "bytes_per_entry": round((peaks[1] - peaks[0]) / (256 * (high - low)), 1)}
    few, many = (int(views) for views in args.views.split(","))
    peaks = [peak_bytes(MASKS_RUN, count=views) for views in (few, many)]
    pairs = [views * (views - 1) for views in (few, many)]
    result["mask_build"] = {"views": [few, many], "peak_bytes": peaks, "bytes_per_pair": round((peaks[1] - peaks[0]) / (pairs[1] - pairs[0]), 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
