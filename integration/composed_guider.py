"""The composed GUIDER: one sampling loop over a views x frames latent grid, denoised per step by two model roles,
a video model on the rows (one video per view) and a multi-view model on the columns (one multi-view set per
frame), combined per cell.

A role (ModelRole) is a MODEL with its layout, its conditioning of the whole grid, its CFG and its chunking; how
each role's groups are split into UNet calls is a policy object shared by the roles (ChunkPolicy; MeasuredChunks
by default). The guider is a comfy.samplers.CFGGuider, so every core sampler, scheduler and SamplerCustomAdvanced
drive it. The first role's model is the guider's own model; the other rides along as an additional model of it,
so ComfyUI's model management loads, offloads and accounts for both.

Both predictions are combined as x0 at the sampler's sigma: each model's own sampling object turns that sigma into
its input scaling and timestep and its output into x0 (eps, v, EDM; LDM linear, sqrt_linear, EDM noise levels).
That is one noise level for both only if they share the noise convention and the latent space, which the guider
checks (kernels.composition.reconcile); at a sigma outside one model's trained range the other denoises alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import comfy.conds
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..kernels.composition import (COLUMNS, ROWS, GuiderSettings, Layout, balanced_chunk, cfg_scales, cfg_scales_all_one, check_descending,
                                   chunks, covering_weights, items_that_fit, model_weights, multiview_weight, reconcile,
                                   step_of_sigma)
from ..kernels.errors import InvalidInput
from ..kernels.grid import GRID_OPTION, Grid
from .composition_roles import LAYOUT_NOUNS, prediction_space
from .multi_gpu import DeviceRun, SpreadOverDevices, device_clones, note_single_gpu, relative_speeds, without_core_multigpu
from .node_errors import input_error, kernel_errors_as_node_errors
from .peak_memory import PeakMemory
from .role_streams import OneAfterAnother, RoleOrder, SideBySide
from .patches.short_sequence_attention import with_short_sequence_attention
from .patches.single_token_attention import with_single_token_attention

GUIDER = "MV4D Composed Guider"
MULTIVIEW_MODEL_KEY = "mv4d_multiview_model"  # the additional-models key of the roles after the first
# Automatic chunks use at most this share of free memory for one call's activations; the rest absorbs allocator
# fragmentation and what a measured call cannot show.
FREE_MEMORY_SHARE = 0.85
# What UNet calls of a model really allocated, kept while the model lives: {BaseModel: {(passes, items per group,
# latent shape, dtype): CallMemory}}. ComfyUI's own memory_required is a worst-case formula (about 6x what SVD-XT
# uses at 576 px with PyTorch attention), so sizing by it alone runs one video per call on a 24 GB card.
MEASURED_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ONE_AFTER_ANOTHER = OneAfterAnother()


@dataclass
class CallMemory:
    peak_bytes: dict[int, float] = field(default_factory=dict)  # items per call -> CUDA allocation peak, measured once
    out_of_memory_at: int | None = None  # the smallest call that ran out of memory (fragmentation, other users)


@dataclass(frozen=True)
class GridConditioning:
    """What the composed guider needs besides the models: the grid shape and each role's conditioning, as a
    conditioning node built them for one pair of model families.

    video_*: the rows' CONDITIONING of the whole grid in view-major order (for SVD: per-frame CLIP embedding and
    concat latent of the row's reference view; for AnimateDiff: the prompt). multiview_*: the columns' in
    column-major order (index f * V + v; for SV3D: reference frame f for every cell of column f, with each view's
    elevation and azimuth; for MVDream: the prompt with each view's camera). azimuths: each view's, from the
    reference view (360 for the reference view itself), for the per-view weights.
    """

    views: int
    frames: int
    latent_height: int
    latent_width: int
    azimuths: list[float]
    elevations: list[float]
    video_positive: list
    video_negative: list
    multiview_positive: list
    multiview_negative: list
    video_family: str = "svd"  # the model families (composition_roles.FAMILIES ids) it was built for
    multiview_family: str = "sv3d"
    source: str = "MV4D Grid Conditioning"  # the node that built it

    @property
    def grid(self) -> Grid:
        return Grid(self.views, self.frames)


def conds_on_device(conds: dict, device: torch.device) -> dict:
    """Processed conds ({"positive": [...], "negative": [...]}) with their model conds' tensors moved to `device`
    once. ComfyUI keeps them where the conditioning nodes made them (CPU) and copies each UNet call's share to the GPU
    in the model's forward; a copy from CPU memory waits for every kernel queued before it, so the GPU then idled
    while the CPU prepared the call (35-55 ms per call at the paper setting, bench/RESULTS.md). The values do not
    change: the model casts them to its dtype as before."""
    def moved(value):
        cond = getattr(value, "cond", None)
        if isinstance(cond, torch.Tensor):
            return value._copy_with(cond.to(device))
        if isinstance(cond, list) and cond and all(isinstance(c, torch.Tensor) for c in cond):
            return value._copy_with([c.to(device) for c in cond])
        return value

    return {key: [{**cond, "model_conds": {name: moved(value) for name, value in cond["model_conds"].items()}}
                  if "model_conds" in cond else cond for cond in entries]
            for key, entries in conds.items()}


def _slice_conds(conds: list[dict], items: slice | torch.Tensor, batch: int, call_grid: Grid) -> list[dict]:
    """The conds of some batch items (a slice or indices). Per-item tensors (batch B) are sliced; num_video_frames
    becomes the length of one video / multi-view set, so the UNet's temporal layers see each one on its own, and the
    call's grid (one row, 1 x F, or one column, V x 1, per group) goes to the model's patches."""
    sliced = []
    for cond in conds:
        model_conds = {}
        for name, value in cond["model_conds"].items():
            if name == "num_video_frames":
                value = comfy.conds.CONDConstant(call_grid.cells)
            elif isinstance(getattr(value, "cond", None), torch.Tensor) and value.cond.shape[0] == batch:
                value = value._copy_with(value.cond[items])
            model_conds[name] = value
        model_conds[GRID_OPTION] = comfy.conds.CONDConstant(call_grid)
        sliced.append({**cond, "model_conds": model_conds})
    return sliced


@dataclass(frozen=True)
class ModelRole:
    """One model of the composition: the MODEL, the layout it denoises (ROWS: a video per view; COLUMNS: a
    multi-view set per frame), its CONDITIONING of the whole grid in that layout's order, its classifier-free
    guidance (linear from cfg[0] to cfg[1] across each group: SVD's 1.5 -> 3.0 over frames) and how many groups one
    UNet call takes (0: the chunk policy decides). input_name: what errors call it (the node input)."""

    model: object
    layout: Layout
    positive: list
    negative: list
    cfg: tuple[float, float] = (1.0, 1.0)
    per_call: int = 0
    input_name: str = "model"

    @property
    def noun(self) -> str:
        return LAYOUT_NOUNS[self.layout.name]


def grid_role(model, layout: Layout, grid: GridConditioning, settings: GuiderSettings) -> ModelRole:
    """The role of a MODEL at a layout, with the grid conditioning's conditioning and the settings' CFG and
    chunking for that layout."""
    if layout is ROWS:
        return ModelRole(model, ROWS, grid.video_positive, grid.video_negative, settings.video_cfg,
                         settings.videos_per_call, "video_model")
    return ModelRole(model, COLUMNS, grid.multiview_positive, grid.multiview_negative, settings.multiview_cfg,
                     settings.multiview_sets_per_call, "multiview_model")


PER_ITEM_CONDS = ("concat_latent_image", "elevation", "azimuth")  # core conds with one entry per latent item


def _entries(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.ndim else 1
    return len(value) if isinstance(value, (list, tuple)) else 1


def check_role_conditioning(role: ModelRole, grid: Grid) -> None:
    """Every per-item value of the role's conditioning has one entry per cell of the grid (ComfyUI would stretch or
    cut one of another length without a word)."""
    for conditioning in (role.positive, role.negative):
        for _, options in conditioning:
            for name, value in options.items():
                if name not in PER_ITEM_CONDS and not (name.startswith("mv4d_") and isinstance(value, torch.Tensor)):
                    continue
                rows = _entries(value)
                if rows not in (1, grid.cells):
                    raise InvalidInput("grid_conditioning", f"the {role.noun}'s conditioning has {rows} '{name}' rows but "
                                       f"the grid is {grid.views} views x {grid.frames} frames ({grid.cells} cells)",
                                       "build the grid conditioning for these views and frames (one conditioning node "
                                       "for the whole grid)")


@dataclass(frozen=True)
class ChunkWork:
    """One role's UNet work in one evaluation, as a chunk policy sees it."""

    model: object  # the BaseModel that runs it (measurements are kept per model)
    groups: list[int]  # the groups (videos / multi-view sets) to evaluate, in the role's layout
    group_size: int  # items per group
    requested: int  # groups per call the role asks for; 0: the policy decides
    passes: int  # UNet passes per item: 2 with CFG (cond and uncond batched), else 1
    sample: torch.Tensor  # the grid's latent batch (its item shape, dtype and device)
    devices: tuple = ()  # multi_gpu.DeviceRun of every device the role's model is on (the first: work.model's)
    pool: object = None  # ComfyUI's MultiGPU thread pool of this sampling run, if it has one


class ChunkPolicy(Protocol):
    """How one role's groups are split into UNet calls. `evaluate(groups, model)` denoises those groups with that
    BaseModel and writes them into the role's prediction; a policy calls it until every group of the work is done.
    Roles share one policy object, so what it learns (measured memory) serves every step and role. A policy for
    several devices would call evaluate with each device's clone of work.model, its share of the groups at a time."""

    def run(self, work: ChunkWork, evaluate: Callable[[list[int], object], None]) -> None: ...


class MeasuredChunks:
    """The default policy: `requested` groups per call, or automatically as many as fit: the first calls are sized
    by ComfyUI's estimate (with its 1.5x margin, cond and uncond batched together), every call of a size not seen
    before is measured, and later calls are sized by those measurements, so chunks grow to what really fits within
    a few steps. An automatic call that still runs out of memory is split in half and redone (the result does not
    depend on the chunks), and no later call of that model is as large again. Measurements live in MEASURED_CALLS,
    per model, as long as the model does."""

    def run(self, work: ChunkWork, evaluate: Callable[[list[int], object], None]) -> None:
        groups, model, x = work.groups, work.model, work.sample
        total = len(groups)
        if work.requested > 0:
            for first, end in chunks(total, work.requested):
                model_management.throw_exception_if_processing_interrupted()
                evaluate(groups[first:end], model)
            return
        memory = MEASURED_CALLS.setdefault(model, {}).setdefault((work.passes, work.group_size, tuple(x.shape[1:]), x.dtype),
                                                                 CallMemory())
        free = model_management.get_free_memory(x.device)
        if memory.peak_bytes:
            fit = items_that_fit(memory.peak_bytes, free * FREE_MEMORY_SHARE)
        else:
            fit = next((n for n in range(total, 0, -1)
                        if model.memory_required([work.passes * n * work.group_size, *x.shape[1:]]) * 1.5 < free), 1)
        if memory.out_of_memory_at:
            fit = min(fit, memory.out_of_memory_at - 1)
        size, first = balanced_chunk(total, fit), 0
        while first < total:
            model_management.throw_exception_if_processing_interrupted()
            end = min(first + size, total)
            out_of_memory, measuring = False, end - first not in memory.peak_bytes
            try:
                with PeakMemory(x.device).measure(enabled=measuring) as peak:
                    evaluate(groups[first:end], model)
            except torch.OutOfMemoryError:
                if end - first == 1:
                    raise
                out_of_memory = True  # handled below, once the exception has let go of the call's tensors
            if out_of_memory:
                memory.out_of_memory_at = min(end - first, memory.out_of_memory_at or end - first)
                model_management.soft_empty_cache()
                size = (end - first) // 2
                logging.warning("%s: a call of %d items ran out of GPU memory; redoing it %d at a time (the result "
                                "does not change)", GUIDER, end - first, size)
                continue
            if peak.bytes:
                memory.peak_bytes[end - first] = peak.bytes
            first = end


@dataclass
class RoleRun:
    """A role during one sampling run: the BaseModel that runs it, its processed conds and model options, the
    groups that have a cell to denoise (groups whose every cell is a kept reference are not evaluated), and the
    model's copies on other GPUs (multi_gpu.DeviceRun), if it has any."""

    model: object
    conds: dict
    options: dict
    open_groups: list[int]
    other_devices: list = field(default_factory=list)


class ComposedGuider(comfy.samplers.CFGGuider):
    def __init__(self, video_model, multiview_model, grid: GridConditioning, settings: GuiderSettings,
                 chunking: ChunkPolicy | None = None):
        """video_model / multiview_model: the rows' and the columns' ModelRole, or a bare MODEL, which then takes the
        grid conditioning's conditioning and the settings' CFG and chunking of its layout (grid_role). Raises
        InvalidInput (argument: the role's input name) for roles whose predictions cannot be combined."""
        roles = tuple(role if isinstance(role, ModelRole) else grid_role(role, layout, grid, settings)
                      for role, layout in ((video_model, ROWS), (multiview_model, COLUMNS)))
        if settings.single_token_shortcut:
            roles = tuple(dataclasses.replace(role, model=with_single_token_attention(role.model)) for role in roles)
        if settings.short_sequence_attention:
            roles = tuple(dataclasses.replace(role, model=with_short_sequence_attention(role.model)) for role in roles)
        for role, layout in zip(roles, (ROWS, COLUMNS)):
            if role.layout is not layout:
                raise InvalidInput(role.input_name, f"this role denoises {role.layout.name}, but its place is the {layout.name}",
                                   f"give the {layout.name} role here")
            check_role_conditioning(role, grid.grid)
        self.roles = roles
        self.spaces = tuple(prediction_space(role.model) for role in roles)
        self.noise_range = reconcile({role.input_name: space for role, space in zip(roles, self.spaces)})
        primary = roles[0].model.clone()
        # loaded, offloaded and counted together with the first role's model by ComfyUI's model management
        primary.set_additional_models(MULTIVIEW_MODEL_KEY, [role.model for role in roles[1:]])
        # ComfyUI sizes the load (and may choose a partial, low-VRAM load) for the whole latent batch at once; we
        # evaluate one chunk of groups at a time, so size it for a single group
        primary.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, MULTIVIEW_MODEL_KEY,
                                     self._size_for_one_group)
        super().__init__(primary)
        self.grid_conditioning = grid
        self.settings = settings
        self.chunking = chunking or SpreadOverDevices(MeasuredChunks())
        self.side_by_side = SideBySide() if settings.roles_side_by_side else None
        note_single_gpu(GUIDER)
        self.inner_set_conds({"positive": roles[0].positive, "negative": roles[0].negative})
        self.additional_original_conds = [{"positive": comfy.sampler_helpers.convert_cond(role.positive),
                                           "negative": comfy.sampler_helpers.convert_cond(role.negative)} for role in roles[1:]]
        self.weights_log: list[tuple[int, float, float]] = []  # (step, sigma, multi-view weight s) per evaluation
        self.predictions: dict[int, tuple[int, torch.Tensor]] = {}
        self.runs: list[RoleRun] = []
        self.pool = None  # ComfyUI's MultiGPU thread pool while it samples, if the host made one
        self.known_x0: torch.Tensor | None = None
        self.told_one_after_another = False

    def summary(self) -> str:
        """Each role's prediction space, and where they are combined (for the node's text)."""
        lines = [f"{role.layout.name}: {role.noun}, {space.describe()}" for role, space in zip(self.roles, self.spaces)]
        low, high = self.noise_range
        lines.append(f"combined as x0 at equal sigma for sigma {low:.4g}..{high:.4g}; outside it the model trained "
                     "there denoises alone")
        return "\n".join(lines)

    def _size_for_one_group(self, executor, model, noise_shape, conds, *args, **kwargs):
        group = self.roles[0].layout.group_grid(self.grid_conditioning.grid).cells
        return executor(model, (group, *noise_shape[1:]), conds, *args, **kwargs)

    def _check_grid(self, noise: torch.Tensor) -> None:
        grid = self.grid_conditioning
        expected = (grid.views * grid.frames, grid.latent_height, grid.latent_width)
        found = (noise.shape[0], *noise.shape[-2:])
        if noise.ndim != 4 or found != expected:
            sees = "; ".join(f"the {role.noun} denoises {role.layout.groups(grid.grid)} {role.layout.name} of "
                             f"{role.layout.group_grid(grid.grid).cells} latents" for role in self.roles)
            raise input_error(
                f"SamplerCustomAdvanced with {GUIDER}", "latent_image",
                f"the latent batch is {tuple(noise.shape)} but the grid conditioning is {grid.views} views x "
                f"{grid.frames} frames of {grid.latent_height}x{grid.latent_width} latents (batch {expected[0]}: {sees})",
                f"use the latent output of {grid.source} (view-major, one item per view and frame)")

    def _check_noise_levels(self, sigmas: torch.Tensor) -> None:
        """Every noise level the sampler will evaluate lies in some role's trained range; say where a role sits out."""
        outside = {index: [] for index in range(len(self.roles))}
        for step, sigma in enumerate(float(s) for s in sigmas[:-1]):
            covered = [space.covers(sigma) for space in self.spaces]
            if not any(covered):
                ranges = ", ".join(f"{role.input_name} {space.sigma_min:.4g}..{space.sigma_max:.4g}"
                                   for role, space in zip(self.roles, self.spaces))
                raise InvalidInput("sigmas", f"step {step} is at sigma {sigma:.4g}, outside the noise levels every composed "
                                   f"model was trained on ({ranges})", "take the sigmas from a scheduler of one of the "
                                   "composed models (e.g. BasicScheduler with the model whose range is narrower)")
            for index, inside in enumerate(covered):
                if not inside:
                    outside[index].append(step)
        for index, steps in outside.items():
            if steps:
                role, space = self.roles[index], self.spaces[index]
                logging.warning("%s: steps %s lie outside the %s's noise levels (sigma %.4g..%.4g): the other model "
                                "denoises them alone", GUIDER, steps, role.noun, space.sigma_min, space.sigma_max)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs):
        self._check_grid(noise)
        with kernel_errors_as_node_errors(f"SamplerCustomAdvanced with {GUIDER}"):
            check_descending(sigmas)
            self._check_noise_levels(sigmas)
        grid = self.grid_conditioning.grid
        open_groups = [role.layout.open_groups(grid, denoise_mask) for role in self.roles]
        # where a group is not evaluated, its cells keep the reference, in the model's latent space as the core
        # inner_sample below makes it (and as the sampler's inpainting puts it back)
        self.known_x0 = latent_image
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            self.known_x0 = self.inner_model.process_latent_in(latent_image)
        additional = self.roles[1:]
        for role in additional:
            role.model.pre_run()
        try:
            # the guider's own model: its conds and options are filled in at each call
            self.runs = [RoleRun(None, {}, {}, open_groups[0],
                                 self._other_devices(self.model_patcher, self.original_conds, self.roles[0].layout, noise, sigmas, seed))]
            for role, original, groups in zip(additional, self.additional_original_conds, open_groups[1:]):
                processed, options = self._role_conds(role.model, original, role.layout, noise, sigmas, device, seed)
                self.runs.append(RoleRun(role.model.model, processed, options, groups,
                                         self._other_devices(role.model, original, role.layout, noise, sigmas, seed)))
            self.sample_sigmas = sigmas
            self.weights_log = []
            self.predictions = {}  # role index -> (evaluation, x0 of the whole grid, view-major)
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs)
        finally:
            for role in additional:
                role.model.cleanup()
                role.model.restore_hook_patches()
            self.runs, self.predictions, self.known_x0 = [], {}, None

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = model_options if model_options is not None else {}
        conditioning, settings = self.grid_conditioning, self.settings
        grid = conditioning.grid
        sigma = float(timestep.max())
        steps = len(self.sample_sigmas) - 1
        step = step_of_sigma(self.sample_sigmas, sigma)
        self.weights_log.append((step, sigma, multiview_weight(settings.schedule, step, steps)))
        shares = model_weights(settings.schedule, step, steps, conditioning.azimuths)
        weights = covering_weights([role.layout.share(*shares) for role in self.roles],
                                   [space.covers(sigma) for space in self.spaces])
        weights = [w.to(x) for w in weights]
        guided = settings.guidance_sigmas[0] <= sigma <= settings.guidance_sigmas[1]
        first = self.runs[0]  # the guider's own model: core inner_sample processed its conds; moved once per run
        conds = first.conds if first.model is not None else conds_on_device(self.conds, x.device)
        self.runs[0] = RoleRun(self.inner_model, conds, without_core_multigpu(model_options), first.open_groups, first.other_devices)
        self.pool = model_options.get("multigpu_thread_pool")

        evaluation = len(self.weights_log) - 1
        # a role with weight 0 everywhere this step is not evaluated at all
        active = [bool((w > 0).any()) for w in weights]
        wanted = [index for index in range(len(self.roles)) if active[index] and self._needs_evaluation(index, evaluation, all(active))]
        works = [functools.partial(self._role_prediction, index, x, timestep, self.roles[index].cfg if guided else (1.0, 1.0))
                 for index in wanted]
        for index, prediction in zip(wanted, self._role_order().run(works, x.device)):
            self.predictions[index] = (evaluation, prediction)
        denoised = torch.zeros_like(x)
        for index, weight in enumerate(weights):
            if active[index]:
                denoised += grid.per_view(weight).view(-1, 1, 1, 1) * self.predictions[index][1]
        return denoised

    def _role_order(self) -> RoleOrder:
        """Side by side where the settings ask for it, every role's calls have a fixed size and one device runs
        them: automatic chunks size each call by the memory free when it starts, which the other role's call would
        be taking at the same time, and several devices already run their shares side by side."""
        if self.side_by_side is None:
            return ONE_AFTER_ANOTHER
        fixed = all(role.per_call > 0 for role in self.roles)
        if fixed and not any(run.other_devices for run in self.runs):
            return self.side_by_side
        if not self.told_one_after_another:
            self.told_one_after_another = True
            logging.info("%s: the models run one after another, not side by side: %s", GUIDER,
                         "side by side needs a fixed number of videos and multi-view sets per call (not 0)" if not fixed
                         else "their calls are already spread over several GPUs")
        return ONE_AFTER_ANOTHER

    def _needs_evaluation(self, index: int, evaluation: int, all_active: bool) -> bool:
        """Always, unless alternate_models is on: then, while every role counts, each evaluation runs one of them
        in turn (the video model on even, the multi-view model on odd evaluations) and reuses the others'
        predictions from the evaluation just before. A role whose last prediction is older than that is always run."""
        if not (self.settings.alternate_models and all_active):
            return True
        last = self.predictions.get(index)
        if last is None or last[0] != evaluation - 1:
            return True
        return evaluation % len(self.roles) == index

    def _role_prediction(self, index: int, x, timestep, cfg) -> torch.Tensor:
        """A role's guided x0 of every group of the grid, put back in the grid's view-major order (groups whose
        cells are all kept references keep the reference)."""
        role, run, grid = self.roles[index], self.runs[index], self.grid_conditioning.grid
        layout, group_grid = role.layout, role.layout.group_grid(grid)
        if len(run.open_groups) == layout.groups(grid):
            prediction = torch.empty_like(x)
        else:
            prediction = self.known_x0.to(x, copy=True)
        if not run.open_groups:
            return prediction

        here = DeviceRun(x.device, run.model, run.conds, run.options, relative_speeds(role.model, [x.device])[0])
        devices = {id(device_run.model): device_run for device_run in (here, *run.other_devices)}

        def evaluate(groups: list[int], model, lock=None) -> None:
            on = devices[id(model)]  # the device this call runs on, and its copies of the conds
            values = self._denoise(model, on.conds, on.options, layout.take(grid, x, groups).to(on.device),
                                   layout.items(grid, groups), group_grid, cfg, timestep.to(on.device)).to(x.device)
            with lock or nullcontext():
                layout.put(grid, prediction, groups, values)

        passes = 1 if cfg == (1.0, 1.0) else 2
        self.chunking.run(ChunkWork(run.model, run.open_groups, group_grid.cells, role.per_call, passes, x,
                                    (here, *run.other_devices), self.pool), evaluate)
        return prediction

    def _role_conds(self, patcher, original: dict, layout, noise, sigmas, device, seed) -> tuple[dict, dict]:
        """A role's conds processed for one device, and its model options there."""
        conds = {k: [c.copy() for c in v] for k, v in original.items()}
        processed = conds_on_device(comfy.samplers.process_conds(patcher.model, layout.order(self.grid_conditioning.grid, noise).to(device),
                                                                 conds, device, None, None, seed), device)
        options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
        options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas.to(device)
        # the model's own wrappers, callbacks and hooks (e.g. core TorchCompileModel) apply as they would if it were
        # sampled on its own
        comfy.sampler_helpers.prepare_model_patcher(patcher, processed, options)
        return processed, options

    def _other_devices(self, patcher, original: dict, layout, noise, sigmas, seed) -> list:
        """The role model's copies on other GPUs (ComfyUI's MultiGPU CFG Split), with conds of their own."""
        clones = device_clones(patcher)
        speeds = relative_speeds(patcher, [clone.load_device for clone in clones])
        return [DeviceRun(clone.load_device, clone.model, *self._role_conds(clone, original, layout, noise, sigmas, clone.load_device, seed), speed)
                for clone, speed in zip(clones, speeds)]

    def _denoise(self, model, conds, model_options, x, items, call_grid: Grid, cfg: tuple[float, float], timestep):
        """Classifier-free guided x0 of a batch of whole groups (videos / multi-view sets: `items` of the grid in this
        model's order, each a `call_grid`), with a per-position CFG scale linear from cfg[0] to cfg[1] in each."""
        batch, group = self.grid_conditioning.grid.cells, call_grid.cells
        positive = _slice_conds(conds["positive"], items, batch, call_grid)
        t = timestep[:1].repeat(len(x))
        if cfg_scales_all_one(cfg[0], cfg[1], group):
            return comfy.samplers.calc_cond_batch(model, [positive], x, t, model_options)[0]
        negative = _slice_conds(conds["negative"], items, batch, call_grid)
        cond, uncond = comfy.samplers.calc_cond_batch(model, [positive, negative], x, t, model_options)
        scale = cfg_scales(cfg[0], cfg[1], group, device=x.device).to(x.dtype).repeat(len(x) // group).view(-1, 1, 1, 1)
        return comfy.samplers.cfg_function(model, cond, uncond, scale, x, t, model_options=model_options,
                                           cond=positive, uncond=negative)
