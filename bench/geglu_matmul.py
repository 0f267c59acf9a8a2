"""GEGLU's projection and gate in one kernel (kernels/geglu_matmul.py) against the two-kernel path, at the shapes of
one Diffusion² joint step.

The real-size SVD-XT and SV3D_p UNets have a GEGLU feed-forward in every transformer block, 15 per level (five
spatial transformers with one in the spatial block and two in the temporal block), at three levels: 72², 36², 18²
tokens per image with 320, 640, 1280 channels at 576 px. One joint step runs them over 1000 images of SVD (20 rows x
25 frames x CFG 2) and 1008 of SV3D (24 columns x 21 views x CFG 2), in calls of 7 videos / 5 sets (350 / 210
images). Per call shape this times:
  two kernels, eager:    cuBLAS's product, then PyTorch's chunk / gelu / product (three elementwise kernels)
  two kernels, compiled: the formula under torch.compile (inductor: cuBLAS's product, then one fused kernel), what a
                         compiled UNet runs
  one kernel:            torch.ops.mv4d.geglu_matmul (Triton, its launch configuration tuned at the first call)
and their errors against the formula in float32, then adds the calls of one joint step.

    python -P bench/geglu_matmul.py                    # paper setting, 7 / 5 per call
    python -P bench/geglu_matmul.py --per-call 3,5     # the 24 GiB card's call sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if "mv4d" not in sys.modules:  # the repository root as the package mv4d, whatever its folder is called
    spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["mv4d"])
from mv4d.kernels.geglu_matmul import geglu_matmul, geglu_reference, launch_descriptors, tuned_descriptor_kernel, tuned_kernel  # noqa: E402

LEVELS = ((72, 320), (36, 640), (18, 1280))  # (latent side at 576 px, channels)
GEGLUS_PER_LEVEL = 15


def seconds(function, arguments: tuple, repeats: int) -> float:
    function(*arguments)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function(*arguments)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def with_descriptors(x, weight, bias):
    return launch_descriptors(x, weight, bias, x.new_empty((x.shape[0], weight.shape[0] // 2)))


def warp_specialised(x, weight, bias):
    return launch_descriptors(x, weight, bias, x.new_empty((x.shape[0], weight.shape[0] // 2)), warp_specialize=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-call", default="7,5", help="videos (SVD) and multi-view sets (SV3D) per UNet call")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    videos, sets = (int(n) for n in args.per_call.split(","))
    models = {"SVD-XT": (videos * 25 * 2, 1000), "SV3D_p": (sets * 21 * 2, 1008)}  # images per call, per step
    device, dtype = torch.device("cuda"), torch.bfloat16
    compiled = torch.compile(geglu_reference, dynamic=False)
    generator = torch.Generator(device).manual_seed(0)
    paths = {"two kernels, eager": geglu_reference, "two kernels, compiled": compiled, "one kernel": geglu_matmul}
    if torch.cuda.get_device_capability(device) >= (9, 0):
        paths["one kernel, descriptors"] = with_descriptors
        paths["one kernel, descriptors, warp-specialised"] = warp_specialised
    step = dict.fromkeys(paths, 0.0)
    for side, channels in LEVELS:
        weight = torch.randn(8 * channels, channels, device=device, generator=generator, dtype=dtype) / channels**0.5
        bias = torch.randn(8 * channels, device=device, generator=generator, dtype=dtype) * 0.1
        for model, (images, images_per_step) in models.items():
            rows = images * side * side
            x = torch.randn(rows, channels, device=device, generator=generator, dtype=dtype)
            exact = geglu_reference(x.float(), weight.float(), bias.float())
            record = {"model": model, "tokens": side * side, "channels": channels, "rows": rows}
            for name, function in paths.items():
                try:
                    result = function(x, weight, bias)
                except Exception as error:  # a variant this Triton cannot build: say so, time the others
                    record[name] = f"{type(error).__name__}: {str(error)[:300]}"
                    step[name] = float("nan")
                    continue
                error = (result.float() - exact).abs().max().item()
                del result
                timed = seconds(function, (x, weight, bias), args.repeats)
                flops = 2 * rows * channels * 8 * channels
                record[name] = {"ms": round(timed * 1000, 3), "TFLOP/s": round(flops / timed / 1e12, 1),
                                "max_error": error}
                step[name] += timed * images_per_step / images * GEGLUS_PER_LEVEL
            record["largest"] = exact.abs().max().item()
            torch.cuda.empty_cache()
            print(json.dumps(record), flush=True)
    best = {str(key): str(config) for kernel in (tuned_kernel(), tuned_descriptor_kernel(), tuned_descriptor_kernel(True)) for key, config in kernel.cache.items()}
    print(json.dumps({"per_step_seconds": {name: round(value, 4) for name, value in step.items()},
                      "tuned_configs": best, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
