"""Training data for the alignment adapters: multi-view video clips with cameras and captions, on disk.

A training set is a folder of clip files, `*.mv4d_clip.safetensors`, one clip each (any names, subfolders are not
read): tensors `images` (V, F, H, W, 3) uint8 (RGB), `world_to_camera` (V, 4, 4) and `intrinsics` (V, 3, 3) float64
(OpenCV, pixels, as kernels/cameras.py), `times` (F,) in [0, 1]; metadata `format` "mv4d.clip", `caption`. All
clips of a set should share V, F and the image size (the trainer batches them).

`demo_clips` makes such a set without any dataset: the synthetic animated scene of kernels/synthetic_scene.py seen
from orbits at random azimuths and elevations over random windows of its animation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cameras import CameraRig, orbit_rig
from .errors import InvalidInput, file_error
from .files import atomic_file, files_in_folder
from .memory import check_memory
from .multiview_video import MultiviewVideo
from .synthetic_scene import render_scene

FORMAT = "mv4d.clip"
SUFFIX = ".mv4d_clip.safetensors"
LOAD_FIX = "use clip files written by MV4D Make Demo Training Set or kernels.training_data.write_clip"
DEMO_CAPTION = "a checkered ball and a striped ellipsoid moving on a ringed plinth, white background"


@dataclass(frozen=True)
class Clip:
    video: MultiviewVideo
    caption: str


def write_clip(path: str | Path, clip: Clip) -> None:
    video = clip.video
    if len(video.cameras) != video.num_views:
        raise InvalidInput("cameras", "a training clip needs one fixed camera per view", "use a rig of one camera per view")
    tensors = {"images": (video.images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous(),
               "world_to_camera": video.cameras.world_to_camera.contiguous(), "intrinsics": video.cameras.intrinsics.contiguous(),
               "times": video.times.float().contiguous()}
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": FORMAT, "caption": clip.caption})


def read_clip(path: str | Path) -> Clip:
    """A clip file back; anything else is refused naming the file and what is wrong."""
    try:
        check_memory("dataset", 6 * Path(path).stat().st_size, f"reading {Path(path).name}", LOAD_FIX)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except InvalidInput:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise file_error(path, f"is not a readable .safetensors file ({type(error).__name__}: {str(error)[:120]})", LOAD_FIX, "dataset") from None
    if metadata.get("format") != FORMAT:
        raise file_error(path, f"is not an mv4d training clip (format {metadata.get('format')!r:.40})", LOAD_FIX, "dataset")
    for key, kind, ndim in (("images", torch.uint8, 5), ("world_to_camera", torch.float64, 3), ("intrinsics", torch.float64, 3),
                            ("times", torch.float32, 1)):
        value = tensors.get(key)
        if value is None or value.dtype != kind or value.ndim != ndim:
            raise file_error(path, f"tensor {key!r} is missing or not {ndim}-D {str(kind).replace('torch.', '')}", LOAD_FIX, "dataset")
    images = tensors["images"]
    try:
        cameras = CameraRig(tensors["world_to_camera"], tensors["intrinsics"], images.shape[2], images.shape[3])
        video = MultiviewVideo(images.float() / 255, cameras, tensors["times"])
    except InvalidInput as error:
        raise file_error(path, f"{error.argument}: {error.problem}", LOAD_FIX, "dataset") from None
    return Clip(video, metadata.get("caption", ""))


def read_training_set(root: str | Path, folder: str | Path) -> list[Clip]:
    """Every clip of a training-set folder (inside root), which must agree on views, frames and size."""
    paths = sorted(files_in_folder(root, folder, (SUFFIX,)))
    if not paths:
        raise InvalidInput("dataset", f"the folder {str(folder)!r} holds no *{SUFFIX} clip files",
                           "make one with MV4D Make Demo Training Set, or write your clips in the documented layout (README)")
    clips = [read_clip(path) for path in paths]
    shapes = {tuple(clip.video.images.shape[:4]) for clip in clips}
    if len(shapes) > 1:
        raise InvalidInput("dataset", f"its clips differ in views x frames x height x width: {sorted(shapes)}",
                           "give every clip of a set the same views, frames and image size")
    return clips


def demo_clips(count: int, views: int, frames: int, size: int, seed: int = 0, elevation_range=(0.0, 30.0),
               radius: float = 2.0, fov: float = 33.8, on_image=None) -> list[Clip]:
    """`count` clips of the synthetic scene: each an orbit of `views` cameras starting at a random azimuth and
    elevation, over a random window of the animation (forwards or backwards), rendered at size x size."""
    if min(count, views, frames, size) < 1:
        raise InvalidInput("count", "count, views, frames and size must be at least 1", "use e.g. 8 clips of 4 views x 16 frames at 64 px")
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for _ in range(count):
        azimuth, elevation, start, span = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        rig = orbit_rig(views, elevation_range[0] + elevation * (elevation_range[1] - elevation_range[0]), radius, fov, size, size,
                        start_azimuth_deg=360.0 * azimuth)
        length = 0.4 + 0.6 * span
        times = (1 - length) * start + torch.linspace(0, length, frames) if frames > 1 else torch.tensor([start])
        if torch.rand(1, generator=generator).item() < 0.5:
            times = times.flip(0)
        images, _ = render_scene(rig, times.clamp(0, 1), on_image=on_image)  # (V, F, H, W, 3)
        clips.append(Clip(MultiviewVideo(images.clamp(0, 1), rig, torch.linspace(0, 1, frames) if frames > 1 else torch.zeros(1)),
                          DEMO_CAPTION))
    return clips
