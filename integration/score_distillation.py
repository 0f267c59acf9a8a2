"""4Diffusion's 4D-aware SDS refinement inside ComfyUI: 4DM's score on renders of 4D Gaussians
(kernels/score_distillation.py), driven through the 4D fit with its pluggable objective.

FourDMScore is the score model (kernels.score_distillation.ScoreModel) of a 4DM MODEL:
- loaded(): the MODEL prepared as a sampling run prepares it (ComfyUI's prepare_sampling: the UNet with its
  additional models, the motion modules and ImageDream's adapter, through model management; pre_run; cleanup at
  the end);
- encode(): the VAE's encoder with gradients, chunk by chunk, each chunk recomputed in the backward pass, so only one
  chunk's activations are held (the VAE's weights get normal copies once: ComfyUI made them under inference mode);
- predict_noise(): the conditioning rebuilt for the request's cameras and frame window (ImagePrompts.conditioning,
  the builder the conditioning node uses), processed as a sampler processes conds, cond and uncond through
  calc_cond_batch and ComfyUI's cfg_function (so the model's patches and CFG patches apply), under inference mode:
  nothing of the UNet is kept for a backward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import comfy.model_management as model_management
import comfy.sampler_helpers
import comfy.samplers
import torch
from torch.utils.checkpoint import checkpoint

from ..kernels.cameras import CameraRig
from ..kernels.multiview_video import MultiviewVideo
from ..kernels.score_distillation import ScoreDistillation, ScoreRequest, SDSHistory, SDSSettings
from ..kernels.splats.fit import FitSettings, fit_dynamic_gaussians
from ..kernels.splats.losses import LPIPS
from ..kernels.splats.model import Splats4D
from . import host
from .fourdm_models import is_4dm
from .grid_latent import LATENT_CHANNELS, LATENT_SCALE
from .multiview_conditioning import ImagePrompts, fitted_pictures, prompts_of
from .node_errors import input_error, kernel_errors_as_node_errors

REFINE = "MV4D Refine 4D with SDS"
ENCODE_CHUNK = 8  # images encoded (and recomputed for the backward pass) at a time: one view's 8 frames in 4DM


class FourDMScore:
    """4DM's classifier-free-guided noise prediction on rendered grids, and the VAE's encoder, for SDS."""

    def __init__(self, model, vae, prompts: ImagePrompts, guidance_scale: float, seed: int = 0):
        self.model, self.vae, self.prompts, self.guidance_scale, self.seed = model, vae, prompts, guidance_scale, seed
        sigmas = model.get_model_object("model_sampling").sigmas.detach().float().cpu()
        self._alphas_cumprod = 1 / (1 + sigmas ** 2)  # ComfyUI's discrete eps schedule: sigma^2 = (1 - ab) / ab
        self.sigmas = sigmas
        self.inner = None
        self.options: dict = {}  # the model options a sampler would give its calls, while loaded
        self.loaded_models: list = []
        self._encoder_ready = False

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    @contextmanager
    def loaded(self, noise_shape: tuple[int, ...]):
        """The MODEL loaded for calls of `noise_shape` latents (with cond and uncond), as a sampler loads it."""
        conds = {"positive": comfy.sampler_helpers.convert_cond(self.prompts.positive),
                 "negative": comfy.sampler_helpers.convert_cond(self.prompts.negative)}
        with torch.inference_mode():
            self.inner, _, self.loaded_models = comfy.sampler_helpers.prepare_sampling(self.model, noise_shape, conds,
                                                                                      self.model.model_options)
            self.model.pre_run()
            self.options = host.sampling_options(self.model)
        try:
            yield self
        finally:
            with torch.inference_mode():
                self.model.cleanup()
                comfy.sampler_helpers.cleanup_models({}, self.loaded_models)
            self.inner, self.loaded_models = None, []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self._encoder_ready:
            host.normal_tensors(self.vae.first_stage_model)
            self._encoder_ready = True
        return torch.cat([checkpoint(self._encode, chunk, use_reentrant=False) for chunk in images.split(ENCODE_CHUNK)])

    def _encode(self, pictures: torch.Tensor) -> torch.Tensor:
        latents = self.model.model.process_latent_in(self.vae.encode(pictures))  # the UNet's latent space
        return latents.to(pictures.device, torch.float32)

    def predict_noise(self, noisy: torch.Tensor, timestep: int, request: ScoreRequest) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            guided, conditional = self._predict(noisy, timestep, request)
        return guided.clone(), conditional.clone()  # normal tensors again, for the loss outside inference mode

    def _predict(self, noisy: torch.Tensor, timestep: int, request: ScoreRequest):
        if self.inner is None:
            raise RuntimeError("FourDMScore.predict_noise outside loaded()")
        model_management.load_models_gpu([self.model, *self.loaded_models])  # back, if a VAE pass made room
        device = self.model.load_device
        positive, negative, grid = self.prompts.conditioning(request.cameras, request.frames)
        views = request.grid.views
        sigma = float(self.sigmas[timestep])
        # ComfyUI's eps models take x0 + sigma eps, i.e. z_t / sqrt(alpha_bar); the controller view's input is
        # overwritten by its clean latent inside the model
        cells = grid.as_matrix(torch.zeros(grid.cells, *noisy.shape[1:], device=device))
        cells[:views] = request.grid.as_matrix(noisy.to(device, torch.float32)) * (1 + sigma ** 2) ** 0.5
        x = grid.as_batch(cells)
        conds = {"positive": comfy.sampler_helpers.convert_cond(positive), "negative": comfy.sampler_helpers.convert_cond(negative)}
        conds = comfy.samplers.process_conds(self.inner, x, conds, device, None, None, self.seed)
        sigmas = torch.full((len(x),), sigma, device=device)
        options = self.options
        cond, uncond = comfy.samplers.calc_cond_batch(self.inner, [conds["positive"], conds["negative"]], x, sigmas, options)
        guided = comfy.samplers.cfg_function(self.inner, cond, uncond, self.guidance_scale, x, sigmas, options,
                                             conds["positive"], conds["negative"])
        # the noise each x0 prediction implies, for the image views only
        return tuple(grid.rows((x - denoised.float()) / sigma, 0, views) for denoised in (guided, cond))


def check_belongs_together(model, prompts: ImagePrompts, grid, cameras: CameraRig, anchor_video: torch.Tensor, splats: Splats4D,
                anchor_view: int) -> None:
    """Refuses a MODEL, cameras, anchor video or 4D Gaussians that do not belong to the conditioning (its prompts and
    the grid it was made for)."""
    if not is_4dm(model):
        raise input_error(REFINE, "model", "this MODEL is not 4DM (ImageDream with 4DM's motion modules)", "connect MV4D Load 4DM's model")
    if prompts.control is None:
        raise input_error(REFINE, "positive", "this conditioning has no pixel-controller view, which 4DM was trained with",
                          "connect MV4D 4DM Conditioning's positive and negative")
    conditioned = grid.views - 1
    if len(cameras) != conditioned:
        raise input_error(REFINE, "cameras", f"{len(cameras)} cameras, but the conditioning is of {conditioned} views",
                          "connect the cameras output of the same MV4D 4DM Conditioning")
    if len(anchor_video) != prompts.frames:
        raise input_error(REFINE, "anchor_video", f"{len(anchor_video)} frames, but the conditioning has {prompts.frames}",
                          "connect MV4D 4DM Conditioning's frames output (the video frames it used)")
    if len(splats.frame_times) != prompts.frames:
        raise input_error(REFINE, "splats_4d", f"the 4D Gaussians were fitted to {len(splats.frame_times)} frames, the "
                          f"conditioning has {prompts.frames}", "fit them to the multi-view video sampled with this conditioning")
    if not 0 <= anchor_view < len(cameras):
        raise input_error(REFINE, "anchor_view", f"there is no view {anchor_view} among {len(cameras)}",
                          f"pick a view from 0 to {len(cameras) - 1}")


@dataclass
class Refinement:
    scene: Splats4D
    history: SDSHistory
    seconds: float


def refine_with_sds(splats: Splats4D, model, vae, positive, negative, cameras: CameraRig, anchor_video: torch.Tensor,
                    anchor_view: int, settings: SDSSettings, background: tuple[float, float, float],
                    lpips: LPIPS | None = None) -> Refinement:
    """The 4D Gaussians refined by 4DM's SDS at random rotations of `cameras` and frame windows plus the anchor
    term (the anchor view's render against the anchor video), through the 4D fit warm-started from them."""
    prompts, grid = prompts_of(REFINE, positive, negative)
    check_belongs_together(model, prompts, grid, cameras, anchor_video, splats, anchor_view)
    device = host.compute_device()
    with kernel_errors_as_node_errors(REFINE, {"images": "anchor_video", "start": "splats_4d", "gaussians": "splats_4d"}):
        settings.check()
        pictures = fitted_pictures(anchor_video, cameras.height, cameras.width)
        anchor = MultiviewVideo(pictures[None].float().clamp(0, 1), cameras.select([anchor_view]), splats.frame_times)
        gaussians = splats.gaussians
        fit = FitSettings(iterations=settings.iterations, resolution=0, views_per_step=1, initial_gaussians=gaussians.count,
                          max_gaussians=gaussians.count, densify=False, background=background, seed=settings.seed,
                          motion=gaussians.config)
        score = FourDMScore(model, vae, prompts, settings.guidance_scale, settings.seed)
        with torch.inference_mode(False):  # nodes run under inference mode; the objective's tensors join autograd
            if lpips is not None:
                lpips = lpips.to(device)
                host.normal_tensors(lpips)
            objective = ScoreDistillation(score, cameras, splats.frame_times, settings, torch.tensor(background), lpips=lpips)
        objective.check_memory(gaussians.count, device)
        window = objective.window
        shape = (grid.views * window, LATENT_CHANNELS, cameras.height // LATENT_SCALE, cameras.width // LATENT_SCALE)
        with score.loaded(shape):
            result = fit_dynamic_gaussians(anchor, fit, device, host.progress(), start=gaussians, objective=objective)
    return Refinement(Splats4D(result.gaussians.to("cpu"), splats.frame_times.clone(), splats.cameras), objective.history,
                      result.seconds)
