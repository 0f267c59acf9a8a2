"""The composed GUIDER: one sampling loop over a views x frames latent grid, denoised per step by a video model
(rows, one video per view) and a multi-view model (columns, one multi-view set per frame), combined per cell.

It is a comfy.samplers.CFGGuider, so every core sampler, scheduler and SamplerCustomAdvanced drive it. The video
model is the guider's own model; the multi-view model rides along as an additional model of it, so ComfyUI's model
management loads, offloads and accounts for both.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.conds
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..kernels.composition import (GuiderSettings, balanced_chunk, cfg_scales, check_descending, chunks, items_that_fit,
                                   model_weights, multiview_weight, step_of_sigma)
from ..kernels.grid import GRID_OPTION, Grid
from .node_errors import input_error, kernel_errors_as_node_errors

GUIDER = "MV4D Composed Guider"
MULTIVIEW_MODEL_KEY = "mv4d_multiview_model"
# Automatic chunks use at most this share of free memory for one call's activations; the rest absorbs allocator
# fragmentation and what a measured call cannot show.
FREE_MEMORY_SHARE = 0.85
# What UNet calls of a model really allocated, kept while the model lives: {BaseModel: {(passes, items per group,
# latent shape, dtype): CallMemory}}. ComfyUI's own memory_required is a worst-case formula (about 6x what SVD-XT
# uses at 576 px with PyTorch attention), so sizing by it alone runs one video per call on a 24 GB card.
MEASURED_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class CallMemory:
    peak_bytes: dict[int, float] = field(default_factory=dict)  # items per call -> CUDA allocation peak, measured once
    out_of_memory_at: int | None = None  # the smallest call that ran out of memory (fragmentation, other users)


class PeakMemory:
    """The CUDA allocation peak of a block above what was allocated when it began (None off CUDA, or when not
    enabled). It resets CUDA's peak statistic."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    @contextmanager
    def measure(self, enabled: bool = True):
        if not enabled or self.device.type != "cuda":
            yield self
            return
        base = torch.cuda.memory_allocated(self.device)  # the allocator's host-side counters: no device sync
        torch.cuda.reset_peak_memory_stats(self.device)
        yield self
        self.bytes = torch.cuda.max_memory_allocated(self.device) - base


@dataclass(frozen=True)
class GridConditioning:
    """What the composed guider needs besides the models: the grid shape and each model's conditioning.

    video_*: CONDITIONING of the whole grid in view-major order (per-frame CLIP embedding and concat latent of the
    row's reference view). multiview_*: the same for the multi-view model in column-major order (index f * V + v:
    reference frame f for every cell of column f, with each view's elevation and azimuth).
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

    @property
    def grid(self) -> Grid:
        return Grid(self.views, self.frames)


def _slice_conds(conds: list[dict], first: int, end: int, batch: int, call_grid: Grid) -> list[dict]:
    """The conds of batch items first..end-1. Per-item tensors (batch B) are sliced; num_video_frames becomes the
    length of one video / multi-view set, so the UNet's temporal layers see each one on its own, and the call's grid
    (one row, 1 x F, or one column, V x 1, per group) goes to the model's patches."""
    sliced = []
    for cond in conds:
        model_conds = {}
        for name, value in cond["model_conds"].items():
            if name == "num_video_frames":
                value = comfy.conds.CONDConstant(call_grid.cells)
            elif isinstance(getattr(value, "cond", None), torch.Tensor) and value.cond.shape[0] == batch:
                value = value._copy_with(value.cond[first:end])
            model_conds[name] = value
        model_conds[GRID_OPTION] = comfy.conds.CONDConstant(call_grid)
        sliced.append({**cond, "model_conds": model_conds})
    return sliced


class ComposedGuider(comfy.samplers.CFGGuider):
    def __init__(self, video_model, multiview_model, grid: GridConditioning, settings: GuiderSettings):
        video_model = video_model.clone()
        # loaded, offloaded and counted together with the video model by ComfyUI's model management
        video_model.set_additional_models(MULTIVIEW_MODEL_KEY, [multiview_model])
        # ComfyUI sizes the load (and may choose a partial, low-VRAM load) for the whole latent batch at once; we
        # evaluate one chunk of videos at a time, so size it for a single video
        video_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, MULTIVIEW_MODEL_KEY,
                                         self._size_for_one_video)
        super().__init__(video_model)
        self.multiview_patcher = multiview_model
        self.grid_conditioning = grid
        self.settings = settings
        self.inner_set_conds({"positive": grid.video_positive, "negative": grid.video_negative})
        self.multiview_original_conds = {
            "positive": comfy.sampler_helpers.convert_cond(grid.multiview_positive),
            "negative": comfy.sampler_helpers.convert_cond(grid.multiview_negative),
        }
        self.weights_log: list[tuple[int, float, float]] = []  # (step, sigma, multi-view weight s) per evaluation
        self.predictions: dict[str, tuple[int, torch.Tensor]] = {}

    def _size_for_one_video(self, executor, model, noise_shape, conds, *args, **kwargs):
        return executor(model, (self.grid_conditioning.frames, *noise_shape[1:]), conds, *args, **kwargs)

    def _check_grid(self, noise: torch.Tensor) -> None:
        grid = self.grid_conditioning
        expected = (grid.views * grid.frames, grid.latent_height, grid.latent_width)
        found = (noise.shape[0], *noise.shape[-2:])
        if noise.ndim != 4 or found != expected:
            raise input_error(
                f"SamplerCustomAdvanced with {GUIDER}", "latent_image",
                f"the latent batch is {tuple(noise.shape)} but the grid conditioning is {grid.views} views x "
                f"{grid.frames} frames of {grid.latent_height}x{grid.latent_width} latents (batch {expected[0]})",
                "use the latent output of MV4D Grid Conditioning (view-major, one item per view and frame)")

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs):
        self._check_grid(noise)
        with kernel_errors_as_node_errors(f"SamplerCustomAdvanced with {GUIDER}"):
            check_descending(sigmas)
        self.multiview_inner = self.multiview_patcher.model
        self.multiview_patcher.pre_run()
        try:
            conds = {k: [c.copy() for c in v] for k, v in self.multiview_original_conds.items()}
            column_noise = self.grid_conditioning.grid.column_major(noise)
            self.multiview_conds = comfy.samplers.process_conds(self.multiview_inner, column_noise, conds, device, None, None, seed)
            self.multiview_options = comfy.model_patcher.create_model_options_clone(self.multiview_patcher.model_options)
            self.multiview_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
            # the multi-view model's own wrappers, callbacks and hooks (e.g. core TorchCompileModel) apply as they
            # would if it were sampled on its own
            comfy.sampler_helpers.prepare_model_patcher(self.multiview_patcher, self.multiview_conds, self.multiview_options)
            self.sample_sigmas = sigmas
            self.weights_log = []
            self.predictions = {}  # role -> (evaluation, x0 of the whole grid, view-major)
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs)
        finally:
            self.multiview_patcher.cleanup()
            self.multiview_patcher.restore_hook_patches()
            self.multiview_conds = self.multiview_inner = None
            self.predictions = {}

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = model_options if model_options is not None else {}
        conditioning, settings = self.grid_conditioning, self.settings
        grid = conditioning.grid
        sigma = float(timestep.max())
        steps = len(self.sample_sigmas) - 1
        step = step_of_sigma(self.sample_sigmas, sigma)
        self.weights_log.append((step, sigma, multiview_weight(settings.schedule, step, steps)))
        video_weight, multiview_weight_ = (w.to(x) for w in model_weights(settings.schedule, step, steps, conditioning.azimuths))
        guided = settings.guidance_sigmas[0] <= sigma <= settings.guidance_sigmas[1]
        video_cfg, multiview_cfg = (settings.video_cfg, settings.multiview_cfg) if guided else ((1.0, 1.0), (1.0, 1.0))

        evaluation = len(self.weights_log) - 1
        # a model with weight 0 everywhere this step is not evaluated at all
        active = {"video": bool((video_weight > 0).any()), "multiview": bool((multiview_weight_ > 0).any())}
        for role in ("video", "multiview"):
            if active[role] and self._needs_evaluation(role, evaluation, both_active=all(active.values())):
                if role == "video":
                    prediction = self._video_prediction(x, timestep, model_options, video_cfg)
                else:
                    prediction = self._multiview_prediction(x, timestep, multiview_cfg)
                self.predictions[role] = (evaluation, prediction)
        denoised = torch.zeros_like(x)
        if active["video"]:
            denoised += grid.per_view(video_weight).view(-1, 1, 1, 1) * self.predictions["video"][1]
        if active["multiview"]:
            denoised += grid.per_view(multiview_weight_).view(-1, 1, 1, 1) * self.predictions["multiview"][1]
        return denoised

    def _needs_evaluation(self, role: str, evaluation: int, both_active: bool) -> bool:
        """Always, unless alternate_models is on: then, while both models count, each evaluation runs one of them
        (video on even, multi-view on odd evaluations) and reuses the other's prediction from the evaluation just
        before. A model whose last prediction is older than that is always run."""
        if not (self.settings.alternate_models and both_active):
            return True
        last = self.predictions.get(role)
        if last is None or last[0] != evaluation - 1:
            return True
        return (evaluation % 2 == 0) == (role == "video")

    def _video_prediction(self, x, timestep, model_options, cfg) -> torch.Tensor:
        """The video model's guided x0 of every row, view-major like the grid."""
        grid = self.grid_conditioning.grid
        prediction = torch.empty_like(x)

        def evaluate(first: int, end: int) -> None:
            prediction[first * grid.frames:end * grid.frames] = self._denoise(
                self.inner_model, self.conds, model_options, grid.rows(x, first, end),
                first * grid.frames, end * grid.frames, grid.row_grid, cfg, timestep)

        self._run_in_chunks(self.inner_model, x, grid.frames, grid.views, self.settings.videos_per_call, cfg, evaluate)
        return prediction

    def _multiview_prediction(self, x, timestep, cfg) -> torch.Tensor:
        """The multi-view model's guided x0 of every column, put back in the grid's view-major order."""
        grid = self.grid_conditioning.grid
        prediction = torch.empty_like(x)

        def evaluate(first: int, end: int) -> None:
            column_prediction = self._denoise(self.multiview_inner, self.multiview_conds, self.multiview_options,
                                              grid.columns(x, first, end), first * grid.views, end * grid.views,
                                              grid.column_grid, cfg, timestep)
            grid.put_columns(prediction, first, end, column_prediction)

        self._run_in_chunks(self.multiview_inner, x, grid.views, grid.frames, self.settings.multiview_sets_per_call, cfg, evaluate)
        return prediction

    def _run_in_chunks(self, model, x, group: int, total: int, requested: int, cfg: tuple[float, float], evaluate) -> None:
        """evaluate(first, end) over all `total` videos (or multi-view sets), `requested` per UNet call, or
        automatically as many as fit: the first calls are sized by ComfyUI's estimate (with its 1.5x margin, cond
        and uncond batched together), every call of a size not seen before is measured, and later calls are sized
        by those measurements, so chunks grow to what really fits within a few steps. An automatic call that still
        runs out of memory is split in half and redone (the result does not depend on the chunks), and no later
        call of that model is as large again."""
        if requested > 0:
            for first, end in chunks(total, requested):
                model_management.throw_exception_if_processing_interrupted()
                evaluate(first, end)
            return
        passes = 1 if cfg == (1.0, 1.0) else 2
        memory = MEASURED_CALLS.setdefault(model, {}).setdefault((passes, group, tuple(x.shape[1:]), x.dtype), CallMemory())
        free = model_management.get_free_memory(x.device)
        if memory.peak_bytes:
            fit = items_that_fit(memory.peak_bytes, free * FREE_MEMORY_SHARE)
        else:
            fit = next((n for n in range(total, 0, -1)
                        if model.memory_required([passes * n * group, *x.shape[1:]]) * 1.5 < free), 1)
        if memory.out_of_memory_at:
            fit = min(fit, memory.out_of_memory_at - 1)
        size, first = balanced_chunk(total, fit), 0
        while first < total:
            model_management.throw_exception_if_processing_interrupted()
            end = min(first + size, total)
            out_of_memory, measuring = False, end - first not in memory.peak_bytes
            try:
                with PeakMemory(x.device).measure(enabled=measuring) as peak:
                    evaluate(first, end)
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

    def _denoise(self, model, conds, model_options, x, first: int, end: int, call_grid: Grid, cfg: tuple[float, float], timestep):
        """Classifier-free guided x0 of a batch of whole videos / multi-view sets (batch items first..end-1 of the
        grid in this model's order, each a `call_grid`), with a per-position CFG scale linear from cfg[0] to cfg[1]
        in each of them."""
        batch, group = self.grid_conditioning.grid.cells, call_grid.cells
        positive = _slice_conds(conds["positive"], first, end, batch, call_grid)
        scales = cfg_scales(cfg[0], cfg[1], group).repeat((end - first) // group)
        t = timestep[:1].repeat(end - first)
        if bool((scales == 1.0).all()):
            return comfy.samplers.calc_cond_batch(model, [positive], x, t, model_options)[0]
        negative = _slice_conds(conds["negative"], first, end, batch, call_grid)
        cond, uncond = comfy.samplers.calc_cond_batch(model, [positive, negative], x, t, model_options)
        scale = scales.to(x).view(-1, 1, 1, 1)
        return comfy.samplers.cfg_function(model, cond, uncond, scale, x, t, model_options=model_options,
                                           cond=positive, uncond=negative)
