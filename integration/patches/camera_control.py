"""CameraCtrl on a motion-patched MODEL: the pose encoder (an additional model) turns the trajectory's Plücker
rays into features once per latent size, a DIFFUSION_MODEL wrapper hands them to the motion modules of every call
(patches/motion.py), and the qkv_merge layers hang on the motion modules' first attentions while injected."""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from torch import nn

from ...kernels.cameras import CameraRig
from ...kernels.models.cameractrl import QKV_MERGE_PATH, UNSHUFFLE, CameraPoseEncoder, trajectory_rays
from ..node_errors import kernel_errors_as_node_errors
from .conds import OPTIONS, call_data
from .motion import call_grid, temporal_attention, with_motion_additions
from .shared import SharedPatch

CAMERA_KEY = "mv4d_cameractrl"
APPLY_NODE = "MV4D Apply Camera Control"


class CameraControl(nn.Module):
    """What a CameraCtrl file holds: the pose encoder and one qkv_merge per down / up motion module."""

    def __init__(self, encoder: CameraPoseEncoder, qkv_merge: dict[str, nn.Linear]):
        super().__init__()
        self.encoder = encoder
        self.qkv_merge = nn.ModuleDict({name.replace(".", "__"): layer for name, layer in qkv_merge.items()})

    def merges(self) -> dict[str, nn.Linear]:
        return {name.replace("__", "."): layer for name, layer in self.qkv_merge.items()}


class PoseFeatures(SharedPatch):
    """DIFFUSION_MODEL wrapper: this call's pose features per level, computed from the cameras once per latent
    size and grid (they do not change between steps) and repeated for the call's cond / uncond chunks."""

    def __init__(self, control: CameraControl, cameras: CameraRig, scale: float):
        self.control, self.cameras, self.scale = control, cameras, scale
        self.cached = (None, None)

    def features(self, x, grid):
        key = (tuple(x.shape[-2:]), grid, x.device, x.dtype)
        if self.cached[0] != key:
            with kernel_errors_as_node_errors(APPLY_NODE):
                rays = trajectory_rays(self.cameras, grid, x.shape[-2] * UNSHUFFLE, x.shape[-1] * UNSHUFFLE)
                levels = self.control.encoder(rays.to(x), grid, temporal_attention)
            self.cached = (key, levels)
        return self.cached[1]

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        grid = call_grid(transformer_options, x.shape[0])
        chunks = grid.chunks(x.shape[0])
        levels = self.features(x, grid)
        data = {**call_data(transformer_options), "pose_scale": self.scale,
                "camera_features": {level: features.repeat(chunks, 1, 1, 1) for level, features in enumerate(levels)}}
        transformer_options = {**transformer_options, OPTIONS: data}
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def with_camera_control(model, control: CameraControl, cameras: CameraRig, scale: float = 1.0):
    """A clone of a motion-patched MODEL that follows `cameras` (one trajectory for every video, or one per video)."""
    patched = with_motion_additions(model, {name: {QKV_MERGE_PATH: layer} for name, layer in control.merges().items()})
    patched.set_additional_models(CAMERA_KEY, [comfy.model_patcher.ModelPatcher(
        control, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device())])
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CAMERA_KEY, PoseFeatures(control, cameras, scale))
    return patched
