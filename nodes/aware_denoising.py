"""VideoMV's 3D-aware denoising nodes: a GUIDER -> GUIDER that reconstructs Gaussians from the predicted clean grid
at chosen steps and blends their renders in, and the last reconstruction of a sampling run as 4D Gaussians."""

from __future__ import annotations

import math
from dataclasses import replace

from comfy_api.latest import io

from ..integration.aware_guider import AWARE, RECONSTRUCTION, aware_guider, last_reconstruction
from ..integration.node_errors import kernel_errors_as_node_errors
from ..kernels.aware_denoising import AwareSettings, parse_steps
from .splats import BACKGROUNDS, splat_outputs, with_splats
from .types import Cameras, Splats4DSocket

DEFAULTS = AwareSettings()
SIGMA_MAX = 1000.0  # the node's "no upper bound": above every model's largest noise level (SVD / SV3D: 700)


class AwareDenoising(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_3DAwareDenoising",
            display_name=AWARE,
            category="mv4d/3d-aware denoising",
            description=(
                "VideoMV's 3D-aware denoising for any multi-view sampler: wraps a GUIDER (MV4D Composed Guider, or a "
                "core CFGGuider of MVDream / ImageDream / SV3D) so that at the chosen steps the predicted clean "
                "images of the grid are decoded, fitted with 3D Gaussians (static for a multi-view set, moving for a "
                "multi-view video; each step continues the previous step's Gaussians), rendered at the grid's "
                "cameras and times, encoded and blended into the prediction. Connect the result to "
                "SamplerCustomAdvanced; MV4D 3D-Aware Reconstruction gives the last step's Gaussians. Cancel stops "
                "it inside a fit too."
            ),
            inputs=[
                io.Guider.Input("guider", tooltip="The guider to make 3D-aware (e.g. MV4D Composed Guider, core CFGGuider)."),
                io.Vae.Input("vae", tooltip="The VAE of the sampled model (decodes x0, encodes the renders)."),
                Cameras.Input("cameras", tooltip="The grid's cameras, one per view, as it was conditioned (the input view last for SV3D)."),
                io.String.Input("steps", default=", ".join(map(str, DEFAULTS.steps)),
                                tooltip="Sampling steps (0 = the noisiest) that get a 3D-aware step, e.g. 20, 30, 40 of 50 "
                                        "(VideoMV). Empty: every step inside the sigma range."),
                io.Int.Input("fit_iterations", default=DEFAULTS.fit.iterations, min=1, max=100000,
                             tooltip="Fit iterations per 3D-aware step (each continues the previous step's Gaussians)."),
                io.Float.Input("blend_weight", default=DEFAULTS.blend_weight, min=0.0, max=1.0, step=0.05,
                               tooltip="How much of x0 the renders replace: 1 = the renders (VideoMV), 0 = sampling "
                                       "unchanged (the fits still run, for the reconstruction)."),
                io.Int.Input("fit_resolution", default=DEFAULTS.fit.resolution, min=0, max=4096,
                             tooltip="Long side of the images the fits compare against (0 = full size); renders are full size."),
                io.Int.Input("initial_gaussians", default=DEFAULTS.fit.initial_gaussians, min=1, max=2_000_000,
                             tooltip="Gaussians the first 3D-aware step starts from (later steps continue its Gaussians)."),
                io.Float.Input("sigma_min", default=DEFAULTS.sigma_min, min=0.0, max=SIGMA_MAX, step=0.001,
                               tooltip="Only steps whose noise level is at least this."),
                io.Float.Input("sigma_max", default=SIGMA_MAX, min=0.0, max=SIGMA_MAX, step=0.001,
                               tooltip="Only steps whose noise level is at most this (1000: no bound)."),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="white",
                               tooltip="The images' background (SV3D, MVDream, ImageDream: white)."),
                io.Int.Input("frames_per_decode", default=0, min=0, max=4096,
                             tooltip="Frames decoded together by a temporal decoder (SVD's); 0 = a whole row. Lower it if VRAM runs out."),
            ],
            outputs=[io.Guider.Output("guider_out", display_name="guider", tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, guider, vae, cameras, steps, fit_iterations, blend_weight, fit_resolution, initial_gaussians, sigma_min,
                sigma_max, background, frames_per_decode) -> io.NodeOutput:
        with kernel_errors_as_node_errors(AWARE, {"iterations": "fit_iterations", "resolution": "fit_resolution"}):
            fit = replace(DEFAULTS.fit, iterations=fit_iterations, resolution=fit_resolution, initial_gaussians=initial_gaussians,
                          max_gaussians=max(DEFAULTS.fit.max_gaussians, initial_gaussians), background=BACKGROUNDS[background])
            settings = AwareSettings(parse_steps(steps), sigma_min, math.inf if sigma_max >= SIGMA_MAX else sigma_max,
                                     blend_weight, fit)
        return io.NodeOutput(aware_guider(guider, settings, vae, cameras, frames_per_decode))


class AwareReconstruction(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_3DAwareReconstruction",
            display_name=RECONSTRUCTION,
            category="mv4d/3d-aware denoising",
            description=(
                f"The Gaussians of the last 3D-aware step of a sampling run with a guider from {AWARE}, as 4D "
                "Gaussians for MV4D Render 4D / Save 4D, instead of a separate fit. The latent input (the sampler's "
                "output) makes this node run after the sampling and checks that the two belong together."
            ),
            inputs=[
                io.Guider.Input("guider", tooltip=f"The guider from {AWARE}."),
                io.Latent.Input("latent", tooltip="The output latent of the SamplerCustomAdvanced that used this guider."),
            ],
            outputs=[Splats4DSocket.Output("splats_4d", tooltip="The last 3D-aware step's Gaussians with the grid's cameras and frame times."),
                     *splat_outputs()],
        )

    @classmethod
    def execute(cls, guider, latent) -> io.NodeOutput:
        return io.NodeOutput(*with_splats(RECONSTRUCTION, last_reconstruction(guider, latent)))
