"""One sampling step of AnimateDiff v3 (optionally with CameraCtrl) on SD1.5 through our patches inside ComfyUI.

Real-size SD1.5 UNet, v3 motion modules (21 modules, 32-frame tables) and CameraCtrl pose encoder + qkv_merge are
built with the released architectures and random weights (compute does not depend on the values), in bf16. One
16-frame video with CFG (a UNet call of 32 images) is denoised through core's CFGGuider and euler sampler, at each
size asked, with the temporal attention through mv4d's short-sequence kernel (the default where Triton runs) and,
path "v3_pytorch_attention", through ComfyUI's attention. Reports per size and path: seconds per step (after a
warm-up), FLOPs per step (torch's flop counter, which does not count the kernel's: compare paths by seconds),
TFLOP/s, peak VRAM. One JSON line.

    python -P bench/motion_step.py                                  # 256 and 512 px, with and without CameraCtrl
    OMP_NUM_THREADS=1 python -P bench/motion_step.py --tiny --sizes 64 --frames 4 --steps 1   # CPU smoke run

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


def build(tiny: bool, dtype, device):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops

    from mv4d.integration.patches.camera_control import CameraControl
    from mv4d.kernels.models.cameractrl import CameraPoseEncoder
    from mv4d.kernels.models.motion import SD15_CHANNELS, MotionModel, MotionVersion
    from mv4d_tiny_models import REAL_SD, TINY_MOTION_CHANNELS, TINY_SD, init_weights, tiny_sd_model

    model = tiny_sd_model("SD15", 0, TINY_SD if tiny else REAL_SD, dtype, device)
    patcher = comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device())
    channels = TINY_MOTION_CHANNELS if tiny else SD15_CHANNELS
    with torch.device(device or "cpu"):
        motion = MotionModel(MotionVersion("v3", 32, False, False, "original"), channels, operations=comfy.ops.manual_cast)
        encoder = CameraPoseEncoder(channels, operations=comfy.ops.manual_cast)
        merges = {name: comfy.ops.manual_cast.Linear(module.temporal_transformer.proj_in.in_features, module.temporal_transformer.proj_in.in_features)
                  for _, name, module in motion.placements() if not name.startswith("mid")}
        control = CameraControl(encoder, merges)
    for module, seed in ((motion, 1), (control, 2)):
        init_weights(module, seed)
        module.to(dtype).requires_grad_(False)
    return patcher, motion, control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="image sizes in pixels")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after a warm-up sampling of 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run) instead of the real architectures")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    import_host(cpu=not cuda)
    import comfy.samplers
    from torch.utils.flop_counter import FlopCounterMode

    from mv4d.integration.patches.camera_control import with_camera_control
    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels.cameras import orbit_rig

    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    base, motion, control = build(args.tiny, dtype, "cuda" if cuda else None)
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "dtype": str(dtype),
              "frames": args.frames, "tiny": args.tiny, "cfg": True, "build_seconds": round(time.perf_counter() - started, 1)}
    context = 64 if args.tiny else 768
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, context, generator=generator), {}]]
    negative = [[torch.randn(1, 77, context, generator=generator), {}]]
    video = with_motion(base, motion)
    video_pytorch_attention = with_motion(base, motion, short_sequence_attention=False)
    peak = PeakVram() if cuda else None
    for size in [int(s) for s in args.sizes.split(",")]:
        cameras = orbit_rig(args.frames, 10.0, 2.0, 45.0, size, size, span_deg=60.0)
        for path, model in (("v3", video), ("v3_pytorch_attention", video_pytorch_attention),
                            ("v3+cameractrl", with_camera_control(video, control, cameras))):
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(positive, negative)
            guider.set_cfg(7.5)
            noise = torch.randn(args.frames, 4, size // 8, size // 8, generator=generator)
            sampler = comfy.samplers.sampler_object("euler")

            def sample(steps: int, guider=guider, noise=noise, sampler=sampler) -> float:
                sigmas = torch.linspace(14.6, 0.03, steps + 1)
                if cuda:
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                with torch.inference_mode():
                    guider.sample(noise.clone(), torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=0)
                if cuda:
                    torch.cuda.synchronize()
                return time.perf_counter() - begin

            sample(1)
            if peak:
                peak.start()
            seconds = sample(args.steps) / args.steps
            with FlopCounterMode(display=False) as counter:
                sample(1)
            flops = counter.get_total_flops()
            result[f"{path}@{size}"] = {"seconds_per_step": round(seconds, 4), "step_tflop": round(flops / 1e12, 3),
                                        "tflops_per_second": round(flops / 1e12 / seconds, 1),
                                        "peak_vram_gib": peak.gib() if peak else None}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
