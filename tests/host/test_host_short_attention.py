"""The short-sequence attention patch (integration/patches/short_sequence_attention.py) on ComfyUI's SVD UNet.

Every self-attention module gets the stand-in; on the CPU every call takes the original module (the kernel needs
Triton's GPU compiler), so the prediction is bit for bit the same; under Triton's interpreter (a child process with
TRITON_INTERPRET=1) the temporal layers' calls take the kernel and the prediction matches the original's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mv4d_tiny_models import svd_family_unet
from test_host_composition import cameras, grid_conditioning, models, references  # noqa: F401
from test_host_exact_savings import svd_inputs, unet_call

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def short_attention_patch(comfy):
    from mv4d.integration.patches import short_sequence_attention

    return short_sequence_attention


def stand_ins(patcher) -> int:
    from mv4d.integration.patches.short_sequence_attention import ShortSequenceSelfAttention

    return sum(isinstance(patch, ShortSequenceSelfAttention) for patch in patcher.object_patches.values())


def test_every_self_attention_gets_the_stand_in_and_the_cpu_takes_the_original(short_attention_patch):
    plain = svd_family_unet("svd", seed=0)
    patched = short_attention_patch.with_short_sequence_attention(plain)
    attn1 = short_attention_patch.self_attention_paths(plain.model.diffusion_model)
    assert attn1 and any(".time_stack." in path for path in attn1)  # spatial and temporal layers alike
    assert stand_ins(patched) == len(attn1) and stand_ins(plain) == 0
    assert stand_ins(short_attention_patch.with_short_sequence_attention(patched)) == len(attn1)  # not stacked
    x, context, conds = svd_inputs()
    assert torch.equal(unet_call(patched, x, context, **conds), unet_call(plain, x, context, **conds))


def test_the_composed_guider_patches_both_models_unless_told_not_to(mv4d_nodes, models, cameras, references):  # noqa: F811
    from mv4d.integration.composed_guider import ComposedGuider
    from mv4d.kernels.composition import GuiderSettings

    conditioning, _ = grid_conditioning(mv4d_nodes, models, cameras, references)
    for taken in (True, False):
        guider = ComposedGuider(models["svd"][0], models["sv3d_p"][0], conditioning,
                                GuiderSettings(short_sequence_attention=taken))
        assert all(bool(stand_ins(role.model)) == taken for role in guider.roles)
    assert not stand_ins(models["svd"][0]) and not stand_ins(models["sv3d_p"][0])  # the MODELs given stay as they are


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed here (pip install triton): this check runs the kernel "
                                         "under Triton's interpreter")


def run_under_interpreter(comfy, code: str) -> dict:
    """Run `code` (which ends by printing one JSON line) in a child Python with Triton's interpreter on (Triton
    decides between interpreter and compiler when a kernel is defined), ComfyUI on the CPU and mv4d importable."""
    host = Path(comfy.__file__).parent  # the comfy fixture is ComfyUI's folder_paths module, at the host's root
    setup = f"""
        import importlib.util, json, sys
        sys.path[:0] = [{str(host)!r}, {str(Path(__file__).parent)!r}]
        spec = importlib.util.spec_from_file_location("mv4d", {str(ROOT / "__init__.py")!r}, submodule_search_locations=[{str(ROOT)!r}])
        sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mv4d"])
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    """
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(setup) + textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
def test_under_the_interpreter_the_temporal_layers_take_the_kernel_and_match(comfy):
    found = run_under_interpreter(comfy, """
        import torch
        from mv4d.integration.patches import short_sequence_attention as patch
        from mv4d_tiny_models import svd_family_unet
        from test_host_exact_savings import svd_inputs, unet_call
        taken, decide = [], patch.ShortSequenceSelfAttention.takes_kernel
        def counting(self, x, *rest):
            taken.append((x.shape[1], decide(self, x, *rest)))
            return taken[-1][1]
        patch.ShortSequenceSelfAttention.takes_kernel = counting
        plain = svd_family_unet("svd", seed=0)
        x, context, conds = svd_inputs()
        expected = unet_call(plain, x, context, **conds)
        got = unet_call(patch.with_short_sequence_attention(plain), x, context, **conds)
        print(json.dumps({"difference": float((got - expected).abs().max()), "scale": float(expected.abs().max()),
                          "taken": taken}))
    """)
    # the temporal layers' 3 frames took the kernel (so did the tiny model's spatial layers: 8 x 8 latents are 64
    # tokens, within one tile)
    assert 3 in {tokens for tokens, kernel in found["taken"] if kernel}
    assert found["difference"] <= 1e-5 * found["scale"]


def test_motion_modules_take_comfyui_attention_on_the_cpu(comfy):
    """Without Triton's GPU compiler (or its interpreter) the motion modules' attention is ComfyUI's, bit for bit,
    whichever way the patch was asked for."""
    from mv4d.integration.patches.motion import with_motion
    from mv4d_tiny_models import TEXT_DIM, tiny_motion_module, tiny_sd15_checkpoint
    from test_host_motion import unet_output

    model = tiny_sd15_checkpoint()[0]
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(8, 4, 8, 8, generator=generator), torch.randn(8, 77, TEXT_DIM, generator=generator)
    with_kernel, without = (unet_output(with_motion(model, tiny_motion_module("v3"), sampling=False, short_sequence_attention=used),
                                        x, 500, context) for used in (True, False))
    assert torch.equal(with_kernel, without)


@needs_triton
def test_under_the_interpreter_motion_modules_and_cameractrl_take_the_kernel_and_match(comfy):
    """AnimateDiff's temporal attention (8 frames here, 8 heads) and CameraCtrl's pose encoder take the kernel; the
    prediction matches ComfyUI's attention."""
    found = run_under_interpreter(comfy, """
        import torch
        from mv4d.integration.patches import motion
        from mv4d.integration.patches.camera_control import with_camera_control
        from mv4d.kernels import short_attention
        from mv4d.kernels.cameras import orbit_rig
        from mv4d_tiny_models import TEXT_DIM, tiny_cameractrl, tiny_motion_module, tiny_sd15_checkpoint
        from test_host_motion import unet_output
        taken, decide, allowed = [], short_attention.takes, [False]
        def counting(q, k, v, heads):  # allowed[0] False: every call takes ComfyUI's attention (the oracle)
            taken.append([q.shape[1], q.shape[2] // heads, allowed[0] and decide(q, k, v, heads)])
            return taken[-1][2]
        short_attention.takes = counting
        model = tiny_sd15_checkpoint()[0]
        generator = torch.Generator().manual_seed(1)
        x, context = torch.randn(8, 4, 8, 8, generator=generator), torch.randn(8, 77, TEXT_DIM, generator=generator)
        cameras = orbit_rig(8, 10.0, 2.0, 33.8, 64, 64, span_deg=90.0)
        out = {}
        for used in (False, True):
            allowed[0] = used  # (CameraCtrl's pose encoder asks `takes` whatever the motion modules were told)
            video = motion.with_motion(model, tiny_motion_module("v3"), sampling=False, short_sequence_attention=used)
            out[used] = unet_output(with_camera_control(video, tiny_cameractrl(), cameras), x, 500, context)
        print(json.dumps({"difference": float((out[True] - out[False]).abs().max()), "scale": float(out[False].abs().max()),
                          "taken": taken}))
    """)
    kernel_calls = [(tokens, channels) for tokens, channels, kernel in found["taken"] if kernel]
    assert kernel_calls and {tokens for tokens, _ in kernel_calls} == {8}  # every temporal call: the video's 8 frames
    assert {channels for _, channels in kernel_calls} == {8, 16}  # heads of the 64- and 128-channel levels
    assert found["difference"] <= 1e-5 * found["scale"], found["difference"]


@needs_triton
def test_under_the_interpreter_calls_that_need_gradients_take_comfyuis_attention(comfy):
    """Training through the motion modules (Vivid-ZOO's adapters) and through SVD's stand-ins differentiates the
    attention: those calls take ComfyUI's attention (the kernel has no backward); the same calls without
    gradients take the kernel."""
    found = run_under_interpreter(comfy, """
        import torch
        from mv4d.integration.patches import short_sequence_attention as patch
        from mv4d.integration.patches.motion import temporal_attention
        from mv4d.kernels import short_attention
        from mv4d.kernels.grid import Grid
        from mv4d.kernels.models.motion import ModuleCall, MotionModule
        from mv4d_tiny_models import svd_family_unet
        from test_host_exact_savings import svd_inputs
        motion_taken, decide = [], short_attention.takes
        short_attention.takes = lambda *call: motion_taken.append(decide(*call)) or motion_taken[-1]
        module = MotionModule(64)
        x = torch.randn(16, 64, 4, 4, requires_grad=True)
        module(x, ModuleCall(Grid(1, 8), temporal_attention)).square().sum().backward()
        trained = {"motion": [any(motion_taken), bool(x.grad.abs().sum() > 0)]}
        motion_taken.clear()
        with torch.no_grad():
            module(x, ModuleCall(Grid(1, 8), temporal_attention))
        untrained = {"motion": any(motion_taken)}
        svd_taken, decide_svd = [], patch.ShortSequenceSelfAttention.takes_kernel
        patch.ShortSequenceSelfAttention.takes_kernel = lambda self, *call: svd_taken.append(decide_svd(self, *call)) or svd_taken[-1]
        unet = patch.with_short_sequence_attention(svd_family_unet("svd", seed=0))
        unet.model.diffusion_model.requires_grad_(True)  # a LoRA trainer, say
        x, context, conds = svd_inputs()
        unet.patch_model()  # the stand-ins go in, as sampling puts them
        try:
            unet.model.apply_model(x, torch.full((len(x),), 3.0), c_crossattn=context, **conds).sum().backward()
        finally:
            unet.unpatch_model()
        trained["svd"] = [any(svd_taken), len(svd_taken) > 0]
        print(json.dumps({"trained": trained, "untrained": untrained}))
    """)
    assert found["trained"] == {"motion": [False, True], "svd": [False, True]}
    assert found["untrained"] == {"motion": True}
