"""Per-item data for our model patches, carried by CONDITIONING: the one way cameras, image prompts and the grid
shape reach a model call.

A stock SD model keeps only the conditioning keys it knows (BaseModel.extra_conds) and drops the rest. Our
conditioning nodes put their data under keys that start with PREFIX; a model patched by `carry_mv4d_conds` keeps
those keys (per-item tensors as CONDRegular, so ComfyUI batches, slices and concatenates cond / uncond chunks
like its own conds; anything else as CONDConstant) and hands them to the UNet call, where a DIFFUSION_MODEL wrapper
moves them into transformer_options[OPTIONS] ({name without prefix: value}) and the grid into
transformer_options[GRID_OPTION], for the emb / attention patches to read.
"""

from __future__ import annotations

import comfy.conds
import comfy.patcher_extension
import torch

from ...kernels.grid import GRID_OPTION, Grid
from ..node_errors import input_error

PREFIX = "mv4d_"
OPTIONS = "mv4d"  # transformer_options key of the per-call data
WRAPPER_KEY = "mv4d_conds"


def _keep_mv4d_conds(original):
    def extra_conds(**kwargs):
        out = original(**kwargs)
        batch = kwargs["noise"].shape[0]
        for name, value in kwargs.items():
            if not name.startswith(PREFIX):
                continue
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                # one row per latent item: ComfyUI would silently repeat or cut a tensor of another length
                if value.shape[0] != batch:
                    raise _batch_mismatch(kwargs.get(PREFIX + "source", "MV4D conditioning"), name[len(PREFIX):], value.shape[0], batch)
                out[name] = comfy.conds.CONDRegular(value)
            else:
                out[name] = comfy.conds.CONDConstant(value)
        return out

    extra_conds.mv4d = True  # marks the patched method, so patching twice wraps once
    return extra_conds


def _batch_mismatch(source: str, name: str, rows: int, batch: int):
    input_name = "cameras" if name == "camera" else name
    return input_error(source, input_name, f"it gives {rows} {name} rows but the sampled latent has {batch} items",
                       f"sample the latent output of {source} (one item per camera) with the same cameras")


def _conds_into_options(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """DIFFUSION_MODEL wrapper: the mv4d_* conds of this call into a copy of its transformer_options."""
    data = {name[len(PREFIX):]: kwargs.pop(name) for name in list(kwargs) if name.startswith(PREFIX)}
    if data:
        transformer_options = {**transformer_options, OPTIONS: data}
        grid = data.get(GRID_OPTION[len(PREFIX):])
        if grid is not None:
            transformer_options[GRID_OPTION] = Grid.of(grid)
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def carry_mv4d_conds(model) -> None:
    """Makes a ModelPatcher (in place: call it on a clone) keep and deliver the mv4d_* conds."""
    original = model.get_model_object("extra_conds")
    if not getattr(original, "mv4d", False):
        model.add_object_patch("extra_conds", _keep_mv4d_conds(original))
    if not model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _conds_into_options)


def call_data(transformer_options: dict) -> dict:
    """The mv4d data of one model call ({} when the conditioning carried none)."""
    return transformer_options.get(OPTIONS, {})


def with_mv4d_values(conditioning: list, **values) -> list:
    """CONDITIONING with mv4d_<name> = value added to every entry (as core's conditioning_set_values does)."""
    return [[embedding, {**options, **{PREFIX + name: value for name, value in values.items()}}]
            for embedding, options in conditioning]
