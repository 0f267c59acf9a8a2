"""The lossless 4D file: every parameter of the dynamic Gaussians, the frame times and the cameras, in one
.safetensors file (`*.mv4d.safetensors`) that MV4D Load 4D reads back exactly."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..cameras import CameraRig
from ..errors import InvalidInput
from ..files import atomic_file
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


def load_splats4d(path: str | Path) -> Splats4D:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise InvalidInput("file", f"{Path(path).name} is not a readable .safetensors file ({error})",
                           "load a file written by MV4D Save 4D") from None
    if metadata.get("format") != FORMAT:
        raise InvalidInput("file", f"{Path(path).name} is not an mv4d 4D file (format {metadata.get('format')!r})",
                           "load a *.mv4d.safetensors file written by MV4D Save 4D")
    config = MotionConfig(**json.loads(metadata["motion"]))
    params = {key[len("param."):]: value for key, value in tensors.items() if key.startswith("param.")}
    cameras = None
    if "cameras.world_to_camera" in tensors:
        height, width = (int(side) for side in metadata["camera_size"].split("x"))
        cameras = CameraRig(tensors["cameras.world_to_camera"], tensors["cameras.intrinsics"], height, width)
    return Splats4D(DynamicGaussians(params, config), tensors["frame_times"], cameras)
