"""`.mv4dweb`, the file our web player (web/mv4d_player.js) plays: the dynamic Gaussians themselves, their
motion model unchanged, so the player draws what `render()` draws at any time, up to half precision (Fourier
motion and view-dependent colour included, which .splatv cannot hold).

Layout (little-endian):

    bytes 0-7    magic b"MV4D-WEB"
    bytes 8-11   uint32 format version (1)
    bytes 12-15  uint32 H, byte length of the header (a multiple of 4)
    bytes 16-    header: UTF-8 JSON padded with spaces to H bytes
    then         payload: `count` records of `stride` uint32 words (stride a multiple of 4: one record is a whole
                 number of RGBA32UI texels, the layout the player uploads as one texture)

Header keys: format ("mv4d.web-player"), version, count, stride, motion (the MotionConfig), fields, frame_times,
cameras, view, background (RGB in [0, 1]), fps. `fields` maps each parameter to {"offset": first word of the
record, "type": "f32" or "f16", "length": values}; f16 values are packed two per word, value 2k in the low 16
bits of word offset + k. The fields are the model's raw parameters (model.py):

    means              f32 x 3            position at rest
    quats              f16 x 4            wxyz, unnormalised
    log_scales         f16 x 3
    opacity            f16 x 1 or 3       logit [, opacity_center, opacity_log_width when temporal_opacity]
    sh                 f16 x 3 (D+1)^2    sh0 then shN, coefficient-major (k0 rgb, k1 rgb, ...)
    position_motion    f16 x 3 (P+2K)     when P + K > 0, term-major (term 0 xyz, term 1 xyz, ...)
    rotation_motion    f16 x 4 R          when R > 0

Means stay float32 (a half-precision centre would move by up to 1/2048 of its coordinate, about half a pixel at
576 px); everything else is half precision, about 1/4096 relative error.
`cameras`: [{"world_to_camera": 16 numbers row-major (OpenCV), "fx", "fy", "cx", "cy" (pixels, pixel centres at
+0.5), "width", "height"}]. `view`: {"center", "radius", "up"}, where the player's default camera looks and
orbits when the file has no cameras, and the world's up direction for orbiting.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..cameras import CameraRig
from ..errors import InvalidInput
from ..files import atomic_file
from .init import scene_sphere
from .model import Splats4D

SUFFIX = ".mv4dweb"
MAGIC = b"MV4D-WEB"
VERSION = 1
FORMAT = "mv4d.web-player"
PREAMBLE_BYTES = 16
HALF_MAX = 65504.0


def field_layout(config) -> dict[str, dict]:
    """Word offset, type and length of every field a record of this motion config holds."""
    lengths = [("means", "f32", 3), ("quats", "f16", 4), ("log_scales", "f16", 3),
               ("opacity", "f16", 3 if config.temporal_opacity else 1), ("sh", "f16", 3 * (config.sh_degree + 1) ** 2)]
    if config.position_degree or config.fourier_terms:
        lengths.append(("position_motion", "f16", 3 * (config.position_degree + 2 * config.fourier_terms)))
    if config.rotation_degree:
        lengths.append(("rotation_motion", "f16", 4 * config.rotation_degree))
    layout, offset = {}, 0
    for name, kind, length in lengths:
        layout[name] = {"offset": offset, "type": kind, "length": length}
        offset += length if kind == "f32" else (length + 1) // 2
    return layout


def record_stride(layout: dict[str, dict]) -> int:
    last = max(layout.values(), key=lambda field: field["offset"])
    words = last["offset"] + (last["length"] if last["type"] == "f32" else (last["length"] + 1) // 2)
    return 4 * math.ceil(words / 4)


def _field_values(scene: Splats4D) -> dict[str, np.ndarray]:
    """(N, length) float arrays of every field, from the model's raw parameters."""
    params = {name: value.detach().to("cpu", torch.float32) for name, value in scene.gaussians.params.items()}
    count = scene.gaussians.count
    opacity = [params["opacities"][:, None]]
    if scene.gaussians.config.temporal_opacity:
        opacity += [params["opacity_center"][:, None], params["opacity_log_width"][:, None]]
    values = {
        "means": params["means"], "quats": params["quats"], "log_scales": params["scales"],
        "opacity": torch.cat(opacity, dim=1), "sh": scene.gaussians.sh().detach().float().cpu().reshape(count, -1),
    }
    if "position_motion" in params:
        values["position_motion"] = params["position_motion"].reshape(count, -1)
    if "rotation_motion" in params:
        values["rotation_motion"] = params["rotation_motion"].reshape(count, -1)
    return {name: value.numpy() for name, value in values.items()}


def _pack_records(values: dict[str, np.ndarray], layout: dict[str, dict], stride: int) -> np.ndarray:
    count = len(values["means"])
    words = np.zeros((count, stride), dtype="<u4")
    for name, field in layout.items():
        value = values[name]
        if not np.isfinite(value).all():
            raise InvalidInput("splats_4d", f"the Gaussians' {name} hold NaN or infinite values", "fit or load the scene again")
        start = field["offset"]
        if field["type"] == "f32":
            words[:, start:start + field["length"]] = value.astype("<f4").view("<u4")
            continue
        halves = np.clip(value, -HALF_MAX, HALF_MAX).astype("<f2").view("<u2").astype("<u4")
        if field["length"] % 2:
            halves = np.concatenate([halves, np.zeros((count, 1), dtype="<u4")], axis=1)
        words[:, start:start + halves.shape[1] // 2] = halves[:, 0::2] | (halves[:, 1::2] << 16)
    return words


def cameras_header(cameras: CameraRig | None) -> list[dict]:
    if cameras is None:
        return []
    return [{
        "world_to_camera": cameras.world_to_camera[index].flatten().tolist(),
        "fx": float(cameras.intrinsics[index, 0, 0]), "fy": float(cameras.intrinsics[index, 1, 1]),
        "cx": float(cameras.intrinsics[index, 0, 2]), "cy": float(cameras.intrinsics[index, 1, 2]),
        "width": cameras.width, "height": cameras.height,
    } for index in range(len(cameras))]


def default_view(scene: Splats4D) -> dict:
    """Where the player looks when it has no camera of the file's: the scene's centre and size, and the up
    direction to orbit about (the cameras' mean up, or +Z, the orbit rigs' up)."""
    means = scene.gaussians.params["means"].detach().float().cpu()
    if scene.cameras is not None and len(scene.cameras) > 1:
        centre = scene_sphere(scene.cameras)[0]
    elif len(means):
        centre = means.median(dim=0).values
    else:
        centre = torch.zeros(3)
    radius = float(torch.quantile((means - centre).norm(dim=-1), 0.9)) if len(means) else 1.0
    up = torch.tensor([0.0, 0.0, 1.0])
    if scene.cameras is not None:
        mean_up = -scene.cameras.rotations[:, 1, :].float().mean(0)  # OpenCV y points down
        if mean_up.norm() > 1e-3:
            up = mean_up / mean_up.norm()
    return {"center": centre.tolist(), "radius": max(radius, 1e-3), "up": up.tolist()}


def encode_player_file(scene: Splats4D, background=(1.0, 1.0, 1.0), fps: float = 12.0) -> bytes:
    config = scene.gaussians.config
    layout = field_layout(config)
    stride = record_stride(layout)
    words = _pack_records(_field_values(scene), layout, stride)
    header = {
        "format": FORMAT, "version": VERSION, "count": scene.gaussians.count, "stride": stride,
        "motion": scene.gaussians.config_dict(), "fields": layout,
        "frame_times": [float(time) for time in scene.frame_times.tolist()],
        "cameras": cameras_header(scene.cameras), "view": default_view(scene),
        "background": [float(channel) for channel in background], "fps": float(fps),
    }
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    return MAGIC + np.array([VERSION, len(text)], dtype="<u4").tobytes() + text + words.tobytes()


def write_player_file(path: str | Path, scene: Splats4D, background=(1.0, 1.0, 1.0), fps: float = 12.0) -> Path:
    data = encode_player_file(scene, background, fps)
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def decode_player_file(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {field: (N, length) float32}): the reader the JavaScript player mirrors, same checks and order."""
    if len(data) < PREAMBLE_BYTES or data[:8] != MAGIC:
        raise InvalidInput("file", "not an mv4d web player file (no MV4D-WEB magic)", "load a .mv4dweb file written by MV4D Preview 4D")
    version, length = np.frombuffer(data[8:16], dtype="<u4")
    if version != VERSION:
        raise InvalidInput("file", f"format version {int(version)}, this reader knows {VERSION}", "update mv4d")
    if PREAMBLE_BYTES + int(length) > len(data):
        raise InvalidInput("file", "the header runs past the end of the file", "the file is truncated; write it again")
    header = json.loads(data[PREAMBLE_BYTES:PREAMBLE_BYTES + int(length)].decode("utf-8"))
    count, stride = header["count"], header["stride"]
    payload = data[PREAMBLE_BYTES + int(length):]
    if len(payload) < count * stride * 4:
        raise InvalidInput("file", f"{len(payload)} payload bytes for {count} Gaussians of {stride * 4} bytes",
                           "the file is truncated; write it again")
    words = np.frombuffer(payload[:count * stride * 4], dtype="<u4").reshape(count, stride)
    fields = {}
    for name, field in header["fields"].items():
        start, size = field["offset"], field["length"]
        if field["type"] == "f32":
            fields[name] = words[:, start:start + size].view("<f4").copy()
            continue
        packed = words[:, start:start + (size + 1) // 2]
        halves = np.stack([packed & 0xFFFF, packed >> 16], axis=2).reshape(count, -1)[:, :size]
        fields[name] = halves.astype("<u2").view("<f2").astype(np.float32)
    return header, fields
