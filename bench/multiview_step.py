"""One sampling step of a multi-view model (MVDream, ImageDream) through our patches inside ComfyUI.

A real-size SD2.1 (or SD1.5) UNet is built from ComfyUI's own classes with the real configuration and random
weights (compute does not depend on the values), with MVDream's camera MLP (and ImageDream's resampler and
image-prompt projections) attached by our patches, in bf16. V views at `size` px with CFG (one UNet call of 2V
images) are denoised through core's CFGGuider and euler sampler. Reports seconds per step (after a warm-up),
UNet FLOPs per step (torch's flop counter), TFLOP/s, peak VRAM and the projected time of a 50-step sampling. One
JSON line.

    python -P bench/multiview_step.py                                   # MVDream-2.1, 4 views, 256 px, CUDA
    python -P bench/multiview_step.py --family imagedream               # 4 views + the pixel-controller view
    OMP_NUM_THREADS=1 python -P bench/multiview_step.py --tiny --steps 2  # CPU smoke run

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


def build(family_id: str, tiny: bool, dtype, device):
    from mv4d.integration.patches.multiview import with_multiview_patches
    from mv4d.kernels.models.multiview import FAMILIES, AdapterShape, MultiviewAdapter, ResamplerShape
    from mv4d.kernels.models.sd_unet import block_prefix, transformer_block_keys
    from mv4d_tiny_models import IMAGE_HIDDEN, REAL_SD, SD_CONTEXT, TEXT_DIM, TINY_SD, init_weights, tiny_sd_model
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    family = FAMILIES[family_id]
    size = TINY_SD if tiny else REAL_SD
    model = tiny_sd_model(family.base, 0, size, dtype, device)
    patcher = comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device())
    context = TEXT_DIM if tiny else SD_CONTEXT[family.base]
    shape = AdapterShape(4 * size["model_channels"])
    if family.image_prompt:
        unet = model.diffusion_model.state_dict()
        blocks = transformer_block_keys(unet)
        dims = tuple((context, unet[f"{block_prefix(block, unet)}attn2.to_k.weight"].shape[0]) for block in blocks)
        hidden = IMAGE_HIDDEN if tiny else 1280  # CLIP ViT-H/14's hidden width
        resampler = ResamplerShape(context, 2 if tiny else 4, 64, 1 if tiny else 12, 16, hidden, context, 4)
        shape = AdapterShape(shape.time_embed_dim, resampler, tuple(blocks), dims)
    with torch.device(device or "cpu"):
        adapter = MultiviewAdapter(shape, operations=comfy.ops.manual_cast)
    init_weights(adapter, 1)
    return with_multiview_patches(patcher, adapter.to(dtype).requires_grad_(False), family), context, family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="mvdream-sd21", choices=["mvdream-sd15", "mvdream-sd21", "imagedream"])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after a warm-up sampling of 2)")
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run) instead of the real architecture")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    import_host(cpu=not cuda)
    import comfy.samplers
    from mv4d.integration.patches.conds import with_mv4d_values
    from mv4d.kernels.cameras import mvdream_cameras
    from mv4d.integration.multiview_conditioning import default_rig
    from mv4d.kernels.grid import Grid

    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    model, context, family = build(args.family, args.tiny, dtype, "cuda" if cuda else None)
    build_seconds = time.perf_counter() - started
    views = args.views + int(family.pixel_controller)
    cameras = mvdream_cameras(default_rig(family.id, args.views, args.size, args.size))
    if family.pixel_controller:
        cameras = torch.cat([cameras, torch.zeros(1, 16)])
    generator = torch.Generator().manual_seed(0)
    values = {"camera": cameras, "grid": Grid(views, 1), "source": "bench"}
    if family.image_prompt:
        hidden = 32 if args.tiny else 1280
        values["image_prompt"] = torch.randn(views, 257, hidden, generator=generator)
    if family.pixel_controller:
        values["control_latent"] = torch.randn(views, 4, args.size // 8, args.size // 8, generator=generator)
    positive = with_mv4d_values([[torch.randn(1, 77, context, generator=generator), {}]], **values)
    negative = with_mv4d_values([[torch.randn(1, 77, context, generator=generator), {}]], **values)
    noise = torch.randn(views, 4, args.size // 8, args.size // 8, generator=generator)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(7.5)
    sampler = comfy.samplers.sampler_object("euler")

    def sample(steps: int) -> float:
        sigmas = float(model.get_model_object("model_sampling").sigma_max) * torch.linspace(1.0, 0.05, steps + 1)
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.inference_mode():
            guider.sample(noise.clone(), torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    sample(2)  # loads the model and warms up the kernels
    peak = PeakVram() if cuda else None
    if peak:
        peak.start()
    step_seconds = sample(args.steps) / args.steps
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        sample(1)
    flops = counter.get_total_flops()
    print(json.dumps({
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "dtype": str(dtype),
        "family": family.id, "views": args.views, "model_views": views, "size": args.size, "tiny": args.tiny, "cfg": True,
        "build_seconds": round(build_seconds, 1), "seconds_per_step": round(step_seconds, 4),
        "step_tflop": round(flops / 1e12, 3), "tflops_per_second": round(flops / 1e12 / step_seconds, 1),
        "peak_vram_gib": peak.gib() if peak else None, "projected_50_steps_seconds": round(50 * step_seconds, 1),
    }))


if __name__ == "__main__":
    main()
