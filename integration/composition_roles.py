"""What a ComfyUI MODEL can be in a Diffusion² composition: its family (which layout it can denoise, which node
builds its grid conditioning) and its prediction space (what its output and its sigma mean), read from the
model itself.

A new model family for the composed guider is a new ModelFamily here and a conditioning builder for it; the
guider does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import comfy.model_base
import comfy.model_sampling
import torch
from comfy.ldm.modules.diffusionmodules.util import make_beta_schedule

from ..kernels.composition import COLUMNS, FLOW_NOISE, ROWS, VE_NOISE, Layout, PredictionSpace
from .node_errors import input_error
from .patches.motion import has_motion
from .patches.multiview import multiview_family

GRID_CONDITIONING_NODE = "MV4D Grid Conditioning"
PROMPT_GRID_CONDITIONING_NODE = "MV4D Prompt Grid Conditioning"
LAYOUT_NOUNS = {ROWS.name: "video model", COLUMNS.name: "multi-view model"}


@dataclass(frozen=True)
class ModelFamily:
    """A kind of MODEL the composed guider takes, the layout it denoises, and the node that conditions it."""

    id: str
    name: str
    layout: Layout
    conditioning_node: str
    matches: Callable[[object], bool]


def _unet(model):
    return getattr(model, "model", None)


def _is_animatediff(model) -> bool:
    return has_motion(model) == "mv4d" and multiview_family(model) is None


def _is_mvdream(model) -> bool:
    return multiview_family(model) in ("mvdream-sd15", "mvdream-sd21") and has_motion(model) is None


SVD = ModelFamily("svd", "SVD / SVD-XT", ROWS, GRID_CONDITIONING_NODE,
                  lambda model: type(_unet(model)) is comfy.model_base.SVD_img2vid)  # SV3D subclasses it: exact type
SV3D = ModelFamily("sv3d", "SV3D_u / SV3D_p", COLUMNS, GRID_CONDITIONING_NODE,
                   lambda model: isinstance(_unet(model), (comfy.model_base.SV3D_u, comfy.model_base.SV3D_p)))
ANIMATEDIFF = ModelFamily("animatediff", "AnimateDiff (an SD1.5 model through MV4D Apply Motion Module)", ROWS,
                          PROMPT_GRID_CONDITIONING_NODE, _is_animatediff)
MVDREAM = ModelFamily("mvdream", "MVDream (MV4D Load Multi-view Model)", COLUMNS, PROMPT_GRID_CONDITIONING_NODE, _is_mvdream)
FAMILIES = (SVD, SV3D, ANIMATEDIFF, MVDREAM)
PAIRS = ((SVD, SV3D), (ANIMATEDIFF, MVDREAM))  # (rows, columns) a conditioning node builds


def family_of(model) -> ModelFamily | None:
    return next((family for family in FAMILIES if family.matches(model)), None)


def supported_pairs() -> str:
    return "; ".join(f"{rows.name} + {columns.name} (conditioned by {rows.conditioning_node})" for rows, columns in PAIRS)


def why_not_a_role(model) -> str | None:
    """For models we know that are no composition role, why not (None for models we know nothing about)."""
    family = multiview_family(model)
    if family is not None and has_motion(model):
        return ("it is a multi-view video model (a multi-view model with motion modules, e.g. the Vivid-ZOO "
                "composite) that denoises the whole grid in one call: sample it with KSampler and MV4D Multi-view "
                "Conditioning (workflow vividzoo_text_to_4d), or compose MVDream without motion modules on the columns")
    if family == "imagedream":
        return "ImageDream needs an image prompt per multi-view set, which no grid conditioning builds yet"
    if has_motion(model) == "AnimateDiff-Evolved":
        return "it carries AnimateDiff-Evolved's motion modules; apply the motion module with MV4D Apply Motion Module"
    return None


def checked_family(node: str, input_name: str, model, layout: Layout, other_input: str) -> ModelFamily:
    """The model's family, which must denoise `layout`; else a refusal naming what it is and what to do."""
    family = family_of(model)
    if family is not None and family.layout is layout:
        return family
    if family is not None:
        found = LAYOUT_NOUNS[family.layout.name]
        raise input_error(node, input_name, f"this is a {found} ({family.name}: {type(model.model).__name__}), not a "
                          f"{LAYOUT_NOUNS[layout.name]}", f"swap the two model inputs: it belongs in '{other_input}'")
    reason = why_not_a_role(model) or f"{type(getattr(model, 'model', model)).__name__} is not supported"
    raise input_error(node, input_name, reason, f"supported pairs: {supported_pairs()}")


# Prediction spaces, read from a MODEL's own sampling object (object patches such as AnimateDiff's schedule or core
# ModelSamplingSD3 included) and latent format.

def _prediction_kinds() -> list[tuple[str, str, str | None]]:
    """(ComfyUI class name, what the network predicts, noise convention), subclasses before their bases."""
    kinds = [("IMG_TO_IMG_FLOW", "image to image (flow)", None), ("IMG_TO_IMG", "image to image", None),
             ("COSMOS_RFLOW", "rectified flow (Cosmos)", VE_NOISE), ("V_PREDICTION_DDPM", "v (DDPM)", VE_NOISE),
             ("CONST", "flow velocity", FLOW_NOISE), ("EDM", "EDM", VE_NOISE), ("V_PREDICTION", "v", VE_NOISE),
             ("X0", "x0", VE_NOISE), ("EPS", "eps", VE_NOISE)]
    return [(name, what, noise) for name, what, noise in kinds if hasattr(comfy.model_sampling, name)]


def _discrete_schedule(sampling) -> str:
    """The beta schedule a discrete sampling object's sigmas come from (ComfyUI 'linear' is LDM's, 'sqrt_linear'
    is diffusers' 'linear', the one AnimateDiff was trained with)."""
    if getattr(sampling, "zsnr", False):
        return "zero terminal SNR"
    sigmas = sampling.sigmas.double().cpu()
    for name, label in (("linear", "LDM linear"), ("sqrt_linear", "sqrt_linear")):
        betas = torch.as_tensor(make_beta_schedule(name, len(sigmas), linear_start=sampling.linear_start,
                                                   linear_end=sampling.linear_end), dtype=torch.float64)
        alphas = torch.cumprod(1 - betas, 0)
        if torch.allclose(((1 - alphas) / alphas) ** 0.5, sigmas, rtol=1e-4):
            return label
    return "custom discrete"


def _schedule(sampling) -> str:
    if isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM):
        return "EDM"
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteEDM):
        return "discrete EDM"
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return _discrete_schedule(sampling)
    shift = getattr(sampling, "shift", None)
    return f"flow (shift {shift:g})" if shift is not None else type(sampling).__name__


def latent_space(model) -> str:
    latent = model.get_model_object("latent_format")
    text = f"{type(latent).__name__} ({latent.latent_channels} channels, scale {latent.scale_factor:g}"
    shift = getattr(latent, "shift_factor", 0.0) or 0.0
    return text + (f", shift {shift:g})" if shift else ")")


def prediction_space(model) -> PredictionSpace:
    sampling = model.get_model_object("model_sampling")
    prediction, noise = next(((what, noise) for name, what, noise in _prediction_kinds()
                              if isinstance(sampling, getattr(comfy.model_sampling, name))),
                             (type(sampling).__name__, f"unknown to mv4d ({type(sampling).__name__})"))
    return PredictionSpace(prediction, noise, _schedule(sampling), float(sampling.sigma_min), float(sampling.sigma_max),
                           latent_space(model))
