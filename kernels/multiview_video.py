"""The V-view x F-frame image matrix every later stage passes around (MV4D_MULTIVIEW_VIDEO).

Rows are videos (one per view), columns are multi-view sets (one per time). Images are float RGB in [0, 1].
Cameras are either one per view (a fixed rig filming over time) or one per (view, frame), view-major.
Frame times are normalised to [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from .cameras import CameraRig
from .errors import InvalidInput
from .grid import Grid


@dataclass(frozen=True, eq=False)
class MultiviewVideo:
    images: torch.Tensor  # (V, F, H, W, 3) float in [0, 1]
    cameras: CameraRig  # V cameras, or V * F cameras view-major (index v * F + f)
    times: torch.Tensor  # (F,) increasing, in [0, 1]

    def __post_init__(self):
        images = self.images
        if not isinstance(images, torch.Tensor) or images.ndim != 5 or images.shape[-1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidInput("images", f"expected views x frames x height x width x 3 RGB, got {shape}",
                               "build the multi-view video from an RGB IMAGE batch")
        views, frames, height, width, _ = images.shape
        if min(views, frames, height, width) == 0:
            raise InvalidInput("images", f"the multi-view video is empty ({views} views x {frames} frames of {width}x{height})",
                               "give at least one view, one frame and a non-empty image")
        if len(self.cameras) not in (views, views * frames):
            raise InvalidInput(
                "cameras", f"{len(self.cameras)} cameras for {views} views x {frames} frames",
                f"give one camera per view ({views}) or one per view and frame ({views * frames}, view-major)",
            )
        times = torch.as_tensor(self.times, dtype=torch.float32).reshape(-1)
        if len(times) != frames:
            raise InvalidInput("times", f"{len(times)} frame times for {frames} frames", "give one time per frame")
        if not torch.isfinite(times).all() or (times < 0).any() or (times > 1).any() or (times[1:] <= times[:-1]).any():
            raise InvalidInput("times", f"frame times must increase within [0, 1], got {times.tolist()}",
                               "use evenly spaced times, e.g. linspace(0, 1, frames)")
        object.__setattr__(self, "times", times)

    @property
    def num_views(self) -> int:
        return self.images.shape[0]

    @property
    def num_frames(self) -> int:
        return self.images.shape[1]

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    @property
    def cameras_move(self) -> bool:
        return len(self.cameras) != self.num_views

    def camera_indices(self, views: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Index into `cameras` of each (view, frame)."""
        return views * self.num_frames + frames if self.cameras_move else views

    def check_has_content(self) -> None:
        """Refuse images that carry nothing to fit (NaN, or every pixel the same colour)."""
        if not all(bool(torch.isfinite(view).all()) for view in self.images):  # a view at a time: no full-size mask
            raise InvalidInput("images", "contain NaN or infinite values", "check the node that produced them")
        if float(self.images.amax() - self.images.amin()) < 1e-6:
            raise InvalidInput("images", f"every pixel has the same value ({float(self.images.flatten()[0]):.3g})",
                               "connect the generated multi-view video, not a blank one")


def even_times(frames: int) -> torch.Tensor:
    """Evenly spaced frame times in [0, 1] (a single frame sits at 0)."""
    return torch.linspace(0.0, 1.0, frames) if frames > 1 else torch.zeros(1)


def from_image_batch(images: torch.Tensor, cameras: CameraRig, frames: int) -> MultiviewVideo:
    """A ComfyUI IMAGE batch of V * F images, view-major (index v * F + f), as a multi-view video."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise InvalidInput("images", f"expected an IMAGE batch (B, H, W, C), got {tuple(images.shape)}", "connect an IMAGE output")
    if frames < 1 or images.shape[0] % frames:
        raise InvalidInput("frames", f"{images.shape[0]} images do not split into rows of {frames} frames",
                           "set frames so that the batch is views x frames, view-major")
    views = images.shape[0] // frames
    if len(cameras) not in (views, views * frames):
        raise InvalidInput("cameras", f"{len(cameras)} cameras but the batch holds {views} views x {frames} frames",
                           f"use a rig of {views} cameras (or {views * frames}), or change frames")
    matrix = Grid(views, frames).as_matrix(images[..., :3]).float().clamp(0, 1)
    return MultiviewVideo(matrix, cameras, even_times(frames))


def to_image_batch(video: MultiviewVideo) -> torch.Tensor:
    """The images as one ComfyUI IMAGE batch, view-major."""
    return Grid(video.num_views, video.num_frames).as_batch(video.images)


def mosaic(images: torch.Tensor, max_width: int = 1024) -> torch.Tensor:
    """(V, F, H, W, 3) -> (F, h, w, 3): every view of a frame side by side in a near-square tiling (unused tiles
    black), scaled down so the mosaic is at most max_width wide. A preview of the whole grid as one video."""
    views, frames, height, width, _ = images.shape
    tiles_across = math.ceil(math.sqrt(views))
    tiles_down = math.ceil(views / tiles_across)
    scale = min(1.0, max_width / (tiles_across * width))
    tile_height, tile_width = max(1, round(height * scale)), max(1, round(width * scale))
    flat = rearrange(images, "v f h w c -> (v f) c h w")
    if (tile_height, tile_width) != (height, width):
        flat = torch.nn.functional.interpolate(flat, size=(tile_height, tile_width), mode="area")
    tiles = rearrange(flat, "(v f) c h w -> v f h w c", v=views)
    padding = tiles.new_zeros(tiles_across * tiles_down - views, *tiles.shape[1:])
    return rearrange(torch.cat([tiles, padding]), "(r k) f h w c -> f (r h) (k w) c", k=tiles_across)
