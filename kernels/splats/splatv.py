""".splatv, the 4D Gaussian format of the splaTV web player (antimatter15/splaTV, from SpacetimeGaussians).

Layout: uint32 magic 0x674b, uint32 length of a UTF-8 JSON list
[{"type": "splat", "size": bytes, "texwidth": 4096, "texheight": h, "cameras": [...]}], then the texture: 16
uint32 words per Gaussian (four RGBA32UI texels):
  0-2 float32 position at the Gaussian's own time centre c
  3-4 half pairs: quaternion wxyz at c          5-6 half pairs: linear scales x, y | z, 0
  7   RGBA bytes: colour (DC), opacity
  8-12 half pairs: motion_0..8, position(t) = p + m_0..2 dt + m_3..5 dt^2 + m_6..8 dt^3 with dt = t - c
  13-14 half pairs: omega_0..3, rotation(t) = normalise(q + omega dt)
  15  half pair: c, s: temporal opacity exp(-(dt / s)^2)
Time runs over [0, 1], as ours.

Our model maps exactly when its position polynomial has degree <= 3, its rotation degree <= 1 and it has no
Fourier terms: the player's per-Gaussian cubic in dt is our polynomial in tau = 2t - 1 re-expanded about c.
Otherwise the trajectory is fitted by least squares over the time the Gaussian is visible, and the writer
reports the largest position error. View-dependent colour (SH degree > 0) is not part of the format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cameras import CameraRig
from ..errors import file_error
from ..files import atomic_file, read_whole_file
from .model import DynamicGaussians, MotionConfig, rgb_to_sh_dc, sh_dc_to_rgb, time_basis

MAGIC = 0x674B
TEXTURE_WIDTH = 4096
WORDS_PER_SPLAT = 16
_ALWAYS_VISIBLE = 1000.0  # temporal scale written for Gaussians without temporal opacity
_WINDOW_SAMPLES = 33


@dataclass
class SplatvRecords:
    """Decoded per-Gaussian fields, float32 tensors."""

    positions: torch.Tensor  # (N, 3) at time centre
    quats: torch.Tensor  # (N, 4) wxyz
    scales: torch.Tensor  # (N, 3) linear
    rgba: torch.Tensor  # (N, 4) bytes as 0..255
    motion: torch.Tensor  # (N, 3, 3): [dt, dt^2, dt^3] coefficients
    omega: torch.Tensor  # (N, 4)
    time_centre: torch.Tensor  # (N,)
    time_scale: torch.Tensor  # (N,)


def to_records(gaussians: DynamicGaussians) -> tuple[SplatvRecords, float]:
    """The player's fields for our Gaussians, and the largest position error of the cubic fit (scene units)."""
    g = gaussians.to("cpu")
    count = g.count
    config = g.config
    if config.temporal_opacity:
        centre = g.params["opacity_center"].clamp(0, 1)
        scale = math.sqrt(2) * g.params["opacity_log_width"].exp()  # exp(-0.5 (dt/w)^2) = exp(-(dt/(sqrt2 w))^2)
    else:
        centre = torch.full((count,), 0.5)
        scale = torch.full((count,), _ALWAYS_VISIBLE)
    # Sample each trajectory over the part of [0, 1] where the Gaussian is visible (2 scales around its centre).
    lower = (centre - 2 * scale).clamp(0, 1)
    upper = (centre + 2 * scale).clamp(0, 1)
    fraction = torch.linspace(0, 1, _WINDOW_SAMPLES)
    times = lower[:, None] + (upper - lower)[:, None] * fraction[None]  # (N, S)
    positions = _positions_at(g, times)  # (N, S, 3)
    at_centre = _positions_at(g, centre[:, None])[:, 0]
    dt = times - centre[:, None]
    basis = torch.stack([dt, dt**2, dt**3], dim=-1).double()  # (N, S, 3)
    solution = torch.linalg.lstsq(basis, (positions - at_centre[:, None]).double()).solution  # (N, 3 powers, 3 axes)
    error = float((basis @ solution - (positions - at_centre[:, None]).double()).norm(dim=-1).max()) if count else 0.0

    quats = g.params["quats"]
    omega = torch.zeros(count, 4)
    if config.rotation_degree:
        tau_c = 2 * centre - 1
        poly = g.params["rotation_motion"]  # (N, R, 4): coefficients of tau^1..tau^R
        quats = quats + sum(poly[:, k] * tau_c[:, None] ** (k + 1) for k in range(config.rotation_degree))
        # derivative of the unnormalised quaternion in t at c (exact for degree 1)
        omega = sum(2 * (k + 1) * poly[:, k] * tau_c[:, None] ** k for k in range(config.rotation_degree))
    colour = (sh_dc_to_rgb(g.params["sh0"][:, 0, :]).clamp(0, 1) * 255).round()
    opacity = (torch.sigmoid(g.params["opacities"]) * 255).round()
    records = SplatvRecords(
        positions=at_centre.float(), quats=quats.float(), scales=g.params["scales"].exp().float(),
        rgba=torch.cat([colour, opacity[:, None]], dim=1), motion=solution.float(), omega=omega.float(),
        time_centre=centre.float(), time_scale=scale.float(),
    )
    return records, error


def _positions_at(g: DynamicGaussians, times: torch.Tensor) -> torch.Tensor:
    """(N, S, 3): Gaussian n at its own times[n, s] (positions() evaluates all Gaussians at shared times)."""
    means = g.params["means"][:, None, :].expand(-1, times.shape[1], -1)
    basis = time_basis(g.config, times).position  # (N, S, P + 2K)
    if basis is not None:
        means = means + torch.einsum("nsk,nkc->nsc", basis, g.params["position_motion"])
    return means


def _half_pairs(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    low16 = low.astype(np.float16).view(np.uint16).astype(np.uint32)
    high16 = high.astype(np.float16).view(np.uint16).astype(np.uint32)
    return low16 | (high16 << 16)


def _unpack_half_pairs(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low = (words & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    high = (words >> 16).astype(np.uint16).view(np.float16).astype(np.float32)
    return low, high


def cameras_json(cameras: CameraRig | None) -> list[dict]:
    """The player's camera list (3DGS cameras.json convention: centre, camera-to-world rotation, focal in px)."""
    if cameras is None:
        return []
    result = []
    for index in range(len(cameras)):
        c2w = cameras.camera_to_world[index]
        result.append({
            "id": index, "img_name": f"view_{index:03d}", "width": cameras.width, "height": cameras.height,
            "position": c2w[:3, 3].tolist(), "rotation": c2w[:3, :3].tolist(),
            "fx": float(cameras.intrinsics[index, 0, 0]), "fy": float(cameras.intrinsics[index, 1, 1]),
        })
    return result


def encode(records: SplatvRecords, cameras: CameraRig | None = None) -> bytes:
    count = len(records.positions)
    height = max(1, math.ceil(4 * count / TEXTURE_WIDTH))
    words = np.zeros((TEXTURE_WIDTH * height * 4,), dtype=np.uint32)
    table = words[: count * WORDS_PER_SPLAT].reshape(count, WORDS_PER_SPLAT)
    r = {name: value.detach().cpu().numpy().astype(np.float32) for name, value in vars(records).items()}
    table[:, 0:3] = r["positions"].view(np.uint32)
    table[:, 3] = _half_pairs(r["quats"][:, 0], r["quats"][:, 1])
    table[:, 4] = _half_pairs(r["quats"][:, 2], r["quats"][:, 3])
    table[:, 5] = _half_pairs(r["scales"][:, 0], r["scales"][:, 1])
    table[:, 6] = _half_pairs(r["scales"][:, 2], np.zeros(count, np.float32))
    rgba = np.clip(r["rgba"], 0, 255).astype(np.uint32)
    table[:, 7] = rgba[:, 0] | (rgba[:, 1] << 8) | (rgba[:, 2] << 16) | (rgba[:, 3] << 24)
    motion = np.concatenate([r["motion"].reshape(count, 9), np.zeros((count, 1), np.float32)], axis=1)  # m0..m8, 0
    for word in range(5):
        table[:, 8 + word] = _half_pairs(motion[:, 2 * word], motion[:, 2 * word + 1])
    table[:, 13] = _half_pairs(r["omega"][:, 0], r["omega"][:, 1])
    table[:, 14] = _half_pairs(r["omega"][:, 2], r["omega"][:, 3])
    table[:, 15] = _half_pairs(r["time_centre"], r["time_scale"])
    header = json.dumps([{
        "type": "splat", "size": int(words.nbytes), "texwidth": TEXTURE_WIDTH, "texheight": height,
        "cameras": cameras_json(cameras),
    }]).encode("utf-8")
    return np.array([MAGIC, len(header)], dtype="<u4").tobytes() + header + words.astype("<u4").tobytes()


SPLATV_FIX = "load a .splatv written by MV4D Save 4D or a splaTV exporter"
READ_MEMORY_PER_BYTE = 12  # the file, its decoded float32 fields and the float64 re-expansion, per byte of the file
_MAX_HEADER_BYTES = 16 << 20  # a JSON header (camera list) larger than this is no splaTV header


def _header_chunk(data: bytes, name: str) -> tuple[dict, int]:
    """The 'splat' chunk of the JSON header and where the texture starts."""
    if len(data) < 8:
        raise file_error(name, f"is {len(data)} bytes long, too short to be a .splatv file", SPLATV_FIX)
    magic, length = (int(value) for value in np.frombuffer(data[:8], dtype="<u4"))
    if magic != MAGIC:
        raise file_error(name, f"starts with magic {magic:#x}, not .splatv's {MAGIC:#x}", SPLATV_FIX)
    if length > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise file_error(name, f"declares a {length}-byte header but holds {len(data) - 8} bytes after the magic", SPLATV_FIX)
    try:
        chunks = json.loads(data[8: 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise file_error(name, f"its header is not UTF-8 JSON ({type(error).__name__}: {str(error)[:80]})", SPLATV_FIX) from None
    if not isinstance(chunks, list):
        raise file_error(name, f"its header is a JSON {type(chunks).__name__}, not the list of chunks", SPLATV_FIX)
    splat = next((chunk for chunk in chunks if isinstance(chunk, dict) and chunk.get("type") == "splat"), None)
    if splat is None:
        raise file_error(name, "its header has no 'splat' chunk", SPLATV_FIX)
    for key in ("size", "texwidth", "texheight"):
        if type(splat.get(key)) is not int or splat[key] < 0:  # bool is an int subclass: not a size
            raise file_error(name, f"its 'splat' chunk has {key} = {splat.get(key)!r}, not a whole number >= 0", SPLATV_FIX)
    if not isinstance(splat.get("cameras", []), list):
        raise file_error(name, "its 'splat' chunk has 'cameras' that are not a list", SPLATV_FIX)
    return splat, 8 + length


def decode(data: bytes, name: str = "file.splatv") -> tuple[SplatvRecords, list[dict]]:
    """The Gaussians of a .splatv's bytes; anything that is not a well-formed .splatv is an InvalidInput naming
    `name`. Sizes the header declares are checked against the bytes present before any array is built."""
    splat, start = _header_chunk(data, name)
    size, width, height = splat["size"], splat["texwidth"], splat["texheight"]
    if size != width * height * 16 or size % (4 * WORDS_PER_SPLAT):
        raise file_error(name, f"its texture of {width} x {height} texels does not hold {size} bytes of whole Gaussians "
                               f"({4 * WORDS_PER_SPLAT} bytes each)", SPLATV_FIX)
    if size > len(data) - start:
        raise file_error(name, f"declares a {size}-byte texture but holds {len(data) - start} bytes after the header "
                               "(truncated?)", "write the file again")
    table = np.frombuffer(memoryview(data)[start: start + size], dtype="<u4").reshape(-1, WORDS_PER_SPLAT)
    # Unused trailing texels are zero; a real Gaussian has a non-zero scale word.
    count = int(np.max(np.nonzero(table[:, 5])[0], initial=-1)) + 1
    table = table[:count]
    q0, q1 = _unpack_half_pairs(table[:, 3])
    q2, q3 = _unpack_half_pairs(table[:, 4])
    s0, s1 = _unpack_half_pairs(table[:, 5])
    s2, _ = _unpack_half_pairs(table[:, 6])
    rgba = np.stack([(table[:, 7] >> shift) & 0xFF for shift in (0, 8, 16, 24)], axis=1).astype(np.float32)
    motion = np.stack([half for word in range(5) for half in _unpack_half_pairs(table[:, 8 + word])], axis=1)[:, :9]
    w0, w1 = _unpack_half_pairs(table[:, 13])
    w2, w3 = _unpack_half_pairs(table[:, 14])
    centre, scale = _unpack_half_pairs(table[:, 15])
    fields = {
        "positions": table[:, 0:3].copy().view(np.float32), "quats": np.stack([q0, q1, q2, q3], 1),
        "scales": np.stack([s0, s1, s2], 1), "rgba": rgba, "motion": motion.reshape(count, 3, 3).copy(),
        "omega": np.stack([w0, w1, w2, w3], 1), "time_centre": centre.copy(), "time_scale": scale.copy(),
    }
    def rows(flags: np.ndarray) -> np.ndarray:  # per Gaussian: any flag set in its row
        return flags.any(axis=tuple(range(1, flags.ndim)))

    for field, values in fields.items():
        bad = rows(~np.isfinite(values))
        if bad.any():
            raise file_error(name, f"Gaussian {int(bad.nonzero()[0][0])} has a NaN or infinite {field}", "write the file again from finite Gaussians")
    for field in ("scales", "time_scale"):
        bad = rows(fields[field] < 0)
        if bad.any():
            raise file_error(name, f"Gaussian {int(bad.nonzero()[0][0])} has a negative {field.replace('_', ' ')}", SPLATV_FIX)
    return SplatvRecords(**{field: torch.from_numpy(values) for field, values in fields.items()}), splat.get("cameras", [])


def write_splatv(path: str | Path, gaussians: DynamicGaussians, cameras: CameraRig | None = None) -> float:
    """Write a .splatv; returns the largest position error of the cubic motion fit (0 when exact)."""
    records, error = to_records(gaussians)
    data = encode(records, cameras)
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)
    return error


def from_records(records: SplatvRecords) -> DynamicGaussians:
    """Our model from the player's fields: exact re-expansion of the cubic in dt as a cubic in tau = 2t - 1."""
    count = len(records.positions)
    centre = records.time_centre.double()
    a, b = 0.5, 0.5 - centre  # dt = a tau + b
    coefficients = records.motion.double()  # (N, 3 powers of dt, 3 axes)
    by_tau = torch.zeros(count, 4, 3, dtype=torch.float64)  # powers tau^0..tau^3
    for power in range(1, 4):  # (a tau + b)^power = sum_j C(power, j) a^j b^(power - j) tau^j
        for j in range(power + 1):
            by_tau[:, j] += math.comb(power, j) * a**j * (b ** (power - j))[:, None] * coefficients[:, power - 1]
    quats = records.quats.double() + records.omega.double() * b[:, None]
    opacity = (records.rgba[:, 3] / 255).clamp(1e-4, 1 - 1e-4)
    params = {
        "means": (records.positions.double() + by_tau[:, 0]).float(),
        "position_motion": by_tau[:, 1:].float(),
        "quats": quats.float(),
        "rotation_motion": (records.omega.double() * a)[:, None, :].float(),
        "scales": records.scales.clamp_min(1e-12).log().float(),
        "opacities": torch.log(opacity / (1 - opacity)).float(),
        "opacity_center": records.time_centre.float(),
        "opacity_log_width": (records.time_scale.clamp_min(1e-6) / math.sqrt(2)).log().float(),
        "sh0": rgb_to_sh_dc(records.rgba[:, :3] / 255)[:, None, :].float(),
    }
    return DynamicGaussians(params, MotionConfig(position_degree=3, fourier_terms=0, rotation_degree=1, temporal_opacity=True, sh_degree=0))


def read_splatv(path: str | Path) -> tuple[DynamicGaussians, list[dict]]:
    """A .splatv file's Gaussians and its camera list; anything else is an InvalidInput naming the file."""
    records, cameras = decode(read_whole_file(path, READ_MEMORY_PER_BYTE, SPLATV_FIX), Path(path).name)
    return from_records(records), cameras
