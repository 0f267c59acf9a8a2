"""Dynamic 3D Gaussians: every Gaussian carries an explicit trajectory over normalised time t in [0, 1].

    position(t) = mean + sum_k position_motion[k] b_k(t),   b(t) = (tau, tau^2, .., tau^P, sin 2pi t, cos 2pi t, .., sin 2pi Kt, cos 2pi Kt)
    rotation(t) = normalise(quat + sum_k rotation_motion[k] tau^(k+1)),   tau = 2t - 1
    opacity(t)  = sigmoid(opacity) * exp(-0.5 ((t - opacity_center) / exp(opacity_log_width))^2)   (temporal opacity)

Scales and colours (spherical harmonics, INRIA normalisation: rgb = 0.5 + C0 * dc) are constant over time.
With no motion terms this is plain 3D Gaussian splatting. All parameters live in one dict of tensors whose first
dimension is the Gaussian count, the layout gsplat's densification strategies edit in place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..cameras import CameraRig
from ..errors import InvalidInput
from ..memory import check_memory

SH_C0 = 0.28209479177387814


@dataclass(frozen=True)
class MotionConfig:
    position_degree: int = 3  # polynomial terms tau^1..tau^P of the position
    fourier_terms: int = 2  # sin/cos pairs of the position, frequencies 1..K cycles over the clip
    rotation_degree: int = 1  # polynomial terms of the quaternion
    temporal_opacity: bool = True  # each Gaussian may fade in and out around its own time
    sh_degree: int = 1  # spherical-harmonics degree of the colour (0 = view-independent)

    def __post_init__(self):
        checks = [
            ("position_degree", 0 <= self.position_degree <= 6, "use 0 to 6 (3 is cubic)"),
            ("fourier_terms", 0 <= self.fourier_terms <= 8, "use 0 to 8"),
            ("rotation_degree", 0 <= self.rotation_degree <= 3, "use 0 to 3"),
            ("sh_degree", 0 <= self.sh_degree <= 3, "use 0 to 3"),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise InvalidInput(name, f"{getattr(self, name)} is out of range", fix)

    @property
    def is_static(self) -> bool:
        return self.position_degree == self.fourier_terms == self.rotation_degree == 0 and not self.temporal_opacity

    @staticmethod
    def static(sh_degree: int = 1) -> MotionConfig:
        return MotionConfig(0, 0, 0, False, sh_degree)


@dataclass(frozen=True, eq=False)
class GaussianFrame:
    """Render-ready (activated) Gaussians at one time: the inputs of a rasteriser."""

    means: torch.Tensor  # (N, 3)
    quats: torch.Tensor  # (N, 4) wxyz, normalised
    scales: torch.Tensor  # (N, 3) linear standard deviations
    opacities: torch.Tensor  # (N,) in [0, 1]
    sh: torch.Tensor  # (N, K, 3), K = (sh_degree + 1)^2
    sh_degree: int

    @property
    def count(self) -> int:
        return len(self.means)


def parameter_shapes(config: MotionConfig) -> dict[str, tuple[int, ...]]:
    """Per-Gaussian shape of every parameter the config needs."""
    shapes: dict[str, tuple[int, ...]] = {"means": (3,), "quats": (4,), "scales": (3,), "opacities": (), "sh0": (1, 3)}
    if config.position_degree or config.fourier_terms:
        shapes["position_motion"] = (config.position_degree + 2 * config.fourier_terms, 3)
    if config.rotation_degree:
        shapes["rotation_motion"] = (config.rotation_degree, 4)
    if config.temporal_opacity:
        shapes["opacity_center"] = ()
        shapes["opacity_log_width"] = ()
    if config.sh_degree:
        shapes["shN"] = ((config.sh_degree + 1) ** 2 - 1, 3)
    return shapes


class DynamicGaussians:
    """The parameters (a dict of tensors, first dimension = Gaussian count) and the motion config."""

    def __init__(self, params: dict[str, torch.Tensor], config: MotionConfig):
        expected = parameter_shapes(config)
        if set(params) != set(expected):
            raise InvalidInput("params", f"keys {sorted(params)} do not match the motion config's {sorted(expected)}",
                               "build the Gaussians with the same MotionConfig they were saved with")
        count = len(params["means"])
        for name, shape in expected.items():
            if tuple(params[name].shape) != (count, *shape):
                raise InvalidInput("params", f"{name} has shape {tuple(params[name].shape)}, expected {(count, *shape)}",
                                   "load a file written by MV4D Save 4D")
        self.params = params
        self.config = config

    @property
    def count(self) -> int:
        return len(self.params["means"])

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    def to(self, device) -> DynamicGaussians:
        return DynamicGaussians({name: value.detach().to(device) for name, value in self.params.items()}, self.config)

    def detached(self) -> DynamicGaussians:
        return DynamicGaussians({name: value.detach().clone() for name, value in self.params.items()}, self.config)

    def config_dict(self) -> dict:
        return asdict(self.config)

    def time_basis(self, times: torch.Tensor) -> TimeBasis:
        return time_basis(self.config, times.to(self.device))

    def positions(self, times: torch.Tensor) -> torch.Tensor:
        """(T, N, 3) centres at normalised times (T,)."""
        basis = self.time_basis(times.reshape(-1))
        means = self.params["means"].expand(len(basis.times), -1, -1)
        if basis.position is not None:
            means = means + torch.einsum("tk,nkc->tnc", basis.position, self.params["position_motion"])
        return means

    def rotations(self, times: torch.Tensor) -> torch.Tensor:
        """(T, N, 4) normalised wxyz quaternions."""
        basis = self.time_basis(times.reshape(-1))
        quats = self.params["quats"].expand(len(basis.times), -1, -1)
        if basis.rotation is not None:
            quats = quats + torch.einsum("tk,nkc->tnc", basis.rotation, self.params["rotation_motion"])
        return quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def opacities(self, times: torch.Tensor) -> torch.Tensor:
        """(T, N) opacities in [0, 1]."""
        times = times.to(self.device, torch.float32).reshape(-1)
        base = torch.sigmoid(self.params["opacities"]).expand(len(times), -1)
        if not self.config.temporal_opacity:
            return base
        offset = (times[:, None] - self.params["opacity_center"]) / self.params["opacity_log_width"].exp()
        return base * torch.exp(-0.5 * offset * offset)

    def sh(self) -> torch.Tensor:
        if self.config.sh_degree:
            return torch.cat([self.params["sh0"], self.params["shN"]], dim=1)
        return self.params["sh0"]

    def frame(self, time: float | torch.Tensor) -> GaussianFrame:
        return self.frame_at(self.time_basis(torch.as_tensor(time, dtype=torch.float32).reshape(1)), 0)

    def frame_at(self, basis: TimeBasis, index: int) -> GaussianFrame:
        """The Gaussians at basis.times[index], from a basis computed once for many steps: the fit's hot path,
        a handful of kernels (one matrix product per motion term)."""
        means, quats = self.params["means"], self.params["quats"]
        if basis.position is not None:
            means = means + torch.matmul(basis.position[index], self.params["position_motion"])
        if basis.rotation is not None:
            quats = quats + torch.matmul(basis.rotation[index], self.params["rotation_motion"])
        opacities = torch.sigmoid(self.params["opacities"])
        if self.config.temporal_opacity:
            offset = (basis.times[index] - self.params["opacity_center"]) / self.params["opacity_log_width"].exp()
            opacities = opacities * torch.exp(-0.5 * offset * offset)
        return GaussianFrame(
            means=means, quats=quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12), scales=self.params["scales"].exp(),
            opacities=opacities, sh=self.sh(), sh_degree=self.config.sh_degree,
        )


@dataclass(frozen=True, eq=False)
class TimeBasis:
    """The motion basis evaluated at some times (tensors on the Gaussians' device)."""

    times: torch.Tensor  # (T,)
    position: torch.Tensor | None  # (T, P + 2K)
    rotation: torch.Tensor | None  # (T, R)


def time_basis(config: MotionConfig, times: torch.Tensor) -> TimeBasis:
    """Basis values at times of any shape (...): position (..., P + 2K), rotation (..., R)."""
    times = times.float()
    tau = 2 * times - 1
    position = rotation = None
    terms = [tau ** (k + 1) for k in range(config.position_degree)]
    for k in range(1, config.fourier_terms + 1):
        angle = 2 * math.pi * k * times
        terms += [angle.sin(), angle.cos()]
    if terms:
        position = torch.stack(terms, dim=-1)
    if config.rotation_degree:
        rotation = torch.stack([tau ** (k + 1) for k in range(config.rotation_degree)], dim=-1)
    return TimeBasis(times, position, rotation)


@dataclass(frozen=True, eq=False)
class Splats4D:
    """A fitted 4D Gaussian scene (MV4D_SPLATS4D): the Gaussians, the frame times of the video they were fitted
    to, and its cameras (default views for rendering and for web players), if known."""

    gaussians: DynamicGaussians
    frame_times: torch.Tensor  # (F,) in [0, 1]
    cameras: CameraRig | None = None

    def __repr__(self) -> str:
        return f"Splats4D({self.gaussians.count} Gaussians, {len(self.frame_times)} frames)"


def frames_at_times(gaussians: DynamicGaussians, times: torch.Tensor, fix: str) -> dict[str, torch.Tensor]:
    """Every Gaussian at each time, (T, N, ...) render-ready: positions, scales, rotations, opacities (T, N, 1)
    and sh (T, N, K, 3), as ComfyUI's core SPLAT batch holds them. Scales and colours do not change over time:
    expanded views, not copies. Refused before allocating when it would not fit in free memory."""
    g = gaussians.to("cpu")
    frames = len(times)
    # positions (3) + rotations (4) + opacities (1) float32 per Gaussian and time, and as much again for the
    # intermediates of evaluating them (basis products, quaternion norms)
    check_memory("frame_times", 2 * 8 * 4 * frames * g.count, f"the scene at each of its {frames} frame times ({g.count} Gaussians)", fix)
    with torch.no_grad():
        return {
            "positions": g.positions(times), "scales": g.params["scales"].exp().expand(frames, -1, -1),
            "rotations": g.rotations(times), "opacities": g.opacities(times)[..., None], "sh": g.sh().expand(frames, -1, -1, -1),
        }


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: torch.Tensor) -> torch.Tensor:
    return dc * SH_C0 + 0.5


def new_gaussians(means: torch.Tensor, colours: torch.Tensor, scales: torch.Tensor, config: MotionConfig,
                  opacity: float = 0.1) -> DynamicGaussians:
    """Gaussians at rest: given centres (N, 3), RGB colours (N, 3) and isotropic scales (N,), no motion yet,
    each visible over the whole clip."""
    count = len(means)
    device = means.device
    params: dict[str, torch.Tensor] = {}
    for name, shape in parameter_shapes(config).items():
        params[name] = torch.zeros(count, *shape, device=device)
    params["means"] = means.float().clone()
    params["quats"][:, 0] = 1.0
    params["scales"] = scales.float().clamp_min(1e-7).log()[:, None].repeat(1, 3)
    params["opacities"] = torch.full((count,), math.log(opacity / (1 - opacity)), device=device)
    params["sh0"] = rgb_to_sh_dc(colours.float())[:, None, :]
    if config.temporal_opacity:
        params["opacity_center"] = torch.full((count,), 0.5, device=device)
        params["opacity_log_width"] = torch.full((count,), math.log(2.0), device=device)  # nearly flat on [0, 1]
    return DynamicGaussians(params, config)
