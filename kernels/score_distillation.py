"""4Diffusion's 4D-aware score distillation (SDS) of 4D Gaussians, as an objective of the 4D fit (splats/fit.py).

Every iteration of the fit renders the anchor view at one frame (the fit's own step) for the anchor term, and this
objective renders the V views of the rig turned by a random azimuth about the up axis over a random window of W
consecutive frames (4Diffusion: 4 views x 8 frames at 256 px, azimuth offset uniform). Their latents z (the score
model's encoder: differentiable) are noised at a random timestep t, z_t = sqrt(ab) z + sqrt(1 - ab) eps, and the
model's classifier-free-guided prediction eps_hat gives the clean latents it sees,

    x0_hat = (z_t - sqrt(1 - ab) eps_hat) / sqrt(ab),

optionally rescaled toward the standard deviation of the conditional prediction's x0 (MVDream's and 4Diffusion's
recon_std_rescale, per grid). The loss is 4Diffusion's x0 reconstruction, 0.5 ||z - sg(x0_hat)||^2 / B, so z gets the
gradient (z - x0_hat) / B, which without rescaling is

    w(t) (eps_hat - eps),   w(t) = sqrt((1 - ab) / ab) / B:

SDS with that weighting. The model's prediction is taken without gradients (the score model promises none): the
gradient reaches the Gaussians through the encoder and the renders only, so memory does not grow with the UNet.

The anchor term (4Diffusion's anchor loss) compares the fit's render of the anchor view with the fit's target at
that frame: lambda_ssim (1 - SSIM) + lambda_lpips LPIPS (4Diffusion: 100 and 200; LPIPS only with its weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .cameras import CameraRig, rotated_about_up
from .errors import InvalidInput
from .grid import Grid
from .memory import check_memory
from .splats.fit import FitBatch
from .splats.init import scene_sphere
from .splats.losses import LPIPS, ssim_per_image
from .splats.model import DynamicGaussians
from .splats.rasterize import GRAD_BYTES_PER_ENTRY, TILE_SIZE, Backend, render, resolve_backend


@dataclass(frozen=True)
class ScoreRequest:
    """What a score model is asked about: the views `cameras` over the clip's frames `frames` (indices), one V x W
    grid of latents, view-major."""

    cameras: CameraRig
    frames: tuple[int, ...]

    @property
    def grid(self) -> Grid:
        return Grid(len(self.cameras), len(self.frames))


class ScoreModel(Protocol):
    """A diffusion model as score distillation needs it."""

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) alpha-bar of the model's discrete noise schedule."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) images in [0, 1] -> (B, C, h, w) latents; differentiable."""

    def predict_noise(self, noisy: torch.Tensor, timestep: int, request: ScoreRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided, conditional) noise predictions for the noisy latents z_t (DDPM scaling) of `request`'s grid,
        without gradients."""


@dataclass(frozen=True)
class SDSSettings:
    iterations: int = 500
    guidance_scale: float = 5.0  # 4Diffusion
    # Timesteps drawn uniformly in [min, max] (fractions of the schedule). 4Diffusion starts NeRFs from nothing and
    # anneals 0.98 -> [0.02, 0.25] over 5000 iterations; a refinement starts from a fit and stays low.
    timestep_min: float = 0.02
    timestep_max: float = 0.5
    window_frames: int = 8  # frames per SDS evaluation (4DM was trained with 8)
    x0_rescale: float = 0.2  # 4Diffusion's recon_std_rescale (0: plain x0 reconstruction)
    sds_weight: float = 1.0
    anchor_ssim_weight: float = 100.0  # 4Diffusion's lambda_ssim (50, added twice in its code)
    anchor_lpips_weight: float = 0.0  # 4Diffusion: 200; needs the LPIPS weights
    seed: int = 0

    def check(self) -> None:
        if self.iterations < 1 or self.window_frames < 1:
            raise InvalidInput("iterations", "iterations and window_frames must be at least 1", "use e.g. 500 and 8")
        if not 0 <= self.timestep_min <= self.timestep_max <= 1:
            raise InvalidInput("timestep_min", f"the timestep range [{self.timestep_min}, {self.timestep_max}] is not within [0, 1] "
                               "with min <= max", "use e.g. 0.02 and 0.5 (fractions of the noise schedule)")
        if not 0 <= self.x0_rescale <= 1:
            raise InvalidInput("x0_rescale", f"must lie in [0, 1], got {self.x0_rescale}", "use 0.2 (4Diffusion) or 0")
        if min(self.sds_weight, self.anchor_ssim_weight, self.anchor_lpips_weight, self.guidance_scale) < 0:
            raise InvalidInput("sds_weight", "weights and the guidance scale must not be negative", "use 4Diffusion's: 1, 100, 200, 5")


def timestep_range(settings: SDSSettings, steps: int) -> tuple[int, int]:
    """The first and last timestep index drawn (4Diffusion: int(T * fraction))."""
    return min(steps - 1, int(steps * settings.timestep_min)), min(steps - 1, int(steps * settings.timestep_max))


def x0_reconstruction(noisy: torch.Tensor, guided: torch.Tensor, conditional: torch.Tensor, alpha_bar: torch.Tensor,
                      rescale: float) -> torch.Tensor:
    """The clean latents of one grid the guided prediction implies, rescaled by `rescale` toward the standard
    deviation of the conditional prediction's (4Diffusion's recon_std_rescale, one factor for the whole grid)."""
    scale_signal, scale_noise = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x0 = (noisy - scale_noise * guided) / scale_signal
    if rescale > 0:
        x0_conditional = (noisy - scale_noise * conditional) / scale_signal
        factor = (x0_conditional.std() + 1e-8) / (x0.std() + 1e-8)
        x0 = rescale * factor * x0 + (1 - rescale) * x0
    return x0


def sds_loss(latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 ||z - sg(target)||^2 / B: its gradient with respect to z is (z - target) / B."""
    return 0.5 * (latents - target.detach()).pow(2).sum() / len(latents)


def sds_weight(alpha_bar: torch.Tensor, batch: int) -> torch.Tensor:
    """w(t) of the x0-reconstruction loss without rescaling: dL/dz = w(t) (eps_hat - eps)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt() / batch


@dataclass(frozen=True)
class SDSDraw:
    """The random choices of one SDS evaluation."""

    timestep: int
    azimuth: float  # degrees the rig is turned by about the up axis
    first_frame: int  # of the window
    noise_seed: int


@dataclass
class SDSResult:
    """One SDS evaluation, for tests and logs (all detached)."""

    loss: torch.Tensor
    latents: torch.Tensor
    noise: torch.Tensor
    guided: torch.Tensor
    target: torch.Tensor
    alpha_bar: torch.Tensor


@dataclass
class SDSHistory:
    sds: list[torch.Tensor] = field(default_factory=list)  # per iteration, detached scalars on the fit's device
    anchor: list[torch.Tensor] = field(default_factory=list)

    def means(self, name: str, blocks: int = 10) -> list[float]:
        """The mean of each of `blocks` consecutive blocks of iterations."""
        values = torch.stack(getattr(self, name)).float().cpu() if getattr(self, name) else torch.zeros(0)
        return [float(block.mean()) for block in values.tensor_split(min(blocks, len(values)))] if len(values) else []


class ScoreDistillation:
    """The fit objective: anchor term + sds_weight x SDS term (see the module docstring). `cameras` are the V views
    the score model takes (at the size to render), `times` the clip's frame times."""

    def __init__(self, score: ScoreModel, cameras: CameraRig, times: torch.Tensor, settings: SDSSettings,
                 background: torch.Tensor, backend: Backend = "auto", lpips: LPIPS | None = None):
        settings.check()
        self.score, self.cameras, self.settings, self.lpips, self.backend = score, cameras, settings, lpips, backend
        # copies: made outside inference mode they can take part in the fit's autograd graph, whatever made them
        self.times = torch.as_tensor(times, dtype=torch.float32).reshape(-1).clone()
        self.background = torch.as_tensor(background, dtype=torch.float32).clone()
        self.window = min(settings.window_frames, len(self.times))
        # the rig turns about the up axis through the point its cameras look at (the origin for one camera)
        self.centre = scene_sphere(cameras)[0].tolist() if len(cameras) > 1 else [0.0, 0.0, 0.0]
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.history = SDSHistory()

    def draw(self, generator: torch.Generator | None = None) -> SDSDraw:
        generator = generator or self.generator
        low, high = timestep_range(self.settings, len(self.score.alphas_cumprod))
        return SDSDraw(timestep=int(torch.randint(low, high + 1, (1,), generator=generator)),
                       azimuth=float(torch.rand(1, generator=generator)) * 360.0,
                       first_frame=int(torch.randint(len(self.times) - self.window + 1, (1,), generator=generator)),
                       noise_seed=int(torch.randint(2**62, (1,), generator=generator)))

    def check_memory(self, gaussians: int, device: torch.device | str) -> None:
        """Refuse, before anything runs, an SDS step the PyTorch rasteriser could not hold: as the fit's own bound
        (fit.check_fit_memory), every Gaussian listed in at least one tile of each of the V x W renders."""
        device = torch.device(device)
        if resolve_backend(self.backend, device) == "torch":
            views = len(self.cameras) * self.window
            check_memory("gaussians", gaussians * views * TILE_SIZE * TILE_SIZE * GRAD_BYTES_PER_ENTRY,
                         f"an SDS step of the PyTorch rasteriser with {gaussians} Gaussians in {len(self.cameras)} views x "
                         f"{self.window} frames", "lower window_frames, or refine fewer Gaussians (fit them with a lower "
                         "max_gaussians); a CUDA GPU renders with gsplat instead", device)

    def request(self, draw: SDSDraw) -> ScoreRequest:
        return ScoreRequest(rotated_about_up(self.cameras, draw.azimuth, self.centre),
                            tuple(range(draw.first_frame, draw.first_frame + self.window)))

    def render_window(self, gaussians: DynamicGaussians, request: ScoreRequest) -> torch.Tensor:
        """(V W, H, W, 3) renders of the request's grid, view-major, differentiable in the Gaussians."""
        device = gaussians.device
        rig = request.cameras
        world_to_camera, intrinsics = rig.world_to_camera.float().to(device), rig.intrinsics.float().to(device)
        background = self.background.to(device)
        backend = resolve_backend(self.backend, device)
        basis = gaussians.time_basis(self.times.to(device))
        frames = [render(gaussians.frame_at(basis, frame), world_to_camera, intrinsics, rig.width, rig.height, background,
                         backend).colors for frame in request.frames]
        return request.grid.as_batch(torch.stack(frames, dim=1))  # (V, W, ...) -> view-major

    def sds_of_images(self, images: torch.Tensor, request: ScoreRequest, draw: SDSDraw) -> tuple[torch.Tensor, SDSResult]:
        """The SDS loss of a grid of renders (differentiable in the images) and what it was made of."""
        latents = self.score.encode(images)
        alpha_bar = self.score.alphas_cumprod[draw.timestep].to(latents.device, torch.float32)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(draw.noise_seed)).to(latents.device)
        with torch.no_grad():
            noisy = alpha_bar.sqrt() * latents.detach().float() + (1 - alpha_bar).sqrt() * noise
            guided, conditional = self.score.predict_noise(noisy, draw.timestep, request)
            target = x0_reconstruction(noisy, guided.float(), conditional.float(), alpha_bar, self.settings.x0_rescale)
        loss = sds_loss(latents.float(), target)
        return loss, SDSResult(loss.detach(), latents.detach(), noise, guided.detach(), target, alpha_bar)

    def sds_term(self, gaussians: DynamicGaussians, draw: SDSDraw) -> tuple[torch.Tensor, SDSResult]:
        request = self.request(draw)
        return self.sds_of_images(self.render_window(gaussians, request), request, draw)

    def anchor_term(self, renders: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        settings = self.settings
        loss = settings.anchor_ssim_weight * (1 - ssim_per_image(renders, targets)).mean()
        if self.lpips is not None and settings.anchor_lpips_weight > 0:
            loss = loss + settings.anchor_lpips_weight * self.lpips(renders, targets).mean()
        return loss

    def loss(self, batch: FitBatch) -> torch.Tensor:
        anchor = self.anchor_term(batch.output.colors, batch.target)
        total = anchor
        if self.settings.sds_weight > 0:
            sds, _ = self.sds_term(batch.gaussians, self.draw())
            total = total + self.settings.sds_weight * sds
            self.history.sds.append(sds.detach())
        self.history.anchor.append(anchor.detach())
        return total
