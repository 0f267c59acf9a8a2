"""The fp8 model patch behind MV4D FP8 Matmuls: a ModelPatcher clone whose diffusion model runs its linear layers
(attention projections, feed-forward) as fp8 matrix multiplications while it samples; convolutions and attention
stay in the model's dtype. Apart from the node (nodes/speed.py) so it loads without ComfyUI's API layer."""

from __future__ import annotations

import comfy.patcher_extension

from ...kernels.fp8_matmul import Fp8Matmuls

WRAPPER_KEY = "mv4d_fp8_matmuls"


def run_with_fp8_matmuls(executor, *args, **kwargs):
    """A DIFFUSION_MODEL wrapper: the UNet's forward, with its linear layers in fp8."""
    with Fp8Matmuls():
        return executor(*args, **kwargs)


def with_fp8_matmuls(model):
    """A clone of the ModelPatcher whose diffusion model runs its linear layers in fp8 (the weights stay as loaded)."""
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, run_with_fp8_matmuls)
    return patched
