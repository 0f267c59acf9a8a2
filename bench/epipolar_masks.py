"""Epipolar masks at real sizes: compact-form cost, dense build throughput, and chunked masked attention at a
large feature map against the size its full mask would have. Prints one JSON line.

    OMP_NUM_THREADS=1 python -P bench/epipolar_masks.py --device cpu --size 128
    python -P bench/epipolar_masks.py --device cuda --size 128 --heads 8 --dim 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
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
from mv4d.kernels.epipolar import build_epipolar_mask, epipolar_attention  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--size", type=int, default=128, help="feature map side (128 = 1024 px images / 8)")
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-mask-mib", type=int, default=256)
    args = parser.parse_args()
    device = torch.device(args.device)
    side = args.size

    rig = orbit_rig(args.views, height=side * 8, width=side * 8, sv3d_order=True)
    start = time.perf_counter()
    mask = build_epipolar_mask(rig, (side, side), reference_size=(256, 256))
    build_seconds = time.perf_counter() - start

    query, key, value = (torch.randn(1, args.heads, side * side, args.dim, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32) for _ in range(3))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    synchronize(device)
    start = time.perf_counter()
    output = epipolar_attention(query, key, value, mask, pair_indices=[0], max_mask_bytes=args.max_mask_mib * 2**20)
    synchronize(device)
    attention_seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - baseline) if device.type == "cuda" else None
    rows = mask.query_chunks(1, args.max_mask_mib * 2**20)[0]
    dense = mask.dense([0], rows, device)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        dense = mask.dense([0], rows, device)
    synchronize(device)
    entries_per_second = repeats * dense.numel() / (time.perf_counter() - start)

    density = float(mask.density([0], max_bytes=args.max_mask_mib * 2**20)[0])

    print(json.dumps({
        "benchmark": "epipolar_masks",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "views": args.views, "pairs": mask.num_pairs, "feature_map": [side, side],
        "compact_bytes_all_pairs": mask.line_maps.numel() * mask.line_maps.element_size(),
        "dense_bool_bytes_one_pair": mask.num_queries * mask.num_keys,
        "dense_bool_bytes_all_pairs": mask.num_pairs * mask.num_queries * mask.num_keys,
        "build_compact_seconds": round(build_seconds, 4),
        "dense_entries_per_second": round(entries_per_second),
        "chunk_rows": rows.stop - rows.start,
        "attention_one_pair_seconds": round(attention_seconds, 3),
        "attention_peak_extra_bytes_cuda": peak,
        "process_max_rss_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before,
        "density_pair_0": round(density, 5),
        "output_finite": bool(torch.isfinite(output).all()),
    }))


if __name__ == "__main__":
    main()
