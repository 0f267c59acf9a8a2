"""Diffusion² stage 1 nodes: SV3D conditioning from our cameras, the grid conditioning of a video model (rows) and
a multi-view model (columns), the composed guider, the rollback Euler sampler, and decoding the latent grid.

The grid contract: a V-view x F-frame latent grid is a LATENT whose batch is view-major (index v * F + f) with
{"views": V, "frames": F} under "mv4d_grid"; decoded, it is a MV4D_MULTIVIEW_VIDEO.
"""

from __future__ import annotations

import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..kernels.grid import Grid
from ..kernels.composition import (COLUMNS, ROLLBACK_STEPS, ROWS, SCHEDULES, CompositionSchedule, GuiderSettings,
                                   ReferenceSettings, check_descending, sample_rollback_euler)
from ..kernels.multiview_video import MultiviewVideo, even_times, mosaic
from ..integration import host
from ..integration.composed_guider import GUIDER, ComposedGuider
from ..integration.composition_roles import (FAMILIES, GRID_CONDITIONING_NODE, PROMPT_GRID_CONDITIONING_NODE, checked_family,
                                             supported_pairs)
from ..integration.grid_conditioning import encode_references, grid_conditioning, official_sv3d_angles, sv3d_conditioning
from ..integration.grid_latent import decode_grid, grid_latent, image_samples
from ..integration.prompt_grid_conditioning import REFERENCE_ROW_NODE, prompt_grid_conditioning, reference_row_latent
from ..integration.node_errors import check_numbers, input_error, kernel_errors_as_node_errors
from .multiview import camera_inputs, rig_for
from .types import Cameras, GridConditioningSocket, MultiviewVideoSocket

SV3D_CONDITIONING = "MV4D SV3D Conditioning"
GRID_CONDITIONING = GRID_CONDITIONING_NODE
PROMPT_GRID_CONDITIONING = PROMPT_GRID_CONDITIONING_NODE
ROLLBACK_EULER = "MV4D Rollback Euler"
DECODE_GRID = "MV4D Decode Grid"
SETTINGS, SCHEDULE, REFERENCE = GuiderSettings(), CompositionSchedule(), ReferenceSettings()  # the official defaults
# The CFG interval's upper end in the node: above SVD/SV3D's sigma_max of 700, so every step is guided by default.
GUIDANCE_SIGMA_MAX = 1000.0


def check_pair(node: str, video_family, multiview_family, grid_conditioning) -> None:
    """The models are the pair the grid conditioning was built for."""
    built_for = (grid_conditioning.video_family, grid_conditioning.multiview_family)
    if (video_family.id, multiview_family.id) != built_for:
        names = {family.id: family.name for family in FAMILIES}
        raise input_error(node, "grid_conditioning", f"it was built by {grid_conditioning.source} for "
                          f"{names.get(built_for[0], built_for[0])} + {names.get(built_for[1], built_for[1])}, but the "
                          f"models are {video_family.name} + {multiview_family.name}",
                          f"condition these models with {video_family.conditioning_node}")


def check_images(node: str, input_name: str, images: torch.Tensor, count: int | None, height: int, width: int) -> None:
    if images.ndim != 4 or images.shape[-1] < 3:
        raise input_error(node, input_name, f"expected an IMAGE batch, got shape {tuple(images.shape)}", "connect an IMAGE output")
    if count is not None and images.shape[0] != count:
        raise input_error(node, input_name, f"{images.shape[0]} images but the cameras have {count} views",
                          f"give one image per camera ({count}), or a rig with {images.shape[0]} cameras")
    if tuple(images.shape[1:3]) != (height, width):
        raise input_error(node, input_name, f"images are {images.shape[2]}x{images.shape[1]} but the cameras are {width}x{height}",
                          f"resize them to {width}x{height} (e.g. ImageScale) or set the cameras' width/height")


def check_latent_size(node: str, height: int, width: int) -> None:
    if height % 8 or width % 8:
        raise input_error(node, "cameras", f"image size {width}x{height} is not a multiple of 8",
                          "set the cameras' width and height to multiples of 8 (SVD/SV3D latents are 1/8 size)")


def sv3d_lists(node: str, cameras) -> tuple[list[float], list[float]]:
    with kernel_errors_as_node_errors(node):
        return official_sv3d_angles(cameras)


class SV3DConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_SV3DConditioning",
            display_name=SV3D_CONDITIONING,
            category="mv4d/composition",
            description="SV3D conditioning from one image and an orbit rig, in the official SV3D convention: azimuths "
                        "measured from the input view, which is the LAST view at 360 degrees (core SV3D_Conditioning "
                        "puts azimuth 0 first). Sample it with any core sampler (CFG 2.5) to get the reference column.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="The SV3D checkpoint's CLIP vision (ImageOnlyCheckpointLoader)."),
                io.Image.Input("init_image", tooltip="The input view; it is resized (centre crop) to the cameras' size."),
                io.Vae.Input("vae", tooltip="The SV3D checkpoint's VAE."),
                Cameras.Input("cameras", tooltip="The orbit, input view last (MV4D Orbit Cameras, order 'sv3d'; 21 views for SV3D)."),
                io.Float.Input("augmentation_level", default=REFERENCE.multiview_augmentation, min=0.0, max=10.0, step=1e-5,
                               tooltip="Noise added to the conditioning image (official SV3D: 1e-5)."),
            ],
            outputs=[
                io.Conditioning.Output("positive", tooltip="Per-view conditioning with elevations and azimuths."),
                io.Conditioning.Output("negative", tooltip="The unconditional counterpart (zero image)."),
                io.Latent.Output("latent", tooltip="An empty latent batch, one item per camera."),
            ],
        )

    @classmethod
    def execute(cls, clip_vision, init_image, vae, cameras, augmentation_level) -> io.NodeOutput:
        check_numbers(SV3D_CONDITIONING, locals())
        check_latent_size(SV3D_CONDITIONING, cameras.height, cameras.width)
        elevations, azimuths = sv3d_lists(SV3D_CONDITIONING, cameras)
        image = comfy.utils.common_upscale(init_image[:1, ..., :3].movedim(-1, 1), cameras.width, cameras.height,
                                           "bilinear", "center").movedim(1, -1)
        embedding, latent = encode_references(clip_vision, vae, image, augmentation_level)
        positive, negative = sv3d_conditioning(embedding, latent, elevations, azimuths, augmentation_level)
        return io.NodeOutput(positive, negative, {"samples": grid_latent(Grid(len(cameras), 1), cameras.height, cameras.width)["samples"]})


class GridConditioningNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_GridConditioning",
            display_name=GRID_CONDITIONING,
            category="mv4d/composition",
            description="Conditioning of a views x frames grid: row v (a video) on reference view v, column f (a "
                        "multi-view set) on reference frame f, as in Diffusion². The reference views come from SV3D "
                        "(or a given multi-view set), the reference frames from SVD (or a given video). Also gives "
                        "the empty grid latent (view-major).",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision of the video model (SVD and SV3D share the same image encoder)."),
                io.Vae.Input("vae", tooltip="The VAE (SVD and SV3D share Stable Diffusion's latent space)."),
                Cameras.Input("cameras", tooltip="One camera per view, input view last (SV3D order)."),
                io.Image.Input("reference_views", tooltip="One image per view (the reference column), in camera order."),
                io.Image.Input("reference_frames", tooltip="One image per frame (the reference row): the video at the input view."),
                io.Int.Input("fps", default=REFERENCE.fps, min=1, max=1024, tooltip="SVD frame-rate conditioning."),
                io.Int.Input("motion_bucket_id", default=REFERENCE.motion_bucket_id, min=1, max=1023, tooltip="SVD motion conditioning (higher: more motion)."),
                io.Float.Input("video_augmentation", default=REFERENCE.video_augmentation, min=0.0, max=10.0, step=0.001,
                               tooltip="Noise added to the video model's reference images (official: 0.02)."),
                io.Float.Input("multiview_augmentation", default=REFERENCE.multiview_augmentation, min=0.0, max=10.0, step=1e-5,
                               tooltip="Noise added to the multi-view model's reference images (official: 1e-5)."),
                io.ClipVision.Input("multiview_clip_vision", optional=True,
                                    tooltip="CLIP vision for the multi-view model, if it should differ from clip_vision."),
            ],
            outputs=[
                GridConditioningSocket.Output("grid_conditioning", tooltip="Per-row and per-column conditioning for MV4D Composed Guider."),
                io.Latent.Output("grid_latent", tooltip="Empty views x frames latent, view-major, for SamplerCustomAdvanced."),
            ],
        )

    @classmethod
    def execute(cls, clip_vision, vae, cameras, reference_views, reference_frames, fps, motion_bucket_id,
                video_augmentation, multiview_augmentation, multiview_clip_vision=None) -> io.NodeOutput:
        node = GRID_CONDITIONING
        check_numbers(node, locals())
        height, width = cameras.height, cameras.width
        check_latent_size(node, height, width)
        check_images(node, "reference_views", reference_views, len(cameras), height, width)
        check_images(node, "reference_frames", reference_frames, None, height, width)
        views, frames = len(cameras), reference_frames.shape[0]
        elevations, azimuths = sv3d_lists(node, cameras)

        view_embeddings, view_latents = encode_references(clip_vision, vae, reference_views, video_augmentation)
        frame_embeddings, frame_latents = encode_references(multiview_clip_vision or clip_vision, vae, reference_frames,
                                                            multiview_augmentation)
        conditioning = grid_conditioning(view_embeddings, view_latents, frame_embeddings, frame_latents, elevations,
                                         azimuths, fps, motion_bucket_id, video_augmentation, multiview_augmentation)
        return io.NodeOutput(conditioning, grid_latent(Grid(views, frames), height, width))


DEFAULT_FRAMES = 16  # AnimateDiff's training length (Vivid-ZOO: 4 views x 16 frames)


class PromptGridConditioningNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_PromptGridConditioning",
            display_name=PROMPT_GRID_CONDITIONING,
            category="mv4d/composition",
            description="Conditioning of a views x frames grid for text -> multi-view video with no training: AnimateDiff "
                        "denoises each row (a video at one view) from its prompt, MVDream each column (the views at one "
                        "frame) from its prompt and one camera per view. Neither model takes an image, so Diffusion²'s "
                        "reference column / row are kept cells: the reference column (MVDream's views) is frame 0 of "
                        "every row, the reference row (a video at view 0) is view 0 of every column; the grid latent's "
                        "noise mask keeps them while the rest is sampled. Also gives the grid latent and the cameras.",
            inputs=[
                io.Model.Input("video_model", tooltip="An SD1.5 model with an AnimateDiff motion module (MV4D Apply Motion Module)."),
                io.Model.Input("multiview_model", tooltip="MVDream from MV4D Load Multi-view Model (no motion module)."),
                io.Conditioning.Input("video_positive", tooltip="The prompt, encoded with the video model's CLIP (CLIPTextEncode)."),
                io.Conditioning.Input("video_negative", tooltip="The negative prompt, with the video model's CLIP."),
                io.Conditioning.Input("multiview_positive", tooltip="The prompt, encoded with MVDream's CLIP."),
                io.Conditioning.Input("multiview_negative", tooltip="The negative prompt, with MVDream's CLIP."),
                *camera_inputs(),
                io.Int.Input("frames", default=DEFAULT_FRAMES, min=1, max=256,
                             tooltip="Frames per view (AnimateDiff: at most its position table, 32; 24 for v1)."),
                io.Latent.Input("reference_column", optional=True,
                                tooltip="MVDream's views at these cameras (KSampler with MV4D Multi-view Conditioning, frames 1): kept as frame 0."),
                io.Latent.Input("reference_row", optional=True,
                                tooltip="A video at view 0 (KSampler with the video model on MV4D Reference Row Latent): kept as row 0."),
            ],
            outputs=[
                GridConditioningSocket.Output("grid_conditioning", tooltip="For MV4D Composed Guider."),
                io.Latent.Output("grid_latent", tooltip="The views x frames latent (view-major) with the references and their noise mask, for SamplerCustomAdvanced."),
                Cameras.Output("cameras_out", display_name="cameras", tooltip="The cameras used (for Decode Grid and the fit)."),
            ],
        )

    @classmethod
    def execute(cls, video_model, multiview_model, video_positive, video_negative, multiview_positive, multiview_negative,
                views, width, height, frames, cameras=None, reference_column=None, reference_row=None) -> io.NodeOutput:
        # without cameras, MVDream's default views (None when it is no MVDream: refused by the conditioning first)
        rig = rig_for(PROMPT_GRID_CONDITIONING, multiview_model, cameras, views, width, height)
        conditioning, latent = prompt_grid_conditioning(video_model, multiview_model, video_positive, video_negative,
                                                        multiview_positive, multiview_negative, rig, frames,
                                                        reference_column, reference_row)
        return io.NodeOutput(conditioning, latent, rig)


class ReferenceRowLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ReferenceRowLatent",
            display_name=REFERENCE_ROW_NODE,
            category="mv4d/composition",
            description="The latent of the reference row for MV4D Prompt Grid Conditioning: a video of `frames` latents "
                        "whose first frame is the first view of the reference column, kept by a noise mask while a core "
                        "KSampler with the video model (AnimateDiff) samples the other frames. So the reference row "
                        "starts where the reference column's view 0 is.",
            inputs=[
                io.Latent.Input("reference_column", tooltip="MVDream's sampled views (KSampler with MV4D Multi-view Conditioning, frames 1)."),
                io.Int.Input("frames", default=DEFAULT_FRAMES, min=1, max=256, tooltip="Frames of the video (the grid's frames)."),
            ],
            outputs=[io.Latent.Output("latent", tooltip="For KSampler with the video model; its output is reference_row.")],
        )

    @classmethod
    def execute(cls, reference_column, frames) -> io.NodeOutput:
        return io.NodeOutput(reference_row_latent(reference_column, frames))


class ComposedGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_ComposedGuider",
            display_name=GUIDER,
            category="mv4d/composition",
            description="Diffusion² score composition as a GUIDER for SamplerCustomAdvanced: each step denoises every "
                        "row of the grid with the video model and every column with the multi-view model (each with "
                        "its own CFG) and mixes their x0 per cell at the sampler's sigma: (1 - s) video + s multi-view, "
                        "s from the schedule. Models of different parameterisations and noise schedules combine when "
                        "they share the latent space and the meaning of sigma (pairs that do not are refused); at a sigma "
                        "one model was not trained on, the other denoises alone. "
                        f"Supported pairs: {supported_pairs()}. Connect the models without CFG patches (the per-frame "
                        "CFG is done here).",
            inputs=[
                io.Model.Input("video_model", tooltip="The rows: SVD / SVD-XT, or an SD1.5 model with an AnimateDiff "
                                                      "motion module (MV4D Apply Motion Module)."),
                io.Model.Input("multiview_model", tooltip="The columns: SV3D_p / SV3D_u, or MVDream (MV4D Load Multi-view Model)."),
                GridConditioningSocket.Input("grid_conditioning", tooltip="From MV4D Grid Conditioning (SVD + SV3D) or "
                                                                          "MV4D Prompt Grid Conditioning (AnimateDiff + MVDream)."),
                io.Float.Input("video_cfg_first", default=SETTINGS.video_cfg[0], min=0.0, max=100.0, step=0.1, tooltip="Video CFG at the first frame (official SVD: 1.5; AnimateDiff: 7.5)."),
                io.Float.Input("video_cfg_last", default=SETTINGS.video_cfg[1], min=0.0, max=100.0, step=0.1, tooltip="Video CFG at the last frame, linear in between (official: 3.0)."),
                io.Float.Input("multiview_cfg_first", default=SETTINGS.multiview_cfg[0], min=0.0, max=100.0, step=0.1, tooltip="Multi-view CFG at the first view (official SV3D: 2.5 flat; MVDream: 7.5)."),
                io.Float.Input("multiview_cfg_last", default=SETTINGS.multiview_cfg[1], min=0.0, max=100.0, step=0.1, tooltip="Multi-view CFG at the last view, linear in between."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default=SCHEDULE.kind,
                               tooltip="Multi-view weight s over the steps. constant: s = multiview_weight (official code). "
                                       "linear: weight_start -> weight_end. logistic: weight_start -> weight_end along "
                                       "1 - 1/(1 + exp(-k (x - center))) (paper: k 20, center 0.5)."),
                io.Float.Input("multiview_weight", default=SCHEDULE.weight, min=0.0, max=1.0, step=0.01, tooltip="s of the constant schedule (official: 0.6)."),
                io.Float.Input("weight_start", default=SCHEDULE.start, min=0.0, max=1.0, step=0.01, tooltip="s at the noisiest step (linear, logistic)."),
                io.Float.Input("weight_end", default=SCHEDULE.end, min=0.0, max=1.0, step=0.01, tooltip="s at the last step (linear, logistic)."),
                io.Float.Input("logistic_k", default=SCHEDULE.logistic_k, min=0.0, max=200.0, step=0.5, tooltip="Steepness k of the logistic schedule (official code 15, paper 20)."),
                io.Float.Input("logistic_center", default=SCHEDULE.logistic_center, min=0.0, max=1.0, step=0.01, tooltip="Centre s0 of the logistic schedule, as a fraction of the steps."),
                io.Boolean.Input("per_view_weights", default=SCHEDULE.per_view,
                                 tooltip="Official per-view modulation: side views lean on the multi-view model, front/back views keep the schedule."),
                io.Int.Input("videos_per_call", default=SETTINGS.videos_per_call, min=0, max=4096, tooltip="Rows per video-model call; 0 = as many as fit in free memory."),
                io.Int.Input("multiview_sets_per_call", default=SETTINGS.multiview_sets_per_call, min=0, max=4096, tooltip="Columns per multi-view-model call; 0 = as many as fit."),
                io.Float.Input("guidance_sigma_min", default=SETTINGS.guidance_sigmas[0], min=0.0, max=1000.0, step=0.001,
                               tooltip="Optional speed-up, off by default: CFG only while sigma is between guidance_sigma_min "
                                       "and guidance_sigma_max; other steps skip the unconditional pass (half their UNet "
                                       "work). It changes the result; its effect on real-model quality is not measured."),
                io.Float.Input("guidance_sigma_max", default=GUIDANCE_SIGMA_MAX, min=0.0, max=GUIDANCE_SIGMA_MAX, step=0.001,
                               tooltip="Upper end of the CFG interval (1000: above SVD/SV3D's 700, i.e. every step is guided)."),
                io.Boolean.Input("alternate_models", default=SETTINGS.alternate_models, optional=True,
                                 tooltip="Optional speed-up, off by default: each evaluation runs only one of the two models "
                                         "(video, then multi-view, in turn) and reuses the other's prediction from the "
                                         "evaluation before: about half the UNet work. It changes the result; its effect "
                                         "on real-model quality is not measured."),
            ],
            outputs=[io.Guider.Output("guider", tooltip="For SamplerCustomAdvanced, with the grid latent of MV4D Grid Conditioning.")],
        )

    @classmethod
    def execute(cls, video_model, multiview_model, grid_conditioning, video_cfg_first, video_cfg_last,
                multiview_cfg_first, multiview_cfg_last, schedule, multiview_weight, weight_start, weight_end,
                logistic_k, logistic_center, per_view_weights, videos_per_call, multiview_sets_per_call,
                guidance_sigma_min=0.0, guidance_sigma_max=GUIDANCE_SIGMA_MAX, alternate_models=False) -> io.NodeOutput:
        check_numbers(GUIDER, locals())
        if guidance_sigma_min > guidance_sigma_max:
            raise input_error(GUIDER, "guidance_sigma_min", f"{guidance_sigma_min} is above guidance_sigma_max {guidance_sigma_max}",
                              "set guidance_sigma_min <= guidance_sigma_max (or 0 and 1000 to guide every step)")
        video_family = checked_family(GUIDER, "video_model", video_model, ROWS, "multiview_model")
        multiview_family = checked_family(GUIDER, "multiview_model", multiview_model, COLUMNS, "video_model")
        check_pair(GUIDER, video_family, multiview_family, grid_conditioning)
        for name, model in (("video_model", video_model), ("multiview_model", multiview_model)):
            if "sampler_cfg_function" in model.model_options:
                raise input_error(GUIDER, name, "the model carries a CFG patch (e.g. VideoLinearCFGGuidance)",
                                  "connect the model straight from its loader: this guider applies per-frame CFG itself")
        with kernel_errors_as_node_errors(GUIDER, {"weight": "multiview_weight", "start": "weight_start", "end": "weight_end"}):
            composition = CompositionSchedule(schedule, multiview_weight, weight_start, weight_end, logistic_k,
                                              logistic_center, per_view_weights)
        settings = GuiderSettings(composition, (video_cfg_first, video_cfg_last), (multiview_cfg_first, multiview_cfg_last),
                                  videos_per_call, multiview_sets_per_call, (guidance_sigma_min, guidance_sigma_max),
                                  alternate_models)
        with kernel_errors_as_node_errors(GUIDER):
            guider = ComposedGuider(video_model, multiview_model, grid_conditioning, settings)
        return io.NodeOutput(guider, ui=ui.PreviewText(guider.summary()))


def rollback_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, rollback_steps=10):
    with kernel_errors_as_node_errors(f"SamplerCustomAdvanced with {ROLLBACK_EULER}"):
        check_descending(sigmas)
    return sample_rollback_euler(model, x, sigmas, extra_args, callback, disable, rollback_steps)


class RollbackEuler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_RollbackEuler",
            display_name=ROLLBACK_EULER,
            category="mv4d/composition",
            description="EDM Euler with Diffusion²'s rollback: on the first steps, after each Euler step the latent is "
                        "re-noised by the step size and the step is taken again (official: 10 of 50 steps, 60 "
                        "evaluations). Works with any scheduler's sigmas (official: Karras 700 -> 0.002, rho 7).",
            inputs=[io.Int.Input("rollback_steps", default=ROLLBACK_STEPS, min=0, max=10000, tooltip="Steps that are taken twice (0 = plain Euler).")],
            outputs=[io.Sampler.Output("sampler", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, rollback_steps) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(rollback_euler, extra_options={"rollback_steps": rollback_steps}))


class DecodeGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_DecodeGrid",
            display_name=DECODE_GRID,
            category="mv4d/composition",
            description="Decodes a views x frames latent grid into a multi-view video. Each row is decoded as a video "
                        "(SVD's temporal decoder mixes frames of one view only), a chunk of frames at a time. Shows "
                        "an animated mosaic of all views.",
            is_output_node=True,
            inputs=[
                io.Vae.Input("vae", tooltip="SVD's VAE (temporal decoder) or any SD-latent VAE."),
                io.Latent.Input("grid_latent", tooltip="The sampled grid, view-major (SamplerCustomAdvanced output)."),
                Cameras.Input("cameras", tooltip="The grid's cameras: one per view, or one per view and frame (view-major, cameras that move)."),
                io.Int.Input("frames_per_decode", default=0, min=0, max=4096,
                             tooltip="Frames decoded together (temporal decoder); 0 = a whole row. Lower it if VRAM runs out."),
                io.Float.Input("preview_fps", default=8.0, min=1.0, max=60.0, step=1.0, tooltip="Frame rate of the animated preview."),
            ],
            outputs=[
                MultiviewVideoSocket.Output("multiview_video", tooltip="The decoded views x frames with their cameras."),
                io.Image.Output("mosaic", tooltip="One image per frame with every view tiled (for core video/image nodes)."),
            ],
        )

    @classmethod
    def execute(cls, vae, grid_latent, cameras, frames_per_decode, preview_fps) -> io.NodeOutput:
        node = DECODE_GRID
        check_numbers(node, locals())
        samples, recorded = image_samples(grid_latent)
        if recorded is not None and recorded.frames > 1 and len(cameras) == recorded.cells:
            views = recorded.views  # cameras that move: one per view and frame, view-major (MV4D Apply CVD's)
        else:
            views = len(cameras)
        if samples.ndim != 4 or samples.shape[0] % views:
            raise input_error(node, "grid_latent", f"a latent batch of {samples.shape[0]} does not split into {views} views",
                              "connect the grid sampled from MV4D Grid Conditioning's latent with the same cameras")
        grid = Grid(views, samples.shape[0] // views)
        if recorded is not None and recorded != grid:
            raise input_error(node, "grid_latent", f"the latent is a {recorded.views} x {recorded.frames} grid "
                              f"but the cameras have {views} views", "connect the cameras the grid was conditioned on")
        images = decode_grid(vae, samples, grid, frames_per_decode, host.progress())
        if tuple(images.shape[2:4]) != (cameras.height, cameras.width):
            raise input_error(node, "cameras", f"the decoded images are {images.shape[3]}x{images.shape[2]} but the "
                              f"cameras are {cameras.width}x{cameras.height}", "use the cameras the grid was conditioned on")
        with kernel_errors_as_node_errors(node):
            video = MultiviewVideo(images.cpu(), cameras, even_times(grid.frames))
        tiles = mosaic(video.images)
        preview = ui.ImageSaveHelper.save_animated_webp(tiles, "mv4d_grid", io.FolderType.temp, cls, preview_fps, False, 85, 4)
        return io.NodeOutput(video, tiles, ui=ui.SavedImages([preview], is_animated=len(tiles) > 1))

