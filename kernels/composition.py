"""Diffusion² score composition: how much of the video model and of the multi-view model goes into each cell of
a views x frames latent grid at each denoising step (the grid itself: `grid.py`), how each model sees the grid
(its layout: rows or columns), whether two models' predictions can be combined at all (their prediction spaces),
how calls are chunked, and the rollback Euler sampler.

At equal sigma combining scores is the same as combining denoised predictions (score = (D - x) / sigma^2), so the
composed denoiser is D = w_video * D_video(row) + w_multiview * D_multiview(column) with w_video + w_multiview = 1.
That needs one sigma to mean one noise level for both models, and one latent space: see PredictionSpace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from einops import rearrange

from .errors import InvalidInput
from .grid import Grid

SCHEDULES = ("constant", "linear", "logistic")


@dataclass(frozen=True)
class CompositionSchedule:
    """The multi-view weight s over the denoising steps (official code's ScaleScheduler).

    x = step / (steps - 1) runs from 0 (the noisiest step) to 1. constant: s = weight. linear: s goes from `start`
    to `end`. logistic: s = end + (start - end) * (1 - 1 / (1 + exp(-k (x - center)))), so with start > end the
    multi-view model leads while the geometry forms and hands over to the video model for the details.
    per_view: modulate by each view's azimuth (official code): views seen from the side lean on the multi-view model.
    """

    kind: str = "constant"
    weight: float = 0.6
    start: float = 1.0
    end: float = 0.0
    logistic_k: float = 15.0
    logistic_center: float = 0.5
    per_view: bool = True

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise InvalidInput("schedule", f"unknown schedule {self.kind!r}", f"use one of {', '.join(SCHEDULES)}")
        for name in ("weight", "start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(name, f"{value} is outside [0, 1]", "a model weight is a fraction between 0 and 1")


@dataclass(frozen=True)
class GuiderSettings:
    """Everything the composed guider needs to know besides its models and conditioning; the defaults are the
    official Diffusion² settings and the one source the node schema and the benchmarks read."""

    schedule: CompositionSchedule = CompositionSchedule()
    video_cfg: tuple[float, float] = (1.5, 3.0)  # first and last frame of each video (SVD's linear CFG)
    multiview_cfg: tuple[float, float] = (2.5, 2.5)  # first and last view of each multi-view set (SV3D: flat)
    videos_per_call: int = 0  # 0: as many as fit in free memory
    multiview_sets_per_call: int = 0
    # optional speed-up (changes the result): classifier-free guidance only while sigma lies in this interval;
    # outside it the unconditional pass is skipped. The default interval holds every sigma (off).
    guidance_sigmas: tuple[float, float] = (0.0, math.inf)
    # optional speed-up (changes the result): each evaluation runs one of the two models and reuses the other's
    # prediction from the evaluation before (about half the UNet work per step)
    alternate_models: bool = False
    # exact (the result is the same): cross-attention over a single context token (SVD / SV3D's CLIP image
    # embedding) skips the queries' projection and the attention, whose output is that token's value for every query
    single_token_shortcut: bool = True
    # exact up to rounding (as a change of attention backend): self-attention over at most 64 tokens (the temporal
    # layers' frames / views) through mv4d's one-tile Triton kernel, about 5x faster there than PyTorch's kernels
    short_sequence_attention: bool = True
    # exact (the same calls on the same inputs): the roles' UNet work of one evaluation side by side on two CUDA
    # streams, so one model's memory-bound kernels overlap the other's matrix products
    roles_side_by_side: bool = False


@dataclass(frozen=True)
class ReferenceSettings:
    """How the reference row and column condition the grid (official Diffusion² / SVD / SV3D values)."""

    fps: int = 6  # SVD frame-rate conditioning
    motion_bucket_id: int = 127  # SVD motion conditioning
    video_augmentation: float = 0.02  # noise on the video model's reference pixels
    multiview_augmentation: float = 1e-5  # noise on the multi-view model's reference pixels (SV3D)


# How a model sees the grid. A layout is a policy object: a model family that sees the grid in another way (all
# videos together, say) is a new layout, not a branch in the guider.

class Layout:
    """The groups one model denoises on their own: a video per view (rows) or a multi-view set per frame (columns),
    and how the grid's view-major batch maps to the model's order (groups one after another) and back."""

    name = ""

    def groups(self, grid: Grid) -> int:
        raise NotImplementedError

    def group_grid(self, grid: Grid) -> Grid:
        """The grid of one group as the model sees it (1 x F for a video, V x 1 for a multi-view set)."""
        raise NotImplementedError

    def share(self, video: torch.Tensor, multiview: torch.Tensor) -> torch.Tensor:
        """Which of the schedule's two per-view weights is this layout's."""
        raise NotImplementedError

    def take(self, grid: Grid, batch: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
        """The groups' items of a view-major batch, in this layout's order, (len(groups) * group size, ...)."""
        raise NotImplementedError

    def put(self, grid: Grid, batch: torch.Tensor, groups: Sequence[int], values: torch.Tensor) -> None:
        """Writes `values` (as `take` gives them) back into the view-major batch."""
        raise NotImplementedError

    def order(self, grid: Grid, batch: torch.Tensor) -> torch.Tensor:
        """The whole grid in this layout's order (the order its conditioning is built in)."""
        return self.take(grid, batch, range(self.groups(grid)))

    def items(self, grid: Grid, groups: Sequence[int]) -> slice | torch.Tensor:
        """Where the groups' items lie in this layout's order (a slice when they are consecutive)."""
        size = self.group_grid(grid).cells
        groups = list(groups)
        if groups == list(range(groups[0], groups[-1] + 1)):
            return slice(groups[0] * size, (groups[-1] + 1) * size)
        return (torch.tensor(groups)[:, None] * size + torch.arange(size)).flatten()

    def open_groups(self, grid: Grid, unknown: torch.Tensor | None) -> list[int]:
        """The groups with at least one cell to denoise, given a per-cell mask of the cells that are not known
        (a sampler's denoise mask: 0 where a reference is kept), or every group when there is none."""
        if unknown is None:
            return list(range(self.groups(grid)))
        per_cell = unknown.reshape(grid.cells, -1).amax(dim=1)
        per_group = self.order(grid, per_cell).reshape(self.groups(grid), -1).amax(dim=1)
        return [int(g) for g in (per_group > 0).nonzero().flatten()]

    def __repr__(self) -> str:
        return self.name


def _groups_index(groups: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """Consecutive groups as a slice: a view to read, and nothing to copy to the GPU to write (an index list would be
    copied from CPU memory, and such a copy waits for every queued kernel: the GPU would then idle while the CPU
    prepares the next call)."""
    groups = list(groups)
    if groups == list(range(groups[0], groups[-1] + 1)):
        return slice(groups[0], groups[-1] + 1)
    return torch.tensor(groups, device=device)


def _select(matrix: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    return matrix[_groups_index(groups, matrix.device)]


class Rows(Layout):
    """A video model: row v (view v over time) is one video."""

    name = "rows"

    def groups(self, grid):
        return grid.views

    def group_grid(self, grid):
        return grid.row_grid

    def share(self, video, multiview):
        return video

    def take(self, grid, batch, groups):
        return _select(grid.as_matrix(batch), groups).flatten(0, 1)

    def put(self, grid, batch, groups, values):
        grid.as_matrix(batch)[_groups_index(groups, batch.device)] = values.reshape(len(groups), grid.frames, *values.shape[1:])


class Columns(Layout):
    """A multi-view model: column f (every view at time f) is one multi-view set, views in order."""

    name = "columns"

    def groups(self, grid):
        return grid.frames

    def group_grid(self, grid):
        return grid.column_grid

    def share(self, video, multiview):
        return multiview

    def take(self, grid, batch, groups):
        by_frame = rearrange(batch, "(v f) ... -> f v ...", f=grid.frames)
        return _select(by_frame, groups).flatten(0, 1)

    def put(self, grid, batch, groups, values):
        by_cell = batch.view(grid.views, grid.frames, *batch.shape[1:])
        by_cell[:, _groups_index(groups, batch.device)] = rearrange(values, "(f v) ... -> v f ...", v=grid.views)


ROWS, COLUMNS = Rows(), Columns()


# Whether two models can be combined: one latent space, one meaning of sigma, noise levels both were trained on.

VE_NOISE = "x = x0 + sigma * noise"  # k-diffusion's convention, which ComfyUI's eps / v / EDM / x0 models share
FLOW_NOISE = "x = (1 - sigma) * x0 + sigma * noise"  # rectified flow (ComfyUI's CONST: SD3, Flux, Wan, ...)
SIGMA_TOLERANCE = 1e-4  # relative: a scheduler's end points are float32 copies of the model's own


@dataclass(frozen=True)
class PredictionSpace:
    """What one model's prediction means: what its network outputs, what sigma means for it, the noise levels it
    was trained on, and its latent space. The sampler hands every model the same sigma and x; each model's own
    sampling object turns them into its input (scaling, its timestep) and its output into x0, so two predictions
    are comparable when the noise convention and the latent space agree, at a sigma both models know."""

    prediction: str  # "eps", "v", "EDM", "x0", "flow velocity", ...
    noise: str | None  # VE_NOISE, FLOW_NOISE, or None for a sampling without noise levels (image to image)
    schedule: str  # the noise levels it was trained on: "LDM linear", "sqrt_linear", "EDM", ...
    sigma_min: float
    sigma_max: float
    latents: str  # its latent space, e.g. "SD15 (4 channels, scale 0.18215)"

    def covers(self, sigma: float) -> bool:
        return self.sigma_min * (1 - SIGMA_TOLERANCE) <= sigma <= self.sigma_max * (1 + SIGMA_TOLERANCE)

    def describe(self) -> str:
        return f"{self.prediction}, {self.schedule} (sigma {self.sigma_min:.4g}..{self.sigma_max:.4g}), {self.latents} latents"


def reconcile(spaces: Mapping[str, PredictionSpace]) -> tuple[float, float]:
    """The noise levels every model knows, (sigma_min, sigma_max), or InvalidInput naming the model (its key)
    whose predictions cannot be combined with the first one's, and why."""
    (first_name, first), *others = spaces.items()
    for name, space in spaces.items():
        if space.noise is None:
            raise InvalidInput(name, f"its sampling ({space.prediction}) has no noise levels, so nothing is denoised "
                               "step by step to combine", "connect the model without that sampling patch")
    for name, space in others:
        if space.noise != first.noise:
            raise InvalidInput(name, f"sigma means another noise level for it ({space.noise}) than for {first_name} "
                               f"({first.noise}): at one sigma the two models would see different amounts of noise",
                               "remove the sampling patch that changed it (e.g. core ModelSamplingSD3 / ModelSamplingFlux on "
                               "a Stable Diffusion model), or compose two models of one kind")
        if space.latents != first.latents:
            raise InvalidInput(name, f"its latents are {space.latents}, {first_name}'s are {first.latents}: an x0 of one "
                               "model is no image for the other", "compose two models of one latent space (SVD, SV3D, "
                               "AnimateDiff on SD1.5 and MVDream share Stable Diffusion's)")
    low, high = max(s.sigma_min for s in spaces.values()), min(s.sigma_max for s in spaces.values())
    if low > high:
        ranges = ", ".join(f"{name} {s.sigma_min:.4g}..{s.sigma_max:.4g}" for name, s in spaces.items())
        raise InvalidInput(others[0][0] if others else first_name, f"the models were trained on noise levels that do not "
                           f"overlap ({ranges})", "compose models whose noise ranges overlap")
    return low, high


def covering_weights(weights: Sequence[torch.Tensor], covered: Sequence[bool]) -> list[torch.Tensor]:
    """Each model's per-view weight at one noise level after the models that were not trained at it (covered
    False) give their share to those that were: the others' weights scaled to sum to 1 (split evenly where they
    are all 0). Unchanged when every model, or none, covers it."""
    if all(covered) or not any(covered):
        return list(weights)
    total = sum(w for w, c in zip(weights, covered) if c)
    even = 1.0 / sum(covered)
    return [torch.where(total > 0, w / total.clamp_min(1e-300), torch.full_like(w, even)) if c else torch.zeros_like(w)
            for w, c in zip(weights, covered)]


ROLLBACK_STEPS = 10  # official: the first 10 of 50 steps are taken twice (60 joint evaluations)


def multiview_weight(schedule: CompositionSchedule, step: int, steps: int) -> float:
    """s at step `step` (0 = noisiest) of `steps` denoising steps."""
    x = step / (steps - 1) if steps > 1 else 0.0
    if schedule.kind == "constant":
        return schedule.weight
    if schedule.kind == "linear":
        return schedule.start + x * (schedule.end - schedule.start)
    ratio = 1.0 - 1.0 / (1.0 + math.exp(-schedule.logistic_k * (x - schedule.logistic_center)))
    return schedule.end + ratio * (schedule.start - schedule.end)


def view_video_shares(azimuths_deg: list[float]) -> torch.Tensor:
    """Per-view w_v of the official code: 1 - 0.75 (1 - c_v), c_v = (1 + cos(2 azimuth_v)) / 2.

    Front and back views (azimuth 0 or 180 from the reference) keep w = 1; side views drop to 0.25. For SV3D's 21
    azimuths 360 (v + 1) / 21 this is the official table c_v = (1 + cos(2 pi (v + 1) / 10.5)) / 2.
    """
    azimuths = torch.deg2rad(torch.tensor(azimuths_deg, dtype=torch.float64))
    closeness = 0.5 * (1.0 + torch.cos(2.0 * azimuths))
    return 1.0 - 0.75 * (1.0 - closeness)


def model_weights(schedule: CompositionSchedule, step: int, steps: int, azimuths_deg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(video weight, multi-view weight) per view, float64 (V,): w_v (1 - s) and 1 - w_v + w_v s; they sum to 1."""
    s = multiview_weight(schedule, step, steps)
    shares = view_video_shares(azimuths_deg) if schedule.per_view else torch.ones(len(azimuths_deg), dtype=torch.float64)
    return shares * (1.0 - s), 1.0 - shares + shares * s


def step_of_sigma(sigmas: torch.Tensor, sigma: float) -> int:
    """The step whose interval [sigmas[i + 1], sigmas[i]] holds sigma (0 = noisiest), for samplers that evaluate
    between schedule points (Heun, DPM-2) or repeat a point (rollback)."""
    points = sigmas[:-1].double().cpu()
    at_or_above = (points >= sigma * (1.0 - 1e-5)).nonzero()
    return int(at_or_above[-1]) if len(at_or_above) else 0


def cfg_scales(first: float, last: float, count: int, device: torch.device | None = None) -> torch.Tensor:
    """Per-frame classifier-free guidance scales, linear from first to last (SVD's 1.5 -> 3.0; flat when equal), made
    on `device` (a copy from CPU memory would wait for the GPU's queued kernels at every UNet call)."""
    if count > 1:
        return torch.linspace(first, last, count, dtype=torch.float64, device=device)
    return torch.full((1,), first, dtype=torch.float64, device=device)


def cfg_scales_all_one(first: float, last: float, count: int) -> bool:
    """Whether every scale of cfg_scales(first, last, count) is 1 (no unconditional pass), without computing them."""
    return first == 1.0 and (last == 1.0 or count == 1)


def check_descending(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise InvalidInput("sigmas", f"expected at least 2 noise levels, got shape {tuple(sigmas.shape)}",
                           "connect a scheduler's SIGMAS (e.g. KarrasScheduler) with at least 1 step")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise InvalidInput("sigmas", f"noise levels must strictly decrease, got {[round(float(s), 4) for s in sigmas[:8]]}...",
                           "use a scheduler's SIGMAS unchanged (e.g. KarrasScheduler 700 -> 0.002) or flip them")


def chunks(total: int, per_chunk: int) -> list[tuple[int, int]]:
    """[first, end) ranges of at most per_chunk items covering 0..total-1."""
    per_chunk = max(1, min(per_chunk, total))
    return [(first, min(first + per_chunk, total)) for first in range(0, total, per_chunk)]


def items_that_fit(peak_bytes: dict[int, float], room: float) -> int:
    """How many items (videos, multi-view sets) one call can take within `room` bytes, from measured calls
    {items: peak bytes}. Memory is taken as affine in the item count, fixed + per_item * n, fitted through the two
    largest measured calls; one call alone is all per-item cost (an overestimate: the fixed part is counted n times).
    It grows at most to 2n + 1 beyond the largest measured n, so a misjudged line is corrected by the next
    measurement before it can cost much."""
    largest = sorted(peak_bytes)[-2:]
    n2, b2 = largest[-1], peak_bytes[largest[-1]]
    per_item, fixed = b2 / n2, 0.0
    if len(largest) == 2:
        n1, b1 = largest[0], peak_bytes[largest[0]]
        slope = (b2 - b1) / (n2 - n1)
        if slope > 0:
            per_item, fixed = slope, max(0.0, b2 - slope * n2)
    return max(1, min(int((room - fixed) // per_item), 2 * n2 + 1))


def balanced_chunk(total: int, fit: int) -> int:
    """The chunk size that covers `total` items in the fewest calls of at most `fit` items, with the calls as even
    as possible (21 rows with room for 8: 7 + 7 + 7 rather than 8 + 8 + 5, a lower peak for the same call count)."""
    fit = max(1, min(fit, total))
    calls = -(-total // fit)
    return -(-total // calls)


# The sampler.

Denoiser = Callable[..., torch.Tensor]


@torch.no_grad()
def sample_rollback_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                          callback: Callable[[dict], None] | None = None, disable: bool | None = None,
                          rollback_steps: int = ROLLBACK_STEPS, noise_seed: int | None = None) -> torch.Tensor:
    """EDM Euler (k-diffusion calling convention) with Diffusion²'s "rollback" on the first `rollback_steps` steps:
    after the Euler step to sigma_{i+1}, add Gaussian noise of std |sigma_{i+1} - sigma_i| (back to about sigma_i)
    and take the step again from there, a Langevin-like correction that lets the composed scores settle.

    model(x, sigma * s_in, **extra_args) returns the denoised prediction. The rollback noise is drawn from a CPU
    generator seeded with `noise_seed` (default: extra_args["seed"]), so a run is repeatable on any device.
    """
    extra_args = extra_args or {}
    seed = noise_seed if noise_seed is not None else extra_args.get("seed", 0)
    generator = torch.Generator().manual_seed(int(seed or 0) + 1)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, next_sigma = sigmas[i], sigmas[i + 1]
        evaluations = 2 if i < rollback_steps else 1
        for evaluation in range(evaluations):
            denoised = model(x, sigma * s_in, **extra_args)
            dt = next_sigma - sigma
            x = x + (x - denoised) / sigma * dt
            if evaluation < evaluations - 1:
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
                x = x + dt.abs() * noise
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x
