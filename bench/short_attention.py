"""The UNets' temporal attention: mv4d's one-tile kernel (kernels/short_attention.py) against PyTorch's backends.

SVD's and SV3D's temporal layers attend over 25 frames / 21 views per token, with 64-channel heads, in batches of
hundreds of thousands of sequences per call. Such attention is bound by memory (q, k, v read once, the output
written once). This times each temporal attention call of one Diffusion² joint step (the calls as
bench/attention_backends.py counts them) with PyTorch's default, memory-efficient and cuDNN kernels, in the layout
ComfyUI's attention_pytorch hands them over, and with `torch.ops.mv4d.short_attention` on the projections as they
are, eager and inside torch.compile (as a compiled UNet runs it); errors against float32 attention; the step's
seconds per kernel. `--motion`: instead, the temporal attention
calls of one AnimateDiff sampling step on SD1.5 (one video of --frames frames at --size px, CFG batched: the
motion modules of the 320- and 640-channel levels, 8 heads of 40 / 80 channels; the 1280-channel levels' heads are
wider than the kernel takes).

    python -P bench/short_attention.py                  # paper setting, 7 videos / 5 sets per call
    python -P bench/short_attention.py --motion --frames 16 --size 512   # AnimateDiff, 16 frames at 512 px
    TRITON_INTERPRET=1 python -P bench/short_attention.py --check-only --size 16 --per-call 1,1   # CPU, the interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
if "mv4d" not in sys.modules:  # the repository root is the package mv4d
    spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["mv4d"])

import mv4d.kernels.short_attention  # noqa: E402,F401  (registers torch.ops.mv4d.short_attention)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_backends import HEAD_CHANNELS, LAYERS_PER_LEVEL, LEVEL_CHANNELS, add_setting_arguments, model_calls  # noqa: E402
from matmul_shapes import gpu_seconds  # noqa: E402


MOTION_HEADS = 8  # every released AnimateDiff motion module
MOTION_LEVELS = ((320, 5), (640, 5))  # (channels, motion modules: 2 in the down blocks, 3 in the up blocks)
MOTION_ATTENTIONS = 2  # temporal attentions per motion module


def diffusion2_calls(args) -> list[dict]:
    """Every temporal attention call shape of one Diffusion² joint step (SVD-XT + SV3D_p, CFG on both)."""
    found = []
    for model, images, sequence, calls in model_calls(args):  # as bench/attention_backends.py counts them
        for level, channels in enumerate(LEVEL_CHANNELS):
            side = (args.size // 8) >> level
            found.append({"model": model, "level": level, "batch": images // sequence * side * side,
                          "heads": channels // HEAD_CHANNELS, "head_channels": HEAD_CHANNELS, "tokens": sequence,
                          "calls_per_step": calls * LAYERS_PER_LEVEL})
    return found


def animatediff_calls(args) -> list[dict]:
    """The kernel's temporal attention call shapes of one AnimateDiff step: one video, cond and uncond batched."""
    return [{"model": "animatediff", "level": level, "batch": 2 * ((args.size // 8) >> level) ** 2, "heads": MOTION_HEADS,
             "head_channels": channels // MOTION_HEADS, "tokens": args.frames, "calls_per_step": modules * MOTION_ATTENTIONS}
            for level, (channels, modules) in enumerate(MOTION_LEVELS)]


def projections(batch: int, tokens: int, width: int, device, dtype) -> torch.Tensor:
    """(batch, tokens, heads * head channels), as a linear layer gives it."""
    return torch.randn(batch, tokens, width, device=device, dtype=dtype)


def heads_first(projected: torch.Tensor, heads: int) -> torch.Tensor:
    """The (batch, heads, tokens, c) view ComfyUI's attention_pytorch hands to scaled_dot_product_attention."""
    batch, tokens, width = projected.shape
    return projected.view(batch, tokens, heads, width // heads).transpose(1, 2)


def sdpa(backend: SDPBackend | None, heads: int, q, k, v) -> torch.Tensor:
    """ComfyUI's attention_pytorch: heads transposed out, PyTorch's attention, heads merged back."""
    batch, tokens, width = q.shape
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(*(heads_first(t, heads) for t in (q, k, v)))
    return out.transpose(1, 2).reshape(batch, tokens, width)


def short_attention_op(q, k, v, heads: int) -> torch.Tensor:
    return torch.ops.mv4d.short_attention(q, k, v, heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_arguments(parser, repeats=10)
    parser.add_argument("--check-only", action="store_true", help="only compare with float32 attention (no timing)")
    parser.add_argument("--motion", action="store_true", help="AnimateDiff's temporal attention on SD1.5 instead "
                        "(one video of --frames frames at --size px; --views and --per-call do not apply)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    backends = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    totals = {name: 0.0 for name in [*backends, "mv4d", "mv4d_compiled"]}
    for call in (animatediff_calls if args.motion else diffusion2_calls)(args):
        heads = call["heads"]
        q, k, v = (projections(call["batch"], call["tokens"], heads * call["head_channels"], device, dtype) for _ in range(3))
        reference = sdpa(None, heads, q.float(), k.float(), v.float())
        kernels = {name: functools.partial(sdpa, backend, heads, q, k, v) for name, backend in backends.items()}
        kernels["mv4d"] = functools.partial(torch.ops.mv4d.short_attention, q, k, v, heads)
        if not cuda:
            kernels = {"mv4d": kernels["mv4d"]}
        else:  # the kernel as a compiled UNet runs it: inductor compiles and launches it with its own arguments
            kernels["mv4d_compiled"] = functools.partial(torch.compile(short_attention_op, fullgraph=True, dynamic=False), q, k, v, heads)
        row = {**call, "ms": {}, "relative_error": {}}
        for name, run in list(kernels.items()):
            try:
                row["relative_error"][name] = ((run().float() - reference).norm() / reference.norm()).item()
            except RuntimeError as error:  # a backend that refuses the shape (cuDNN at some head widths, say)
                row["ms"][name] = f"refused: {str(error).splitlines()[0][:120]}"
                totals[name] = None
                del kernels[name]
        if not args.check_only:
            for name, run in kernels.items():
                seconds = gpu_seconds(run, args.repeats)
                row["ms"][name] = round(seconds * 1e3, 3)
                if totals[name] is not None:
                    totals[name] += seconds * row["calls_per_step"]
            moved = 4 * q.numel() * q.element_size()  # q, k, v read and the output written, once each
            row["tb_per_s"] = {name: round(moved / (ms / 1e3) / 1e12, 2) for name, ms in row["ms"].items()
                               if isinstance(ms, float)}
        print(json.dumps(row), flush=True)
        del q, k, v, reference
    if not args.check_only:
        import triton

        print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                          "setting": {"motion": args.motion, "size": args.size, "frames": args.frames,
                                      **({} if args.motion else {"views": args.views, "per_call": args.per_call})},
                          "temporal_attention_seconds_per_step": {name: None if s is None else round(s, 3) for name, s in totals.items()}}))


if __name__ == "__main__":
    main()
