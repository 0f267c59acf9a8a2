"""4D Gaussian nodes: fit to a multi-view video, render, save and load. Where the host has ComfyUI's core SPLAT
type (0.29+), the 4D result is also given as a per-frame SPLAT batch for core splat nodes."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..kernels.splats.export import export_scene
from ..kernels.splats.fit import FitSettings, fit_dynamic_gaussians, fit_size
from ..kernels.splats.losses import load_lpips
from ..kernels.errors import InvalidInput
from ..kernels.files import files_under
from ..kernels.splats.model import MotionConfig, Splats4D, frames_at_times
from ..kernels.splats.splatv import read_splatv
from ..kernels.splats.storage import SUFFIX, load_splats4d
from ..kernels.splats.views import grid_request, render_images, turntable
from ..integration import host
from ..integration.node_errors import check_numbers, input_error, kernel_errors_as_node_errors, output_error
from .types import Cameras, MultiviewVideoSocket, Splats4DSocket

FIT = "MV4D Fit 4D Gaussians"
RENDER = "MV4D Render 4D"
SAVE = "MV4D Save 4D"
LOAD = "MV4D Load 4D"
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
LOSSES = {"L1 + D-SSIM": False, "confidence-weighted D-SSIM (Diffusion²)": True}
FIT_DEFAULTS, MOTION_DEFAULTS = FitSettings(), MotionConfig()
CORE_SPLAT = getattr(io, "Splat", None)  # ComfyUI 0.29+: core gaussian-splat type and nodes


def splat_outputs() -> list:
    if CORE_SPLAT is None:
        return []
    return [CORE_SPLAT.Output("splat_frames", tooltip="The scene at each frame time as a core SPLAT batch (core splat nodes). "
                                                      "Built when a node first reads it.")]


SPLAT_FRAMES_FIX = ("connect MV4D Render 4D or MV4D Save 4D instead, which work one frame at a time, or fit the scene "
                    "to fewer frames")


@functools.cache
def lazy_splat_frames_class():
    from comfy_api.latest import Types

    class LazySplatFrames(Types.SPLAT):
        """The scene at each of its frame times as a core SPLAT batch, built when a node first reads one of its
        fields: a ComfyUI node computes every output whether or not it is connected, and a file with thousands
        of frame times would otherwise cost gigabytes on loading. Building checks free memory first."""

        def __init__(self, *fields, scene: Splats4D | None = None, node: str = "", **named):
            self.scene, self.node, self._fields = scene, node, None
            if scene is None:  # made as a plain SPLAT from tensors, as type(splat)(positions, ...) does
                super().__init__(*fields, **named)
            else:
                self.counts = None

        def _field(self, name: str) -> torch.Tensor:
            if name not in (self._fields or {}):
                try:
                    built = frames_at_times(self.scene.gaussians, self.scene.frame_times, SPLAT_FRAMES_FIX)
                except InvalidInput as error:
                    raise output_error(self.node, "splat_frames", error.problem, error.fix) from error
                self._fields = {**built, **(self._fields or {})}  # a field set before it was read stays as set
            return self._fields[name]

        def _set(self, name: str, value: torch.Tensor) -> None:
            self._fields = {**(self._fields or {}), name: value}

    for name in ("positions", "scales", "rotations", "opacities", "sh"):
        setattr(LazySplatFrames, name, property(lambda self, name=name: self._field(name),
                                                lambda self, value, name=name: self._set(name, value)))
    return LazySplatFrames


def with_splats(node: str, scene: Splats4D) -> list:
    outputs = [scene]
    if CORE_SPLAT is not None:
        outputs.append(lazy_splat_frames_class()(scene=scene, node=node))
    return outputs


def lpips_weights() -> tuple[Path, Path] | None:
    """The user's LPIPS files in ComfyUI/models/lpips: a VGG16 backbone (vgg16*.pth/.safetensors) and LPIPS' v0.1
    heads (vgg.pth or lpips*vgg*)."""
    host.register_model_folders()
    names = folder_paths.get_filename_list(host.LPIPS_FOLDER)
    backbone = next((name for name in names if os.path.basename(name).startswith("vgg16")), None)
    heads = next((name for name in names if os.path.basename(name) == "vgg.pth" or "lpips" in os.path.basename(name).lower()), None)
    if backbone is None or heads is None:
        return None
    return Path(folder_paths.get_full_path(host.LPIPS_FOLDER, backbone)), Path(folder_paths.get_full_path(host.LPIPS_FOLDER, heads))


class Fit4DGaussians(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_Fit4DGaussians",
            display_name=FIT,
            category="mv4d/4d gaussians",
            description=(
                "Fits dynamic 3D Gaussians (each with its own trajectory: polynomial + Fourier position, rotating, "
                "fading in and out) to a multi-view video with known cameras (Diffusion² stage 2). Uses gsplat on a "
                "CUDA GPU, a slow pure-PyTorch rasteriser otherwise. Cancel stops it at the next step."
            ),
            inputs=[
                MultiviewVideoSocket.Input("multiview_video", tooltip="Views x frames images with their cameras."),
                io.Int.Input("iterations", default=FIT_DEFAULTS.iterations, min=1, max=200000, tooltip="Optimisation steps (Diffusion²: 5000)."),
                io.Int.Input("resolution", default=FIT_DEFAULTS.resolution, min=0, max=4096, tooltip="Long side of the images the fit compares against (0 = their own size)."),
                io.Int.Input("views_per_step", default=FIT_DEFAULTS.views_per_step, min=1, max=64, tooltip="Views of one frame rendered per step: more views per step fit a little better per iteration and take longer (bench/RESULTS.md has figures)."),
                io.Int.Input("initial_gaussians", default=FIT_DEFAULTS.initial_gaussians, min=1, max=2_000_000, tooltip="Gaussians to start from."),
                io.Int.Input("max_gaussians", default=FIT_DEFAULTS.max_gaussians, min=1, max=20_000_000, tooltip="Densification stops adding past this count (VRAM bound)."),
                io.Boolean.Input("densify", default=FIT_DEFAULTS.densify, tooltip="Split, clone and prune Gaussians during the fit (3DGS adaptive density control)."),
                io.Float.Input("densify_until", default=FIT_DEFAULTS.densify_stop, min=0.0, max=1.0, step=0.05, tooltip="Fraction of the iterations after which densification stops."),
                io.Float.Input("grow_threshold", default=FIT_DEFAULTS.grow_grad2d, min=0.0, max=0.01, step=0.00005, tooltip="Image-space gradient above which a Gaussian is split or cloned."),
                io.Int.Input("position_degree", default=MOTION_DEFAULTS.position_degree, min=0, max=6, tooltip="Polynomial degree of each trajectory (0 = none)."),
                io.Int.Input("fourier_terms", default=MOTION_DEFAULTS.fourier_terms, min=0, max=8, tooltip="Sine/cosine pairs added to each trajectory (.splatv export then approximates)."),
                io.Int.Input("rotation_degree", default=MOTION_DEFAULTS.rotation_degree, min=0, max=3, tooltip="Polynomial degree of each Gaussian's rotation over time."),
                io.Boolean.Input("temporal_opacity", default=MOTION_DEFAULTS.temporal_opacity, tooltip="Let each Gaussian fade in and out around its own time."),
                io.Int.Input("sh_degree", default=MOTION_DEFAULTS.sh_degree, min=0, max=3, tooltip="Spherical-harmonics degree of the colours (0 = view-independent)."),
                io.Combo.Input("loss", options=list(LOSSES), default="L1 + D-SSIM", tooltip="Photometric loss; Diffusion² weights D-SSIM (and LPIPS) by per-image confidence."),
                io.Float.Input("lpips_weight", default=FIT_DEFAULTS.lpips_weight, min=0.0, max=10.0, step=0.05, tooltip="Weight of LPIPS; needs vgg16 and LPIPS vgg.pth in ComfyUI/models/lpips."),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="white", tooltip="Colour behind the Gaussians; match the images' background (SV3D: white)."),
                io.Int.Input("fit_seed", default=FIT_DEFAULTS.seed, min=0, max=2**31 - 1, tooltip="Seed of initialisation and view sampling."),
            ],
            outputs=[Splats4DSocket.Output("splats_4d", tooltip="The fitted 4D Gaussians."), *splat_outputs()],
        )

    @classmethod
    def execute(cls, multiview_video, iterations, resolution, views_per_step, initial_gaussians, max_gaussians, densify,
                densify_until, grow_threshold, position_degree, fourier_terms, rotation_degree, temporal_opacity, sh_degree,
                loss, lpips_weight, background, fit_seed) -> io.NodeOutput:
        check_numbers(FIT, locals())
        lpips = None
        if lpips_weight > 0:
            files = lpips_weights()
            if files is None:
                raise input_error(FIT, "lpips_weight", "LPIPS needs weights that no package ships",
                                  "put torchvision's vgg16-397923af.pth and LPIPS' v0.1 vgg.pth into ComfyUI/models/lpips, or set lpips_weight to 0")
            with kernel_errors_as_node_errors(FIT, {"lpips": "lpips_weight"}):
                lpips = load_lpips(*files)
        with kernel_errors_as_node_errors(FIT, {"images": "multiview_video", "cameras": "multiview_video", "densify_stop": "densify_until",
                                                "gaussians": "initial_gaussians/max_gaussians/resolution"}):
            settings = FitSettings(
                iterations=iterations, resolution=resolution, views_per_step=views_per_step,
                initial_gaussians=initial_gaussians, max_gaussians=max(max_gaussians, initial_gaussians), densify=densify,
                densify_stop=densify_until, densify_start=min(0.05, densify_until), grow_grad2d=grow_threshold,
                confidence_weighting=LOSSES[loss], lpips_weight=lpips_weight, background=BACKGROUNDS[background], seed=fit_seed,
                motion=MotionConfig(position_degree, fourier_terms, rotation_degree, temporal_opacity, sh_degree),
            )
            device = host.compute_device()
            height, width = fit_size(multiview_video, resolution)
            host.make_room(device, multiview_video.num_views * multiview_video.num_frames * height * width * 3 + max_gaussians * 1024)
            result = fit_dynamic_gaussians(multiview_video, settings, device, host.progress(every=10), lpips)
        gaussians = result.gaussians.to("cpu")  # cached outputs stay in RAM, not VRAM
        scene = Splats4D(gaussians, multiview_video.times.clone(), multiview_video.cameras)
        return io.NodeOutput(*with_splats(FIT, scene))


class Render4D(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_Render4D",
            display_name=RENDER,
            category="mv4d/4d gaussians",
            description=(
                "Renders 4D Gaussians to an IMAGE batch with an animated preview: a turntable (the camera circles "
                "while time runs), or given cameras at evenly spaced times (view-major: every frame of camera 0, then camera 1, ...)."
            ),
            is_output_node=True,  # its animated preview is an output of its own
            inputs=[
                Splats4DSocket.Input("splats_4d", tooltip="4D Gaussians from MV4D Fit 4D Gaussians or MV4D Load 4D."),
                io.Combo.Input("mode", options=["turntable", "cameras x frames"], default="turntable",
                               tooltip="turntable: one orbiting camera; cameras x frames: each camera at each time."),
                io.Int.Input("frames", default=25, min=0, max=1000, tooltip="Images (turntable) or times per camera; 0 = the scene's own frame times."),
                io.Int.Input("width", default=576, min=8, max=4096, step=8, tooltip="Turntable image width."),
                io.Int.Input("height", default=576, min=8, max=4096, step=8, tooltip="Turntable image height."),
                io.Float.Input("elevation", default=10.0, min=-89.9, max=89.9, step=0.1, tooltip="Turntable elevation in degrees."),
                io.Float.Input("radius", default=2.0, min=0.01, max=1000.0, step=0.01, tooltip="Turntable distance from the scene centre."),
                io.Float.Input("fov", default=33.8, min=1.0, max=179.0, step=0.1, tooltip="Turntable vertical field of view."),
                io.Float.Input("turns", default=1.0, min=0.0, max=10.0, step=0.25, tooltip="Turntable orbits over the clip."),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="white", tooltip="Background colour."),
                io.Float.Input("fps", default=12.0, min=1.0, max=60.0, step=1.0, tooltip="Frame rate of the animated preview."),
                Cameras.Input("cameras", optional=True, tooltip="cameras x frames: the cameras to render from (default: the scene's own)."),
            ],
            outputs=[io.Image.Output("images", tooltip="The rendered images.")],
        )

    @classmethod
    def execute(cls, splats_4d, mode, frames, width, height, elevation, radius, fov, turns, background, fps, cameras=None) -> io.NodeOutput:
        check_numbers(RENDER, locals())
        with kernel_errors_as_node_errors(RENDER, {"images": "frames/width/height"}):
            if mode == "turntable":
                rig, times = turntable(splats_4d, frames or len(splats_4d.frame_times), elevation, radius, fov, height, width, turns)
            else:
                rig = cameras if cameras is not None else splats_4d.cameras
                if rig is None:
                    raise input_error(RENDER, "cameras", "this scene has no cameras of its own", "connect cameras or use mode = turntable")
                times = splats_4d.frame_times if frames == 0 else torch.linspace(0, 1, frames)
                rig, times = grid_request(rig, times)
            device = host.compute_device()
            images = render_images(splats_4d.gaussians.to(device), rig, times, torch.tensor(BACKGROUNDS[background]),
                                   on_image=host.progress())
        preview = ui.ImageSaveHelper.save_animated_webp(images, "mv4d_render", io.FolderType.temp, cls, fps, False, 85, 4)
        return io.NodeOutput(images, ui=ui.SavedImages([preview], is_animated=len(images) > 1))


class Save4D(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_Save4D",
            display_name=SAVE,
            category="mv4d/4d gaussians",
            description=(
                "Saves 4D Gaussians under ComfyUI's output folder: the lossless .mv4d.safetensors (MV4D Load 4D), a "
                ".splatv for 4D web players (splaTV), one INRIA .ply per frame, and optionally a static .ply of one time. "
                "The files appear together once all are written, or none of them (an error or Cancel leaves nothing behind)."
            ),
            is_output_node=True,
            inputs=[
                Splats4DSocket.Input("splats_4d", tooltip="The 4D Gaussians to save."),
                io.String.Input("filename_prefix", default="mv4d/scene", tooltip="Name, optionally with subfolders, under the output folder."),
                io.Boolean.Input("splatv", default=True, tooltip="Write a .splatv (4D web player)."),
                io.Boolean.Input("ply_sequence", default=True, tooltip="Write one .ply per frame time (any splat viewer)."),
                io.Boolean.Input("static_ply", default=False, tooltip="Also write a single .ply of the scene at static_time."),
                io.Float.Input("static_time", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="Time of the static .ply (0 = first frame, 1 = last)."),
            ],
            outputs=[],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix):  # only the prefix: checked before the prompt runs, not when it saves
        try:
            with kernel_errors_as_node_errors(SAVE):
                host.check_prefix(filename_prefix)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, splats_4d, filename_prefix, splatv, ply_sequence, static_ply, static_time) -> io.NodeOutput:
        check_numbers(SAVE, locals())
        with kernel_errors_as_node_errors(SAVE):
            base = host.output_base(filename_prefix)
            saved = export_scene(splats_4d, base, splatv, ply_sequence, static_time if static_ply else None, host.progress())
        results = [host.ui_entry(path) for path in saved.paths]
        summary = f"{len(saved.paths)} files, {splats_4d.gaussians.count} Gaussians"
        if saved.splatv_motion_error:
            summary += f"; .splatv motion fit error {saved.splatv_motion_error:.2g} scene units"
        return io.NodeOutput(ui={"files": results, "text": [summary]})


LOAD_ROOTS = {"output": folder_paths.get_output_directory, "input": folder_paths.get_input_directory}


def loadable_files() -> list[str]:
    """Our 4D files (.mv4d.safetensors, .splatv) anywhere under the output and input folders, as 'path [folder]'."""
    return sorted(f"{relative} [{kind}]" for kind, root in LOAD_ROOTS.items() for relative in files_under(root(), (SUFFIX, ".splatv")))


def resolve_loadable(choice: str) -> Path:
    if not isinstance(choice, str) or not choice:
        return host.existing_file("", choice, LOAD, "file", "the output or input folder", "a .mv4d.safetensors or .splatv file")
    name, _, kind = choice.rpartition(" [")
    kind = kind.rstrip("]")
    if kind not in LOAD_ROOTS:
        raise input_error(LOAD, "file", f"{choice!r} is not a listed file", "pick a file from the list (refresh with R)")
    return host.existing_file(LOAD_ROOTS[kind](), name, LOAD, "file", f"the {kind} folder", "a .mv4d.safetensors or .splatv file")


class Load4D(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_Load4D",
            display_name=LOAD,
            category="mv4d/4d gaussians",
            description="Loads 4D Gaussians saved by MV4D Save 4D (.mv4d.safetensors, exact) or any .splatv (cubic motion, "
                        "half precision, no view-dependent colour), from the output or input folder.",
            inputs=[io.Combo.Input("file", options=loadable_files(), tooltip="A .mv4d.safetensors or .splatv file.")],
            outputs=[Splats4DSocket.Output("splats_4d", tooltip="The 4D Gaussians."), *splat_outputs()],
        )

    @classmethod
    def validate_inputs(cls, file):
        try:
            resolve_loadable(file)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, file):
        try:
            return host.fingerprint(resolve_loadable(file))
        except ValueError:
            return file

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        path = resolve_loadable(file)
        with kernel_errors_as_node_errors(LOAD):
            if path.name.endswith(SUFFIX):
                scene = load_splats4d(path)
            else:
                gaussians, _ = read_splatv(path)
                scene = Splats4D(gaussians, torch.linspace(0, 1, 25), None)
        return io.NodeOutput(*with_splats(LOAD, scene))
