"""Conditioning for the multi-view models (MVDream, ImageDream): text CONDITIONING plus, per latent item, its
camera, the grid, and for ImageDream the image prompt and the pixel controller's clean latent (patches/conds.py
carries them to the model). One multi-view set per sampling: a V x 1 grid, or (V + 1) x 1 with ImageDream's
pixel-controller view last."""

from __future__ import annotations

import logging

import comfy.utils
import torch

from ..kernels.cameras import CameraRig, mvdream_cameras, orbit_rig
from ..kernels.grid import Grid
from ..kernels.models.alignment import setting_warnings
from ..kernels.models.multiview import FAMILIES
from .grid_latent import grid_latent
from .node_errors import input_error, kernel_errors_as_node_errors
from .patches.conds import with_mv4d_values
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


def imagedream_conditioning(node: str, model, clip_vision, vae, image: torch.Tensor, positive, negative,
                            cameras: CameraRig, image_prompt_weight: float, pixel_controller: bool):
    """(positive, negative, LATENT) for ImageDream: V views (+ the pixel controller's view, last) of one image.
    Unconditional: a zero image embedding through the resampler and a zero controller latent (official demo)."""
    checked_family(node, model, image_prompt=True)
    check_views(node, cameras, pixel_controller)
    views = len(cameras) + int(pixel_controller)
    grid = Grid(views, 1)
    picture = comfy.utils.common_upscale(image[:1, ..., :3].movedim(-1, 1), cameras.width, cameras.height,
                                         "bilinear", "center").movedim(1, -1)
    hidden = clip_vision.encode_image(picture).penultimate_hidden_states  # ViT-H/14: (1, 257, 1280)
    with kernel_errors_as_node_errors(node):
        embedded = mvdream_cameras(cameras)
    if pixel_controller:
        embedded = torch.cat([embedded, torch.zeros(1, embedded.shape[1])])  # the controller view: zero camera
    common = {"camera": embedded, "grid": grid, "source": node, "image_prompt_weight": float(image_prompt_weight)}
    cond = {**common, "image_prompt": hidden.expand(views, -1, -1).clone()}
    uncond = {**common, "image_prompt": torch.zeros_like(cond["image_prompt"])}
    if pixel_controller:
        clean = model.model.process_latent_in(vae.encode(picture)).to(torch.float32)  # the model's latent space
        control = torch.zeros(views, *clean.shape[1:])
        control[-1] = clean[0]
        cond["control_latent"], uncond["control_latent"] = control, torch.zeros_like(control)
    latent = grid_latent(grid, cameras.height, cameras.width, control_view=pixel_controller)
    return with_mv4d_values(positive, **cond), with_mv4d_values(negative, **uncond), latent
