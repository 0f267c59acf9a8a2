"""Reading motion-module, CameraCtrl and CVD files from ComfyUI's models/animatediff_models folder (the folder
AnimateDiff-Evolved users already have): safetensors, weights-only pickles, or a diffusers MotionAdapter folder
(config.json + diffusion_pytorch_model.safetensors)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import comfy.ops
import comfy.utils

from ..kernels.errors import InvalidInput
from ..kernels.models.cameractrl import load_pose_encoder, qkv_merge_layers, split_cameractrl
from ..kernels.models.cvd import CVDModel, load_cvd_model, normalize_cvd_state_dict
from ..kernels.models.fourdm import is_4dm_state_dict, split_4dm
from ..kernels.models.motion import MotionModel, load_motion_model, normalize_motion_state_dict
from .patches.camera_control import CameraControl

MOTION_FOLDER = "animatediff_models"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def read_weights(path: Path, argument: str) -> tuple[dict, dict]:
    """(state dict, diffusers config or {}) of a weights file or a diffusers folder; pickles only as weights."""
    config = {}
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise InvalidInput(argument, f"the folder {path.name} holds no .safetensors or .bin weights",
                               "pick a weights file or a diffusers MotionAdapter folder")
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        path = files[0]
    try:
        state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    except pickle.UnpicklingError as error:
        raise InvalidInput(argument, f"{path.name} holds more than weights, so it is not loaded ({str(error).splitlines()[0]})",
                           "use a .safetensors version of the file") from None
    return state_dict, config


def load_motion_file(path: Path, argument: str = "motion_module") -> MotionModel:
    state_dict, config = read_weights(path, argument)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):  # 4DM's 4dm.ckpt, Lightning-style
        state_dict = state_dict["state_dict"]
    if is_4dm_state_dict(state_dict) and split_4dm(state_dict, argument).unet:
        logging.warning("mv4d: %s also holds UNet weights besides 4DM's motion modules, which only MV4D Load 4DM uses",
                        path.name)
    normalized, version = normalize_motion_state_dict(state_dict, config.get("motion_max_seq_length"), argument)
    motion = load_motion_model(normalized, version, argument, operations=comfy.ops.manual_cast)
    return motion.eval().requires_grad_(False)


def load_cameractrl_file(path: Path, argument: str = "cameractrl") -> CameraControl:
    state_dict, _ = read_weights(path, argument)
    checkpoint = split_cameractrl(state_dict, argument)
    encoder = load_pose_encoder(checkpoint, argument, operations=comfy.ops.manual_cast)
    control = CameraControl(encoder, qkv_merge_layers(checkpoint, operations=comfy.ops.manual_cast))
    return control.eval().requires_grad_(False)


def load_cvd_file(path: Path, argument: str = "cvd_module") -> CVDModel:
    """CVD.ckpt ({'unet_trainable_dict': ...}, read as weights only) or its safetensors conversion."""
    if path.is_dir():
        raise InvalidInput(argument, f"{path.name} is a folder", "pick CVD.ckpt or its .safetensors conversion")
    state_dict, _ = read_weights(path, argument)
    cvd = load_cvd_model(normalize_cvd_state_dict(state_dict, argument), argument, operations=comfy.ops.manual_cast)
    return cvd.eval().requires_grad_(False)


def motion_files() -> list[str]:
    """Weights files and diffusers folders in models/animatediff_models."""
    import folder_paths

    names = [name for name in folder_paths.get_filename_list(MOTION_FOLDER) if name.lower().endswith(WEIGHT_SUFFIXES)]
    for root in folder_paths.get_folder_paths(MOTION_FOLDER):
        if Path(root).is_dir():
            names += [entry.name + "/" for entry in sorted(Path(root).iterdir())
                      if entry.is_dir() and (entry / "config.json").is_file()]
    return sorted(set(names))


def resolve_motion_file(name: str) -> Path | None:
    import folder_paths

    if name.endswith("/"):
        for root in folder_paths.get_folder_paths(MOTION_FOLDER):
            path = Path(root) / name.rstrip("/")
            if Path(name.rstrip("/")).name == name.rstrip("/") and path.is_dir():
                return path
        return None
    path = folder_paths.get_full_path(MOTION_FOLDER, name)
    return Path(path) if path else None
