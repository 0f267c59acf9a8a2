"""Vivid-ZOO's alignment adapters on a multi-view model with motion modules: the adapters are an additional model
of the clone (ComfyUI loads them with the UNet) and hang on the motion modules while injected (patches/motion.py)."""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher

from ...kernels.errors import InvalidInput
from ...kernels.models.alignment import AdapterInfo, AlignmentAdapters, check_compatible
from .motion import motion_of, with_motion_additions
from .multiview import multiview_family

ADAPTERS_KEY = "mv4d_alignment_adapters"


def alignment_adapters_of(model) -> AlignmentAdapters | None:
    patchers = getattr(model, "additional_models", {}).get(ADAPTERS_KEY)
    return patchers[0].model if patchers else None


def _composite_parts(model):
    family, motion = multiview_family(model), motion_of(model)
    if family is None or motion is None:
        raise InvalidInput("model", "alignment adapters join a multi-view model and motion modules, and this MODEL is not both",
                           "load MVDream with MV4D Load Multi-view Model, then MV4D Apply Motion Module (AnimateDiff v2)")
    return family, motion


def fresh_adapters(model, views: int = 4, frames: int = 16, resolution: int = 256) -> AlignmentAdapters:
    """Zero adapters for a multi-view MODEL with motion modules, recorded as made for views x frames at resolution."""
    family, motion = _composite_parts(model)
    channels = tuple(motion.modules_named()[f"down_blocks.{block}.motion_modules.0"].temporal_transformer.proj_in.in_features
                     for block in range(4))
    return AlignmentAdapters.fresh(motion, AdapterInfo(family, motion.version.name, channels, views, frames, resolution))


def with_alignment_adapters(model, adapters: AlignmentAdapters):
    """A clone of a multi-view MODEL with motion modules, joined by `adapters` (InvalidInput 'model' / 'adapters'
    when the model is not that composite or the adapters were made for another one)."""
    family, motion = _composite_parts(model)
    if alignment_adapters_of(model) is not None:
        raise InvalidInput("model", "this MODEL has alignment adapters already", "apply one set of adapters")
    check_compatible(adapters.info, family, motion)
    patched = with_motion_additions(model, adapters.additions())
    patched.set_additional_models(ADAPTERS_KEY, [comfy.model_patcher.ModelPatcher(
        adapters, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device())])
    return patched
