"""The composed GUIDER: one sampling loop over a views x frames latent grid, denoised per step by a video model
(rows, one video per view) and a multi-view model (columns, one multi-view set per frame), combined per cell.

It is a comfy.samplers.CFGGuider, so every core sampler, scheduler and SamplerCustomAdvanced drive it. The video
model is the guider's own model; the multi-view model rides along as an additional model of it, so ComfyUI's model
management loads, offloads and accounts for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.conds
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch
from einops import rearrange

from ..kernels.composition import (CompositionSchedule, cfg_scales, check_descending, chunks, columns, model_weights,
                                   multiview_weight, rows, step_of_sigma)
from .node_errors import input_error, kernel_errors_as_node_errors

GUIDER = "MV4D Composed Guider"
MULTIVIEW_MODEL_KEY = "mv4d_multiview_model"


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


@dataclass(frozen=True)
class GuiderSettings:
    schedule: CompositionSchedule
    video_cfg: tuple[float, float]  # first and last frame of each video
    multiview_cfg: tuple[float, float]  # first and last view of each multi-view set
    videos_per_call: int  # 0: as many as fit in free memory
    multiview_sets_per_call: int
    # optional speed-up (changes the result): classifier-free guidance only while sigma lies in this interval;
    # outside it the unconditional pass is skipped. The default interval holds every sigma (off).
    guidance_sigmas: tuple[float, float] = (0.0, math.inf)


def _slice_conds(conds: list[dict], first: int, end: int, batch: int, group: int) -> list[dict]:
    """The conds of batch items first..end-1. Per-item tensors (batch B) are sliced; num_video_frames becomes the
    length of one video / multi-view set, so the UNet's temporal layers see each one on its own."""
    sliced = []
    for cond in conds:
        model_conds = {}
        for name, value in cond["model_conds"].items():
            if name == "num_video_frames":
                value = comfy.conds.CONDConstant(group)
            elif isinstance(getattr(value, "cond", None), torch.Tensor) and value.cond.shape[0] == batch:
                value = value._copy_with(value.cond[first:end])
            model_conds[name] = value
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
        self.grid = grid
        self.settings = settings
        self.inner_set_conds({"positive": grid.video_positive, "negative": grid.video_negative})
        self.multiview_original_conds = {
            "positive": comfy.sampler_helpers.convert_cond(grid.multiview_positive),
            "negative": comfy.sampler_helpers.convert_cond(grid.multiview_negative),
        }
        self.weights_log: list[tuple[int, float, float]] = []  # (step, sigma, multi-view weight s) per evaluation

    def _size_for_one_video(self, executor, model, noise_shape, conds, *args, **kwargs):
        return executor(model, (self.grid.frames, *noise_shape[1:]), conds, *args, **kwargs)

    def _check_grid(self, noise: torch.Tensor) -> None:
        grid = self.grid
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
            column_noise = columns(noise, self.grid.frames, 0, self.grid.frames)
            self.multiview_conds = comfy.samplers.process_conds(self.multiview_inner, column_noise, conds, device, None, None, seed)
            self.multiview_options = comfy.model_patcher.create_model_options_clone(self.multiview_patcher.model_options)
            self.multiview_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
            # the multi-view model's own wrappers, callbacks and hooks (e.g. core TorchCompileModel) apply as they
            # would if it were sampled on its own
            comfy.sampler_helpers.prepare_model_patcher(self.multiview_patcher, self.multiview_conds, self.multiview_options)
            self.sample_sigmas = sigmas
            self.weights_log = []
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs)
        finally:
            self.multiview_patcher.cleanup()
            self.multiview_patcher.restore_hook_patches()
            self.multiview_conds = self.multiview_inner = None

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = model_options if model_options is not None else {}
        grid, settings = self.grid, self.settings
        sigma = float(timestep.max())
        steps = len(self.sample_sigmas) - 1
        step = step_of_sigma(self.sample_sigmas, sigma)
        self.weights_log.append((step, sigma, multiview_weight(settings.schedule, step, steps)))
        video_weight, multiview_weight_ = (w.to(x) for w in model_weights(settings.schedule, step, steps, grid.azimuths))
        guided = settings.guidance_sigmas[0] <= sigma <= settings.guidance_sigmas[1]
        video_cfg, multiview_cfg = (settings.video_cfg, settings.multiview_cfg) if guided else ((1.0, 1.0), (1.0, 1.0))

        denoised = torch.zeros_like(x)
        if bool((video_weight > 0).any()):  # a model with weight 0 everywhere this step is not evaluated at all
            per_call = self._per_call(self.inner_model, x, grid.frames, grid.views, settings.videos_per_call, video_cfg)
            for first, end in chunks(grid.views, per_call):
                model_management.throw_exception_if_processing_interrupted()
                prediction = self._denoise(self.inner_model, self.conds, model_options, rows(x, grid.frames, first, end),
                                           first * grid.frames, end * grid.frames, grid.frames, video_cfg, timestep)
                weight = video_weight[first:end].repeat_interleave(grid.frames)
                denoised[first * grid.frames:end * grid.frames] += weight.view(-1, 1, 1, 1) * prediction
        if bool((multiview_weight_ > 0).any()):
            per_call = self._per_call(self.multiview_inner, x, grid.views, grid.frames, settings.multiview_sets_per_call, multiview_cfg)
            by_cell = rearrange(denoised, "(v f) ... -> v f ...", f=grid.frames)
            for first, end in chunks(grid.frames, per_call):
                model_management.throw_exception_if_processing_interrupted()
                prediction = self._denoise(self.multiview_inner, self.multiview_conds, self.multiview_options,
                                           columns(x, grid.frames, first, end), first * grid.views, end * grid.views,
                                           grid.views, multiview_cfg, timestep)
                prediction = rearrange(prediction, "(f v) ... -> v f ...", v=grid.views)
                by_cell[:, first:end] += multiview_weight_.view(-1, 1, 1, 1, 1) * prediction
        return denoised

    def _per_call(self, model, x, group: int, total: int, requested: int, cfg: tuple[float, float]) -> int:
        """Videos (or multi-view sets) per UNet call: as asked, or as many as fit in free memory (ComfyUI's own
        estimate with its 1.5x margin, cond and uncond batched together)."""
        if requested > 0:
            return min(requested, total)
        passes = 1 if cfg == (1.0, 1.0) else 2
        free = model_management.get_free_memory(x.device)
        for per_call in range(total, 0, -1):
            if model.memory_required([passes * per_call * group, *x.shape[1:]]) * 1.5 < free:
                return per_call
        return 1

    def _denoise(self, model, conds, model_options, x, first: int, end: int, group: int, cfg: tuple[float, float], timestep):
        """Classifier-free guided x0 of a batch of whole videos / multi-view sets (batch items first..end-1 of the
        grid in this model's order), with a per-position CFG scale linear from cfg[0] to cfg[1] in each group."""
        batch = self.grid.views * self.grid.frames
        positive = _slice_conds(conds["positive"], first, end, batch, group)
        scales = cfg_scales(cfg[0], cfg[1], group).repeat((end - first) // group)
        t = timestep[:1].repeat(end - first)
        if bool((scales == 1.0).all()):
            return comfy.samplers.calc_cond_batch(model, [positive], x, t, model_options)[0]
        negative = _slice_conds(conds["negative"], first, end, batch, group)
        cond, uncond = comfy.samplers.calc_cond_batch(model, [positive, negative], x, t, model_options)
        scale = scales.to(x).view(-1, 1, 1, 1)
        return comfy.samplers.cfg_function(model, cond, uncond, scale, x, t, model_options=model_options,
                                           cond=positive, uncond=negative)
