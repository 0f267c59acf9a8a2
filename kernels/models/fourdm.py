"""4Diffusion's 4DM (Zhang et al. 2024; aejion/4Diffusion): ImageDream with AnimateDiff-style motion modules, and
the key map of its weights file `4dm.ckpt`.

4DM is ImageDream (SD2.1-base, 4 views + the pixel controller's view, image prompt) with a Vanilla motion module
(8 heads, a 32-frame position table, per-frame GroupNorm: AnimateDiff v2's) after the last transformer of every
block, or after its first ResBlock where it has none: ADE's and our positions (motion.MotionModel.placements), so
the composite is our ImageDream patches + our motion injection on one V x F grid, nothing of its own.

The file (the official loader: torch.load(...)['state_dict'], 'module.' stripped, loaded into the UNet with
strict=False over ImageDream's weights) is keyed by UNet position in the official UNet, where the modules are real
layers and shift the layers after them:

    input_blocks.{1,2,4,5,7,8}.2 / input_blocks.{10,11}.1 / middle_block.2 / output_blocks.{0-2}.1 /
    output_blocks.{3-11}.2  .temporal_transformer.*

The motion keys are mapped to AnimateDiff's names (motion._from_4dm). Whether the file also holds the (possibly
fine-tuned) spatial weights is unknown (no one here opened it): any it holds are taken, in ComfyUI's unshifted
layout (middle_block.3 -> 2, output_blocks.2.2 / 5.3 / 8.3 -> 2.1 / 5.2 / 8.2, the inverse of the official
loader's shift of ImageDream's keys), over the base's. What the file cannot give is the base itself: VAE, text and
image encoders and, for motion-only files, every spatial weight come from ImageDream's sd-v2.1-base-4view-ipmv.pt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import InvalidInput
from .motion import _4DM_KEY, MotionVersion, normalize_motion_state_dict

TRAINED_FRAMES = 8  # the official code's hard-coded "(b f n)" fold, f = 8
TRAINED_VIEWS = 4  # + the pixel controller's view (n = 5)
BASE_FILE = "sd-v2.1-base-4view-ipmv.pt"  # ImageDream, 4DM's base
FILE = "4dm.ckpt"
VERSION = "4dm"  # the MotionVersion name motion.normalize_motion_state_dict gives its modules
# Layers after a motion module in the official UNet, one index later than in ComfyUI's (and ImageDream's) UNet.
_SHIFTED = (("middle_block.3.", "middle_block.2."), ("output_blocks.2.2.", "output_blocks.2.1."),
            ("output_blocks.5.3.", "output_blocks.5.2."), ("output_blocks.8.3.", "output_blocks.8.2."))
_PREFIXES = re.compile(r"^(?:module\.|model\.diffusion_model\.|diffusion_model\.)+")
_UNET_KEY = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|out|camera_embed|image_embed)\.")


@dataclass
class FourDMFile:
    """A 4dm.ckpt split: its motion modules (AnimateDiff keys, normalised) and the spatial UNet weights it holds, if
    any (ComfyUI's layout, no prefix)."""

    motion: dict
    version: MotionVersion
    unet: dict


def is_4dm_state_dict(state_dict: dict) -> bool:
    """Motion modules keyed by 4DM's UNet positions (and none under AnimateDiff's own names)."""
    keys = [key for key in state_dict if isinstance(key, str)]
    return any(_4DM_KEY.match(key) for key in keys) and not any(".motion_modules." in key for key in keys)


def unshift(key: str) -> str:
    """A spatial key of the official 4DM UNet (no prefix) in ComfyUI's layout."""
    for theirs, ours in _SHIFTED:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def split_4dm(state_dict: dict, argument: str = "fourdm") -> FourDMFile:
    """4dm.ckpt's state dict (its 'state_dict' entry) split into motion modules and spatial UNet weights."""
    if not is_4dm_state_dict(state_dict):
        raise InvalidInput(argument, "this file holds no 4DM motion modules (no input_blocks.N.M.temporal_transformer keys)",
                           f"pick 4Diffusion's {FILE} (into models/animatediff_models)")
    motion, version = normalize_motion_state_dict(state_dict, argument=argument)
    unet = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or ".temporal_transformer." in key:
            continue
        bare = _PREFIXES.sub("", key)
        if _UNET_KEY.match(bare):
            unet[unshift(bare)] = value
    return FourDMFile(motion, version, unet)


def with_4dm_weights(base_unet: dict, file: FourDMFile, argument: str = "fourdm") -> dict:
    """The base's UNet state dict (ImageDream's, no prefix) with the 4DM file's spatial weights in place; refused
    when the file holds weights the base lacks or shaped otherwise (a 4DM made for another base)."""
    foreign = [key for key in file.unet if key not in base_unet]
    if foreign:
        raise InvalidInput(argument, f"the file holds {len(foreign)} UNet weights the ImageDream base lacks (first: {foreign[0]})",
                           f"use the {FILE} made for ImageDream with {BASE_FILE} as the base")
    wrong = [key for key, value in file.unet.items() if tuple(value.shape) != tuple(base_unet[key].shape)]
    if wrong:
        raise InvalidInput(argument, f"{wrong[0]} has shape {tuple(file.unet[wrong[0]].shape)}, the base's is "
                           f"{tuple(base_unet[wrong[0]].shape)}", f"use the {FILE} made for ImageDream with {BASE_FILE} as the base")
    return {**base_unet, **file.unet}


NOT_A_BASE = (f"this is 4Diffusion's {FILE}: motion modules (and perhaps UNet weights) made for ImageDream, not a "
              "checkpoint of its own: it needs its base", f"load it with MV4D Load 4DM together with ImageDream's {BASE_FILE}")
