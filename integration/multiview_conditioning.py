"""Conditioning for the multi-view models (MVDream, ImageDream, 4DM): text CONDITIONING plus, per latent item, its
camera, the grid, and for ImageDream / 4DM the image prompt and the pixel controller's clean latent (patches/conds.py
carries them to the model). A V x F grid (F = 1: one multi-view set), (V + 1) x F with the pixel controller's view
last; ImageDream takes one image for every frame, 4DM one frame of a monocular video per frame."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import comfy.utils
import torch

from ..kernels.cameras import CameraRig, mvdream_cameras, orbit_rig
from ..kernels.grid import Grid
from ..kernels.models.alignment import setting_warnings
from ..kernels.models.fourdm import TRAINED_FRAMES
from ..kernels.models.multiview import FAMILIES
from .fourdm_models import is_4dm
from .grid_latent import grid_latent
from .node_errors import input_error, kernel_errors_as_node_errors
from .patches.conds import PREFIX, with_mv4d_values
from .patches.motion import motion_of
from .patches.multiview import multiview_family


def default_rig(family_id: str, views: int, height: int, width: int) -> CameraRig:
    """The official default cameras: MVDream's t2i orbit (elevation 15, its azimuths 90..360 = ours 0..270) and
    ImageDream's (elevation 5, its azimuth 0 = the input view = ours -90). Radius and field of view are not seen by
    the model (cameras are normalised onto the unit sphere); these match MV4D Orbit Cameras for the 4D fit."""
    elevation, start = (5.0, -90.0) if FAMILIES[family_id].image_prompt else (15.0, 0.0)
    return orbit_rig(views, elevation, 2.0, 33.8, height, width, start)


def checked_family(node: str, model, image_prompt: bool) -> str:
    family = multiview_family(model)
    if family is None:
        raise input_error(node, "model", "this MODEL has no multi-view patches. A core checkpoint loader drops an "
                          "MVDream / ImageDream file's camera MLP (its console says 'unet unexpected: camera_embed...') "
                          "and would sample unrelated Stable Diffusion images",
                          "load the file with MV4D Load Multi-view Model")
    if image_prompt and not FAMILIES[family].image_prompt:
        raise input_error(node, "model", f"{FAMILIES[family].name} takes no image prompt",
                          "load ImageDream (sd-v2.1-base-4view-ipmv.pt), or use MV4D Multi-view Conditioning for MVDream")
    return family


def warn_untrained_setting(node: str, model, grid: Grid, resolution: int) -> list[str]:
    """Alignment adapters apply to any views x frames and size (their layers are per token), but were trained for
    one: say so, in the console, when this sampling differs (a warning, not a refusal: nothing breaks)."""
    from .patches.alignment import alignment_adapters_of

    adapters = alignment_adapters_of(model)
    warnings = [] if adapters is None else setting_warnings(adapters.info, grid.views, grid.frames, resolution)
    for warning in warnings:
        logging.warning("%s: %s", node, warning)
    return warnings


def check_views(node: str, cameras: CameraRig, pixel_controller: bool) -> None:
    if pixel_controller and len(cameras) % 4:
        raise input_error(node, "cameras", f"{len(cameras)} views: ImageDream's pixel controller was trained with "
                          "4 views per input image (its official code asserts a multiple of 4)",
                          "use 4 (or 8) cameras, or turn pixel_controller off")
    if cameras.height % 8 or cameras.width % 8:
        raise input_error(node, "cameras", f"image size {cameras.width}x{cameras.height} is not a multiple of 8",
                          "set the cameras' width and height to multiples of 8 (SD latents are 1/8 size)")


def multiview_conditioning(node: str, model, positive, negative, cameras: CameraRig, frames: int = 1):
    """(positive, negative, LATENT) for MVDream: one V x F grid (F > 1 for a multi-view video, with motion modules
    applied to the model), view v's camera on every frame of row v."""
    checked_family(node, model, image_prompt=False)
    check_views(node, cameras, pixel_controller=False)
    grid = Grid(len(cameras), frames)
    warn_untrained_setting(node, model, grid, max(cameras.height, cameras.width))
    with kernel_errors_as_node_errors(node):
        embedded = grid.per_view(mvdream_cameras(cameras))
    values = {"camera": embedded, "grid": grid, "source": node}
    return (with_mv4d_values(positive, **values), with_mv4d_values(negative, **values),
            grid_latent(grid, cameras.height, cameras.width))


@dataclass
class ImagePrompts:
    """ImageDream's image conditioning of F frames (one for an image, a monocular video's frames for 4DM), as the
    conditioning node made it and the SDS refinement rebuilds it for other cameras and frame windows: per frame its
    CLIP vision hidden states and, with the pixel controller, its clean latent in the model's latent space; the text
    conditioning it goes with; the image-prompt weight."""

    positive: list  # text CONDITIONING (no mv4d keys)
    negative: list
    hidden: torch.Tensor  # (F, tokens, width) CLIP vision penultimate hidden states (ViT-H/14: 257 x 1280)
    control: torch.Tensor | None  # (F, 4, h, w) the pixel controller's clean latents, or None without it
    weight: float
    source: str  # the node that made them (named in errors about the conditioning)

    @property
    def frames(self) -> int:
        return len(self.hidden)

    def conditioning(self, cameras: CameraRig, frames: Sequence[int] | None = None) -> tuple[list, list, Grid]:
        """(positive, negative, grid) for the views `cameras` over `frames` (indices; default all): a V x W grid,
        (V + 1) x W with the pixel controller's view last (zero camera, the frame's clean latent). Unconditional: a
        zero image embedding through the resampler and a zero controller latent (the official demo)."""
        frames = list(range(self.frames)) if frames is None else list(frames)
        pixel_controller = self.control is not None
        grid = Grid(len(cameras) + int(pixel_controller), len(frames))
        with kernel_errors_as_node_errors(self.source):
            embedded = mvdream_cameras(cameras)
        if pixel_controller:
            embedded = torch.cat([embedded, torch.zeros(1, embedded.shape[1])])  # the controller view: zero camera
        prompt = grid.per_frame(self.hidden[frames])
        common = {"camera": grid.per_view(embedded), "grid": grid, "source": self.source, "image_prompt_weight": self.weight}
        cond, uncond = {**common, "image_prompt": prompt}, {**common, "image_prompt": torch.zeros_like(prompt)}
        if pixel_controller:
            control = grid.as_matrix(torch.zeros(grid.cells, *self.control.shape[1:]))
            control[-1] = self.control[frames]
            cond["control_latent"] = grid.as_batch(control)
            uncond["control_latent"] = torch.zeros_like(cond["control_latent"])
        return with_mv4d_values(self.positive, **cond), with_mv4d_values(self.negative, **uncond), grid


def fitted_pictures(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """RGB images (B, H, W, C) resized to height x width, centre-cropped to its aspect."""
    return comfy.utils.common_upscale(images[..., :3].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)


def image_prompts(node: str, model, clip_vision, vae, pictures: torch.Tensor, positive, negative, weight: float,
                  pixel_controller: bool) -> ImagePrompts:
    """The image prompts of F pictures (F, H, W, 3) at the cameras' size."""
    hidden = clip_vision.encode_image(pictures).penultimate_hidden_states.float().cpu()  # ViT-H/14: (F, 257, 1280)
    control = None
    if pixel_controller:
        control = model.model.process_latent_in(vae.encode(pictures)).to("cpu", torch.float32)  # the model's latent space
    return ImagePrompts(positive, negative, hidden, control, float(weight), node)


def prompts_of(node: str, positive, negative) -> tuple[ImagePrompts, Grid]:
    """The image prompts an ImageDream / 4DM conditioning carries, read back from its positive and negative
    CONDITIONING (per frame: the first view's image prompt and the controller view's latent), and the grid it was
    made for (the controller's view included)."""
    found = next((options for _, options in positive if PREFIX + "image_prompt" in options and PREFIX + "grid" in options), None)
    if found is None:
        raise input_error(node, "positive", "this conditioning carries no image prompts of a views x frames grid",
                          "connect the positive and negative outputs of MV4D 4DM Conditioning")
    grid = Grid.of(found[PREFIX + "grid"])
    control = found.get(PREFIX + "control_latent")

    def text_only(conditioning):
        return [[embedding, {key: value for key, value in options.items() if not key.startswith(PREFIX)}] for embedding, options in conditioning]

    prompts = ImagePrompts(text_only(positive), text_only(negative), grid.rows(found[PREFIX + "image_prompt"], 0, 1),
                           None if control is None else grid.rows(control, grid.views - 1, grid.views),
                           float(found.get(PREFIX + "image_prompt_weight", 1.0)), found.get(PREFIX + "source", node))
    return prompts, grid


def imagedream_conditioning(node: str, model, clip_vision, vae, image: torch.Tensor, positive, negative,
                            cameras: CameraRig, image_prompt_weight: float, pixel_controller: bool):
    """(positive, negative, LATENT) for ImageDream: V views (+ the pixel controller's view, last) of one image."""
    checked_family(node, model, image_prompt=True)
    check_views(node, cameras, pixel_controller)
    prompts = image_prompts(node, model, clip_vision, vae, fitted_pictures(image[:1], cameras.height, cameras.width), positive,
                            negative, image_prompt_weight, pixel_controller)
    positive, negative, grid = prompts.conditioning(cameras)
    return positive, negative, grid_latent(grid, cameras.height, cameras.width, control_view=pixel_controller)


def fourdm_rig(views: int, height: int, width: int) -> CameraRig:
    """4DM's default cameras: its official demo's, elevation 0 from MVDream's azimuth 90 (our 0), the input view first."""
    return orbit_rig(views, 0.0, 2.0, 33.8, height, width, 0.0)


def video_frames(node: str, video: torch.Tensor, frames: int, stride: int) -> torch.Tensor:
    """The `frames` frames of a video (IMAGE batch) taken every `stride` frames from the first."""
    needed = (frames - 1) * stride + 1
    if video.ndim != 4 or len(video) < needed:
        have = len(video) if video.ndim == 4 else 0
        raise input_error(node, "video", f"it has {have} frames, but {frames} frames every {stride} need {needed}",
                          "load a longer video (LoadVideo / GetVideoComponents give all its frames), or lower frames or frame_stride")
    return video[0:needed:stride]


def fourdm_conditioning(node: str, model, clip_vision, vae, video: torch.Tensor, positive, negative, cameras: CameraRig,
                        frames: int, stride: int, image_prompt_weight: float):
    """(positive, negative, LATENT, frames used) for 4DM: the views of `cameras` over F frames of a monocular video,
    each frame its own image prompt and pixel-controller latent ((V + 1) x F grid, the controller view last)."""
    if not is_4dm(model):
        raise input_error(node, "model", "this MODEL is not 4DM (ImageDream with 4DM's motion modules)",
                          "connect MV4D Load 4DM's model")
    length = motion_of(model).version.table_length
    if frames > length:
        raise input_error(node, "frames", f"{frames} frames, but 4DM's motion modules hold a position table of {length}",
                          f"use at most {length} frames (4DM was trained on {TRAINED_FRAMES})")
    check_views(node, cameras, pixel_controller=True)
    if frames > TRAINED_FRAMES:
        logging.warning("%s: %d frames: 4DM was trained on %d (its position table holds %d); quality beyond %d is not measured",
                        node, frames, TRAINED_FRAMES, length, TRAINED_FRAMES)
    pictures = fitted_pictures(video_frames(node, video, frames, stride), cameras.height, cameras.width)
    prompts = image_prompts(node, model, clip_vision, vae, pictures, positive, negative, image_prompt_weight, pixel_controller=True)
    positive, negative, grid = prompts.conditioning(cameras)
    return positive, negative, grid_latent(grid, cameras.height, cameras.width, control_view=True), pictures
