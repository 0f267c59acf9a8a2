"""Vivid-ZOO's alignment layers (Li et al. 2024): what joins a frozen multi-view model (MVDream) to frozen video
motion modules (AnimateDiff v2), and their file.

Per motion module two Linear(C, C), zero-initialised, so fresh adapters leave the composite exactly the naive
composition: `align_in` in parallel with the module's proj_in (from the multi-view model's 3D-aware features to
the 2D features the motion module was trained on), `align_out` in parallel with its proj_out (back). Only these
train. They hang on the motion modules (kernels/models/motion.py) while the model is patched.

File (safetensors, in ComfyUI/models/mv4d_adapters): keys
`{down_blocks.i|up_blocks.i|mid_block}.motion_modules.j.temporal_transformer.{align_in,align_out}.{weight,bias}`
(the motion module's own key prefix, so they read like the module's own weights), and metadata (all strings):
format "mv4d.alignment_adapters", version, spatial_model (the multi-view family id, e.g. "mvdream-sd15"),
motion_model (AnimateDiff version, e.g. "v2"), channels (of down blocks 0..3), views, frames, resolution,
steps_trained, learning_rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import InvalidInput, file_error
from ..files import atomic_file
from ..memory import check_memory
from .motion import MotionModel

FORMAT = "mv4d.alignment_adapters"
VERSION = "1"
LOAD_FIX = "load an adapter file written by MV4D Train Alignment Adapters"
PATHS = ("temporal_transformer.align_in", "temporal_transformer.align_out")  # relative to a MotionModule


@dataclass(frozen=True)
class AdapterInfo:
    """What the adapters were made for and how far they were trained (the file's metadata)."""

    spatial_model: str
    motion_model: str
    channels: tuple[int, ...]
    views: int
    frames: int
    resolution: int
    steps_trained: int = 0
    learning_rate: float = 0.0

    def metadata(self) -> dict[str, str]:
        values = asdict(self)
        values["channels"] = json.dumps(list(self.channels))
        return {"format": FORMAT, "version": VERSION, **{key: str(value) for key, value in values.items() if key != "channels"},
                "channels": values["channels"]}

    @classmethod
    def from_metadata(cls, metadata: dict, path) -> AdapterInfo:
        if metadata.get("format") != FORMAT:
            raise file_error(path, f"is not an mv4d alignment-adapter file (format {metadata.get('format')!r:.40})", LOAD_FIX)
        kinds = {field.name: field.type for field in fields(cls)}
        try:
            values = {name: metadata[name] for name in kinds}
            values["channels"] = tuple(int(c) for c in json.loads(values["channels"]))
            for name in ("views", "frames", "resolution", "steps_trained"):
                values[name] = int(values[name])
            values["learning_rate"] = float(values["learning_rate"])
        except (KeyError, ValueError, TypeError) as error:
            raise file_error(path, f"its metadata is incomplete or malformed ({type(error).__name__}: {error})", LOAD_FIX) from None
        return cls(**values)


class AlignmentPair(nn.Module):
    def __init__(self, channels: int, operations=nn):
        super().__init__()
        self.align_in = operations.Linear(channels, channels)
        self.align_out = operations.Linear(channels, channels)


class AlignmentAdapters(nn.Module):
    """Two alignment layers per motion module of a MotionModel, keyed by the module's name."""

    def __init__(self, info: AdapterInfo, module_channels: dict[str, int], operations=nn):
        super().__init__()
        self.info = info
        self.pairs = nn.ModuleDict({_key(name): AlignmentPair(channels, operations) for name, channels in module_channels.items()})

    @classmethod
    def fresh(cls, motion: MotionModel, info: AdapterInfo, operations=nn) -> AlignmentAdapters:
        """Zero-initialised adapters for every module of `motion`: the composite then equals the naive one."""
        adapters = cls(info, module_channels(motion), operations)
        for parameter in adapters.parameters():
            nn.init.zeros_(parameter)
        return adapters

    def additions(self) -> dict[str, dict[str, nn.Module]]:
        """{motion module name: {attribute path: layer}} for the motion patch to hang on its modules."""
        return {_name(key): {PATHS[0]: pair.align_in, PATHS[1]: pair.align_out} for key, pair in self.pairs.items()}

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, pair in self.pairs.items():
            for path, layer in zip(PATHS, (pair.align_in, pair.align_out)):
                out[f"{_name(key)}.{path}.weight"] = layer.weight.detach().float().cpu().contiguous()
                out[f"{_name(key)}.{path}.bias"] = layer.bias.detach().float().cpu().contiguous()
        return out

    def with_info(self, **changes) -> AlignmentAdapters:
        self.info = AdapterInfo(**{**asdict(self.info), **changes})
        return self


def _key(name: str) -> str:  # ModuleDict keys cannot hold dots
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


def module_channels(motion: MotionModel) -> dict[str, int]:
    return {name: module.temporal_transformer.proj_in.in_features for _, name, module in motion.placements()}


def save_adapters(path: str | Path, adapters: AlignmentAdapters, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Writes the adapters (and `extra` tensors, e.g. the optimizer's state for resuming) whole or not at all."""
    tensors = {**adapters.file_state_dict(), **(extra or {})}
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata=adapters.info.metadata())


def load_adapters(path: str | Path, operations=nn) -> tuple[AlignmentAdapters, dict[str, torch.Tensor]]:
    """(adapters, the file's other tensors) of an adapter file; anything else is refused naming the file."""
    try:
        check_memory("adapters", 3 * Path(path).stat().st_size, f"reading {Path(path).name}", LOAD_FIX)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except InvalidInput:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise file_error(path, f"is not a readable .safetensors file ({type(error).__name__}: {str(error)[:120]})", LOAD_FIX) from None
    info = AdapterInfo.from_metadata(metadata, path)
    weights = {key: value for key, value in tensors.items() if key.endswith((".weight", ".bias")) and ".align_" in key}
    channels = {}
    for key, value in weights.items():
        if key.endswith(f"{PATHS[0]}.weight"):
            if value.ndim != 2 or value.shape[0] != value.shape[1]:
                raise file_error(path, f"{key} has shape {tuple(value.shape)}, an alignment layer is C x C", LOAD_FIX)
            channels[key[:-len(f".{PATHS[0]}.weight")]] = value.shape[0]
    if not channels:
        raise file_error(path, "holds no alignment layers", LOAD_FIX)
    adapters = AlignmentAdapters(info, channels, operations)
    expected = adapters.file_state_dict()
    missing = [key for key in expected if key not in weights]
    if missing:
        raise file_error(path, f"lacks {missing[0]}", LOAD_FIX)
    for key, value in weights.items():
        if key not in expected or value.shape != expected[key].shape or not torch.isfinite(value).all():
            raise file_error(path, f"tensor {key} does not fit the adapters (shape {tuple(value.shape)}, or not finite)", LOAD_FIX)
    with torch.no_grad():
        for key, pair in adapters.pairs.items():
            for path_name, layer in zip(PATHS, (pair.align_in, pair.align_out)):
                layer.weight.copy_(weights[f"{_name(key)}.{path_name}.weight"])
                layer.bias.copy_(weights[f"{_name(key)}.{path_name}.bias"])
    return adapters, {key: value for key, value in tensors.items() if key not in weights}


def check_compatible(info: AdapterInfo, spatial_model: str, motion: MotionModel, argument: str = "adapters") -> None:
    """Refuses adapters made for another multi-view model or motion module (their layers would not fit, or would
    align features they never saw)."""
    if info.spatial_model != spatial_model:
        raise InvalidInput(argument, f"these adapters were made for {info.spatial_model}, the model is {spatial_model}",
                           f"train adapters for {spatial_model} (MV4D Train Alignment Adapters) or load that model")
    channels = tuple(module_channels(motion)[f"down_blocks.{block}.motion_modules.0"] for block in range(4))
    if info.motion_model != motion.version.name or tuple(info.channels) != channels:
        raise InvalidInput(argument, f"these adapters were made for AnimateDiff {info.motion_model} with channels {list(info.channels)}, "
                           f"the model's motion module is {motion.version.name} with {list(channels)}",
                           f"apply the {info.motion_model} motion module the adapters were trained with")


def setting_warnings(info: AdapterInfo, views: int, frames: int, resolution: int) -> list[str]:
    """Warnings, not refusals, for a setting the adapters were not trained for: the layers are per-token linear
    maps, so they apply to any view and frame count and size, but nobody measured how well outside the trained
    setting."""
    out = []
    for name, trained, used in (("views", info.views, views), ("frames", info.frames, frames), ("resolution", info.resolution, resolution)):
        if used != trained:
            out.append(f"adapters trained for {trained} {name}, used with {used}: they apply (per-token layers) but their "
                       "quality there was never measured")
    return out


@dataclass(frozen=True)
class TrainingSettings:
    """How the alignment layers train (Vivid-ZOO: AdamW 1e-4; the defaults, read by the node and the command line)."""

    steps: int = 1000
    learning_rate: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints (each written whole, replacing the last)
    gradient_checkpointing: bool = False  # recompute the frozen blocks' activations in the backward pass: less memory
    bf16: bool = True  # bfloat16 autocast on CUDA (float32 elsewhere)
    caption_dropout: float = 0.1  # share of steps trained on the empty prompt, for classifier-free guidance
    weight_decay: float = 0.01

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise InvalidInput("steps", "steps, batch_size and checkpoint_every must be at least 1", "use e.g. 1000, 1 and 100")
        if not (0 < self.learning_rate < 1 and math.isfinite(self.learning_rate)):
            raise InvalidInput("learning_rate", f"{self.learning_rate} is not a learning rate in (0, 1)", "use 1e-4 (Vivid-ZOO)")
        if not 0 <= self.caption_dropout <= 1:
            raise InvalidInput("caption_dropout", f"{self.caption_dropout} is not a share in [0, 1]", "use 0.1")
