"""AnimateDiff motion modules and CameraCtrl as native patches, on tiny models of the real SD1.5 layout.

Properties: diffusers' UNetMotionModel (the test oracle, its motion GroupNorm made per-frame as the original code
has it) and our patched ComfyUI model give the same noise prediction for v2 and v3, and stock diffusers does not;
every released key layout loads to the same modules; zero proj_out / zero qkv_merge change nothing; without motion
modules frames are independent; CameraCtrl follows the trajectory relative to its first camera; bad input is
refused naming node, input and fix.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import (TEXT_DIM, TINY_MOTION_CHANNELS, tiny_cameractrl, tiny_cameractrl_checkpoint, tiny_motion_module,
                              tiny_motion_state_dict, tiny_sd15_checkpoint)

FRAMES, LATENT = 8, 8
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_sd15_checkpoint()


def prompts(clip, text="a cat walking"):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text)), clip.encode_from_tokens_scheduled(clip.tokenize(""))


def sample(model, clip, noise, steps=3):
    import comfy.sample

    positive, negative = prompts(clip)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise.clone(), steps, 5.0, "euler", "normal", positive, negative,
                                   torch.zeros_like(noise), seed=0, disable_pbar=True)


def video_noise(frames=FRAMES, seed=0):
    return torch.randn(frames, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def unet_output(patched, x, timestep, context):
    """The raw UNet prediction of a ModelPatcher (injections applied, as ComfyUI does when it loads the model)."""
    transformer_options = {**copy.deepcopy(patched.model_options.get("transformer_options", {})), "cond_or_uncond": [0]}
    patched.patch_model()
    try:
        with torch.inference_mode():
            return patched.model.diffusion_model(x, timesteps=torch.full((len(x),), float(timestep)), context=context,
                                                 transformer_options=transformer_options)
    finally:
        patched.unpatch_model()


def diffusers_motion_unet(comfy_model, motion_state: dict, mid_block: bool, per_frame_norm: bool):
    """diffusers' UNetMotionModel with the tiny SD UNet's weights (converted by ComfyUI's own LDM <-> diffusers map) and
    the motion weights (converted by diffusers' own AnimateDiff converter)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
    import comfy.utils

    unet2d = UNet2DConditionModel(sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=TINY_MOTION_CHANNELS,
                                  layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=TEXT_DIM,
                                  attention_head_dim=8, norm_num_groups=32)
    ldm = comfy_model.model.diffusion_model.state_dict()
    names = comfy.utils.unet_to_diffusers(comfy_model.model.model_config.unet_config)  # diffusers name -> LDM name
    unet2d.load_state_dict({name: ldm[ldm_name] for name, ldm_name in names.items() if name in unet2d.state_dict()}, strict=True)
    adapter = MotionAdapter(block_out_channels=TINY_MOTION_CHANNELS, motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=mid_block)
    missing, unexpected = adapter.load_state_dict(convert_animatediff_checkpoint_to_diffusers(motion_state), strict=False)
    assert not unexpected and all(key.endswith("pos_embed.pe") for key in missing), (missing, unexpected)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    if per_frame_norm:  # the original AnimateDiff normalises each frame on its own: (b f) c h w before the norm
        class PerFrame(torch.nn.Module):
            def __init__(self, norm):
                super().__init__()
                self.norm = norm

            def forward(self, x):  # (b, c, f, h, w)
                b, c, f, h, w = x.shape
                frames = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
                return frames.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

        for module in unet.modules():
            if isinstance(module, AnimateDiffTransformer3D):
                module.norm = PerFrame(module.norm)
    return unet


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_our_patched_model_matches_diffusers_unet_motion_model_and_stock_diffusers_differs(sd15, version):
    from mv4d.integration.patches.motion import with_motion

    model = sd15[0]
    state = tiny_motion_state_dict(version)
    ours = with_motion(model, tiny_motion_module(version), sampling=False)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, FRAMES, LATENT, LATENT, generator=generator)
    context = torch.randn(1, 77, TEXT_DIM, generator=generator)
    ours_out = unet_output(ours, latents[0].transpose(0, 1), 500, context.expand(FRAMES, -1, -1))
    with torch.no_grad():
        frames_context = context.expand(FRAMES, -1, -1)  # diffusers takes the prompt once per frame
        oracle = diffusers_motion_unet(model, state, version == "v2", per_frame_norm=True)(latents, 500, frames_context).sample[0].transpose(0, 1)
        stock = diffusers_motion_unet(model, state, version == "v2", per_frame_norm=False)(latents, 500, frames_context).sample[0].transpose(0, 1)
    scale = float(oracle.abs().max())
    matched, differs = float((ours_out - oracle).abs().max()), float((ours_out - stock).abs().max())
    print(f"{version}: ours vs diffusers with per-frame motion norm: max |difference| {matched:.3g} ({matched / scale:.2g} of "
          f"max |prediction| {scale:.3g}); vs stock diffusers: {differs:.3g} ({differs / scale:.2g})")
    assert matched <= 1e-4 * scale
    assert differs > 100 * matched and differs > 1e-3 * scale  # stock diffusers normalises over all frames: not the original


def test_every_released_layout_loads_to_the_same_modules(comfy, tmp_path):
    import json

    import safetensors.torch
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    from mv4d.integration.motion_models import load_motion_file

    original = tiny_motion_state_dict("v2")
    torch.save(original, tmp_path / "mm_v2.ckpt")
    safetensors.torch.save_file(original, tmp_path / "mm_v2.safetensors")
    folder = tmp_path / "motion_adapter"
    folder.mkdir()
    safetensors.torch.save_file(convert_animatediff_checkpoint_to_diffusers(original), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "MotionAdapter", "motion_max_seq_length": 32}))
    # 4DM: the same modules under ImageDream's UNet positions, 'module.' prefixed, in a Lightning state_dict
    positions = {**{f"down_blocks.{b}.motion_modules.{s}": f"input_blocks.{1 + 3 * b + s}.{2 if b < 3 else 1}" for b in range(4) for s in range(2)},
                 **{f"up_blocks.{b}.motion_modules.{s}": f"output_blocks.{3 * b + s}.{1 if b == 0 else 2}" for b in range(4) for s in range(3)},
                 "mid_block.motion_modules.0": "middle_block.2"}
    four_dm = {}
    for key, value in original.items():
        module = next(name for name in positions if key.startswith(name + "."))
        four_dm[f"module.model.diffusion_model.{positions[module]}{key[len(module):]}"] = value
    torch.save({"state_dict": four_dm, "epoch": 3}, tmp_path / "4dm.ckpt")
    loaded = {path.name: load_motion_file(path) for path in (tmp_path / "mm_v2.ckpt", tmp_path / "mm_v2.safetensors", folder, tmp_path / "4dm.ckpt")}
    reference = loaded["mm_v2.ckpt"].state_dict()
    assert loaded["mm_v2.ckpt"].version.name == "v2" and loaded["4dm.ckpt"].version.name == "4dm"
    assert loaded["motion_adapter"].version.source_layout == "diffusers"
    for name, motion in loaded.items():
        state = motion.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state), name


def test_versions_are_read_from_the_keys_and_other_files_are_refused(comfy):
    from mv4d.kernels.errors import InvalidInput
    from mv4d.kernels.models.motion import normalize_motion_state_dict

    for version, (length, mid) in (("v1", (24, False)), ("v2", (32, True)), ("v3", (32, False))):
        _, found = normalize_motion_state_dict(tiny_motion_state_dict(version))
        assert (found.name, found.table_length, found.mid_block, found.cross_frame_norm) == (version, length, mid, version == "v1")
    sdxl = {key: value for key, value in tiny_motion_state_dict("v3").items() if not key.startswith("down_blocks.3")}
    with pytest.raises(InvalidInput, match="SDXL"):
        normalize_motion_state_dict(sdxl)
    with pytest.raises(InvalidInput, match="no AnimateDiff motion modules"):
        normalize_motion_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})


def test_zero_proj_out_and_zero_qkv_merge_change_nothing(sd15):
    from mv4d.integration.patches.camera_control import with_camera_control
    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels.cameras import orbit_rig

    model, clip, _ = sd15
    silent = tiny_motion_module("v3")
    for _, _, module in silent.placements():
        torch.nn.init.zeros_(module.temporal_transformer.proj_out.weight)
        torch.nn.init.zeros_(module.temporal_transformer.proj_out.bias)
    noise = video_noise()
    plain = sample(with_motion(model, tiny_motion_module("v3"), sampling=True), clip, noise)  # (for the schedule)
    zeroed = sample(with_motion(model, silent, sampling=True), clip, noise)
    no_modules = sample(with_motion_schedule_only(model), clip, noise)
    print(f"zero proj_out vs no motion module: max |difference| {float((zeroed - no_modules).abs().max()):.3g}")
    assert float((zeroed - no_modules).abs().max()) <= TOLERANCE * max(1.0, float(no_modules.abs().max()))
    assert float((plain - no_modules).abs().max()) > 1e-3  # a trained-like proj_out does act
    video = with_motion(model, tiny_motion_module("v3"))
    cameras = orbit_rig(FRAMES, 10.0, 2.0, 33.8, 8 * LATENT, 8 * LATENT, span_deg=90.0)
    quiet = sample(with_camera_control(video, tiny_cameractrl(zero_merge=True), cameras), clip, noise)
    motion_only = sample(video, clip, noise)
    print(f"zero qkv_merge vs no CameraCtrl: max |difference| {float((quiet - motion_only).abs().max()):.3g}")
    assert float((quiet - motion_only).abs().max()) <= TOLERANCE * max(1.0, float(motion_only.abs().max()))
    assert float((sample(with_camera_control(video, tiny_cameractrl(), cameras), clip, noise) - motion_only).abs().max()) > 1e-3


def with_motion_schedule_only(model):
    """The model with AnimateDiff's schedule but no motion module (what a zero motion module must equal)."""
    from mv4d.integration.patches.motion import animatediff_sampling

    patched = model.clone()
    patched.add_object_patch("model_sampling", animatediff_sampling(patched))
    return patched


def test_frames_are_independent_without_motion_modules_and_talk_with_them(sd15):
    from mv4d.integration.patches.motion import with_motion

    model, clip, _ = sd15
    noise, changed = video_noise(), video_noise()
    changed[3] = torch.randn(changed[3].shape, generator=torch.Generator().manual_seed(9))
    others = [frame for frame in range(FRAMES) if frame != 3]
    alone = sample(model, clip, noise), sample(model, clip, changed)
    assert torch.equal(alone[0][others], alone[1][others])
    video = with_motion(model, tiny_motion_module("v3"))
    together = sample(video, clip, noise), sample(video, clip, changed)
    assert float((together[0][others] - together[1][others]).abs().max()) > 1e-4
    # the base model is plain again afterwards: the modules were taken out of its UNet
    assert torch.equal(sample(model, clip, noise), alone[0])
    assert not any(type(layer).__name__ == "MotionModule" for block in model.model.diffusion_model.input_blocks for layer in block)


def test_cameractrl_checkpoint_forms_agree_and_only_the_relative_trajectory_matters(sd15, tmp_path):
    import safetensors.torch

    from mv4d.integration.motion_models import load_cameractrl_file
    from mv4d.integration.patches.camera_control import with_camera_control
    from mv4d.integration.patches.motion import with_motion
    from mv4d.kernels.cameras import CameraRig, orbit_rig

    two_dicts = tiny_cameractrl_checkpoint()
    torch.save(two_dicts, tmp_path / "CameraCtrl.ckpt")
    merged = {**two_dicts["pose_encoder_state_dict"], **two_dicts["attention_processor_state_dict"]}
    safetensors.torch.save_file(merged, tmp_path / "CameraCtrl_pruned.safetensors")
    first, second = (load_cameractrl_file(tmp_path / name) for name in ("CameraCtrl.ckpt", "CameraCtrl_pruned.safetensors"))
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, clip, _ = sd15
    video = with_motion(model, tiny_motion_module("v3"))
    cameras = orbit_rig(FRAMES, 10.0, 2.0, 33.8, 8 * LATENT, 8 * LATENT, span_deg=90.0)
    # the whole trajectory moved and turned rigidly: relative to its first camera nothing changed
    turn = torch.eye(4, dtype=torch.float64)
    turn[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    turn[:3, 3] = torch.tensor([0.3, -2.0, 0.5], dtype=torch.float64)
    moved = CameraRig(cameras.world_to_camera @ torch.linalg.inv(turn), cameras.intrinsics, cameras.height, cameras.width)
    noise = video_noise()
    here, there = (sample(with_camera_control(video, first, rig), clip, noise) for rig in (cameras, moved))
    assert float((here - there).abs().max()) <= 1e-4 * max(1.0, float(here.abs().max()))
    other_path = orbit_rig(FRAMES, 40.0, 2.0, 33.8, 8 * LATENT, 8 * LATENT, span_deg=-90.0)
    assert float((sample(with_camera_control(video, first, other_path), clip, noise) - here).abs().max()) > 1e-3


def test_bad_input_names_node_input_and_fix(comfy, mv4d_nodes, sd15, tmp_path):
    import safetensors.torch

    from mv4d.integration.node_errors import NodeInputError
    from mv4d.kernels.cameras import orbit_rig

    model, clip, _ = sd15
    comfy.add_model_folder_path("animatediff_models", str(tmp_path))
    safetensors.torch.save_file({"input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "not_motion.safetensors")
    with pytest.raises(NodeInputError, match=r"MV4D Load Motion Module: input 'motion_module': .*no AnimateDiff motion modules.*Fix: pick"):
        run_node(mv4d_nodes.LoadMotionModule, motion_module="not_motion.safetensors")
    with pytest.raises(NodeInputError, match=r"MV4D Load CameraCtrl: input 'cameractrl': .*not a CameraCtrl checkpoint"):
        run_node(mv4d_nodes.LoadCameraCtrl, cameractrl="not_motion.safetensors")
    v1 = tiny_motion_module("v1")  # a 24-frame position table
    with pytest.raises(NodeInputError, match=r"MV4D Apply Motion Module: input 'frames': 25 frames.*table has 24.*Fix: use at most 24 frames"):
        run_node(mv4d_nodes.ApplyMotionModule, model=model, motion=v1, frames=25, schedule="AnimateDiff (sqrt_linear)")
    video = run_node(mv4d_nodes.ApplyMotionModule, model=model, motion=v1, frames=0, schedule="AnimateDiff (sqrt_linear)").result[0]
    with pytest.raises(NodeInputError, match=r"MV4D Apply Motion Module: input 'frames': 25 frames per video.*Fix: sample at most 24"):
        sample(video, clip, video_noise(frames=25))
    with pytest.raises(NodeInputError, match=r"MV4D Apply Motion Module: input 'model': .*already has a motion module"):
        run_node(mv4d_nodes.ApplyMotionModule, model=video, motion=v1, frames=0, schedule="AnimateDiff (sqrt_linear)")
    evolved = model.clone()
    evolved.set_additional_models("ADE", [model.clone()])  # what AnimateDiff-Evolved's motion patch leaves on a MODEL
    with pytest.raises(NodeInputError, match=r"input 'model': this MODEL already carries AnimateDiff-Evolved's motion modules"):
        run_node(mv4d_nodes.ApplyMotionModule, model=evolved, motion=v1, frames=0, schedule="AnimateDiff (sqrt_linear)")
    with pytest.raises(NodeInputError, match=r"MV4D Apply Camera Control: input 'model': this MODEL has no motion module"):
        run_node(mv4d_nodes.ApplyCameraControl, model=model, cameractrl=tiny_cameractrl(), cameras=orbit_rig(FRAMES, 10.0, 2.0, 33.8, 64, 64), scale=1.0)
    v3 = run_node(mv4d_nodes.ApplyMotionModule, model=model, motion=tiny_motion_module("v3"), frames=0, schedule="AnimateDiff (sqrt_linear)").result[0]
    controlled = run_node(mv4d_nodes.ApplyCameraControl, model=v3, cameractrl=tiny_cameractrl(),
                          cameras=orbit_rig(FRAMES + 2, 10.0, 2.0, 33.8, 64, 64), scale=1.0).result[0]
    with pytest.raises(NodeInputError, match=r"MV4D Apply Camera Control: input 'cameras': 10 cameras for 1 video\(s\) of 8 frames"):
        sample(controlled, clip, video_noise())


def test_videos_longer_than_the_position_table_run_in_core_context_windows(sd15):
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    from mv4d.integration.patches.motion import with_motion

    model, clip, _ = sd15

    def windowed(base):
        import inspect

        settings = dict(model=base, context_length=16, context_overlap=4, context_schedule="standard_static", context_stride=1,
                        closed_loop=False, fuse_method="pyramid", dim=0, freenoise=False)
        accepted = inspect.signature(ContextWindowsManualNode.execute).parameters
        out = ContextWindowsManualNode.execute(**{key: value for key, value in settings.items() if key in accepted})
        return out.result[0] if hasattr(out, "result") else out[0]

    noise = video_noise(frames=30)
    try:
        sample(windowed(model), clip, noise, steps=2)
    except RuntimeError as error:  # ComfyUI 0.3.64's context windows fail on their own, without any mv4d patch
        pytest.skip(f"this host's core context windows do not run even without mv4d ({error})")
    video = windowed(with_motion(model, tiny_motion_module("v1")))  # a 24-frame table, 30 frames in windows of 16
    out = sample(video, clip, noise, steps=2)
    assert out.shape == noise.shape and bool(torch.isfinite(out).all())
