"""The lossless 4D file: every parameter of the dynamic Gaussians, the frame times and the cameras, in one
.safetensors file (`*.mv4d.safetensors`) that MV4D Load 4D reads back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cameras import CameraRig
from ..errors import InvalidInput, file_error
from ..files import atomic_file
from ..memory import check_memory
from .model import DynamicGaussians, MotionConfig, Splats4D

FORMAT = "mv4d.splats4d"
VERSION = "1"
SUFFIX = ".mv4d.safetensors"


def save_splats4d(path: str | Path, scene: Splats4D) -> None:
    tensors = {f"param.{name}": value.detach().float().cpu().contiguous() for name, value in scene.gaussians.params.items()}
    tensors["frame_times"] = scene.frame_times.float().cpu().contiguous()
    metadata = {"format": FORMAT, "version": VERSION, "motion": json.dumps(scene.gaussians.config_dict())}
    if scene.cameras is not None:
        tensors["cameras.world_to_camera"] = scene.cameras.world_to_camera.contiguous()
        tensors["cameras.intrinsics"] = scene.cameras.intrinsics.contiguous()
        metadata["camera_size"] = f"{scene.cameras.height}x{scene.cameras.width}"
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


LOAD_FIX = "load a *.mv4d.safetensors file written by MV4D Save 4D"
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MOTION_FIELDS = {"position_degree": int, "fourier_terms": int, "rotation_degree": int, "temporal_opacity": bool, "sh_degree": int}


def _tensor(tensors: dict, key: str, path, ndim: int | None = None) -> torch.Tensor:
    """A float tensor of the file, as float32 (float64 for cameras), refusing what our writer never writes."""
    if key not in tensors:
        raise file_error(path, f"has no tensor {key!r}", LOAD_FIX)
    value = tensors[key]
    if value.dtype not in _FLOAT_TYPES:
        raise file_error(path, f"tensor {key!r} is {str(value.dtype).replace('torch.', '')}, not a float16/32/64 tensor", LOAD_FIX)
    if value.ndim == 0 or (ndim is not None and value.ndim != ndim):
        raise file_error(path, f"tensor {key!r} has shape {tuple(value.shape)}", LOAD_FIX)
    if not torch.isfinite(value).all():
        raise file_error(path, f"tensor {key!r} holds NaN or infinite values", "write the file again from finite Gaussians")
    return value.double() if key.startswith("cameras.") else value.float()


def _motion_config(metadata: dict, path) -> MotionConfig:
    try:
        fields = json.loads(metadata.get("motion", ""))
    except (ValueError, RecursionError):
        fields = None
    if not isinstance(fields, dict) or set(fields) != set(_MOTION_FIELDS) or any(
            type(fields[name]) is not kind for name, kind in _MOTION_FIELDS.items()):
        raise file_error(path, f"its 'motion' metadata {metadata.get('motion')!r:.200} is not the motion settings MV4D Save 4D "
                               f"writes ({', '.join(_MOTION_FIELDS)})", LOAD_FIX)
    try:
        return MotionConfig(**fields)
    except InvalidInput as error:
        raise file_error(path, f"its motion setting {error.argument}: {error.problem}", LOAD_FIX) from None


def _cameras(metadata: dict, tensors: dict, path) -> CameraRig | None:
    keys = [key for key in ("cameras.world_to_camera", "cameras.intrinsics") if key in tensors]
    if not keys:
        return None
    size = metadata.get("camera_size", "")
    height, _, width = size.partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise file_error(path, f"has cameras but its 'camera_size' metadata {size!r:.40} is not HEIGHTxWIDTH", LOAD_FIX)
    world_to_camera = _tensor(tensors, "cameras.world_to_camera", path, ndim=3)
    intrinsics = _tensor(tensors, "cameras.intrinsics", path, ndim=3)
    try:
        return CameraRig(world_to_camera, intrinsics, int(height), int(width))
    except InvalidInput as error:
        raise file_error(path, f"its cameras are unusable: {error.argument}: {error.problem}", LOAD_FIX) from None


def load_splats4d(path: str | Path) -> Splats4D:
    """A file written by save_splats4d, back exactly. Anything else (damaged, from another program, with
    parameters that are not finite float tensors of the right shapes, frame times outside [0, 1]) is refused
    with an InvalidInput naming the file and what is wrong. safetensors checks every tensor's declared size
    against the file before reading it, so nothing larger than the file is allocated."""
    try:
        check_memory("file", 3 * Path(path).stat().st_size, f"reading {Path(path).name}", LOAD_FIX)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except InvalidInput:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise file_error(path, f"is not a readable .safetensors file ({type(error).__name__}: {str(error)[:120]})", LOAD_FIX) from None
    if metadata.get("format") != FORMAT:
        raise file_error(path, f"is not an mv4d 4D file (format {metadata.get('format')!r:.40})", LOAD_FIX)
    config = _motion_config(metadata, path)
    params = {key[len("param."):]: _tensor(tensors, key, path) for key in tensors if key.startswith("param.")}
    try:
        gaussians = DynamicGaussians(params, config)
    except InvalidInput as error:
        raise file_error(path, f"its Gaussians do not match its motion settings: {error.problem}", LOAD_FIX) from None
    frame_times = _tensor(tensors, "frame_times", path, ndim=1)
    if len(frame_times) == 0 or (frame_times < 0).any() or (frame_times > 1).any() or (frame_times[1:] <= frame_times[:-1]).any():
        raise file_error(path, f"its {len(frame_times)} frame times do not increase within [0, 1]", LOAD_FIX)
    return Splats4D(gaussians, frame_times, _cameras(metadata, tensors, path))
