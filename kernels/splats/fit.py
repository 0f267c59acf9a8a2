"""Fit dynamic Gaussians to a V-view x F-frame multi-view video with known cameras.

Each iteration takes one frame at random and a few of its views, renders them, and steps Adam on the loss an
objective object computes (default: the photometric loss of FitSettings). A densification strategy object edits
the Gaussians between steps, with gsplat's strategy interface (default: AdaptiveDensity, 3DGS's adaptive density
control through gsplat's DefaultStrategy, with its opacity reset applied here: in gsplat 1.5.3
`step % reset_every == 0 & step > 0` parses as a chained comparison that is never true, so the strategy never
resets opacities by itself). A fit starts from Gaussians carved from the images, or continues from given ones
(warm start); `settings.iterations` is the budget of one call, and the learning-rate decay and densification
schedule run over that budget.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..errors import InvalidInput
from ..memory import check_memory
from ..multiview_video import MultiviewVideo
from .init import camera_extent, initial_gaussians
from .losses import LPIPS, photometric_loss, resize_images
from .model import DynamicGaussians, MotionConfig
from .rasterize import GRAD_BYTES_PER_ENTRY, TILE_SIZE, TORCH_FIT_FIX, Backend, RenderOutput, render, resolve_backend

# Adam learning rates (3DGS's, per parameter); position-like ones are multiplied by the scene scale and decay
# exponentially to 1% over the fit.
LEARNING_RATES = {
    "means": 1.6e-4, "position_motion": 1.6e-4,
    "quats": 1e-3, "rotation_motion": 1e-3, "scales": 5e-3, "opacities": 5e-2,
    "opacity_center": 2e-3, "opacity_log_width": 5e-3, "sh0": 2.5e-3, "shN": 2.5e-3 / 20,
}
POSITION_PARAMETERS = ("means", "position_motion")


@dataclass(frozen=True)
class FitSettings:
    iterations: int = 5000
    resolution: int = 576  # long side of the images the fit sees (0 or at least the video's size: its own size)
    views_per_step: int = 3
    initial_gaussians: int = 20_000
    max_gaussians: int = 1_000_000  # densification stops growing past this count (a VRAM bound)
    densify: bool = True
    densify_start: float = 0.05  # fraction of the iterations
    densify_stop: float = 0.6
    densify_every: int = 100
    opacity_reset_every: int = 2000  # 0 = never
    grow_grad2d: float = 0.0002
    ssim_weight: float = 0.2
    confidence_weighting: bool = False  # Diffusion²'s confidence-weighted D-SSIM (+ LPIPS), no L1
    lpips_weight: float = 0.0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    carve: bool = True  # start from the visual hull of the non-background pixels
    initial_time_window: float = 0.1  # > 0: each Gaussian starts visible only around the frame it was carved at
                                      # (temporal std in clip units); 0: visible over the whole clip
    seed: int = 0
    backend: Backend = "auto"
    motion: MotionConfig = field(default_factory=MotionConfig)

    def check(self) -> None:
        if self.iterations <= 0:
            raise InvalidInput("iterations", f"must be at least 1, got {self.iterations}", "use e.g. 5000 (Diffusion²)")
        if self.views_per_step < 1:
            raise InvalidInput("views_per_step", f"must be at least 1, got {self.views_per_step}", "use 1 to 8")
        if self.resolution < 0 or self.initial_gaussians < 1 or self.max_gaussians < self.initial_gaussians:
            raise InvalidInput("resolution", "resolution must be >= 0 and 1 <= initial_gaussians <= max_gaussians",
                               "use resolution 0 (the images' size) and e.g. 20000 initial Gaussians")
        if not 0 <= self.ssim_weight <= 1 or self.lpips_weight < 0:
            raise InvalidInput("ssim_weight", "ssim_weight must lie in [0, 1] and lpips_weight be >= 0", "use 0.2 and 0")
        if not 0 <= self.densify_stop <= 1:
            raise InvalidInput("densify_stop", f"must lie in [0, 1], got {self.densify_stop}", "use 0.6 (the fraction of the iterations)")
        if not 0 <= self.densify_start <= self.densify_stop or self.densify_every < 1:
            raise InvalidInput("densify", "densify_start <= densify_stop within [0, 1] and densify_every >= 1 are needed",
                               "use 0.05, 0.6 and 100")


@dataclass
class FitResult:
    gaussians: DynamicGaussians
    seconds: float
    backend: str
    losses: list[float]  # mean loss of every block of 100 iterations
    history: list[int]  # Gaussian count after every block of 100 iterations


def fit_size(video: MultiviewVideo, resolution: int) -> tuple[int, int]:
    if resolution == 0 or resolution >= max(video.height, video.width):
        return video.height, video.width
    scale = resolution / max(video.height, video.width)
    return max(1, round(video.height * scale)), max(1, round(video.width * scale))


@dataclass
class FitBatch:
    """What one iteration rendered, for an objective: the views `views` of frame `frame` (at normalised `time`),
    their renders and target images, and the live Gaussians (to render more, e.g. novel views for SDS)."""

    step: int
    frame: int
    time: torch.Tensor  # () on the device
    views: torch.Tensor  # (B,) view indices
    output: RenderOutput  # colors (B, H, W, 3)
    target: torch.Tensor  # (B, H, W, 3) in [0, 1]
    gaussians: DynamicGaussians


class Objective(Protocol):
    """The loss of one iteration (a differentiable scalar)."""

    def loss(self, batch: FitBatch) -> torch.Tensor: ...


class DensificationStrategy(Protocol):
    """gsplat's strategy interface (gsplat.strategy.DefaultStrategy is one): it may replace the parameter tensors
    of `params` and their optimizer state in place."""

    def initialize_state(self, scene_scale: float) -> dict: ...

    def step_pre_backward(self, params: dict, optimizers: dict, state: dict, step: int, info: dict) -> None: ...

    def step_post_backward(self, params: dict, optimizers: dict, state: dict, step: int, info: dict) -> None: ...


@dataclass
class PhotometricObjective:
    """The renders against the target images (losses.photometric_loss): L1 + D-SSIM, or Diffusion²'s
    confidence-weighted D-SSIM, optionally + LPIPS."""

    ssim_weight: float = 0.2
    confidence_weighting: bool = False
    lpips: LPIPS | None = None
    lpips_weight: float = 0.0

    @classmethod
    def of(cls, settings: FitSettings, lpips: LPIPS | None = None) -> PhotometricObjective:
        return cls(settings.ssim_weight, settings.confidence_weighting, lpips, settings.lpips_weight)

    def loss(self, batch: FitBatch) -> torch.Tensor:
        return photometric_loss(batch.output.colors, batch.target, self.ssim_weight, self.confidence_weighting,
                                self.lpips, self.lpips_weight)


class AdaptiveDensity:
    """3DGS's adaptive density control from FitSettings: gsplat's DefaultStrategy (split, clone, prune), growing
    no further once max_gaussians is reached, with the opacity reset gsplat 1.5.3 skips."""

    def __init__(self, settings: FitSettings):
        self.settings = settings
        self.strategy = None

    def initialize_state(self, scene_scale: float) -> dict:
        self.strategy, state = _strategy(self.settings, scene_scale)
        return state

    def step_pre_backward(self, params, optimizers, state, step, info) -> None:
        self.strategy.step_pre_backward(params, optimizers, state, step, info)

    def step_post_backward(self, params, optimizers, state, step, info) -> None:
        _densify(self.strategy, params, optimizers, state, step, info, self.settings)


def fit_dynamic_gaussians(
    video: MultiviewVideo,
    settings: FitSettings = FitSettings(),
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    lpips: LPIPS | None = None,
    start: DynamicGaussians | None = None,
    objective: Objective | None = None,
    strategy: DensificationStrategy | None = None,
) -> FitResult:
    """The one entry point of fitting. on_step(done, total) is called every iteration (ComfyUI's progress bar and
    interrupt check); it may raise to stop the fit, and nothing is returned then. Runs with autograd on even when
    called under torch.inference_mode(), as ComfyUI executes nodes.

    start: continue from these Gaussians (not modified) instead of carving new ones; their motion config must be
    settings.motion. objective: the loss (default PhotometricObjective.of(settings, lpips)). strategy: the
    densification (default AdaptiveDensity(settings) when settings.densify, else none)."""
    if start is not None and start.config != settings.motion:
        raise InvalidInput("start", f"the Gaussians to start from have motion {start.config}, the fit {settings.motion}",
                           "fit with the motion config the Gaussians were made with")
    if strategy is None and settings.densify:
        strategy = AdaptiveDensity(settings)
    with torch.inference_mode(False), torch.enable_grad():
        if objective is None:  # LPIPS moved here: weights copied under inference mode could not be differentiated
            objective = PhotometricObjective.of(settings, lpips.to(device) if lpips is not None and settings.lpips_weight > 0 else None)
        return _fit(video, settings, torch.device(device), on_step, start, objective, strategy)


def check_fit_memory(video: MultiviewVideo, settings: FitSettings, device: torch.device, backend: str) -> None:
    """Refuse, before anything is allocated, a fit whose targets or (on the PyTorch rasteriser) whose first step
    cannot fit in free memory."""
    height, width = fit_size(video, settings.resolution)
    check_memory("resolution", video.num_views * video.num_frames * height * width * 3,
                 f"the {video.num_views} x {video.num_frames} target images at {width} x {height} (8-bit)",
                 "lower resolution", device)
    if backend == "torch":
        # A lower bound: every initial Gaussian lies in the ball all cameras see, so it is listed in at least one
        # 16 x 16 tile of each view a step renders, and autograd keeps each listing's pixel entries.
        views = min(settings.views_per_step, video.num_views)
        check_memory("gaussians", settings.initial_gaussians * views * TILE_SIZE * TILE_SIZE * GRAD_BYTES_PER_ENTRY,
                     f"a step of the PyTorch rasteriser with {settings.initial_gaussians} Gaussians in {views} views",
                     TORCH_FIT_FIX, device)


def fit_targets(video: MultiviewVideo, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The images the fit compares against: (V, F, height, width, 3) uint8 on the device (21 x 25 images of 576^2:
    0.5 GB instead of 2 GB), resized and quantised a view at a time where the fit runs: for the paper's grid on an
    H200 0.33 s with the copy of the float images, against 1.07 s converting on the CPU first (bench/RESULTS.md)."""
    targets = torch.empty(video.num_views, video.num_frames, height, width, 3, dtype=torch.uint8, device=device)
    for view in range(video.num_views):
        images = video.images[view].to(device)
        targets[view] = (resize_images(images, height, width).clamp(0, 1) * 255).round()
    return targets


def _fit(video, settings, device, on_step, start, objective, strategy) -> FitResult:
    settings.check()
    video.check_has_content()
    backend = resolve_backend(settings.backend, device)
    check_fit_memory(video, settings, device, backend)
    started = time.perf_counter()
    height, width = fit_size(video, settings.resolution)
    targets = fit_targets(video, height, width, device)
    cameras = video.cameras.resized(height, width)
    world_to_camera = cameras.world_to_camera.float().to(device)
    intrinsics = cameras.intrinsics.float().to(device)
    background = torch.tensor(settings.background, dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(settings.seed)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # gsplat's split samples from the global generator
        if start is None:
            carve_background = background.cpu() if settings.carve else None
            gaussians = initial_gaussians(video, settings.initial_gaussians, settings.motion, carve_background, generator, device,
                                          settings.initial_time_window, on_batch=lambda: on_step(0, settings.iterations) if on_step else None)
        else:
            gaussians = start.detached().to(device)
        # copies: a warm start may be a node's output, made under inference mode, which autograd cannot use
        params = {name: torch.nn.Parameter(value.clone(memory_format=torch.contiguous_format)) for name, value in gaussians.params.items()}
        gaussians = DynamicGaussians(params, settings.motion)  # the strategy edits this dict in place
        scene_scale = camera_extent(video.cameras)
        base_rates = {name: LEARNING_RATES[name] * (scene_scale if name in POSITION_PARAMETERS else 1.0) for name in params}
        # One Adam for all parameters (one step() and zero_grad() per iteration), seen by the strategy as one
        # optimizer per parameter, gsplat's convention.
        optimizer = torch.optim.Adam([{"params": [param], "lr": base_rates[name], "name": name} for name, param in params.items()],
                                     eps=1e-15, fused=device.type == "cuda")
        optimizers = {group["name"]: _OneGroup(optimizer, group) for group in optimizer.param_groups}
        state = strategy.initialize_state(scene_scale=scene_scale) if strategy is not None else None

        losses, history, block_loss = [], [], torch.zeros((), device=device)
        views_per_step = min(settings.views_per_step, video.num_views)
        basis = gaussians.time_basis(video.times)
        for step in range(settings.iterations):
            frame = int(torch.randint(video.num_frames, (1,), generator=generator))
            views = torch.randperm(video.num_views, generator=generator)[:views_per_step]
            cameras_and_views = torch.stack([video.camera_indices(views, torch.full_like(views, frame)), views]).to(device, non_blocking=True)
            camera_index, view_index = cameras_and_views
            output = render(gaussians.frame_at(basis, frame), world_to_camera[camera_index],
                            intrinsics[camera_index], width, height, background, backend)
            target = targets[view_index, frame].float() / 255
            if strategy is not None:
                strategy.step_pre_backward(params, optimizers, state, step, output.info)
            loss = objective.loss(FitBatch(step, frame, basis.times[frame], view_index, output, target, gaussians))
            loss.backward()
            if strategy is not None:
                strategy.step_post_backward(params, optimizers, state, step, output.info)
            decay = 0.01 ** (step / max(1, settings.iterations - 1))
            for group in optimizer.param_groups:
                if group["name"] in POSITION_PARAMETERS:
                    group["lr"] = base_rates[group["name"]] * decay
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            block_loss += loss.detach()
            if (step + 1) % 100 == 0 or step + 1 == settings.iterations:
                losses.append(float(block_loss) / ((step % 100) + 1))
                history.append(gaussians.count)
                block_loss.zero_()
            if on_step is not None:
                on_step(step + 1, settings.iterations)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return FitResult(gaussians.detached(), time.perf_counter() - started, backend, losses, history)


class _OneGroup:
    """One parameter group of a shared optimizer, shaped like the one-parameter optimizer gsplat's strategy ops
    expect: they read `state` and replace `param_groups[0]["params"]`, which is the shared group itself."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict):
        self.state = optimizer.state
        self.param_groups = [group]


@functools.lru_cache(maxsize=1)
def _strategy_class():
    from gsplat.strategy import DefaultStrategy  # pure Python; imported only when a fit densifies

    class SyncFreeStrategy(DefaultStrategy):
        """gsplat's DefaultStrategy gathering its per-step gradient statistics without torch.where, which makes
        the CPU wait for the GPU at every step (unpacked rendering, image-plane gradients, as we use it)."""

        def _update_state(self, params, state, info, packed=False):
            grads = info["means2d"].grad  # (C, N, 2)
            # Python-number scales: a tensor built from a list here would be a blocking host-to-device copy.
            x = grads[..., 0] * (info["width"] / 2.0 * info["n_cameras"])
            y = grads[..., 1] * (info["height"] / 2.0 * info["n_cameras"])
            seen = (info["radii"] > 0).all(dim=-1)  # (C, N)
            count = len(params["means"])
            if state["grad2d"] is None:
                state["grad2d"] = torch.zeros(count, device=grads.device)
                state["count"] = torch.zeros(count, device=grads.device)
            state["grad2d"] += (torch.sqrt(x * x + y * y) * seen).sum(0)
            state["count"] += seen.sum(0)

    return SyncFreeStrategy


def _strategy(settings: FitSettings, scene_scale: float):
    """gsplat's strategy (sync-free statistics) on FitSettings' schedule, and its initial state."""
    strategy = _strategy_class()(
        refine_start_iter=int(settings.densify_start * settings.iterations),
        refine_stop_iter=int(settings.densify_stop * settings.iterations),
        refine_every=settings.densify_every,
        reset_every=settings.opacity_reset_every or 10**9,
        grow_grad2d=settings.grow_grad2d,
    )
    return strategy, strategy.initialize_state(scene_scale=scene_scale)


def _densify(strategy, params, optimizers, state, step, info, settings) -> None:
    from gsplat.strategy.ops import reset_opa

    if step < strategy.refine_stop_iter and len(params["means"]) >= settings.max_gaussians:
        # at the cap: keep pruning and resetting, stop growing (the strategy only grows at refine steps)
        growth = strategy.grow_grad2d
        strategy.grow_grad2d = math.inf
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        strategy.grow_grad2d = growth
    else:
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
    reset_every = settings.opacity_reset_every
    if reset_every and 0 < step < strategy.refine_stop_iter and step % reset_every == 0:
        reset_opa(params=params, optimizers=optimizers, state=state, value=strategy.prune_opa * 2.0)
