"""Loading MVDream / ImageDream checkpoints as stock ComfyUI SD models with our multi-view patches.

The UNet is built from ComfyUI's own SD15 / SD20 model configs, chosen by the family the checkpoint's keys show
(not by ComfyUI's global model detection, which knows no multi-view model and would only match real-size files),
always as an eps model (the SD2.1-based files are eps; ComfyUI's SD2 heuristic could take them for v-prediction).
The text encoder, VAE and CLIP vision go through ComfyUI's own loaders; the camera MLP, resampler and image-prompt
projections become our adapter (kernels/models/multiview.py).
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import comfy.clip_vision
import comfy.model_base
import comfy.model_detection
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils

from ..kernels.errors import InvalidInput
from ..kernels.models.multiview import (ORIGINAL_UNET_PREFIX, MultiviewCheckpoint, MultiviewFamily, from_diffusers_components,
                                        split_checkpoint)
from .patches.multiview import build_adapter, with_multiview_patches

# What to load instead when a file lacks an encoder (the official code takes them from these releases too).
STOCK_ENCODERS = {
    ("SD15", "text"): "core Load CLIP (type stable_diffusion) with SD1.5's text encoder (CLIP ViT-L/14, e.g. clip_l.safetensors)",
    ("SD20", "text"): "core Load CLIP (type stable_diffusion) with SD2.1's OpenCLIP ViT-H/14 text encoder "
                      "(stabilityai/stable-diffusion-2-1-base text_encoder/model.safetensors)",
    ("SD15", "vae"): "core Load VAE with SD's VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors)",
    ("SD20", "vae"): "core Load VAE with SD2.1's VAE (stable-diffusion-2-1-base vae/diffusion_pytorch_model.safetensors)",
    ("SD20", "clip_vision"): "core Load CLIP Vision with OpenCLIP ViT-H/14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
}
DIFFUSERS_COMPONENTS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "image_encoder": "image_encoder"}


@dataclass
class LoadedMultiviewModel:
    family: MultiviewFamily
    model: object  # ModelPatcher with our patches
    clip: object | None
    vae: object | None
    clip_vision: object | None
    missing: list[str] = field(default_factory=list)  # what to load with core loaders instead

    def summary(self) -> str:
        text = f"{self.family.name}"
        if self.missing:
            text += ". Not in this file: " + "; ".join(self.missing)
        return text


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "unet").is_dir()


def load_multiview_model(path: Path, embedding_directory=None) -> LoadedMultiviewModel:
    """An original MVDream / ImageDream file (.safetensors, or .pt / .ckpt read with weights_only) or a
    diffusers-format folder. Raises InvalidInput (argument 'ckpt_name') for files of another family."""
    if path.is_dir():
        return build_multiview_model(read_diffusers_folder(path), embedding_directory)
    return build_multiview_model(split_checkpoint(read_checkpoint(path)), embedding_directory)


def read_checkpoint(path: Path, argument: str = "ckpt_name") -> dict:
    """The state dict of a checkpoint file (.safetensors, or a pickle read as weights only), unwrapped from a
    Lightning-style {'state_dict': ...}."""
    try:
        state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)  # weights_only=True for pickles
    except pickle.UnpicklingError as error:
        raise InvalidInput(argument, f"{path.name} holds more than weights, so it is not loaded ({str(error).splitlines()[0]})",
                           "use a .safetensors version of the checkpoint, or convert it with a trusted script") from None
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):  # Lightning-style wrapper
        state_dict = state_dict["state_dict"]
    return state_dict


def read_diffusers_folder(folder: Path) -> MultiviewCheckpoint:
    parts = {}
    for name, subfolder in DIFFUSERS_COMPONENTS.items():
        files = sorted((folder / subfolder).glob("*.safetensors")) + sorted((folder / subfolder).glob("*.bin"))
        state = {}
        for file in files:
            state.update(comfy.utils.load_torch_file(str(file), safe_load=True))
        parts[name] = state
    return from_diffusers_components(parts["unet"], parts["vae"], parts["text_encoder"], parts["image_encoder"])


def diffusers_folder_family(folder: Path) -> str | None:
    """The pipeline class a diffusers folder declares (for listing; the keys decide when loading)."""
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def build_multiview_model(checkpoint: MultiviewCheckpoint, embedding_directory=None, unet_dtypes=None) -> LoadedMultiviewModel:
    """unet_dtypes: the UNet dtypes to choose from, in order of preference (default: ComfyUI's for the base)."""
    family = checkpoint.family
    model = with_multiview_patches(sd_unet(checkpoint, unet_dtypes), build_adapter(checkpoint.adapter_shape, checkpoint.adapter), family)
    clip = text_encoder(checkpoint, embedding_directory) if checkpoint.text else None
    vae = comfy.sd.VAE(sd=checkpoint.vae) if checkpoint.vae else None
    clip_vision = image_encoder(checkpoint) if checkpoint.clip_vision else None
    missing = [STOCK_ENCODERS[(family.base, part)] for part in checkpoint.missing_parts]
    for line in missing:
        logging.warning("mv4d: %s: use %s", family.name, line)
    return LoadedMultiviewModel(family, model, clip, vae, clip_vision, missing)


def sd_unet(checkpoint: MultiviewCheckpoint, unet_dtypes=None):
    """A stock ComfyUI SD15 / SD20 BaseModel (eps) of the checkpoint's UNet, in a ModelPatcher. ComfyUI picks its
    dtype (its command-line flags first) among unet_dtypes, or the base's supported dtypes."""
    state_dict = {ORIGINAL_UNET_PREFIX + key: value for key, value in checkpoint.unet.items()}
    config = getattr(comfy.supported_models, checkpoint.family.base)(
        comfy.model_detection.detect_unet_config(state_dict, ORIGINAL_UNET_PREFIX))
    parameters = comfy.utils.calculate_parameters(state_dict, ORIGINAL_UNET_PREFIX)
    load_device = model_management.get_torch_device()
    supported = list(unet_dtypes or config.supported_inference_dtypes)
    unet_dtype = model_management.unet_dtype(model_params=parameters, supported_dtypes=supported,
                                             weight_dtype=comfy.utils.weight_dtype(state_dict, ORIGINAL_UNET_PREFIX))
    config.set_inference_dtype(unet_dtype, model_management.unet_manual_cast(unet_dtype, load_device, supported))
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS,
                                       device=model_management.unet_inital_load_device(parameters, unet_dtype))
    model.load_model_weights(state_dict, ORIGINAL_UNET_PREFIX)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=model_management.unet_offload_device())


def text_encoder(checkpoint: MultiviewCheckpoint, embedding_directory=None):
    """ComfyUI's SD1 / SD2 CLIP from the checkpoint's text tower (transformers layout, or SD2's open_clip one)."""
    text = checkpoint.text
    if checkpoint.text_format == "open_clip":
        text = comfy.utils.clip_text_transformers_convert(dict(text), "", "")
    return comfy.sd.load_text_encoder_state_dicts([text], embedding_directory=embedding_directory,
                                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


def image_encoder(checkpoint: MultiviewCheckpoint):
    """ComfyUI's CLIP vision from an open_clip ViT ('visual.*', ImageDream's .pt) or a transformers one."""
    if any(key.startswith("visual.") for key in checkpoint.clip_vision):
        return comfy.clip_vision.load_clipvision_from_sd(checkpoint.clip_vision, prefix="visual.", convert_keys=True)
    return comfy.clip_vision.load_clipvision_from_sd(checkpoint.clip_vision)


DIFFUSERS_TAG = " [diffusers]"


def checkpoint_choices() -> list[str]:
    """The loader's list: files of models/checkpoints, and diffusers-format folders of models/diffusers."""
    import folder_paths

    folders = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if Path(root).is_dir():
            folders += [entry.name + DIFFUSERS_TAG for entry in sorted(Path(root).iterdir()) if is_diffusers_folder(entry)]
    return folder_paths.get_filename_list("checkpoints") + folders


def resolve_checkpoint(choice: str) -> Path | None:
    """The file or folder behind a listed choice (None when it is not there)."""
    import folder_paths

    if choice.endswith(DIFFUSERS_TAG):
        name = choice[:-len(DIFFUSERS_TAG)]
        for root in folder_paths.get_folder_paths("diffusers"):
            path = Path(root) / name
            if Path(name).name == name and is_diffusers_folder(path):
                return path
        return None
    path = folder_paths.get_full_path("checkpoints", choice)
    return Path(path) if path else None
