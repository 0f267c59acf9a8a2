"""Motion nodes: AnimateDiff motion modules and CameraCtrl on stock SD1.5 models and on the multi-view models."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..integration import host
from ..integration.motion_models import load_cameractrl_file, load_motion_file, motion_files, resolve_motion_file
from ..integration.node_errors import input_error, kernel_errors_as_node_errors
from ..integration.patches.camera_control import APPLY_NODE as APPLY_CAMERA, with_camera_control
from ..integration.patches.motion import APPLY_NODE as APPLY_MOTION, has_motion, motion_of, with_motion
from ..integration.patches.multiview import multiview_family
from ..kernels.models.fourdm import BASE_FILE, VERSION as FOURDM_VERSION
from ..kernels.models.multiview import IMAGEDREAM
from .types import Cameras, CameraCtrlSocket, MotionModuleSocket

LOAD_MOTION = "MV4D Load Motion Module"
LOAD_CAMERA = "MV4D Load CameraCtrl"
SCHEDULES = {"AnimateDiff (sqrt_linear)": True, "keep the model's": False}


def motion_file_input(name: str, tooltip: str):
    host.register_model_folders()
    return io.Combo.Input(name, options=motion_files(), tooltip=tooltip)


def checked_file(node: str, input_name: str, name: str):
    path = resolve_motion_file(name)
    if path is None:
        raise input_error(node, input_name, f"{name!r} is not in models/animatediff_models", "put the file there and refresh (R)")
    return path


class LoadMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_LoadMotionModule",
            display_name=LOAD_MOTION,
            category="mv4d/motion",
            description="Loads an AnimateDiff motion module from models/animatediff_models: v1 (mm_sd_v15.ckpt), v2 "
                        "(mm_sd_v15_v2.ckpt), v3 (v3_sd15_mm.ckpt), a diffusers MotionAdapter (file or folder) or 4DM's "
                        "4dm.ckpt; the version is read from the keys. .ckpt / .pt files are read as weights only.",
            inputs=[motion_file_input("motion_module", "A motion-module file or diffusers folder in models/animatediff_models.")],
            outputs=[MotionModuleSocket.Output("motion", tooltip="The motion modules, for MV4D Apply Motion Module.")],
        )

    @classmethod
    def execute(cls, motion_module) -> io.NodeOutput:
        with kernel_errors_as_node_errors(LOAD_MOTION):
            motion = load_motion_file(checked_file(LOAD_MOTION, "motion_module", motion_module))
        version = motion.version
        text = f"AnimateDiff {version.name}: {version.table_length}-frame position table, {'with' if version.mid_block else 'no'} mid block"
        if version.name == FOURDM_VERSION:
            text = (f"4DM's motion modules ({version.table_length}-frame position table), made for ImageDream: MV4D Load 4DM "
                    "loads them with their base in one node (and any UNet weights the file holds)")
        return io.NodeOutput(motion, ui=ui.PreviewText(text))


class ApplyMotionModule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ApplyMotionModule",
            display_name=APPLY_MOTION,
            category="mv4d/motion",
            description="MODEL + motion module -> a video MODEL: AnimateDiff's temporal modules injected at its positions "
                        "(through ComfyUI's model patching: stock samplers, LoRA and offloading keep working). On a plain SD1.5 "
                        "model the latent batch is the video (EmptyLatentImage batch = frames); on a multi-view model "
                        "the conditioning's views x frames grid is used, and views never mix in the motion modules.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model (core loaders) or an MV4D multi-view model."),
                MotionModuleSocket.Input("motion", tooltip="From MV4D Load Motion Module."),
                io.Int.Input("frames", default=0, min=0, max=4096,
                             tooltip="Frames per video when the conditioning gives no grid; 0 = each latent batch is one video."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="AnimateDiff (sqrt_linear)",
                               tooltip="The noise schedule: AnimateDiff was trained with diffusers' 'linear' betas (ComfyUI's "
                                       "sqrt_linear); 'keep' leaves the model's own."),
                io.Boolean.Input("cross_frame_norm", default=False, optional=True,
                                 tooltip="AnimateDiff v1's GroupNorm over all frames of a video (its training setting; on by "
                                         "itself for v1 files, this forces it for others)."),
            ],
            outputs=[io.Model.Output("video_model", display_name="model", tooltip="The model with motion modules.")],
        )

    @classmethod
    def execute(cls, model, motion, frames, schedule, cross_frame_norm=False) -> io.NodeOutput:
        present = has_motion(model)
        if present == "AnimateDiff-Evolved":
            raise input_error(APPLY_MOTION, "model", "this MODEL already carries AnimateDiff-Evolved's motion modules",
                              "connect the model straight from its loader (use one of the two packs' motion nodes, not both)")
        if present == "mv4d":
            raise input_error(APPLY_MOTION, "model", "this MODEL already has a motion module", "apply one motion module only")
        if motion.version.name == FOURDM_VERSION:
            check_4dm_base(model, SCHEDULES[schedule])
        if frames > motion.version.table_length:
            raise input_error(APPLY_MOTION, "frames", f"{frames} frames, but this motion module's position table has "
                              f"{motion.version.table_length}", f"use at most {motion.version.table_length} frames, or core "
                              "context windows (ContextWindowsManual) with frames 0")
        return io.NodeOutput(with_motion(model, motion, frames, sampling=SCHEDULES[schedule],
                                         cross_frame_norm=cross_frame_norm or None))


def check_4dm_base(model, animatediff_schedule: bool) -> None:
    """4DM's motion modules belong on ImageDream, with ImageDream's noise schedule."""
    if multiview_family(model) != IMAGEDREAM.id:
        raise input_error(APPLY_MOTION, "model", "4DM's motion modules were trained on ImageDream, and this MODEL is not ImageDream",
                          f"load ImageDream ({BASE_FILE}) with MV4D Load Multi-view Model, or load both files with MV4D Load 4DM")
    if animatediff_schedule:
        raise input_error(APPLY_MOTION, "schedule", "4DM keeps ImageDream's noise schedule (LDM linear), not AnimateDiff's",
                          "set schedule to \"keep the model's\" (MV4D Load 4DM does so)")


class LoadCameraCtrl(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_LoadCameraCtrl",
            display_name=LOAD_CAMERA,
            category="mv4d/motion",
            description="Loads CameraCtrl (for AnimateDiff v3) from models/animatediff_models: the original CameraCtrl.ckpt "
                        "(pose encoder + attention processors) or AnimateDiff-Evolved's CameraCtrl_pruned.safetensors.",
            inputs=[motion_file_input("cameractrl", "A CameraCtrl file in models/animatediff_models.")],
            outputs=[CameraCtrlSocket.Output("cameractrl_out", display_name="cameractrl", tooltip="For MV4D Apply Camera Control or MV4D Apply CVD.")],
        )

    @classmethod
    def execute(cls, cameractrl) -> io.NodeOutput:
        with kernel_errors_as_node_errors(LOAD_CAMERA):
            return io.NodeOutput(load_cameractrl_file(checked_file(LOAD_CAMERA, "cameractrl", cameractrl)))


class ApplyCameraControl(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ApplyCameraControl",
            display_name=APPLY_CAMERA,
            category="mv4d/motion",
            description="MODEL with a motion module + CameraCtrl + cameras -> a MODEL whose videos follow the camera "
                        "trajectory: Plücker rays of each frame (relative to the first, as CameraCtrl was trained) through "
                        "the pose encoder into the motion modules' first attention. One camera per frame (all videos), or "
                        "one per frame of every video (video by video).",
            inputs=[
                io.Model.Input("model", tooltip="A model from MV4D Apply Motion Module (AnimateDiff v3)."),
                CameraCtrlSocket.Input("cameractrl", tooltip="From MV4D Load CameraCtrl."),
                Cameras.Input("cameras", tooltip="The trajectory (MV4D Load Camera Trajectory, or an orbit): one camera per frame."),
                io.Float.Input("scale", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="Strength of the camera features (official: 1)."),
            ],
            outputs=[io.Model.Output("camera_model", display_name="model", tooltip="The camera-controlled video model.")],
        )

    @classmethod
    def execute(cls, model, cameractrl, cameras, scale) -> io.NodeOutput:
        check_camera_control(APPLY_CAMERA, model, cameractrl)
        check_camera_size(APPLY_CAMERA, "cameras", cameras)
        return io.NodeOutput(with_camera_control(model, cameractrl, cameras, scale))


def check_camera_size(node: str, input_name: str, cameras) -> None:
    """CameraCtrl's pose encoder halves the latent three times with average pooling (rounding down) where the UNet's
    strided convolutions round up: their feature maps agree only for latent sides divisible by 8."""
    if cameras.height % 64 or cameras.width % 64:
        raise input_error(node, input_name, f"image size {cameras.width}x{cameras.height}: CameraCtrl needs width and height "
                          "that are multiples of 64 (its pose encoder's levels must match the UNet's)",
                          "set the cameras' width and height to multiples of 64 (e.g. 256 x 384)")


def check_camera_control(node: str, model, cameractrl):
    """The MODEL's motion modules, once it is known that CameraCtrl fits them (else a node error)."""
    motion = motion_of(model)
    if motion is None:
        raise input_error(node, "model", "this MODEL has no motion module", "put MV4D Apply Motion Module (AnimateDiff v3) before it")
    names = set(cameractrl.merges())
    missing = [name for name in motion.modules_named() if not name.startswith("mid_block") and name not in names]
    if missing:
        raise input_error(node, "cameractrl", f"it has no qkv_merge for motion module {missing[0]}",
                          "use the CameraCtrl file made for this motion module (AnimateDiff v3)")
    return motion
