"""Time PyTorch's attention backends at the attention calls of one Diffusion² joint step.

The real-size SVD-XT and SV3D_p UNets attend at three levels (72², 36², 18² latents at 576 px, 64 channels per
head): spatially over the tokens of one image, and temporally over the 25 frames (SVD) or 21 views (SV3D) of one
token. Every level has five such layers of each kind. This script builds q, k and v in the layout ComfyUI's
`attention_pytorch` hands to `scaled_dot_product_attention` (heads transposed out of a contiguous projection), times
each backend per call shape and adds the calls of one joint step (CFG on both models: 1050 images each), so the
step's attention time can be read per backend without a compile. Cross-attention is not here: the single-token
shortcut removes it.

    python -P bench/attention_backends.py                   # paper setting, 7 videos / 5 sets per call
    python -P bench/attention_backends.py --per-call 3,5    # the 24 GiB card's call sizes
"""

import argparse
import contextlib
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default": None,  # no restriction: what PyTorch picks by its own priority (flash, efficient, math, cudnn)
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
HEAD_CHANNELS = 64
LEVEL_CHANNELS = (320, 640, 1280)
LAYERS_PER_LEVEL = 5  # two in the input blocks, three in the output blocks


def add_setting_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The paper setting and call sizes whose attention calls are timed (bench/short_attention.py takes them too)."""
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--per-call", default="7,5", help="videos per SVD call, multi-view sets per SV3D call")
    parser.add_argument("--repeats", type=int, default=repeats)


def model_calls(args) -> list[tuple[str, int, int, int]]:
    """(model, images per call with cond and uncond batched, sequence of the temporal layers, calls per joint step)."""
    videos, sets = (int(n) for n in args.per_call.split(","))
    return [("svd", 2 * videos * args.frames, args.frames, args.views // videos),
            ("sv3d", 2 * sets * args.views, args.views, args.frames // sets)]


def only(backend: SDPBackend | None):
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def comfy_layout(batch: int, tokens: int, heads: int, device, dtype) -> torch.Tensor:
    """(batch, heads, tokens, 64) as a transposed view of a (batch, tokens, heads * 64) projection, as ComfyUI has it."""
    projected = torch.randn(batch, tokens, heads * HEAD_CHANNELS, device=device, dtype=dtype)
    return projected.view(batch, tokens, heads, HEAD_CHANNELS).transpose(1, 2)


def seconds_per_call(backend: SDPBackend, q, k, v, repeats: int) -> float | None:
    try:
        with only(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)  # warm-up, and the backend's refusal if any
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
            end.record()
            torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / repeats
    except (RuntimeError, torch.OutOfMemoryError) as refused:
        print(f"  {backend} refused: {str(refused).splitlines()[0][:160]}")
        return None


def agrees(backend: SDPBackend, q, k, v, reference: torch.Tensor) -> float | None:
    try:
        with only(backend):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    return ((out.float() - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_arguments(parser, repeats=5)
    parser.add_argument("--backends", default="default,flash,efficient,cudnn,math")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    videos, sets = (int(n) for n in args.per_call.split(","))
    latent = args.size // 8
    models = model_calls(args)
    rows, totals, shapes_run = [], {name: 0.0 for name in args.backends.split(",")}, {}
    best_total = 0.0
    for model, images, sequence, calls in models:
        for level, channels in enumerate(LEVEL_CHANNELS):
            side = latent >> level
            heads = channels // HEAD_CHANNELS
            for kind, batch, tokens in (("spatial", images, side * side), ("temporal", images // sequence * side * side, sequence)):
                q, k, v = (comfy_layout(batch, tokens, heads, device, dtype) for _ in range(3))
                flop = 4 * batch * heads * tokens * tokens * HEAD_CHANNELS
                reference = None
                if tokens <= 1024:  # the float32 reference only where its score matrix fits
                    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
                row = {"model": model, "level": level, "kind": kind, "batch": batch, "heads": heads, "tokens": tokens,
                       "calls_per_step": calls * LAYERS_PER_LEVEL, "ms": {}, "tflops": {}, "relative_error": {}}
                print(f"{model} level {level} {kind}: batch {batch}, heads {heads}, tokens {tokens}")
                for name in args.backends.split(","):
                    if name == "math" and batch * heads * tokens * tokens * 4 > 16 * 2**30:
                        continue  # its score matrix would not fit
                    seconds = seconds_per_call(BACKENDS[name], q, k, v, args.repeats)
                    if seconds is None:
                        continue
                    row["ms"][name] = round(seconds * 1000, 3)
                    row["tflops"][name] = round(flop / seconds / 1e12, 1)
                    totals[name] += seconds * row["calls_per_step"]
                    shapes_run[name] = shapes_run.get(name, 0) + 1
                    if reference is not None:
                        row["relative_error"][name] = agrees(BACKENDS[name], q, k, v, reference)
                    print(f"  {name}: {seconds * 1000:.3f} ms, {flop / seconds / 1e12:.1f} TFLOP/s")
                best = min(row["ms"], key=row["ms"].get)
                row["best"] = best
                best_total += row["ms"][best] / 1000 * row["calls_per_step"]
                rows.append(row)
                del q, k, v, reference
                torch.cuda.empty_cache()
    every_shape = {name: round(total, 3) for name, total in totals.items() if shapes_run.get(name) == len(rows)}
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cudnn": torch.backends.cudnn.version(), "per_call": [videos, sets],
                      "seconds_per_step_by_backend": every_shape,  # backends that ran every shape
                      "seconds_per_step_best_per_shape": round(best_total, 3),
                      "rows": rows}))


if __name__ == "__main__":
    main()
