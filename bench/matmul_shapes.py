"""Time the matrix products of one Diffusion² joint step shape by shape, and what other kernels would save.

The compiled joint step spends about 62 % of its kernel time in GEMMs and convolutions (bench/RESULTS.md), which
carry 88 % of its FLOPs. This script finds out which of them run below what the GPU can do, and whether a layout
or kernel choice that gives the same numbers would be faster, without compiling a whole UNet:

  - the real-size SVD-XT and SV3D_p UNets are run once on the meta device (ComfyUI's classes, no weights) to list
    every linear layer and convolution with its shape and how often one call runs it;
  - each shape is timed at the call sizes of the paper setting (7 videos / 5 multi-view sets per call, cond and
    uncond in one call: 350 and 210 images) with
      linear layers: cuBLAS as PyTorch calls it, and inductor's max-autotune choice (Triton templates against
      cuBLAS; `--autotune-seconds` bounds the time spent compiling them), and the three self-attention input
      projections as one product (q, k, v weights concatenated);
      convolutions: NCHW as the UNets run them, channels-last, each with and without cudnn.benchmark; the
      temporal (3, 1, 1) convolutions also as a 2-d (3, 1) convolution over (t, h w) and as three batched
      matrix products on a (b, t, h w, c) layout;
  - the step's time per option is the sum over shapes of calls x seconds (SVD: 3 calls, SV3D_p: 5 per step).

    python -P bench/matmul_shapes.py                       # paper setting, CUDA
    python -P bench/matmul_shapes.py --autotune-seconds 0  # without the max-autotune column

Needs a ComfyUI source tree at $COMFYUI_DIR or ~/ComfyUI (its Python requirements installed). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def meta_unet(kind: str):
    """The real-size UNet of `kind` ("svd" / "sv3d_p") on the meta device, and the size of its conditioning vector."""
    host = Path(os.environ.get("COMFYUI_DIR", Path.home() / "ComfyUI"))
    sys.path.insert(0, str(host))
    sys.path.insert(1, str(ROOT / "tests" / "host"))
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # only meta tensors are made here
    import comfy.ldm.modules.attention as attention
    from mv4d_tiny_models import REAL_SIZE, svd_family_config

    attention.optimized_attention = attention.attention_pytorch  # the others query free memory, which meta lacks
    config = svd_family_config(kind, REAL_SIZE)
    with torch.device("meta"):
        model = config.get_model({}, device=torch.device("meta"))
    return model.diffusion_model, model.adm_channels


def shapes_of_one_call(kind: str, images: int, frames: int, latent: int) -> collections.Counter:
    """(layer kind, per-image shape...) -> how many times one UNet call over `images` images runs it."""
    unet, adm = meta_unet(kind)
    counts = collections.Counter()

    def record(name, module, inputs):
        x = inputs[0]
        if isinstance(module, torch.nn.Linear):
            # time / vector embeddings and the single-token context are negligible, and the single-token shortcut
            # (on by default) removes the cross-attention's query projection and runs its output once per image
            if x.shape[-2] == 1 or x.dim() == 2 or ".attn2.to_q" in name or ".attn2.to_out" in name:
                return
            tokens = x.numel() // x.shape[-1] // images
            counts[("linear", tokens, module.in_features, module.out_features, module.bias is not None)] += 1
        elif isinstance(module, torch.nn.Conv3d):
            counts[("conv3d", module.in_channels, x.shape[-2], x.shape[-1], module.out_channels)] += 1
        elif isinstance(module, torch.nn.Conv2d):
            counts[("conv2d", module.in_channels, x.shape[-2], x.shape[-1], module.out_channels,
                    module.kernel_size[0], module.stride[0])] += 1

    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            module.register_forward_hook(lambda module, inputs, output, name=name: record(name, module, inputs))
    meta = {"device": "meta"}
    with torch.no_grad():
        unet(torch.zeros(images, 8, latent, latent, **meta), torch.zeros(images, **meta),
             context=torch.zeros(images, 1, 1024, **meta), y=torch.zeros(images, adm, **meta),
             num_video_frames=frames, image_only_indicator=torch.zeros(images // frames, frames, **meta))
    return counts


def gpu_seconds(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / repeats


def flops_of(shape, images: int, frames: int) -> float:
    if shape[0] == "linear":
        _, tokens, k, n, _ = shape
        return 2.0 * images * tokens * k * n
    if shape[0] == "conv3d":
        _, c_in, h, w, c_out = shape
        return 2.0 * images * h * w * c_in * c_out * 3
    _, c_in, h, w, c_out, kernel, stride = shape
    return 2.0 * images * (h // stride) * (w // stride) * c_in * c_out * kernel * kernel


class Autotuner:
    """Inductor's max-autotune choice for one linear shape, while the time budget lasts."""

    def __init__(self, seconds: float):
        self.left = seconds

    def seconds(self, x, weight, bias, repeats: int) -> float | None:
        if self.left <= 0:
            return None
        import torch._dynamo

        torch._dynamo.reset()
        started = time.perf_counter()
        compiled = torch.compile(lambda a, w, b: F.linear(a, w, b), mode="max-autotune-no-cudagraphs", dynamic=False)
        try:
            compiled(x, weight, bias)
        except Exception as failure:  # a template that does not build: report it, keep the other columns
            print(f"  autotune failed: {str(failure).splitlines()[0][:160]}", file=sys.stderr)
            return None
        finally:
            self.left -= time.perf_counter() - started
        return gpu_seconds(lambda: compiled(x, weight, bias), repeats)


def time_linear(shape, images: int, repeats: int, autotuner: Autotuner) -> dict:
    _, tokens, k, n, has_bias = shape
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.randn(images * tokens, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=device, dtype=dtype) if has_bias else None
    result = {"cublas": gpu_seconds(lambda: F.linear(x, weight, bias), repeats)}
    result["autotuned"] = autotuner.seconds(x, weight, bias, repeats)
    return result


def time_fused_qkv(tokens: int, channels: int, images: int, repeats: int) -> dict:
    """The self-attention's q, k, v projections (no bias) as three products and as one on concatenated weights."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.randn(images * tokens, channels, device=device, dtype=dtype)
    weights = [torch.randn(channels, channels, device=device, dtype=dtype) / channels**0.5 for _ in range(3)]
    joined = torch.cat(weights)
    separate = gpu_seconds(lambda: [F.linear(x, w) for w in weights], repeats)
    fused = gpu_seconds(lambda: F.linear(x, joined).split(channels, dim=-1), repeats)
    error = (F.linear(x, joined)[:, channels:2 * channels].float() - F.linear(x, weights[1]).float()).abs().max().item()
    return {"three": separate, "one": fused, "max_abs_difference": error}


def cudnn_layouts(convolution, x, weight, layouts: dict, repeats: int) -> dict:
    """Seconds of `convolution(x, weight)` per layout name -> memory format, with and without cudnn.benchmark."""
    result = {}
    for layout, memory_format in layouts.items():
        xl, wl = x.contiguous(memory_format=memory_format), weight.contiguous(memory_format=memory_format)
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            key = layout + ("_benchmark" if benchmark else "")
            result[key] = gpu_seconds(lambda xl=xl, wl=wl: convolution(xl, wl), repeats)
    torch.backends.cudnn.benchmark = False
    return result


def time_conv2d(shape, images: int, repeats: int) -> dict:
    _, c_in, h, w, c_out, kernel, stride = shape
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.randn(images, c_in, h, w, device=device, dtype=dtype)
    weight = torch.randn(c_out, c_in, kernel, kernel, device=device, dtype=dtype) / (c_in * kernel * kernel) ** 0.5
    return cudnn_layouts(lambda a, b: F.conv2d(a, b, None, stride, kernel // 2), x, weight,
                         {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}, repeats)


def time_conv3d(shape, images: int, frames: int, repeats: int) -> dict:
    """The (3, 1, 1) temporal convolution: cuDNN in both layouts, as a 2-d convolution, and as three batched
    products over frames."""
    _, c_in, h, w, c_out = shape
    device, dtype = torch.device("cuda"), torch.bfloat16
    videos = images // frames
    x = torch.randn(videos, c_in, frames, h, w, device=device, dtype=dtype)
    weight = torch.randn(c_out, c_in, 3, 1, 1, device=device, dtype=dtype) / (3 * c_in) ** 0.5
    result = cudnn_layouts(lambda a, b: F.conv3d(a, b, None, 1, (1, 0, 0)), x, weight,
                           {"ncdhw": torch.contiguous_format, "ndhwc": torch.channels_last_3d}, repeats)
    # the same as a 2-d convolution over (frames, h w) with kernel (3, 1), in the channels-last layout inductor
    # gives 2-d convolutions (tried first for kernels/compile_passes.py: slower than NDHWC)
    x_image = x.reshape(videos, c_in, frames, h * w).contiguous(memory_format=torch.channels_last)
    w_image = weight.reshape(c_out, c_in, 3, 1).contiguous(memory_format=torch.channels_last)
    result["image_conv_nhwc"] = gpu_seconds(lambda: F.conv2d(x_image, w_image, None, 1, (1, 0)), repeats)
    image_conv = F.conv2d(x_image, w_image, None, 1, (1, 0)).reshape(videos, c_out, frames, h, w)
    result["image_conv_max_abs_difference"] = (image_conv.float() - F.conv3d(x, weight, None, 1, (1, 0, 0)).float()).abs().max().item()

    # (videos, frames * h * w, c): frame t's rows are [t * hw, (t + 1) * hw); the product of tap k reads frame t + k - 1
    rows = h * w
    tokens = x.permute(0, 2, 3, 4, 1).reshape(videos, frames * rows, c_in)
    taps = [weight[:, :, k, 0, 0].t().contiguous() for k in range(3)]

    def three_products():
        out = torch.matmul(tokens, taps[1])
        out[:, rows:].baddbmm_(tokens[:, :-rows], taps[0].expand(videos, -1, -1))
        out[:, :-rows].baddbmm_(tokens[:, rows:], taps[2].expand(videos, -1, -1))
        return out

    result["btc_three_products"] = gpu_seconds(three_products, repeats)
    reference = F.conv3d(x, weight, None, 1, (1, 0, 0)).permute(0, 2, 3, 4, 1).reshape(videos, frames * rows, c_out)
    result["three_products_max_abs_difference"] = (three_products().float() - reference.float()).abs().max().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--per-call", default="7,5", help="videos per SVD call, multi-view sets per SV3D call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", default="linear,conv2d,conv3d", help="which layer kinds to time")
    parser.add_argument("--autotune-seconds", type=float, default=300.0,
                        help="time budget for compiling max-autotune linears (0: skip that column)")
    args = parser.parse_args()
    latent = args.size // 8
    videos, sets = (int(n) for n in args.per_call.split(","))
    models = {  # images per call (cond and uncond together), frames per group, calls per joint step
        "svd": (2 * videos * args.frames, args.frames, args.views // videos),
        "sv3d_p": (2 * sets * args.views, args.views, args.frames // sets),
    }
    autotuner = Autotuner(args.autotune_seconds)
    step = collections.defaultdict(float)  # option -> seconds per joint step
    step_flops, shapes_out = 0.0, []
    for kind, (images, frames, calls) in models.items():
        counts = shapes_of_one_call(kind, images, frames, latent)
        # the largest shapes first, so the autotune budget goes where the FLOPs are
        ordered = sorted(counts.items(), key=lambda item: -flops_of(item[0], images, frames) * item[1])
        for shape, per_call in ordered:
            if shape[0] not in args.kinds.split(","):
                continue
            flops = flops_of(shape, images, frames)
            if shape[0] == "linear":
                times = time_linear(shape, images, args.repeats, autotuner)
            elif shape[0] == "conv3d":
                times = time_conv3d(shape, images, frames, args.repeats)
            else:
                times = time_conv2d(shape, images, args.repeats)
            runs = per_call * calls
            step_flops += flops * runs
            default = times["cublas"] if shape[0] == "linear" else times["nchw"] if shape[0] == "conv2d" else times["ncdhw"]
            candidates = {k: v for k, v in times.items() if v is not None and "difference" not in k}
            best = min(candidates.values())
            step["as_run"] += default * runs
            step["best_per_shape"] += best * runs
            for option, seconds in candidates.items():
                step[f"{shape[0]}:{option}"] += seconds * runs
            row = {"model": kind, "shape": list(shape), "runs_per_step": runs, "tflops_as_run": round(flops / default / 1e12, 1),
                   **{k: (round(v * 1e3, 3) if v is not None and "difference" not in k else v) for k, v in times.items()}}
            shapes_out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
        if kind == "svd" and "linear" in args.kinds.split(","):
            for tokens, channels in ((latent * latent, 320), ((latent // 2) ** 2, 640), ((latent // 4) ** 2, 1280)):
                fused = time_fused_qkv(tokens, channels, images, args.repeats)
                print(json.dumps({"model": kind, "fused_qkv": [tokens, channels], **fused}), file=sys.stderr, flush=True)
                shapes_out.append({"model": kind, "fused_qkv": [tokens, channels], **fused})
    print(json.dumps({"step_tflop": round(step_flops / 1e12, 1),
                      "step_seconds": {k: round(v, 3) for k, v in sorted(step.items())},
                      "tflops_as_run": round(step_flops / step["as_run"] / 1e12, 1),
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": shapes_out}))


if __name__ == "__main__":
    main()
