"""The grid conditioning of the text pair: AnimateDiff on the rows (a prompt: each row is a video at one view) and
MVDream on the columns (a prompt and one camera per view: each column is the multi-view set at one frame).

Diffusion² conditions row v on reference view v and column f on reference frame f through the models' image
inputs. Neither model here takes an image, so the references are cells of the grid that stay fixed while sampling
(the sampler's own inpainting: the LATENT's noise_mask is 0 there): the reference column (MVDream's views at frame
0) gives every row its first frame, the reference row (a video at view 0 whose first frame is the column's view 0)
gives every column its first view; the models see them noised like every other cell and denoise the rest around
them (motion modules across frames, multi-view attention across views).
"""

from __future__ import annotations

import torch

from ..kernels.cameras import CameraRig, mvdream_cameras, sv3d_angles
from ..kernels.grid import Grid
from .composed_guider import GridConditioning
from .composition_roles import ANIMATEDIFF, MVDREAM, PROMPT_GRID_CONDITIONING_NODE, checked_family
from .grid_latent import grid_latent, image_samples
from .node_errors import input_error, kernel_errors_as_node_errors
from .patches.conds import with_mv4d_values
from .patches.motion import motion_of

NODE = PROMPT_GRID_CONDITIONING_NODE
REFERENCE_ROW_NODE = "MV4D Reference Row Latent"
NOISE_MASK = "noise_mask"  # core LATENT key: 1 where the sampler denoises, 0 where it keeps the latent


def check_pair_family(input_name: str, model, family, other_input: str) -> None:
    found = checked_family(NODE, input_name, model, family.layout, other_input)
    if found is not family:
        raise input_error(NODE, input_name, f"this is {found.name}, which {found.conditioning_node} conditions",
                          f"connect {family.name}, or condition {found.name} with {found.conditioning_node}")


def context_width(model) -> int | None:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return None if config is None else config.unet_config.get("context_dim")


def check_prompt(node: str, input_name: str, conditioning, model, loader: str) -> None:
    width = context_width(model)
    for embedding, _ in conditioning:
        if width is not None and embedding.shape[-1] != width:
            raise input_error(node, input_name, f"the prompt is encoded {embedding.shape[-1]} wide but the model reads "
                              f"{width}-wide text", f"encode it with the CLIP of {loader}")


def reference_latents(node: str, input_name: str, latent: dict, count: int, latent_size: tuple[int, int], what: str) -> torch.Tensor:
    samples, _ = image_samples(latent)
    if samples.ndim != 4 or samples.shape[0] != count or tuple(samples.shape[-2:]) != latent_size:
        raise input_error(node, input_name, f"it holds {tuple(samples.shape)} latents but the grid needs {count} "
                          f"{what} of {latent_size[1] * 8}x{latent_size[0] * 8} px (latents {tuple(latent_size)})",
                          f"sample it at the grid's cameras and size ({count} {what})")
    return samples


def prompt_grid_conditioning(video_model, multiview_model, video_positive, video_negative, multiview_positive,
                             multiview_negative, cameras: CameraRig, frames: int, reference_column: dict | None = None,
                             reference_row: dict | None = None) -> tuple[GridConditioning, dict]:
    """(GridConditioning, grid LATENT) of a len(cameras) x frames grid. reference_column: a LATENT of one item per
    camera (MVDream sampled at these cameras), kept as frame 0; reference_row: a LATENT of `frames` items (a video
    at view 0), kept as row 0 (its frame 0 is the column's view 0 when both are given)."""
    check_pair_family("video_model", video_model, ANIMATEDIFF, "multiview_model")
    check_pair_family("multiview_model", multiview_model, MVDREAM, "video_model")
    table = motion_of(video_model).version.table_length
    if frames > table:
        raise input_error(NODE, "frames", f"{frames} frames, but the motion module's position table holds {table}",
                          f"use at most {table} frames")
    if cameras.height % 8 or cameras.width % 8:
        raise input_error(NODE, "cameras", f"image size {cameras.width}x{cameras.height} is not a multiple of 8",
                          "set the cameras' width and height to multiples of 8 (SD latents are 1/8 size)")
    for name, conditioning, model, loader in (("video_positive", video_positive, video_model, "the video model's checkpoint"),
                                              ("video_negative", video_negative, video_model, "the video model's checkpoint"),
                                              ("multiview_positive", multiview_positive, multiview_model, "MV4D Load Multi-view Model"),
                                              ("multiview_negative", multiview_negative, multiview_model, "MV4D Load Multi-view Model")):
        check_prompt(NODE, name, conditioning, model, loader)
    grid = Grid(len(cameras), frames)
    with kernel_errors_as_node_errors(NODE):
        camera_rows = mvdream_cameras(cameras)
        angles = sv3d_angles(cameras, reference_view=0)  # from the reference view, which sits at 360
    # column-major, as the columns role sees the grid: column f holds every view's camera, in view order
    per_cell = {"camera": camera_rows.repeat(frames, 1), "source": NODE}
    conditioning = GridConditioning(
        views=grid.views, frames=frames, latent_height=cameras.height // 8, latent_width=cameras.width // 8,
        azimuths=angles.azimuths_deg, elevations=angles.elevations_deg,
        video_positive=video_positive, video_negative=video_negative,
        multiview_positive=with_mv4d_values(multiview_positive, **per_cell),
        multiview_negative=with_mv4d_values(multiview_negative, **per_cell),
        video_family=ANIMATEDIFF.id, multiview_family=MVDREAM.id, source=NODE)
    return conditioning, with_references(grid, cameras, reference_column, reference_row)


def with_references(grid: Grid, cameras: CameraRig, reference_column: dict | None, reference_row: dict | None) -> dict:
    """The empty grid LATENT with the references in place and a noise mask that keeps them."""
    latent = grid_latent(grid, cameras.height, cameras.width)
    if reference_column is None and reference_row is None:
        return latent
    size = tuple(latent["samples"].shape[-2:])
    matrix = grid.as_matrix(latent["samples"])
    unknown = torch.ones(grid.views, grid.frames, *size)
    if reference_row is not None:
        matrix[0] = reference_latents(NODE, "reference_row", reference_row, grid.frames, size, "frames")
        unknown[0] = 0
    if reference_column is not None:
        matrix[:, 0] = reference_latents(NODE, "reference_column", reference_column, grid.views, size, "views")
        unknown[:, 0] = 0
    return {**latent, NOISE_MASK: grid.as_batch(unknown)}


def reference_row_latent(reference_column: dict, frames: int) -> dict:
    """A video LATENT of `frames` items whose first frame is the reference column's first view, kept while sampling
    (noise_mask 0 there): sampled with the video model, it is the reference row."""
    samples, recorded = image_samples(reference_column)
    if samples.ndim != 4 or len(samples) == 0 or (recorded is not None and recorded.frames != 1):
        raise input_error(REFERENCE_ROW_NODE, "reference_column", f"expected one multi-view set (one latent per view), got "
                          f"{tuple(samples.shape)}" + (f" recorded as a {recorded.views} x {recorded.frames} grid" if recorded else ""),
                          "connect the sampled latent of MV4D Multi-view Conditioning with frames 1")
    video = torch.zeros(frames, *samples.shape[1:], dtype=samples.dtype)
    video[0] = samples[0]
    unknown = torch.ones(frames, *samples.shape[-2:])
    unknown[0] = 0
    return {"samples": video, NOISE_MASK: unknown}
