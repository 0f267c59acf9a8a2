"""One joint step of the text pair's composition (AnimateDiff rows + MVDream columns) through MV4D Composed Guider.

Real-size networks with random weights (compute does not depend on the values), bf16 on CUDA: an SD1.5 UNet with
AnimateDiff v2 motion modules (mid block, 32-frame tables) for the rows and a second SD1.5 UNet with MVDream's camera
MLP and multi-view attention for the columns. A 4-view x 16-frame grid at 256 px (32 x 32 latents), CFG on both
models, one Euler step (one joint evaluation), by:
  - "fast": automatic chunks (as many videos / multi-view sets per UNet call as fit);
  - "plain": one video / one multi-view set per call;
  - "vividzoo": for comparison, Vivid-ZOO's naive composite (MVDream + the same motion modules in one UNet) over the
    same grid with core CFGGuider: one UNet call of the whole grid per step.
Reports seconds per step, peak VRAM and the UNet batch sizes per path. One JSON line.

    python -P bench/prompt_composition_step.py                       # 4 x 16 at 256 px, CUDA
    python -P bench/prompt_composition_step.py --memory-cap-gib 24   # as on a 24 GB card
    OMP_NUM_THREADS=1 python -P bench/prompt_composition_step.py --tiny --frames 4 --size 64   # CPU smoke run

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
from composition_step import PeakVram, emulate_card, import_host  # noqa: E402


def build(tiny: bool, dtype, device):
    """(AnimateDiff MODEL, MVDream MODEL, Vivid-ZOO naive composite MODEL, text width) with random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    from mv4d.integration.patches.motion import with_motion
    from mv4d.integration.patches.multiview import with_multiview_patches
    from mv4d.kernels.models.motion import SD15_CHANNELS, MotionModel, MotionVersion
    from mv4d.kernels.models.multiview import MVDREAM_SD15, AdapterShape, MultiviewAdapter
    from mv4d_tiny_models import REAL_SD, TEXT_DIM, TINY_MOTION_CHANNELS, TINY_SD, init_weights, tiny_sd_model

    size = TINY_SD if tiny else REAL_SD

    def unet(seed):
        return comfy.model_patcher.ModelPatcher(tiny_sd_model("SD15", seed, size, dtype, device),
                                                comfy.model_management.get_torch_device(),
                                                comfy.model_management.unet_offload_device())

    def modules(seed):
        with torch.device(device or "cpu"):
            camera = MultiviewAdapter(AdapterShape(4 * size["model_channels"]), operations=comfy.ops.manual_cast)
            motion = MotionModel(MotionVersion("v2", 32, True, False, "original"),
                                 TINY_MOTION_CHANNELS if tiny else SD15_CHANNELS, operations=comfy.ops.manual_cast)
        for module, offset in ((camera, 1), (motion, 2)):
            init_weights(module, seed + offset)
            module.to(dtype).requires_grad_(False)
        return camera, motion

    # separate networks for each MODEL, so no two share a UNet or a module (model management loads each its way)
    camera, motion = modules(10)
    animatediff = with_motion(unet(3), motion)
    mvdream = with_multiview_patches(unet(0), camera, MVDREAM_SD15)
    camera, motion = modules(10)
    composite = with_motion(with_multiview_patches(unet(0), camera, MVDREAM_SD15), motion)
    return animatediff, mvdream, composite, TEXT_DIM if tiny else 768


class UNetBatches:
    """The batch of every UNet call per model (both are plain SD BaseModels: told apart by identity)."""

    def __init__(self, names: dict[int, str]):
        import comfy.samplers

        self.calls: list[tuple[str, int]] = []
        original = comfy.samplers.calc_cond_batch

        def recorded(model, conds, x, *args, **kwargs):
            self.calls.append((names.get(id(model), type(model).__name__), x.shape[0]))
            return original(model, conds, x, *args, **kwargs)

        comfy.samplers.calc_cond_batch = recorded

    def take(self) -> dict:
        sizes: dict[str, list[int]] = {}
        for name, batch in self.calls:
            sizes.setdefault(name, []).append(batch)
        self.calls.clear()
        return {name: sorted(set(batches)) for name, batches in sizes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run) instead of the real architectures")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per path after one warm-up step")
    parser.add_argument("--paths", default="fast,plain,vividzoo", help="comma-separated: fast, plain, vividzoo")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0, help="emulate a card of this size (0: the whole GPU)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    holder = emulate_card(args.memory_cap_gib) if cuda and args.memory_cap_gib else None
    guider_module = import_host(cpu=not cuda)
    import comfy.samplers

    from mv4d.integration.patches.conds import with_mv4d_values
    from mv4d.integration.prompt_grid_conditioning import prompt_grid_conditioning
    from mv4d.kernels.cameras import mvdream_cameras, orbit_rig
    from mv4d.kernels.composition import CompositionSchedule, GuiderSettings
    from mv4d.kernels.grid import Grid

    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    animatediff, mvdream, composite, width = build(args.tiny, dtype, "cuda" if cuda else None)
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "dtype": str(dtype),
              "views": args.views, "frames": args.frames, "size": args.size, "tiny": args.tiny,
              "memory_cap_gib": args.memory_cap_gib or None, "build_seconds": round(time.perf_counter() - started, 1)}
    generator = torch.Generator().manual_seed(0)

    def text():
        return [[torch.randn(1, 77, width, generator=generator), {}]]

    rig = orbit_rig(args.views, 15.0, 2.0, 33.8, args.size, args.size)
    prompts = text(), text(), text(), text()
    with torch.inference_mode():
        conditioning, latent = prompt_grid_conditioning(animatediff, mvdream, *prompts, rig, args.frames)
    grid = Grid(args.views, args.frames)
    noise = torch.randn(grid.cells, 4, args.size // 8, args.size // 8, generator=generator)
    sigmas = torch.tensor([14.6, 7.0])  # one Euler step: one joint evaluation, inside both models' noise levels
    sampler = comfy.samplers.sampler_object("euler")
    batch_sizes = UNetBatches({id(animatediff.model): "animatediff", id(mvdream.model): "mvdream", id(composite.model): "vividzoo"})
    peak = PeakVram() if cuda else None

    def guider_for(path: str):
        if path == "vividzoo":
            values = {"camera": grid.per_view(mvdream_cameras(rig)), "grid": grid, "source": "bench"}
            guider = comfy.samplers.CFGGuider(composite)
            guider.set_conds(with_mv4d_values(prompts[2], **values), with_mv4d_values(prompts[3], **values))
            guider.set_cfg(7.5)
            return guider
        per_call = 1 if path == "plain" else 0
        settings = GuiderSettings(CompositionSchedule(), (7.5, 7.5), (7.5, 7.5), per_call, per_call)
        return guider_module.ComposedGuider(animatediff, mvdream, conditioning, settings)

    def step(path: str) -> float:
        guider = guider_for(path)
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.inference_mode():
            guider.sample(noise.clone(), torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    for path in [p for p in args.paths.split(",") if p]:
        try:
            warm_up = step(path)  # model loading, allocator, kernel selection, measuring chunk memory
            batch_sizes.take()
            if peak:
                peak.start()
            seconds = [step(path) for _ in range(args.repeats)]
        except torch.OutOfMemoryError:
            result[path] = "out of memory"
            continue
        entry = {"step_seconds": round(min(seconds), 3), "steps_seconds": [round(s, 3) for s in seconds],
                 "warm_up_seconds": round(warm_up, 1),
                 "batches": batch_sizes.take()}
        if cuda:
            entry["peak_vram_gib"] = peak.gib()
        result[path] = entry
        print(json.dumps({path: entry}), file=sys.stderr, flush=True)  # partial results survive a time limit
    if isinstance(result.get("fast"), dict) and isinstance(result.get("vividzoo"), dict):
        result["fast_vs_vividzoo_seconds_ratio"] = round(result["fast"]["step_seconds"] / result["vividzoo"]["step_seconds"], 2)
    if holder is not None:
        holder.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
