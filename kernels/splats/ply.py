"""INRIA 3D Gaussian Splatting .ply files, the layout every splat viewer and tool reads.

One binary little-endian vertex element of float32 properties, in this order:
x y z nx ny nz f_dc_0..2 f_rest_0..(3(K-1)-1) opacity scale_0..2 rot_0..3
with opacity as a logit, scales as logs, rot as a wxyz quaternion, and f_rest channel-major (all red
coefficients, then green, then blue), as INRIA's exporter writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidInput
from ..files import atomic_file
from .model import GaussianFrame

_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "uchar": "u1", "uint8": "u1",
          "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4", "short": "<i2", "ushort": "<u2"}


def property_names(sh_degree: int) -> list[str]:
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def frame_to_columns(frame: GaussianFrame) -> np.ndarray:
    """(N, properties) float32 table of one frame in INRIA's layout."""
    count = frame.count
    sh = frame.sh.detach().float().cpu()
    rest = sh[:, 1:, :].transpose(1, 2).reshape(count, -1)  # channel-major
    opacity = frame.opacities.detach().float().cpu().clamp(1e-6, 1 - 1e-6)
    columns = torch.cat([
        frame.means.detach().float().cpu(), torch.zeros(count, 3), sh[:, 0, :], rest,
        torch.log(opacity / (1 - opacity))[:, None], frame.scales.detach().float().cpu().clamp_min(1e-12).log(),
        frame.quats.detach().float().cpu(),
    ], dim=1)
    return columns.numpy().astype("<f4")


def write_ply(path: str | Path, frame: GaussianFrame) -> None:
    names = property_names(frame.sh_degree)
    table = frame_to_columns(frame)
    header = "\n".join(["ply", "format binary_little_endian 1.0", f"element vertex {frame.count}"]
                       + [f"property float {name}" for name in names] + ["end_header"]) + "\n"
    with atomic_file(path) as temporary, open(temporary, "wb") as handle:
        handle.write(header.encode("ascii"))
        handle.write(np.ascontiguousarray(table).tobytes())


@dataclass
class PlyGaussians:
    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    opacity_logits: torch.Tensor
    sh: torch.Tensor  # (N, K, 3)
    sh_degree: int


def read_ply(path: str | Path) -> PlyGaussians:
    """A 3DGS .ply (binary little endian) back into tensors: what write_ply wrote, or any INRIA-layout file."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise InvalidInput("file", f"{Path(path).name} is not a PLY file", "load a 3D Gaussian splatting .ply")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise InvalidInput("file", f"{Path(path).name} is not binary little-endian", "convert it with a 3DGS tool")
    count, fields, in_vertex = None, [], False
    for line in header:
        words = line.split()
        if words[:2] == ["element", "vertex"]:
            count, in_vertex = int(words[2]), True
        elif words[:1] == ["element"]:
            in_vertex = False
        elif words[:1] == ["property"] and in_vertex:
            if words[1] == "list" or words[1] not in _TYPES:
                raise InvalidInput("file", f"unsupported PLY property {line!r}", "load a 3D Gaussian splatting .ply")
            fields.append((words[2], _TYPES[words[1]]))
    table = np.frombuffer(data, dtype=np.dtype(fields), count=count, offset=end + len(b"end_header\n"))
    names = set(table.dtype.names)
    needed = {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"}
    if not needed <= names:
        raise InvalidInput("file", f"{Path(path).name} lacks Gaussian properties {sorted(needed - names)}", "load a 3D Gaussian splatting .ply")

    def column(*keys):
        return torch.from_numpy(np.stack([table[key].astype(np.float32) for key in keys], axis=-1))

    rest_count = len([name for name in names if name.startswith("f_rest_")])
    sh_degree = int(round(math.sqrt(rest_count // 3 + 1))) - 1
    dc = column("f_dc_0", "f_dc_1", "f_dc_2")
    if rest_count:
        rest = column(*[f"f_rest_{i}" for i in range(rest_count)]).reshape(count, 3, -1).transpose(1, 2)
        sh = torch.cat([dc[:, None], rest], dim=1)
    else:
        sh = dc[:, None]
    return PlyGaussians(column("x", "y", "z"), column("rot_0", "rot_1", "rot_2", "rot_3"),
                        column("scale_0", "scale_1", "scale_2"), column("opacity")[:, 0], sh, sh_degree)
