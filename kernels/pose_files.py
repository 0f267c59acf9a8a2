"""RealEstate10K / CameraCtrl camera-trajectory files, the pose format CVD and CameraCtrl read.

Layout: the first line is the source video's URL (or any text); every further non-empty line describes one frame
with 19 numbers separated by spaces:

    timestamp_us fx fy cx cy k1 k2 r11 r12 r13 t1 r21 r22 r23 t2 r31 r32 r33 t3

fx, cx are normalised by the source frame's width and fy, cy by its height; k1, k2 are unused (zero); the last 12
numbers are the 3x4 OpenCV world-to-camera matrix, row-major. Frames are rescaled to cover the requested image
and centre-cropped, as CameraCtrl does, so the source aspect ratio must be known (RealEstate10K clips are 16:9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cameras import GEOMETRY_DTYPE, CameraRig, find_camera_problem
from .errors import InvalidInput, file_error
from .files import read_whole_file

NUMBERS_PER_FRAME = 19
POSE_FIX = "use a plain-text RealEstate10K / CameraCtrl pose file"
# Parsing holds every number as a Python float in lists (about 32 bytes for each of 19 numbers of a line of at
# least 38 characters), then a float64 tensor: about 20 bytes of working memory per byte of text.
READ_MEMORY_PER_BYTE = 20
_FIELD_HELP = "timestamp, fx, fy, cx, cy, two distortion terms, then the 12 entries of the 3x4 world-to-camera matrix"


@dataclass(frozen=True, eq=False)
class PoseTrajectory:
    cameras: CameraRig
    timestamps_us: list[int]
    source_line_numbers: list[int]  # 1-based line of each kept frame, for messages


def _parse_frames(text: str) -> tuple[list[int], list[list[float]]]:
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise InvalidInput("pose_file", "the file is empty (line 1 should hold the source video URL)",
                           "use a RealEstate10K / CameraCtrl pose file")
    line_numbers, frames = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != NUMBERS_PER_FRAME:
            raise InvalidInput(
                "pose_file", f"line {number}: expected {NUMBERS_PER_FRAME} numbers ({_FIELD_HELP}), got {len(fields)}",
                "fix or remove that line",
            )
        try:
            values = [float(field) for field in fields]
        except ValueError:
            bad = next(field for field in fields if not _is_float(field))
            raise InvalidInput("pose_file", f"line {number}: {bad!r} is not a number", "fix or remove that line") from None
        if not all(math.isfinite(value) for value in values):
            raise InvalidInput("pose_file", f"line {number}: contains NaN or infinity", "fix or remove that line")
        line_numbers.append(number)
        frames.append(values)
    if not frames:
        raise InvalidInput("pose_file", "no camera lines after the first (URL) line",
                           "use a RealEstate10K / CameraCtrl pose file with one line per frame")
    return line_numbers, frames


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_pose_file(
    text: str,
    height: int,
    width: int,
    source_aspect: float = 16 / 9,
    start_frame: int = 0,
    frame_stride: int = 1,
    max_frames: int = 0,
    relative_to_first: bool = True,
) -> PoseTrajectory:
    """Read a pose file into a camera rig for images of height x width.

    start_frame / frame_stride / max_frames (0 = all) pick frames as CameraCtrl's samplers do.
    relative_to_first re-expresses every pose relative to the first kept camera (which becomes the identity),
    as CameraCtrl and CVD do before building Plücker embeddings.
    """
    if height <= 0 or width <= 0:
        raise InvalidInput("size", f"width and height must be positive, got {width} x {height}", "set the output image size")
    if not source_aspect > 0 or not math.isfinite(source_aspect):
        raise InvalidInput("source_aspect", f"must be a positive width/height ratio, got {source_aspect}",
                           "use 1.7778 for 16:9 RealEstate10K clips")
    if frame_stride < 1 or start_frame < 0 or max_frames < 0:
        raise InvalidInput("frames", f"start {start_frame}, stride {frame_stride}, max {max_frames} is not a valid selection",
                           "use start >= 0, stride >= 1, max >= 0 (0 = all)")
    line_numbers, frames = _parse_frames(text)
    picked = list(range(start_frame, len(frames), frame_stride))
    if max_frames:
        picked = picked[:max_frames]
    if not picked:
        raise InvalidInput("start_frame", f"frame {start_frame} is past the end of the file ({len(frames)} frames)",
                           "choose a start frame inside the file")
    values = torch.tensor([frames[i] for i in picked], dtype=GEOMETRY_DTYPE)
    numbers = [line_numbers[i] for i in picked]

    focal_principal = values[:, 1:5]
    # Scale the source frame (aspect x 1 in normalised units) to cover the target, then centre-crop.
    scale = max(width / source_aspect, height / 1.0)
    source_width, source_height = source_aspect * scale, scale
    crop_x, crop_y = (source_width - width) / 2, (source_height - height) / 2
    intrinsics = torch.zeros(len(picked), 3, 3, dtype=GEOMETRY_DTYPE)
    intrinsics[:, 0, 0] = focal_principal[:, 0] * source_width
    intrinsics[:, 1, 1] = focal_principal[:, 1] * source_height
    intrinsics[:, 0, 2] = focal_principal[:, 2] * source_width - crop_x
    intrinsics[:, 1, 2] = focal_principal[:, 3] * source_height - crop_y
    intrinsics[:, 2, 2] = 1

    world_to_camera = torch.eye(4, dtype=GEOMETRY_DTYPE).repeat(len(picked), 1, 1)
    world_to_camera[:, :3, :] = values[:, 7:].reshape(-1, 3, 4)
    problem = find_camera_problem(world_to_camera, intrinsics)
    if problem:  # name the line, which a user can find in the file, rather than the camera index
        raise InvalidInput("pose_file", f"line {numbers[problem.camera]}: the camera {problem.problem}", "fix or remove that line")
    cameras = CameraRig(world_to_camera, intrinsics, height, width)
    if relative_to_first:
        cameras = cameras.relative_to_camera(0)
    return PoseTrajectory(cameras, [int(v) for v in values[:, 0].tolist()], numbers)


def load_pose_file(path, height: int, width: int, **selection) -> PoseTrajectory:
    """parse_pose_file of a file: its text (UTF-8, its size checked against free memory first), every error an
    InvalidInput naming the file."""
    data = read_whole_file(path, READ_MEMORY_PER_BYTE, POSE_FIX, argument="pose_file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise file_error(path, f"is not UTF-8 text (byte {error.start} is {data[error.start]:#04x})", POSE_FIX, "pose_file") from None
    if "\0" in text:
        raise file_error(path, f"holds a NUL byte at character {text.index(chr(0))}: it is not a text file", POSE_FIX, "pose_file")
    try:
        return parse_pose_file(text, height, width, **selection)
    except InvalidInput as error:
        if error.argument != "pose_file":
            raise
        raise file_error(path, error.problem, error.fix, "pose_file") from None


def format_pose_file(trajectory: CameraRig, timestamps_us: list[int] | None = None, url: str = "mv4d") -> str:
    """Write a rig as a pose file for images of exactly its own size (source aspect = width / height, no crop)."""
    timestamps_us = timestamps_us if timestamps_us is not None else [i * 33_333 for i in range(len(trajectory))]
    lines = [url]
    for stamp, K, w2c in zip(timestamps_us, trajectory.intrinsics, trajectory.world_to_camera):
        numbers = [
            K[0, 0] / trajectory.width, K[1, 1] / trajectory.height,
            K[0, 2] / trajectory.width, K[1, 2] / trajectory.height, 0.0, 0.0,
            *w2c[:3, :].reshape(-1).tolist(),
        ]
        lines.append(" ".join([str(int(stamp))] + [repr(float(v)) for v in numbers]))
    return "\n".join(lines) + "\n"
