"""Exact savings, fused kernels and kept compiled UNets on a CUDA GPU in bf16, through the composed guider: the
single-token cross-attention shortcut and the short-sequence attention kernel (both on by default), MV4D Fuse
Elementwise and MV4D Compile and Keep each give the grid of the path without them within bf16 tolerance."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from test_gpu_composition import guider_module, tiny_grid_setup  # noqa: F401


def composed_grid(guiders, models, conditioning, noise, sigmas, settings):
    import comfy.samplers

    guider = guiders.ComposedGuider(*models, conditioning, settings)
    with torch.inference_mode():
        return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                             disable_pbar=True, seed=0).float()


def assert_same_within_bf16(reference, grid, what: str) -> None:
    scale, difference = reference.abs().max().item(), (grid - reference).abs().max().item()
    print(f"{what}, bf16: max |difference| {difference:.3e}, values up to {scale:.2f}")
    assert torch.isfinite(grid).all() and difference < 2e-2 * scale


def test_the_shortcut_gives_the_same_grid_in_bf16(guider_module):  # noqa: F811
    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    without, shortcut = (composed_grid(guider_module, (video, multiview), conditioning, noise, sigmas,
                                       guider_module.GuiderSettings(single_token_shortcut=taken)) for taken in (False, True))
    assert_same_within_bf16(without, shortcut, "shortcut vs without")


def test_short_sequence_attention_gives_the_same_grid_in_bf16(guider_module, monkeypatch):  # noqa: F811
    """The one-tile kernel in the temporal layers (on by default): the grid of PyTorch's attention within bf16."""
    from mv4d.integration.patches.short_sequence_attention import ShortSequenceSelfAttention

    taken, decide = [], ShortSequenceSelfAttention.takes_kernel
    monkeypatch.setattr(ShortSequenceSelfAttention, "takes_kernel", lambda self, x, *rest: taken.append(decide(self, x, *rest)) or taken[-1])
    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    without, kernel = (composed_grid(guider_module, (video, multiview), conditioning, noise, sigmas,
                                     guider_module.GuiderSettings(short_sequence_attention=used)) for used in (False, True))
    assert any(taken)
    assert_same_within_bf16(without, kernel, "short-sequence kernel vs PyTorch's attention")


def pytorch_attention(q, k, v, heads: int) -> torch.Tensor:
    """ComfyUI's attention_pytorch on (batch, tokens, heads * c) projections."""
    batch, tokens, width = q.shape
    split = [t.view(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(batch, tokens, width)


def doubled_short_attention(q, k, v, heads: int) -> torch.Tensor:
    return torch.ops.mv4d.short_attention(q, k, v, heads) * 2


def test_the_short_attention_kernel_at_the_temporal_shapes_eager_and_compiled():
    """bf16 at SVD's and SV3D's temporal shapes (64-channel heads) and AnimateDiff's (16 frames, 8 heads of 40 / 80
    channels): as close to float32 attention as PyTorch's own bf16 kernel, and a compiled graph that calls the
    operator runs the kernel (the same values up to rounding)."""
    from mv4d.kernels import short_attention  # noqa: F401  (registers the operator)

    generator = torch.Generator("cuda").manual_seed(0)
    compiled = torch.compile(doubled_short_attention, fullgraph=True, dynamic=False)
    for tokens, heads, channels in ((25, 5, 64), (21, 10, 64), (25, 20, 64), (64, 2, 64), (1, 5, 64), (16, 8, 40), (16, 8, 80)):
        q, k, v = torch.randn(3, 4096, tokens, heads * channels, device="cuda", dtype=torch.bfloat16, generator=generator).unbind(0)
        reference = pytorch_attention(q.float(), k.float(), v.float(), heads)
        errors = {name: ((out.float() - reference).norm() / reference.norm()).item()
                  for name, out in (("kernel", torch.ops.mv4d.short_attention(q, k, v, heads)),
                                    ("pytorch", pytorch_attention(q, k, v, heads)))}
        print(f"{tokens} tokens, {heads} heads of {channels}: relative error against float32 {errors}")
        assert errors["kernel"] <= 1.5 * errors["pytorch"] + 1e-4
        eager = doubled_short_attention(q, k, v, heads)
        # inductor compiles the same kernel with its own options: equal up to one bf16 rounding
        assert torch.allclose(compiled(q, k, v, heads).float(), eager.float(), rtol=2 ** -7, atol=2 ** -7)


def test_a_motion_module_with_the_kernel_is_as_close_to_float32_as_with_pytorch_attention():
    """AnimateDiff's motion module at its first level's real width (320 channels, 8 heads of 40, 16 frames) in bf16:
    with the kernel for its temporal attention it is as close to the float32 module as with PyTorch's attention."""
    from mv4d.kernels.grid import Grid
    from mv4d.kernels.models.motion import ModuleCall, MotionModule, sdpa_attention

    module = MotionModule(320)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / max(1, parameter.shape[-1]) ** 0.5)
    module = module.cuda()
    x = torch.randn(2 * 16, 320, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    grid = Grid(1, 16)
    taken = []

    def kernel(q, k, v, heads):
        taken.append(q.shape)
        return torch.ops.mv4d.short_attention(q, k, v, heads)

    with torch.no_grad():
        reference = module(x, ModuleCall(grid, sdpa_attention))
        half = module.to(torch.bfloat16)
        errors = {name: ((half(x.to(torch.bfloat16), ModuleCall(grid, attention)).float() - reference).norm() / reference.norm()).item()
                  for name, attention in (("kernel", kernel), ("pytorch", sdpa_attention))}
    print(f"motion module, 320 channels, 16 frames, bf16: relative error against float32 {errors}")
    assert taken and errors["kernel"] <= 1.5 * errors["pytorch"] + 1e-4


def test_fused_elementwise_gives_the_same_grid_in_bf16(guider_module):  # noqa: F811
    """MV4D Fuse Elementwise's inductor kernels on the GPU: the composed grid equals the eager one within bf16
    tolerance (the kernels compute in float32 inside and round once)."""
    from mv4d.integration.patches.fused_elementwise import fused_module_count, with_fused_elementwise

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    fused = (with_fused_elementwise(video), with_fused_elementwise(multiview))
    assert all(fused_module_count(model) > 0 for model in fused)
    eager, compiled = (composed_grid(guider_module, models, conditioning, noise, sigmas, guider_module.GuiderSettings())
                       for models in ((video, multiview), fused))
    assert_same_within_bf16(eager, compiled, "fused elementwise vs eager")


def test_compile_and_keep_gives_the_same_grid_in_bf16_and_loads_from_disk(guider_module, tmp_path):  # noqa: F811
    """MV4D Compile and Keep on the GPU: both UNets compiled (CUDA kernels), the composed grid equal to eager within
    bf16 tolerance; a second pair of wrappers over the same folder loads the files and compiles nothing."""
    from mv4d.integration.patches.precompiled_unet import compiled_unets_of, with_compile_and_keep

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    grids, runs = [], []
    for wrap in (lambda m: m, *[lambda m: with_compile_and_keep(m, min_images=1, max_shapes=4, folder=tmp_path,
                                                                first_compile="before the call")] * 2):
        models = (wrap(video), wrap(multiview))
        grids.append(composed_grid(guider_module, models, conditioning, noise, sigmas, guider_module.GuiderSettings()))
        runs.append([event for model in models for wrapper in compiled_unets_of(model) for event in wrapper.events])
    print(f"compile and keep: first run {runs[1]}, second {runs[2]}")
    assert_same_within_bf16(grids[0], grids[1], "compile and keep vs eager")
    assert any("compiled" in event for event in runs[1]) and runs[2] and not any("compiled" in event for event in runs[2])
    assert torch.equal(grids[2], grids[1])  # the loaded code is the compiled code


def test_compile_and_keep_beside_the_run_compiles_in_worker_processes(guider_module, tmp_path, caplog):  # noqa: F811
    """The first compiles in processes of their own on the GPU: the first grid is sampled meanwhile (uncompiled),
    the workers save one file per model, and a second sampling loads them and gives the compiled grid."""
    import time

    from mv4d.integration.patches.precompiled_unet import DEFAULT_PIECES, compiled_unets_of, with_compile_and_keep

    video, multiview, conditioning, noise, sigmas = tiny_grid_setup(guider_module, steps=4)
    eager = composed_grid(guider_module, (video, multiview), conditioning, noise, sigmas, guider_module.GuiderSettings())
    models = tuple(with_compile_and_keep(m, min_images=1, max_shapes=4, folder=tmp_path, first_compile="beside the run")
                   for m in (video, multiview))
    wrappers = [wrapper for model in models for wrapper in compiled_unets_of(model)]
    first = composed_grid(guider_module, models, conditioning, noise, sigmas, guider_module.GuiderSettings())
    deadline = time.monotonic() + 400
    while any(job.running() for wrapper in wrappers for job in wrapper.jobs.values()):
        assert time.monotonic() < deadline, "the compile processes did not finish"
        time.sleep(1.0)
    with caplog.at_level(logging.INFO):
        second = composed_grid(guider_module, models, conditioning, noise, sigmas, guider_module.GuiderSettings())
    events = [event for wrapper in wrappers for event in wrapper.events]
    print(f"beside the run: {events}")
    files = 2 * DEFAULT_PIECES  # one per piece of each model
    assert sum("compiled" in event for event in events) == files and sum("loaded" in event for event in events) == files
    assert len(list(tmp_path.glob("*.compiled"))) == files
    assert "does not accept" not in caplog.text, caplog.text  # the workers' code runs in this process
    assert_same_within_bf16(eager, first, "sampled while compiling vs eager")
    assert_same_within_bf16(eager, second, "compiled by the workers vs eager")


def test_temporal_convolutions_compile_in_channels_last_3d_in_bf16():
    """kernels/compile_passes.py on the GPU: a spatial 3x3 convolution (so inductor picks channels-last), then a
    video UNet's temporal (3, 1, 1) convolution; compiled with the pass it gives eager's numbers within bf16."""
    import torch.nn.functional as F

    from mv4d.kernels.compile_passes import inductor_options

    def video_block(x, spatial, temporal, frames: int):
        y = F.conv2d(x, spatial, None, padding=1)
        videos = y.shape[0] // frames
        y = y.view(videos, frames, *y.shape[1:]).permute(0, 2, 1, 3, 4)  # (b t) c h w -> b c t h w, as ComfyUI does
        y = F.conv3d(torch.nn.functional.silu(y), temporal, None, padding=(1, 0, 0))
        return y.permute(0, 2, 1, 3, 4).reshape(x.shape[0], -1, *x.shape[2:])

    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2 * 5, 64, 16, 16, device="cuda", dtype=torch.bfloat16, generator=generator)
    spatial = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16, generator=generator) / 24
    temporal = torch.randn(64, 64, 3, 1, 1, device="cuda", dtype=torch.bfloat16, generator=generator) / 14
    options = inductor_options()
    compiled = torch.compile(video_block, options={**options, "fx_graph_cache": False})
    with torch.inference_mode():
        result, expected = compiled(x, spatial, temporal, 5).float(), video_block(x, spatial, temporal, 5).float()
    assert options["post_grad_custom_pre_pass"].rewritten == 1
    assert_same_within_bf16(expected, result, "temporal convolution in channels_last_3d")


def test_motion_modules_with_the_kernel_give_the_same_video_in_bf16(guider_module, monkeypatch):  # noqa: F811
    """A tiny SD1.5 + AnimateDiff v3 + CameraCtrl sampled on the GPU through ComfyUI: the motion modules' temporal
    attention through the kernel (the default) gives the video of ComfyUI's attention within bf16 tolerance."""
    import comfy.samplers

    from mv4d.integration.patches.camera_control import with_camera_control
    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels import short_attention
    from mv4d.kernels.cameras import orbit_rig

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from motion_step import build

    taken, decide, allowed = [], short_attention.takes, [False]

    def counting(q, k, v, heads):  # allowed[0] False: every call takes ComfyUI's attention, CameraCtrl's too
        taken.append(allowed[0] and decide(q, k, v, heads))
        return taken[-1]

    monkeypatch.setattr(short_attention, "takes", counting)
    base, motion, control = build(True, torch.bfloat16, "cuda")
    generator = torch.Generator().manual_seed(0)
    positive, negative = ([[torch.randn(1, 77, 64, generator=generator), {}]] for _ in range(2))
    noise = torch.randn(8, 4, 8, 8, generator=generator)
    cameras = orbit_rig(8, 10.0, 2.0, 45.0, 64, 64, span_deg=60.0)
    videos = []
    for used in (False, True):
        allowed[0] = used
        guider = comfy.samplers.CFGGuider(with_camera_control(with_motion(base, motion, short_sequence_attention=used), control, cameras))
        guider.set_conds(positive, negative)
        guider.set_cfg(7.5)
        with torch.inference_mode():
            videos.append(guider.sample(noise.clone(), torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                                        torch.linspace(14.6, 0.03, 5), disable_pbar=True, seed=0).float())
    assert any(taken)
    assert_same_within_bf16(videos[0], videos[1], "motion modules, short-sequence kernel vs ComfyUI's attention")
