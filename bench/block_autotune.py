"""Inductor's max-autotune for matrix products inside the real-size SVD-XT UNet's blocks, against its default.

By default inductor hands every linear layer to cuBLAS and runs the work around it (norms applied, GEGLU's gate,
residual adds) as separate fused Triton kernels that read and write the activations once more each. Under
max-autotune it also generates Triton products and benchmarks them with those neighbours fused into their loads
(prologue) and stores (epilogue). At the 72 x 72 level the UNets' products have 320 channels in and out, which is
memory-bound on an H100 / H200, so fusing there could save more than the Triton product loses to cuBLAS.

This times single UNet blocks (a TimestepEmbedSequential: residual block + transformer, as the UNet calls them) at
the paper setting's call size, compiled both ways, with the inputs an eager UNet call hands them; the single-token
cross-attention shortcut is on, as in sampling. One JSON line per block and configuration, as it goes.

    python -P bench/block_autotune.py                                  # CUDA, real size, 350 images per call
    OMP_NUM_THREADS=1 python -P bench/block_autotune.py --tiny --images 8 --configs default   # CPU smoke run
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composition_step import import_host  # noqa: E402  (the same host import as the step benchmark)

CONFIGS = {
    "default": {},
    "max_autotune_gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    "max_autotune_gemm_tma": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                              "triton.enable_persistent_tma_matmul": True},
}


def run_block(block, x, emb, context, time_context, num_video_frames):
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed

    return forward_timestep_embed(block, x, emb, context, {}, None, time_context, num_video_frames, None)


def captured_block_inputs(unet, blocks: dict, call: dict) -> dict:
    """Each named block's (x, emb, context, time_context, num_video_frames), from one eager UNet call."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    wanted = {id(block): name for name, block in blocks.items()}
    seen = {}
    original = openaimodel.forward_timestep_embed

    def recording(ts, x, emb, *arguments, **keywords):
        if id(ts) in wanted:  # forward_timestep_embed(ts, x, emb, context, transformer_options, output_shape, ...)
            call = inspect.signature(original).bind(ts, x, emb, *arguments, **keywords).arguments
            seen[wanted[id(ts)]] = (x, emb, call.get("context"), call.get("time_context"), call.get("num_video_frames"))
        return original(ts, x, emb, *arguments, **keywords)

    openaimodel.forward_timestep_embed = recording
    try:
        with torch.inference_mode():
            unet(**call)
    finally:
        openaimodel.forward_timestep_embed = original
    return seen


def seconds_per_call(function, arguments, repeats: int, cuda: bool) -> float:
    for _ in range(2):
        function(*arguments)
    if not cuda:
        started = time.perf_counter()
        for _ in range(repeats):
            function(*arguments)
        return (time.perf_counter() - started) / repeats
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function(*arguments)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny SVD (CPU smoke run) instead of the real architecture")
    parser.add_argument("--images", type=int, default=350, help="images per UNet call (7 videos x 25 frames x cond/uncond)")
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=576, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--blocks", default="input_blocks.1,output_blocks.10,input_blocks.4,input_blocks.7")
    parser.add_argument("--configs", default="default,max_autotune_gemm", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    import_host(cpu=not cuda)
    import comfy.ldm.modules.attention as attention

    attention.optimized_attention = attention.attention_pytorch  # what CUDA gets; the CPU's choice reads free memory
    from mv4d.integration.patches.single_token_attention import SingleTokenCrossAttention, cross_attention_paths
    from mv4d.kernels import compile_passes
    from mv4d_tiny_models import CONTEXT_DIM, REAL_SIZE, TINY_SIZE, svd_family_unet

    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    size, context_dim = (TINY_SIZE, CONTEXT_DIM) if args.tiny else (REAL_SIZE, 1024)
    unet = svd_family_unet("svd", 0, size, dtype).model.diffusion_model.to(device)
    for path in cross_attention_paths(unet):  # the shortcut, as sampling runs it
        parent, name = path.rsplit(".", 1)
        setattr(unet.get_submodule(parent), name, SingleTokenCrossAttention(unet.get_submodule(path)))
    latent = args.size // 8
    generator = torch.Generator(device).manual_seed(0)
    call = dict(x=torch.randn(args.images, unet.in_channels, latent, latent, device=device, dtype=dtype, generator=generator),
                timesteps=torch.rand(args.images, device=device, generator=generator),
                context=torch.randn(args.images, 1, context_dim, device=device, dtype=dtype, generator=generator),
                y=torch.randn(args.images, unet.label_emb[0][0].in_features, device=device, dtype=dtype, generator=generator),
                num_video_frames=args.frames)
    blocks = {name: unet.get_submodule(name) for name in args.blocks.split(",")}
    inputs = captured_block_inputs(unet, blocks, call)
    del call
    for name, block in blocks.items():
        arguments = (block, *inputs[name])
        with torch.inference_mode():
            eager = run_block(*arguments)
            eager_seconds = seconds_per_call(run_block, arguments, args.repeats, cuda)
        for config in args.configs.split(","):
            torch._dynamo.reset()
            compiled = torch.compile(run_block, fullgraph=True, dynamic=False,
                                     options={**compile_passes.inductor_options(), **CONFIGS[config]})
            with torch.inference_mode():
                started = time.perf_counter()
                output = compiled(*arguments)
                if cuda:
                    torch.cuda.synchronize()
                compile_seconds = time.perf_counter() - started
                seconds = seconds_per_call(compiled, arguments, args.repeats, cuda)
            print(json.dumps({"block": name, "config": config, "input": list(inputs[name][0].shape),
                              "eager_ms": round(eager_seconds * 1e3, 3), "compiled_ms": round(seconds * 1e3, 3),
                              "compile_s": round(compile_seconds, 1),
                              "max_abs_difference_vs_eager": float((output.float() - eager.float()).abs().max()),
                              "max_abs_eager": float(eager.float().abs().max())}), flush=True)
            del compiled, output


if __name__ == "__main__":
    main()
