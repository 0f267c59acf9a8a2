"""The patch behind MV4D Fuse Elementwise: a ModelPatcher clone whose UNet runs its elementwise glue (GEGLU and the
video UNets' spatial / temporal mixer) as fused kernels (kernels/fused_elementwise.py) while it samples.

Each fusion is a policy object that finds its modules in a UNet and builds a stand-in for one of them; the patch
walks the fusions it is given, so a new fusion is a new object, not a new branch. Stand-ins register the original's
parameters and submodules under the same names, so weight paths (LoRA, ComfyUI's weight patches and low-VRAM
casting) are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.util as comfy_unet_util
import torch

from ...kernels.fused_elementwise import FusedKernels, fused_kernels
from ..multi_gpu import keep_clones_matched


class FusedGEGLU(torch.nn.Module):
    """Stands in for a GEGLU: its projection, then gelu-gate and product in one kernel."""

    def __init__(self, original: torch.nn.Module, kernels: FusedKernels):
        super().__init__()
        self.proj = original.proj
        self.kernels = kernels

    def forward(self, x):
        return self.kernels.geglu(self.proj(x))


class FusedAlphaBlender(torch.nn.Module):
    """Stands in for an AlphaBlender (the video UNets' spatial / temporal mix): alpha as the original computes it,
    the blend in one kernel. The mix factor is registered here, where ComfyUI's weight patches will look for it."""

    def __init__(self, original: torch.nn.Module, kernels: FusedKernels):
        super().__init__()
        self.merge_strategy, self.rearrange_pattern = original.merge_strategy, original.rearrange_pattern
        if isinstance(original.mix_factor, torch.nn.Parameter):
            self.mix_factor = original.mix_factor
        else:
            self.register_buffer("mix_factor", original.mix_factor)
        self.kernels = kernels

    def forward(self, x_spatial, x_temporal, image_only_indicator=None):
        alpha = comfy_unet_util.AlphaBlender.get_alpha(self, image_only_indicator, x_spatial.device)
        return self.kernels.alpha_blend(alpha, x_spatial, x_temporal)


@dataclass(frozen=True)
class Fusion:
    """One kind of glue to fuse: `targets` names the modules of a UNet it replaces, `stand_in` builds the
    replacement of one of them."""

    name: str
    stand_in: type

    def targets(self, diffusion_model: torch.nn.Module) -> list[str]:
        raise NotImplementedError


# A model that another clone is sampling with holds that clone's object patches, so stand-ins count as targets.

class GegluFusion(Fusion):
    def targets(self, diffusion_model):
        return [path for path, module in diffusion_model.named_modules() if type(module) in (comfy_attention.GEGLU, FusedGEGLU)]


class AlphaBlendFusion(Fusion):
    def targets(self, diffusion_model):
        return [path for path, module in diffusion_model.named_modules()
                if type(module) in (comfy_unet_util.AlphaBlender, FusedAlphaBlender)]


FUSIONS = {fusion.name: fusion for fusion in (GegluFusion("geglu", FusedGEGLU),
                                              AlphaBlendFusion("alpha_blend", FusedAlphaBlender))}
ALL_FUSIONS = tuple(FUSIONS.values())


def with_fused_elementwise(model, fusions=ALL_FUSIONS, backend: str | None = "inductor"):
    """A clone of the ModelPatcher whose UNet runs the given fusions' glue as fused kernels while it samples
    (backend None: the same stand-ins with the eager formulas, the reference the tests compare against)."""
    kernels = fused_kernels(backend)
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    for fusion in fusions:
        for path in fusion.targets(diffusion_model):
            key = f"diffusion_model.{path}"
            current = patched.get_model_object(key)  # the original module, or this clone's own stand-in
            if not isinstance(current, fusion.stand_in):
                patched.add_object_patch(key, fusion.stand_in(current, kernels))
    keep_clones_matched(patched)  # the model's copies on other GPUs take the patch too
    return patched


def fused_module_count(model) -> int:
    """How many of the UNet's modules this clone replaces (object patches that are stand-ins of this module)."""
    stand_ins = tuple(fusion.stand_in for fusion in FUSIONS.values())
    return sum(isinstance(patch, stand_ins) for patch in model.object_patches.values())
