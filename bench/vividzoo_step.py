"""Vivid-ZOO's composite on one GPU: MVDream-1.5 + AnimateDiff v2 + alignment adapters through our patches.

Real-size SD1.5 UNet with MVDream's camera MLP, v2 motion modules (mid block, 32-frame tables) and the 42 alignment
layers, random weights (compute does not depend on the values), bf16 for sampling. A 4-view x 16-frame grid at
256 px is (1) denoised for one sampling step with CFG through core's CFGGuider (one UNet call of 2 x 64 images), and
(2) trained for a few steps with the pack's training function (batch 1 clip: 64 images; bf16 autocast), with and
without gradient checkpointing. Reports seconds per step and peak VRAM of each. One JSON line.

    python -P bench/vividzoo_step.py                         # the paper setting, CUDA
    python -P bench/vividzoo_step.py --memory-cap-gib 24     # as on a 24 GB card
    OMP_NUM_THREADS=1 python -P bench/vividzoo_step.py --tiny --frames 4 --size 64 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P leaves this folder off the path
from composition_step import PeakVram, emulate_card, import_host, seconds_per_run_and_peak  # noqa: E402


def build(tiny: bool, dtype, device):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    from mv4d.integration.patches.alignment import fresh_adapters, with_alignment_adapters
    from mv4d.integration.patches.motion import with_motion
    from mv4d.integration.patches.multiview import with_multiview_patches
    from mv4d.kernels.models.motion import SD15_CHANNELS, MotionModel, MotionVersion
    from mv4d.kernels.models.multiview import MVDREAM_SD15, AdapterShape, MultiviewAdapter
    from mv4d_tiny_models import REAL_SD, TINY_MOTION_CHANNELS, TINY_SD, init_weights, tiny_sd_model

    size = TINY_SD if tiny else REAL_SD
    unet = comfy.model_patcher.ModelPatcher(tiny_sd_model("SD15", 0, size, dtype, device), comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())
    with torch.device(device or "cpu"):
        camera = MultiviewAdapter(AdapterShape(4 * size["model_channels"]), operations=comfy.ops.manual_cast)
        motion = MotionModel(MotionVersion("v2", 32, True, False, "original"), TINY_MOTION_CHANNELS if tiny else SD15_CHANNELS,
                             operations=comfy.ops.manual_cast)
    for module, seed in ((camera, 1), (motion, 2)):
        init_weights(module, seed)
        module.to(dtype).requires_grad_(False)
    video = with_motion(with_multiview_patches(unet, camera, MVDREAM_SD15), motion)
    return video, fresh_adapters, with_alignment_adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed sampling / training steps (after one warm-up)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0, help="emulate a card of this size (0: the whole GPU)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    holder = emulate_card(args.memory_cap_gib) if cuda and args.memory_cap_gib else None
    import_host(cpu=not cuda)
    import comfy.samplers

    from mv4d.integration.alignment_training import EncodedClip, train_alignment_adapters
    from mv4d.integration.patches.conds import with_mv4d_values
    from mv4d.kernels.cameras import mvdream_cameras, orbit_rig
    from mv4d.kernels.grid import Grid
    from mv4d.kernels.models.alignment import TrainingSettings

    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    video, fresh_adapters, with_alignment_adapters = build(args.tiny, dtype, "cuda" if cuda else None)
    composite = with_alignment_adapters(video, fresh_adapters(video, args.views, args.frames, args.size))
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "views": args.views,
              "frames": args.frames, "size": args.size, "tiny": args.tiny, "memory_cap_gib": args.memory_cap_gib or None,
              "build_seconds": round(time.perf_counter() - started, 1)}
    grid = Grid(args.views, args.frames)
    context_width = 64 if args.tiny else 768
    generator = torch.Generator().manual_seed(0)
    cameras = grid.per_view(mvdream_cameras(orbit_rig(args.views, 15.0, 2.0, 33.8, args.size, args.size)))
    latent = args.size // 8
    peak = PeakVram() if cuda else None

    values = {"camera": cameras, "grid": grid, "source": "bench"}
    positive = with_mv4d_values([[torch.randn(1, 77, context_width, generator=generator), {}]], **values)
    negative = with_mv4d_values([[torch.randn(1, 77, context_width, generator=generator), {}]], **values)
    guider = comfy.samplers.CFGGuider(composite)
    guider.set_conds(positive, negative)
    guider.set_cfg(7.5)
    noise = torch.randn(grid.cells, 4, latent, latent, generator=generator)
    sampler = comfy.samplers.sampler_object("euler")

    def sampling_step():
        with torch.inference_mode():
            guider.sample(noise.clone(), torch.zeros_like(noise), sampler, torch.tensor([14.6, 7.0]), disable_pbar=True, seed=0)

    try:
        result["sampling_seconds_per_step"], result["sampling_peak_vram_gib"] = seconds_per_run_and_peak(sampling_step, args.steps, peak)
    except torch.OutOfMemoryError:
        result["sampling_seconds_per_step"] = "out of memory"
    clip = EncodedClip(torch.randn(grid.cells, 4, latent, latent, generator=generator), cameras,
                       torch.randn(1, 77, context_width, generator=generator), grid)
    empty = torch.randn(1, 77, context_width, generator=generator)
    for checkpointing in (False, True):
        settings = TrainingSettings(steps=1, checkpoint_every=1, gradient_checkpointing=checkpointing, bf16=True)
        key = "training_with_checkpointing" if checkpointing else "training"

        def training_step(settings=settings):  # one optimizer step through the trainer (its set-up is small)
            train_alignment_adapters(composite, [clip], settings, empty)

        try:
            result[f"{key}_seconds_per_step"], result[f"{key}_peak_vram_gib"] = seconds_per_run_and_peak(training_step, args.steps, peak)
        except torch.OutOfMemoryError:
            result[f"{key}_seconds_per_step"] = "out of memory"
    if holder is not None:
        holder.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
