"""Motion modules (AnimateDiff, and what CameraCtrl / Vivid-ZOO / CVD add to them) on a stock ComfyUI SD model.

The MotionModel rides along as an additional model of a ModelPatcher clone (loaded and offloaded with the UNet by
ComfyUI's model management). A PatcherInjection inserts its modules into the UNet's blocks when ComfyUI patches
the model and takes them out when it unpatches it, at AnimateDiff's positions (after a block's last transformer,
else after its first ResBlock, so before any Upsample); a forward_timestep_embed patch calls our module class
with this call's grid. Nothing global is touched.

Per call the grid comes from the conditioning (patches/conds.py: a V x F grid for multi-view videos); without one,
every chunk of the batch is one video (AnimateDiff's convention), or `frames`-long videos when the node sets it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from ...kernels import short_attention
from ...kernels.grid import GRID_OPTION, Grid
from ...kernels.models.motion import ModuleCall, MotionModel
from ..node_errors import kernel_errors_as_node_errors
from .conds import call_data, carry_mv4d_conds
from .shared import SharedPatch

MOTION_KEY = "mv4d_motion"
APPLY_NODE = "MV4D Apply Motion Module"
FRAMES_OPTION = "mv4d_motion_frames"  # transformer_options: frames per video when the conditioning sets no grid
ADE_KEY = "ADE"  # AnimateDiff-Evolved's key for its motion models and injections
ANIMATEDIFF_SCHEDULE = {"beta_schedule": "sqrt_linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}


def comfy_attention_function(q, k, v, heads):
    return comfy_attention.optimized_attention(q, k, v, heads)


def temporal_attention(q, k, v, heads):
    """The frames of each video attending to each other (16-32 tokens per sequence, one sequence per token
    position): mv4d's one-tile kernel where it takes the call (a GPU with Triton, heads of at most 128 channels,
    so AnimateDiff's 320- and 640-channel levels), ComfyUI's attention otherwise. PyTorch's kernels tile by 64-128
    queries and run such short sequences several times slower than their memory traffic allows
    (kernels/short_attention.py); the result is the same up to rounding."""
    if short_attention.takes(q, k, v, heads):
        return torch.ops.mv4d.short_attention(q, k, v, heads)
    return comfy_attention_function(q, k, v, heads)


@dataclass
class MotionAdditions:
    """What other patches hang on the motion modules while they are injected (set at inject, removed at eject):
    {module name: {attribute path: module}}, e.g. {"down_blocks.0.motion_modules.0": {"temporal_transformer.align_in":
    Linear}}. Attribute paths are relative to the MotionModule."""

    by_module: dict[str, dict[str, torch.nn.Module]] = field(default_factory=dict)


def _set_path(root, path: str, value) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        root = getattr(root, parent) if not parent.isdigit() else root[int(parent)]
    setattr(root, name, value)


class MotionInjection(SharedPatch):
    """Inserts the motion modules into a UNet at AnimateDiff's positions, and takes them out again."""

    def __init__(self, motion: MotionModel, additions: MotionAdditions):
        self.motion, self.additions = motion, additions

    def inject(self, patcher) -> None:
        unet = patcher.model.diffusion_model
        for (kind, index), name, module in self.motion.placements():
            container = unet.middle_block if kind == "middle" else getattr(unet, f"{kind}_blocks")[index]
            transformers = [i for i, layer in enumerate(container) if isinstance(layer, SpatialTransformer)]
            resblocks = [i for i, layer in enumerate(container) if isinstance(layer, ResBlock)]
            position = transformers[-1] + 1 if transformers else resblocks[0] + 1
            container.insert(position, module)
            for path, addition in self.additions.by_module.get(name, {}).items():
                _set_path(module, path, addition)

    @property
    def module_class(self) -> type:
        """The class of the modules injected (the one the timestep-embed patch must match)."""
        return type(self.motion.placements()[0][2])

    def eject(self, patcher) -> None:
        unet = patcher.model.diffusion_model
        for container in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
            for index in reversed([i for i, layer in enumerate(container) if isinstance(layer, self.module_class)]):
                del container[index]
        for name, module in self.motion.modules_named().items():
            for path in self.additions.by_module.get(name, {}):
                _set_path(module, path, None)


class MotionForward(SharedPatch):
    """forward_timestep_embed patch for MotionModule: the module with this call's grid, attention and poses."""

    def __init__(self, cross_frame_norm: bool, attention=temporal_attention):
        self.cross_frame_norm, self.attention = cross_frame_norm, attention

    def __call__(self, layer, x, emb, context, transformer_options, *args, **kwargs):
        grid = call_grid(transformer_options, x.shape[0])
        data = call_data(transformer_options)  # CameraCtrl's pose features and CVD's pairing, when their patches set them
        with kernel_errors_as_node_errors(APPLY_NODE):
            return layer(x, ModuleCall(grid, self.attention, data.get("camera_features", {}).get(layer.pose_level),
                                       data.get("pose_scale", 1.0), self.cross_frame_norm, data.get("cross_video")))


def call_grid(transformer_options: dict, batch: int) -> Grid:
    """The grid of one UNet call: from the conditioning if it set one, else videos of the node's `frames`, else
    one video per chunk (cond, uncond) of the batch."""
    if GRID_OPTION in transformer_options:
        return Grid.of(transformer_options[GRID_OPTION])
    frames = transformer_options.get(FRAMES_OPTION) or batch // max(1, len(transformer_options.get("cond_or_uncond", [0])))
    return Grid(1, frames)


class CrossFrameGroupNorm(SharedPatch):
    """DIFFUSION_MODEL wrapper for AnimateDiff v1: during the UNet's forward, its GroupNorms take their statistics over
    all frames of each video (v1 was trained with 5-D normalisation), per model instance, restored afterwards."""

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        unet = executor.class_obj
        norms = [module for name, module in unet.named_modules()
                 if isinstance(module, torch.nn.GroupNorm) and ".temporal_transformer." not in f".{name}."]
        grid = call_grid(transformer_options, x.shape[0])

        def cross_frame(norm):
            def forward(h):
                if h.ndim != 4 or h.shape[0] % grid.frames:
                    return type(norm).forward(norm, h)
                batch, channels = h.shape[:2]
                videos = h.reshape(batch // grid.frames, grid.frames, channels, *h.shape[2:]).transpose(1, 2)
                return type(norm).forward(norm, videos).transpose(1, 2).reshape(h.shape)
            return forward

        for norm in norms:
            norm.forward = cross_frame(norm)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for norm in norms:
                del norm.forward


def animatediff_sampling(model):
    """The discrete eps schedule AnimateDiff was trained with: diffusers' "linear" betas, ComfyUI's "sqrt_linear"."""
    class AnimateDiffSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    return AnimateDiffSampling(types.SimpleNamespace(sampling_settings=dict(ANIMATEDIFF_SCHEDULE)))


def motion_patcher(motion: MotionModel):
    return comfy.model_patcher.ModelPatcher(motion, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def with_motion_additions(model, additions: dict[str, dict[str, torch.nn.Module]]):
    """A clone of a motion-patched MODEL whose injection also hangs `additions` ({module name: {path: module}}) on
    the motion modules. The modules must belong to an additional model of the clone, so ComfyUI loads them."""
    patched = model.clone()
    current = patched.injections[MOTION_KEY][0].inject.__self__
    merged = {name: dict(paths) for name, paths in current.additions.by_module.items()}
    for name, paths in additions.items():
        merged.setdefault(name, {}).update(paths)
    injection = MotionInjection(current.motion, MotionAdditions(merged))
    patched.set_injections(MOTION_KEY, [comfy.patcher_extension.PatcherInjection(inject=injection.inject, eject=injection.eject)])
    return patched


def motion_of(model) -> MotionModel | None:
    patchers = getattr(model, "additional_models", {}).get(MOTION_KEY)
    return patchers[0].model if patchers else None


def has_motion(model) -> str | None:
    """'mv4d' or 'AnimateDiff-Evolved' when the MODEL already carries motion modules, else None."""
    additional = getattr(model, "additional_models", {})
    if additional.get(MOTION_KEY):
        return "mv4d"
    if additional.get(ADE_KEY) or ADE_KEY in getattr(model, "injections", {}):
        return "AnimateDiff-Evolved"
    return None


def with_motion(model, motion: MotionModel, frames: int = 0, sampling: bool = True,
                cross_frame_norm: bool | None = None, additions: MotionAdditions | None = None,
                short_sequence_attention: bool = True):
    """A clone of `model` with the motion modules injected. sampling: switch to AnimateDiff's schedule.
    cross_frame_norm: v1's cross-frame GroupNorm (default: as the version was trained). additions: modules other
    patches hang on the motion modules (alignment layers, qkv_merge, cross-video modules).
    short_sequence_attention: the temporal attention through mv4d's kernel where it runs (`temporal_attention`);
    False: always ComfyUI's attention."""
    cross_frame_norm = motion.version.cross_frame_norm if cross_frame_norm is None else cross_frame_norm
    patched = model.clone()
    carry_mv4d_conds(patched)
    patched.set_additional_models(MOTION_KEY, [motion_patcher(motion)])
    injection = MotionInjection(motion, additions or MotionAdditions())
    patched.set_injections(MOTION_KEY, [comfy.patcher_extension.PatcherInjection(inject=injection.inject, eject=injection.eject)])
    attention = temporal_attention if short_sequence_attention else comfy_attention_function
    patched.set_model_forward_timestep_embed_patch((injection.module_class, MotionForward(cross_frame_norm, attention)))
    if frames:
        patched.model_options.setdefault("transformer_options", {})[FRAMES_OPTION] = frames
    if cross_frame_norm:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, MOTION_KEY, CrossFrameGroupNorm())
    if sampling:
        patched.add_object_patch("model_sampling", animatediff_sampling(patched))
    return patched
