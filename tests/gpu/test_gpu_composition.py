"""The composed guider on a CUDA GPU in bf16: the fast path (many videos / multi-view sets per UNet call) equals
the plain reference (one per call) within bf16 tolerance. Needs a ComfyUI source tree ($COMFYUI_DIR or ~/ComfyUI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HOST = Path(os.environ.get("COMFYUI_DIR", Path.home() / "ComfyUI"))
VIEWS, FRAMES, LATENT = 6, 5, 16


@pytest.fixture(scope="module")
def guider_module():
    if not (HOST / "comfy").is_dir():
        pytest.skip(f"no ComfyUI source tree at {HOST} (set COMFYUI_DIR)")
    sys.path.insert(0, str(HOST))
    sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "host"))
    import mv4d.integration.composed_guider as composed_guider  # no comfy_api needed: runs on a bare GPU machine

    return composed_guider


def test_fast_path_equals_one_call_per_video_in_bf16(guider_module):
    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    grids = {per_call: sample_grid(guider_module, video, multiview, conditioning, noise, sigmas, per_call)
             for per_call in (0, 1)}
    scale = grids[1].abs().max().item()
    difference = (grids[0] - grids[1]).abs().max().item()
    print(f"fast vs plain, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
    assert torch.isfinite(grids[0]).all() and scale > 0.1
    assert difference < 2e-2 * scale  # a few bf16 ulps (2^-8 relative) accumulated over 4 steps


def tiny_grid_setup(guider_module, steps=3):
    import comfy.samplers
    from mv4d_tiny_models import svd_family_unet

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from composition_step import random_grid_conditioning

    video, multiview = svd_family_unet("svd", 0, dtype=torch.bfloat16), svd_family_unet("sv3d_p", 1, dtype=torch.bfloat16)
    conditioning = random_grid_conditioning(VIEWS, FRAMES, LATENT, 32)
    noise = torch.randn(VIEWS * FRAMES, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(video.get_model_object("model_sampling"), "karras", steps)
    return video, multiview, conditioning, noise, sigmas


def sample_grid(guider_module, video, multiview, conditioning, noise, sigmas, per_call=0, **settings_overrides):
    import comfy.samplers
    from mv4d.kernels.composition import CompositionSchedule

    settings = guider_module.GuiderSettings(CompositionSchedule(), (1.5, 3.0), (2.5, 2.5), per_call, per_call, **settings_overrides)
    guider = guider_module.ComposedGuider(video, multiview, conditioning, settings)
    with torch.inference_mode():
        return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                             disable_pbar=True, seed=0).float()


def test_automatic_chunks_are_sized_by_measured_cuda_memory(guider_module, monkeypatch):
    """Automatic calls measure their real allocation; with free memory for 2.5 videos by that measurement, calls
    carry at most 2 videos. The grid equals one video / set per call within bf16 tolerance."""
    import weakref

    import comfy.model_management
    import comfy.samplers

    monkeypatch.setattr(guider_module, "MEASURED_CALLS", weakref.WeakKeyDictionary())
    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module)
    sample_grid(guider_module, video, multiview, conditioning, noise, sigmas)
    measured = {type(model).__name__: [memory.peak_bytes for memory in entries.values() if memory.peak_bytes]
                for model, entries in guider_module.MEASURED_CALLS.items()}
    print(f"measured call peaks (items: bytes): {measured}")
    assert sorted(measured) == ["SV3D_p", "SVD_img2vid"]
    one_video_latents = 2 * FRAMES * 4 * LATENT * LATENT * 2  # cond + uncond inputs alone, bf16
    assert all(peak > items * one_video_latents for calls in measured.values() for entry in calls for items, peak in entry.items())

    items, video_bytes = max(measured["SVD_img2vid"][0].items())
    room = (video_bytes / items) * 2.5 / guider_module.FREE_MEMORY_SHARE
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda device=None, torch_free_too=False: (room, room) if torch_free_too else room)
    batches = []
    original = comfy.samplers.calc_cond_batch
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch",
                        lambda model, conds, x, *a, **k: batches.append((type(model).__name__, x.shape[0])) or original(model, conds, x, *a, **k))
    chunked = sample_grid(guider_module, video, multiview, conditioning, noise, sigmas)
    video_batches = {size // FRAMES for name, size in batches if name == "SVD_img2vid"}
    print(f"videos per call with room for 2.5: {sorted(video_batches)}")
    assert max(video_batches) <= 2 and len(batches) > 2
    one_per_call = sample_grid(guider_module, video, multiview, conditioning, noise, sigmas, per_call=1)
    assert (chunked - one_per_call).abs().max().item() < 2e-2 * one_per_call.abs().max().item()


def test_fp8_matmuls_match_their_emulation_and_run_inside_the_unet(guider_module, monkeypatch):
    from mv4d.kernels.fp8_matmul import emulated_fp8_linear, fp8_linear, gpu_has_fp8_matmuls

    if not gpu_has_fp8_matmuls(torch.device("cuda")):
        pytest.skip(f"{torch.cuda.get_device_name()} has no fp8 tensor cores (compute capability 8.9+)")
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(7, 333, 640, device="cuda", generator=generator, dtype=torch.bfloat16)
    weight = torch.randn(1280, 640, device="cuda", generator=generator, dtype=torch.bfloat16) / 25
    bias = torch.randn(1280, device="cuda", generator=generator, dtype=torch.bfloat16)
    fast, emulated = fp8_linear(x, weight, bias).float(), emulated_fp8_linear(x, weight, bias).float()
    exact = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    print(f"fp8 vs emulation max |diff| {(fast - emulated).abs().max().item():.3e}; "
          f"fp8 vs exact relative {((fast - exact).norm() / (exact - bias.float()).norm()).item():.4f}")
    assert (fast - emulated).abs().max() <= 2e-2 * emulated.abs().max()  # same rounding; bf16 output, summation order
    assert ((fast - exact).norm() / (exact - bias.float()).norm()) < 0.05

    import mv4d.integration.patches.fp8_matmuls as fp8_node
    from mv4d_tiny_models import record_fp8_modes

    modes = record_fp8_modes(monkeypatch)
    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module)
    plain = sample_grid(guider_module, video, multiview, conditioning, noise, sigmas, per_call=VIEWS)
    in_fp8 = sample_grid(guider_module, fp8_node.with_fp8_matmuls(video), fp8_node.with_fp8_matmuls(multiview),
                         conditioning, noise, sigmas, per_call=VIEWS)
    routed = sum(mode.routed for mode in modes)
    relative = ((in_fp8 - plain).norm() / plain.norm()).item()
    print(f"fp8 linears run: {routed}, not eligible: {sum(mode.skipped for mode in modes)}; grid relative change {relative:.4f}")
    assert routed > 0 and torch.isfinite(in_fp8).all()
    assert 0 < relative < 0.1  # it changes the result, by fp8 rounding, not more



def test_the_cpu_waits_for_the_gpu_per_step_not_per_call(guider_module):
    """A copy between CPU and GPU memory (conds made on the CPU, CFG scales, index lists, a read of a GPU value)
    waits for every kernel queued before it; one in the call loop leaves the GPU idle while the CPU prepares each
    next UNet call. Counted as the operators see them: the same with one video / set per call (11 calls per step)
    as with automatic chunks (2 calls per step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = {"item", "is_nonzero", "_local_scalar_dense", "nonzero"}  # a GPU value read on the CPU (as the mode sees them)

    class CrossingCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name in reads and args[0].is_cuda:
                self.count += 1
            elif name in ("to", "_to_copy", "copy_") and isinstance(result, torch.Tensor):
                source, target = (args[1], args[0]) if name == "copy_" else (args[0], result)
                self.count += isinstance(source, torch.Tensor) and source.device.type != target.device.type
            return result

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module)
    crossings = {}
    for per_call in (0, 1, 0):  # the first run measures the automatic calls' memory (not the same code path)
        with CrossingCopies() as counter:
            sample_grid(guider_module, video, multiview, conditioning, noise, sigmas, per_call)
        crossings[per_call] = counter.count
    print(f"CPU <-> GPU copies and reads in 3 steps: automatic chunks {crossings[0]}, one per call {crossings[1]}")
    assert crossings[0] > 0, "the count saw none of the per-step reads (sigma): it proves nothing"
    assert crossings[1] == crossings[0]


def test_the_roles_side_by_side_on_two_streams_give_the_grid_of_one_after_another(guider_module):
    """The same calls on the same inputs, the multi-view model's on a side stream: the grid differs at most by the
    rounding of kernels that pick another algorithm (none expected), and the side stream was really used."""
    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    streams = []
    original = guider_module.comfy.samplers.calc_cond_batch

    def spy(model, *args, **kwargs):
        streams.append((type(model).__name__, torch.cuda.current_stream().cuda_stream))
        return original(model, *args, **kwargs)

    guider_module.comfy.samplers.calc_cond_batch = spy
    try:
        grids = {side: sample_grid(guider_module, video, multiview, conditioning, noise, sigmas, 2, roles_side_by_side=side)
                 for side in (False, True)}
    finally:
        guider_module.comfy.samplers.calc_cond_batch = original
    default = torch.cuda.default_stream().cuda_stream
    side_streams = {stream for name, stream in streams[len(streams) // 2:] if name == "SV3D_p"}
    difference = (grids[True] - grids[False]).abs().max().item()
    print(f"side by side vs one after another, bf16: max |difference| {difference:.3e}; multi-view streams {side_streams}")
    assert side_streams and default not in side_streams
    assert {stream for name, stream in streams if name == "SVD_img2vid"} == {default}
    assert difference <= 2e-2 * grids[False].abs().max().item()
