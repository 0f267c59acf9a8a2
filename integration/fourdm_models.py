"""Loading 4Diffusion's 4DM as one MODEL: ImageDream's checkpoint (the base: UNet, encoders, VAE) loaded as our
other multi-view models are, with 4dm.ckpt's spatial weights, if it holds any, in place of the base's, and its motion
modules injected by our motion patch over the conditioning's views x frames grid (kernels/models/fourdm.py).

4DM keeps ImageDream's noise schedule (LDM linear, eps), so the motion patch leaves the model's schedule as it is.
The UNet prefers bf16 where the device has it (ComfyUI's command-line dtype flags still win).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.ops
import torch

from ..kernels.errors import InvalidInput
from ..kernels.models.fourdm import (BASE_FILE, FILE, TRAINED_FRAMES, VERSION, FourDMFile, is_4dm_state_dict, split_4dm,
                                     with_4dm_weights)
from ..kernels.models.motion import MotionModel, load_motion_model, motion_channels
from ..kernels.models.multiview import IMAGEDREAM, split_checkpoint
from .motion_models import read_weights
from .multiview_models import LoadedMultiviewModel, build_multiview_model, read_checkpoint
from .patches.motion import motion_of, with_motion
from .patches.multiview import multiview_family

UNET_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # in order of preference (ComfyUI picks what the device has)


@dataclass
class Loaded4DM:
    loaded: LoadedMultiviewModel  # its model carries the motion modules
    motion: MotionModel
    spatial_weights: int  # UNet weights the 4DM file held (0: motion modules only)

    def summary(self) -> str:
        model = self.loaded.model.model
        weights = (f"{self.spatial_weights} UNet weights of its own over ImageDream's" if self.spatial_weights
                   else "motion modules only, on ImageDream's weights")
        text = (f"4DM: ImageDream + {len(self.motion.placements())} motion modules ({weights}); position table "
                f"{self.motion.version.table_length} frames (trained on {TRAINED_FRAMES}); UNet {str(model.get_dtype()).replace('torch.', '')}")
        if self.loaded.missing:
            text += ". Not in the base file: " + "; ".join(self.loaded.missing)
        return text


def read_4dm(path: Path, argument: str = "fourdm") -> FourDMFile:
    """4dm.ckpt (or a safetensors copy) split into motion modules and spatial weights; other files are refused."""
    state_dict, _ = read_weights(path, argument)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):  # 4dm.ckpt is Lightning-style
        state_dict = state_dict["state_dict"]
    if not is_4dm_state_dict(state_dict) and any(key.endswith("input_blocks.0.0.weight") for key in state_dict):
        raise InvalidInput(argument, f"{path.name} is a model checkpoint, not 4DM's motion-module file",
                           f"pick {FILE} here (in models/animatediff_models) and the ImageDream checkpoint as the base")
    return split_4dm(state_dict, argument)


def unet_channels(unet: dict) -> tuple[int, ...]:
    """The UNet's channels per level (its first ResBlock's output of input blocks 1, 4, 7, 10)."""
    return tuple(unet[f"input_blocks.{1 + 3 * level}.0.out_layers.3.weight"].shape[0] for level in range(4))


def load_4dm(fourdm_path: Path, base_path: Path, embedding_directory=None) -> Loaded4DM:
    """The 4DM MODEL (and the base's CLIP, VAE and CLIP vision). InvalidInput names 'fourdm' or 'base_ckpt'."""
    file = read_4dm(fourdm_path)
    base = read_checkpoint(base_path, "base_ckpt")
    if is_4dm_state_dict(base):
        raise InvalidInput("base_ckpt", f"{base_path.name} is 4DM's own motion-module file, not its base",
                           f"pick ImageDream's {BASE_FILE} (in models/checkpoints) as the base")
    checkpoint = split_checkpoint(base, "base_ckpt", edit_unet=lambda unet: with_4dm_weights(unet, file, "fourdm"))
    if checkpoint.family is not IMAGEDREAM:
        raise InvalidInput("base_ckpt", f"{base_path.name} is {checkpoint.family.name}, but 4DM was trained on ImageDream",
                           f"pick ImageDream's {BASE_FILE} as the base")
    channels = motion_channels(file.motion)
    if channels != unet_channels(checkpoint.unet):
        raise InvalidInput("fourdm", f"its motion modules have channels {channels}, the base UNet {unet_channels(checkpoint.unet)}",
                           f"use the {FILE} made for ImageDream")
    loaded = build_multiview_model(checkpoint, embedding_directory, UNET_DTYPES)
    motion = load_motion_model(file.motion, file.version, "fourdm", operations=comfy.ops.manual_cast).eval().requires_grad_(False)
    loaded.model = with_motion(loaded.model, motion, sampling=False)  # 4DM keeps ImageDream's schedule
    if file.unet:
        logging.info("mv4d: 4DM: %d UNet weights of %s replace ImageDream's", len(file.unet), fourdm_path.name)
    return Loaded4DM(loaded, motion, len(file.unet))


def is_4dm(model) -> bool:
    """ImageDream with 4DM's motion modules (MV4D Load 4DM's MODEL)."""
    motion = motion_of(model)
    return multiview_family(model) == IMAGEDREAM.id and motion is not None and motion.version.name == VERSION
