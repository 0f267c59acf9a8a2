"""INRIA 3D Gaussian Splatting .ply files, the layout every splat viewer and tool reads.

One binary little-endian vertex element of float32 properties, in this order:
x y z nx ny nz f_dc_0..2 f_rest_0..(3(K-1)-1) opacity scale_0..2 rot_0..3
with opacity as a logit, scales as logs, rot as a wxyz quaternion, and f_rest channel-major (all red
coefficients, then green, then blue), as INRIA's exporter writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import file_error
from ..files import atomic_file, read_whole_file
from .model import GaussianFrame

_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "char": "i1", "int8": "i1", "uchar": "u1",
          "uint8": "u1", "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2", "int": "<i4", "int32": "<i4",
          "uint": "<u4", "uint32": "<u4"}


def property_names(sh_degree: int) -> list[str]:
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def frame_to_columns(frame: GaussianFrame) -> np.ndarray:
    """(N, properties) float32 table of one frame in INRIA's layout."""
    count = frame.count
    sh = frame.sh.detach().float().cpu()
    rest = sh[:, 1:, :].transpose(1, 2).reshape(count, 3 * (sh.shape[1] - 1))  # channel-major (explicit width: count may be 0)
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


_REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
_MAX_HEADER_BYTES = 1 << 20  # INRIA's header is about 1.5 KB; a file without end_header in its first MiB is no 3DGS .ply
_PLY_FIX = "load a binary little-endian 3D Gaussian splatting .ply (INRIA layout)"
READ_MEMORY_PER_BYTE = 8  # the file, its float32 columns and the tensors built from them, per byte of the file


def _header(data: bytes, path) -> tuple[int, list[tuple[str, str]], int]:
    """(vertex count, [(property name, numpy type)], offset of the vertex data), refusing what we cannot read."""
    if not data.startswith(b"ply\n"):
        raise file_error(path, "is not a PLY file (it does not start with 'ply')", _PLY_FIX)
    end = data.find(b"end_header\n", 0, _MAX_HEADER_BYTES)
    if end < 0:
        raise file_error(path, "has no 'end_header' line in its first MiB", _PLY_FIX)
    count, fields, names, element = None, [], set(), None
    for number, line in enumerate(data[:end].decode("ascii", errors="replace").splitlines(), start=1):
        words = line.split()
        if number == 1 or not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if words[1:] != ["binary_little_endian", "1.0"]:
                raise file_error(path, f"is in PLY format {' '.join(words[1:])!r}, not binary_little_endian 1.0", "convert it with a 3DGS tool")
        elif words[0] == "element":
            if element is None and words[1:2] != ["vertex"]:
                raise file_error(path, f"line {number}: its first element is {line!r}, not the vertices", _PLY_FIX)
            element = words[1] if len(words) > 1 else ""
            if element == "vertex":
                if len(words) != 3 or not words[2].isdigit():
                    raise file_error(path, f"line {number}: {line!r} is not 'element vertex <count>'", _PLY_FIX)
                count = int(words[2])
        elif words[0] == "property":
            if element != "vertex":
                continue  # elements after the vertices are not read
            if len(words) != 3 or words[1] not in _TYPES:
                raise file_error(path, f"line {number}: unsupported PLY property {line!r} (lists are not splats)", _PLY_FIX)
            if words[2] in names:
                raise file_error(path, f"line {number}: property {words[2]!r} is declared twice", _PLY_FIX)
            names.add(words[2])
            fields.append((words[2], _TYPES[words[1]]))
        else:
            raise file_error(path, f"line {number}: {line[:80]!r} is not a PLY header line", _PLY_FIX)
    if count is None:
        raise file_error(path, "declares no vertex element", _PLY_FIX)
    return count, fields, end + len(b"end_header\n")


def read_ply(path: str | Path) -> PlyGaussians:
    """A 3DGS .ply (binary little endian) back into tensors: what write_ply wrote, or any INRIA-layout file.
    Anything else is refused with an InvalidInput naming the file; the declared vertex count is checked against
    the bytes the file holds before anything is allocated."""
    data = read_whole_file(path, READ_MEMORY_PER_BYTE, _PLY_FIX)
    count, fields, offset = _header(data, path)
    missing = [name for name in _REQUIRED if name not in {field for field, _ in fields}]
    if missing:
        raise file_error(path, f"lacks the Gaussian properties {missing}", _PLY_FIX)
    rest_names = [field for field, _ in fields if field.startswith("f_rest_")]
    rest_count = len(rest_names)
    sh_degree = next((degree for degree in range(4) if 3 * ((degree + 1) ** 2 - 1) == rest_count), None)
    if sh_degree is None or sorted(rest_names) != sorted(f"f_rest_{i}" for i in range(rest_count)):
        raise file_error(path, f"has {rest_count} f_rest_* properties, not f_rest_0..f_rest_N-1 of an SH degree 0..3 "
                               "(0, 9, 24 or 45 of them)", _PLY_FIX)
    row = np.dtype(fields)
    if count * row.itemsize > len(data) - offset:
        raise file_error(path, f"declares {count} vertices of {row.itemsize} bytes but holds only {len(data) - offset} "
                               "bytes after its header (truncated?)", "write the file again")
    table = np.frombuffer(data, dtype=row, count=count, offset=offset)

    def column(*keys):
        values = np.stack([table[key].astype(np.float32) for key in keys], axis=-1).reshape(count, len(keys))
        if not np.isfinite(values).all():
            raise file_error(path, f"has NaN or infinite values in {', '.join(keys)}", "write the file again from finite Gaussians")
        return torch.from_numpy(values)

    dc = column("f_dc_0", "f_dc_1", "f_dc_2")
    if rest_count:
        rest = column(*[f"f_rest_{i}" for i in range(rest_count)]).reshape(count, 3, rest_count // 3).transpose(1, 2)
        sh = torch.cat([dc[:, None], rest], dim=1)
    else:
        sh = dc[:, None]
    return PlyGaussians(column("x", "y", "z"), column("rot_0", "rot_1", "rot_2", "rot_3"),
                        column("scale_0", "scale_1", "scale_2"), column("opacity")[:, 0], sh, sh_degree)
