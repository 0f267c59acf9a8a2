"""VideoMV's 3D-aware denoising inside any sampler: a GUIDER made from a GUIDER.

The result is a copy of the given guider (same class: the composed guider, a core CFGGuider of MVDream / ImageDream
/ SV3D, ...) with two ComfyUI wrappers in its own model options, so every core sampler drives it through
SamplerCustomAdvanced exactly as it drives the original:

- OUTER_SAMPLE: at the start of a sampling run, finds the grid (views x frames) and checks the cameras against it;
  at the end, keeps the run's last reconstruction for MV4D 3D-Aware Reconstruction;
- PREDICT_NOISE: after the wrapped guider's prediction of x0, at the chosen steps, decodes x0 of the grid's images
  with the VAE, fits Gaussians to them (continuing the previous step's), renders them at the grid's cameras and
  times, encodes the renders and blends them into x0 (kernels/aware_denoising.py).

ImageDream's pixel-controller view (the last view, a conditioning slot) is no image: it is neither decoded nor
changed.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch

from ..kernels.aware_denoising import AwareSettings, blend, reconstruct_and_render
from ..kernels.cameras import CameraRig
from ..kernels.composition import step_of_sigma
from ..kernels.grid import Grid
from ..kernels.multiview_video import even_times
from ..kernels.splats.model import DynamicGaussians, Splats4D
from . import host
from .composed_guider import ComposedGuider
from .grid_latent import decode_grid
from .node_errors import input_error, kernel_errors_as_node_errors
from .patches.conds import PREFIX

AWARE = "MV4D 3D-Aware Denoising"
RECONSTRUCTION = "MV4D 3D-Aware Reconstruction"
WRAPPER_KEY = "mv4d_3d_aware"


@dataclass(frozen=True)
class StepRecord:
    """One 3D-aware step of a sampling run: where it ran and what it cost (seconds)."""

    step: int
    sigma: float
    decode: float
    fit: float
    render: float
    encode: float
    gaussians: int

    @property
    def seconds(self) -> float:
        return self.decode + self.fit + self.render + self.encode


@dataclass
class SamplingRun:
    grid: Grid  # the image items: the first grid.cells of the batch, view-major
    sigmas: torch.Tensor
    done: set[int] = field(default_factory=set)
    gaussians: DynamicGaussians | None = None  # the last step's, where the next step starts
    steps: list[StepRecord] = field(default_factory=list)


def recorded_grid(guider) -> tuple[Grid, bool] | None:
    """The grid a guider's conditioning records, and whether its last view is a control view (no image): the
    composed guider's grid conditioning, or the grid our multi-view conditioning puts into the conds, where the
    pixel controller's clean latent marks the control view (as the model patch reads it). None for conds without."""
    if isinstance(guider, ComposedGuider):
        return guider.grid_conditioning.grid, False
    for conds in getattr(guider, "original_conds", {}).values():
        for cond in conds:
            if PREFIX + "grid" in cond:
                return Grid.of(cond[PREFIX + "grid"]), PREFIX + "control_latent" in cond
    return None


def image_grid(guider, batch: int, cameras: CameraRig) -> Grid:
    """The grid of the images in a sampled batch: as the conditioning records it (less a control view), or else
    one view per camera."""
    recorded = recorded_grid(guider)
    if recorded is None:
        if batch % len(cameras):
            raise input_error(AWARE, "cameras", f"{len(cameras)} cameras do not divide the sampled batch of {batch} "
                              "latents (its conditioning records no grid)", "connect one camera per view of the grid")
        grid = Grid(len(cameras), batch // len(cameras))
    else:
        full, control_view = recorded
        if full.cells != batch:
            raise input_error(AWARE, "guider", f"the latent batch has {batch} items but the conditioning is a "
                              f"{full.views} x {full.frames} grid", "sample the latent made with the guider's conditioning")
        grid = Grid(full.views - 1, full.frames) if control_view else full
    if len(cameras) not in (grid.views, grid.cells):
        raise input_error(AWARE, "cameras", f"{len(cameras)} cameras for a grid of {grid.views} image views x "
                          f"{grid.frames} frames", f"connect the cameras the grid was conditioned on ({grid.views})")
    return grid


class AwareDenoising:
    """The 3D-aware part of one wrapped guider: what it does (settings, VAE, cameras), the sampling run under way,
    and what the last run left (its reconstruction, its output latent, its steps)."""

    def __init__(self, settings: AwareSettings, vae, cameras: CameraRig, frames_per_decode: int = 0):
        self.settings, self.vae, self.cameras, self.frames_per_decode = settings, vae, cameras, frames_per_decode
        self.run: SamplingRun | None = None
        self.reconstruction: Splats4D | None = None
        self.sampled: torch.Tensor | None = None
        self.steps: list[StepRecord] = []

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        grid = image_grid(executor.class_obj, noise.shape[0], self.cameras)
        unreached = [step for step in self.settings.steps if step >= len(sigmas) - 1]
        if unreached:
            logging.warning("%s: steps %s lie beyond this %d-step schedule and never run", AWARE, unreached, len(sigmas) - 1)
        self.run, self.reconstruction, self.sampled, self.steps = SamplingRun(grid, sigmas.detach().cpu()), None, None, []
        try:
            output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            run, self.run = self.run, None
        self.steps = run.steps
        if run.gaussians is not None:
            self.reconstruction = Splats4D(run.gaussians.to("cpu"), even_times(grid.frames), self.cameras)
        self.sampled = output.detach().to("cpu", copy=True)
        return output

    def predict_noise(self, executor, x, timestep, model_options, seed):
        denoised = executor(x, timestep, model_options, seed)
        run = self.run
        if run is None:  # called outside a sampling run of this guider
            return denoised
        sigma = float(timestep.max())
        step = step_of_sigma(run.sigmas, sigma)
        if step in run.done or not self.settings.chooses(step, sigma):
            return denoised
        run.done.add(step)
        guider = executor.class_obj
        sampling_models = [guider.model_patcher, *getattr(guider, "loaded_models", [])]
        with host.models_kept_loaded(sampling_models), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            return self._aware_step(guider.inner_model, denoised, step, sigma)

    def _aware_step(self, model, denoised: torch.Tensor, step: int, sigma: float) -> torch.Tensor:
        run = self.run
        grid = run.grid
        started = time.perf_counter()
        images = decode_grid(self.vae, model.process_latent_out(denoised[:grid.cells]), grid, self.frames_per_decode,
                             host.check_interrupt)
        decoded = time.perf_counter()
        with kernel_errors_as_node_errors(AWARE):
            result = reconstruct_and_render(images.cpu(), self.cameras, self.settings, run.gaussians, denoised.device,
                                            host.check_interrupt)
        fitted = time.perf_counter()
        encoded = self.vae.encode(grid.as_batch(result.renders))
        renders = model.process_latent_in(encoded.to(denoised.device, torch.float32)).to(denoised)
        run.gaussians = result.fit.gaussians
        record = StepRecord(step, sigma, decoded - started, result.fit.seconds, fitted - decoded - result.fit.seconds,
                            time.perf_counter() - fitted, result.fit.gaussians.count)
        run.steps.append(record)
        logging.info("%s: step %d (sigma %.3g): decode %.2f s, fit %.2f s (%d Gaussians), render %.2f s, encode %.2f s",
                     AWARE, step, sigma, record.decode, record.fit, record.gaussians, record.render, record.encode)
        if self.settings.blend_weight == 0:
            return denoised
        out = denoised.clone()
        out[:grid.cells] = blend(denoised[:grid.cells], renders, self.settings.blend_weight)
        return out


def aware_guider(guider, settings: AwareSettings, vae, cameras: CameraRig, frames_per_decode: int = 0):
    """A copy of `guider` that denoises 3D-aware; the original is untouched (ComfyUI may reuse it elsewhere)."""
    if not isinstance(guider, comfy.samplers.CFGGuider):
        raise input_error(AWARE, "guider", f"{type(guider).__name__} is no ComfyUI CFGGuider (their wrappers are how "
                          "this node joins the sampling)", "connect a core guider (CFGGuider, BasicGuider, ...) or MV4D Composed Guider")
    aware = AwareDenoising(settings, vae, cameras, frames_per_decode)
    wrapped = copy.copy(guider)
    wrapped.model_options = comfy.model_patcher.create_model_options_clone(guider.model_options)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, aware.outer_sample),
                          (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, aware.predict_noise)):
        comfy.patcher_extension.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper, wrapped.model_options, is_model_options=True)
    wrapped.mv4d_3d_aware = aware
    return wrapped


def last_reconstruction(guider, latent: dict) -> Splats4D:
    """The Gaussians of the last 3D-aware step of the sampling run that produced `latent` with this guider."""
    aware = getattr(guider, "mv4d_3d_aware", None)
    if aware is None:
        raise input_error(RECONSTRUCTION, "guider", "this guider does no 3D-aware denoising", f"connect the output of {AWARE}")
    if aware.sampled is None or not (aware.sampled.shape == latent["samples"].shape
                                     and torch.equal(aware.sampled, latent["samples"].detach().cpu())):
        raise input_error(RECONSTRUCTION, "latent", "this latent is not the last one sampled with the guider",
                          "connect the output latent of the SamplerCustomAdvanced that uses this guider")
    if aware.reconstruction is None:
        raise input_error(RECONSTRUCTION, "guider", f"no 3D-aware step ran in that sampling (steps "
                          f"{list(aware.settings.steps) or 'all'}, sigma in [{aware.settings.sigma_min}, "
                          f"{aware.settings.sigma_max}])", "choose steps that the sampler's schedule reaches")
    return aware.reconstruction
