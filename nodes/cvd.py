"""CVD nodes: several camera-controlled videos of one scene, sampled together so that they agree."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..integration.grid_latent import grid_latent
from ..integration.motion_models import load_cvd_file
from ..integration.node_errors import check_numbers, input_error, kernel_errors_as_node_errors
from ..integration.patches.camera_control import CAMERA_KEY
from ..integration.patches.cvd import APPLY_NODE as APPLY_CVD, has_cvd, joined_trajectories, with_cvd
from ..kernels.grid import Grid
from ..kernels.models.cvd import CVDSettings
from .motion import check_camera_control, check_camera_size, checked_file, motion_file_input
from .types import Cameras, CameraCtrlSocket, CVDModuleSocket

LOAD_CVD = "MV4D Load CVD Module"
MAX_VIDEOS = 8
TRAJECTORIES = [f"trajectory_{index}" for index in range(1, MAX_VIDEOS + 1)]
DEFAULTS = CVDSettings()


class LoadCVDModule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_LoadCVDModule",
            display_name=LOAD_CVD,
            category="mv4d/motion",
            description="Loads CVD's cross-video synchronisation modules (Collaborative Video Diffusion) from "
                        "models/animatediff_models: CVD.ckpt (its unet_trainable_dict, read as weights only) or its "
                        ".safetensors conversion. They follow AnimateDiff v3's motion modules with CameraCtrl.",
            inputs=[motion_file_input("cvd_module", "CVD.ckpt or CVD.safetensors in models/animatediff_models.")],
            outputs=[CVDModuleSocket.Output("cvd", tooltip="The synchronisation modules, for MV4D Apply CVD.")],
        )

    @classmethod
    def execute(cls, cvd_module) -> io.NodeOutput:
        with kernel_errors_as_node_errors(LOAD_CVD):
            cvd = load_cvd_file(checked_file(LOAD_CVD, "cvd_module", cvd_module))
        modules = len(cvd.by_motion_module())
        return io.NodeOutput(cvd, ui=ui.PreviewText(f"CVD: {modules} synchronisation modules, channels {list(cvd.channels)}"))


def trajectory_inputs():
    first, *others = TRAJECTORIES
    return [Cameras.Input(first, tooltip="Video 1's camera path: one camera per frame (MV4D Orbit Cameras with a span, or "
                                         "MV4D Load Camera Trajectory). All trajectories share one world frame.")] + [
        Cameras.Input(name, optional=True, tooltip=f"Video {name.rsplit('_', 1)[1]}'s camera path (at least 2 videos; connect "
                                                   "them in order).") for name in others]


class ApplyCVD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ApplyCVD",
            display_name=APPLY_CVD,
            category="mv4d/motion",
            description="Several videos of one scene that agree (CVD): a MODEL with AnimateDiff v3 + CameraCtrl + CVD's "
                        "modules and one camera trajectory per video -> a MODEL and an empty latent of every video's "
                        "frames (videos x frames, video by video) for any core sampler. Each video follows its trajectory; "
                        "at every frame each video attends to a partner video near the epipolar lines of their cameras "
                        "(two videos: each other; more: a random pairing per step). Decode with MV4D Decode Grid and the "
                        "cameras output.",
            inputs=[
                io.Model.Input("model", tooltip="From MV4D Apply Motion Module (AnimateDiff v3), without CameraCtrl: this node applies it."),
                CameraCtrlSocket.Input("cameractrl", tooltip="From MV4D Load CameraCtrl."),
                CVDModuleSocket.Input("cvd", tooltip="From MV4D Load CVD Module."),
                io.Int.Input("frames", default=16, min=1, max=64,
                             tooltip="Frames per video; every trajectory must hold this many cameras (CVD and CameraCtrl: 16)."),
                *trajectory_inputs(),
                io.Combo.Input("mask_mode", options=["soft", "hard"], default=DEFAULTS.mode,
                               tooltip="soft: the released code's distance bias (what CVD.ckpt was trained with). hard: only "
                                       "cells within tau pixels of the epipolar line (the paper)."),
                io.Float.Input("tau", default=DEFAULTS.tau, min=0.0, max=1000.0, step=0.1,
                               tooltip="hard: band half-width in pixels at the reference resolution (paper: 3)."),
                io.Float.Input("band_fraction", default=round(DEFAULTS.band_fraction, 4), min=0.0001, max=1.0, step=0.0001,
                               tooltip="soft: band as a fraction of the largest line distance (CVD: 3/128 = 0.0234)."),
                io.Float.Input("decay", default=DEFAULTS.decay, min=0.01, max=100.0, step=0.01,
                               tooltip="soft: steepness of the bias outside the band (CVD: 3)."),
                io.Int.Input("reference_resolution", default=DEFAULTS.reference_resolution, min=0, max=8192,
                             tooltip="Long side, in pixels, of the image grid distances are measured on (CVD: 256). 0 = the cameras' image size."),
                io.Int.Input("pairing_seed", default=DEFAULTS.seed, min=0, max=2**31 - 1,
                             tooltip="Seed of the per-step random pairings (more than 2 videos) and of the pseudo-epipolar "
                                     "lines of cameras that coincide."),
                io.Int.Input("matchings", default=DEFAULTS.matchings, min=1, max=16,
                             tooltip="Random pairings averaged per step (more than 2 videos; each costs one more model "
                                     "evaluation). CVD: 1 for 4 videos, 2 for 6."),
                io.Float.Input("camera_scale", default=DEFAULTS.camera_scale, min=0.0, max=10.0, step=0.05,
                               tooltip="Strength of CameraCtrl's camera features (official: 1)."),
                io.Int.Input("mask_cache_mb", default=DEFAULTS.mask_cache_mb, min=0, max=1 << 20,
                             tooltip="Memory for the epipolar masks, built once per UNet level and kept during sampling. "
                                     "Levels that do not fit are rebuilt in small blocks at every call (slower, little memory)."),
            ],
            outputs=[
                io.Model.Output("cvd_model", display_name="model", tooltip="The model that samples every video together."),
                io.Latent.Output("latent", tooltip="An empty latent of videos x frames (video by video), for the sampler."),
                Cameras.Output("cameras", tooltip="Every video's cameras, video by video (for MV4D Decode Grid and the 4D fit)."),
            ],
        )

    @classmethod
    def execute(cls, model, cameractrl, cvd, frames, trajectory_1, mask_mode, tau, band_fraction, decay, reference_resolution,
                pairing_seed, matchings, camera_scale, mask_cache_mb, **more_trajectories) -> io.NodeOutput:
        node = APPLY_CVD
        check_numbers(node, locals())
        if CAMERA_KEY in getattr(model, "additional_models", {}):
            raise input_error(node, "model", "this MODEL already has CameraCtrl applied (with one trajectory)",
                              "connect the model straight from MV4D Apply Motion Module: MV4D Apply CVD applies CameraCtrl "
                              "itself, with every video's trajectory")
        if has_cvd(model):
            raise input_error(node, "model", "this MODEL already has CVD applied", "apply CVD once, to the motion model")
        motion = check_camera_control(node, model, cameractrl)
        trajectories = checked_trajectories(node, {"trajectory_1": trajectory_1, **more_trajectories}, frames)
        first = trajectories[0]
        if frames > motion.version.table_length or frames > cameractrl.encoder.table_length:
            limit = min(motion.version.table_length, cameractrl.encoder.table_length)
            raise input_error(node, "frames", f"{frames} frames, but CameraCtrl's pose encoder holds at most "
                              f"{cameractrl.encoder.table_length} and the motion module {motion.version.table_length}",
                              f"use at most {limit} frames")
        check_cvd_fits(node, cvd, motion)
        settings = CVDSettings(mask_mode, tau, band_fraction, decay, reference_resolution, pairing_seed, matchings, camera_scale, mask_cache_mb)
        grid = Grid(len(trajectories), frames)
        cameras = joined_trajectories(trajectories)
        with kernel_errors_as_node_errors(node, {"cameras": "trajectory_1", "reference_size": "reference_resolution"}):
            patched = with_cvd(model, cvd, cameractrl, cameras, grid, settings)
        return io.NodeOutput(patched, grid_latent(grid, first.height, first.width), cameras)


def checked_trajectories(node: str, given: dict, frames: int) -> list:
    """The connected trajectories in order, each with `frames` cameras and one image size."""
    connected = [name for name in TRAJECTORIES if given.get(name) is not None]
    gaps = [name for name in TRAJECTORIES[:len(connected)] if given.get(name) is None]
    if gaps:
        raise input_error(node, gaps[0], f"nothing is connected here, but {connected[-1]} is",
                          "connect the trajectories in order, from trajectory_1 on")
    if len(connected) < 2:
        raise input_error(node, "trajectory_2", "only one trajectory is connected, and CVD makes 2 or more videos agree",
                          "connect a second camera trajectory (trajectory_2), or use MV4D Apply Camera Control for one video")
    trajectories = [given[name] for name in connected]
    lengths = [len(rig) for rig in trajectories]
    if len(set(lengths)) > 1:
        odd = next(index for index, length in enumerate(lengths) if length != lengths[0])
        raise input_error(node, connected[odd], f"the trajectories have different lengths ({', '.join(f'{name}: {length}' for name, length in zip(connected, lengths))} "
                          "cameras); every video needs one camera per frame",
                          f"give every trajectory {frames} cameras (MV4D Orbit Cameras' views, MV4D Load Camera Trajectory's max_frames)")
    if lengths[0] != frames:
        problem = f"{lengths[0]} cameras per trajectory, but frames is {frames}"
        if lengths[0] < frames:
            problem += " (a pose file with fewer poses than MV4D Load Camera Trajectory's max_frames asks, from its start_frame and frame_stride, gives fewer)"
        raise input_error(node, connected[0], problem, f"set frames to {lengths[0]}, or give every trajectory {frames} cameras "
                          "(a longer pose file, a smaller frame_stride, or Orbit Cameras' views)")
    sizes = {(rig.width, rig.height) for rig in trajectories}
    if len(sizes) > 1:
        raise input_error(node, connected[1], f"the trajectories are for different image sizes ({sorted(sizes)})",
                          "give every trajectory the same width and height")
    check_camera_size(node, connected[0], trajectories[0])
    return trajectories


def check_cvd_fits(node: str, cvd, motion) -> None:
    modules = motion.modules_named()
    for name, module in cvd.by_motion_module().items():
        channels = module.epi_transformer.proj_in.in_features
        if name not in modules or modules[name].temporal_transformer.proj_in.in_features != channels:
            found = modules[name].temporal_transformer.proj_in.in_features if name in modules else "none"
            raise input_error(node, "cvd", f"its module after {name} has {channels} channels, the motion module there {found}",
                              "use CVD's modules for SD1.5 with AnimateDiff v3 (CVD.ckpt)")
