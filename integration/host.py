"""The few ComfyUI services our nodes use: the compute device, progress bars that stop when the user presses
Cancel, model folders, and output paths."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.utils
import folder_paths
import torch

from ..kernels.files import check_output_prefix, inside, is_hidden, readable
from .node_errors import input_error, kernel_errors_as_node_errors

LPIPS_FOLDER = "lpips"


def compute_device() -> torch.device:
    return model_management.get_torch_device()


def device_name(device: torch.device) -> str:
    """What ComfyUI calls the device in its start-up log, e.g. 'cuda:0 NVIDIA GeForce RTX 3090 : cudaMallocAsync'."""
    return model_management.get_torch_device_name(device)


def make_room(device: torch.device, bytes_needed: int) -> None:
    """Ask ComfyUI to unload models until about `bytes_needed` is free on the device (no-op on the CPU)."""
    if device.type == "cuda":
        model_management.free_memory(bytes_needed, device)


def progress(every: int = 1) -> Callable[[int, int], None]:
    """on_step(done, total) for kernels: advances the node's progress bar (sized by the kernel's own total) and
    raises ComfyUI's interrupt when the user cancels, so a long loop stops at the next step."""
    bars: dict[int, comfy.utils.ProgressBar] = {}

    def on_step(done: int, total: int) -> None:
        model_management.throw_exception_if_processing_interrupted()
        if done % every == 0 or done == total:
            bar = bars.setdefault(total, comfy.utils.ProgressBar(total))
            bar.update_absolute(done, total)

    return on_step


# ComfyUI/models/<folder> of the files our loaders list: LPIPS weights (vgg16 backbone, LPIPS v0.1 heads); motion
# modules and CameraCtrl (the folder AnimateDiff-Evolved uses, so its users' files are found).
# mv4d_adapters: alignment adapters trained with MV4D Train Alignment Adapters (Vivid-ZOO).
MODEL_FOLDERS = (LPIPS_FOLDER, "animatediff_models", "mv4d_adapters")
@contextmanager
def models_kept_loaded(models: list) -> Iterator[None]:
    """For work between the model calls of a sampling run that loads models of its own (a VAE): ComfyUI unloads
    whatever it must to make room, including the models being sampled with, and nothing loads them again before
    the sampler's next call. Loads back any of `models` (ModelPatchers) that lost weights on the way."""
    before = [model.loaded_size() for model in models]
    yield
    if any(model.loaded_size() < size for model, size in zip(models, before)):
        model_management.load_models_gpu(models)


def sampling_options(model) -> dict:
    """A ModelPatcher's model options as a sampler prepares them for its model calls, with the patcher's wrappers
    and callbacks in transformer_options. For model calls made outside a sampler (training, score distillation):
    without them the model's wrappers do not run, among them the one that hands our conditioning (cameras, the
    grid) to the patches."""
    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    options.setdefault("transformer_options", {})
    comfy.sampler_helpers.prepare_model_patcher(model, {}, options)
    return options


def normal_tensors(module: torch.nn.Module) -> None:
    """Tensors ComfyUI created under torch.inference_mode() (every model a node loads) cannot take part in autograd;
    give each such parameter and buffer a normal copy of the same values (in place, once, before training)."""
    for child in module.modules():
        for name, value in list(child._parameters.items()):
            if value is not None and value.is_inference():
                child._parameters[name] = torch.nn.Parameter(value.clone(), requires_grad=value.requires_grad)
        for name, value in list(child._buffers.items()):
            if value is not None and value.is_inference():
                child._buffers[name] = value.clone()


def check_interrupt(done: int = 0, total: int = 0) -> None:
    """on_step for a loop inside another node's work (a fit inside sampling): stops when the user cancels, and draws
    no progress bar of its own (the node's bar stays the sampler's)."""
    model_management.throw_exception_if_processing_interrupted()


def register_model_folders() -> None:
    for name in MODEL_FOLDERS:
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def check_prefix(filename_prefix: str) -> None:
    """An output prefix is checked before the prompt runs (a node's validate_inputs) and again when it writes."""
    check_output_prefix(folder_paths.get_output_directory(), filename_prefix)


def output_base(filename_prefix: str) -> Path:
    """The base path (no suffix) of a new numbered output; a prefix that cannot be written is refused."""
    output = folder_paths.get_output_directory()
    check_output_prefix(output, filename_prefix)
    full_folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, output)
    return Path(full_folder) / f"{filename}_{counter:05}_"


def ui_entry(path: Path) -> dict:
    """{filename, subfolder, type} of a file under the output folder, as /view and /history expect."""
    relative = path.resolve().relative_to(Path(folder_paths.get_output_directory()).resolve())
    return {"filename": relative.name, "subfolder": relative.parent.as_posix() if relative.parent != Path(".") else "", "type": "output"}


def existing_file(root: str, relative, node: str, input_name: str, folder: str, kind: str = "a file") -> Path:
    """The file `relative` under root, as the reading rule of kernels/files.py accepts it (inside root once
    links are resolved, not hidden); anything else is a node input error."""
    if not isinstance(relative, str) or not relative.strip():
        raise input_error(node, input_name, f"no file chosen ({relative!r}): {folder} has none to list, or the list is "
                          "out of date", f"put {kind} into {folder} and refresh the node list (R)")
    with kernel_errors_as_node_errors(node, {input_name: input_name}):
        inside(root, relative, input_name, folder)
    path = Path(root) / relative
    if not path.exists():
        raise input_error(node, input_name, f"{relative!r} does not exist in {folder}", f"put it in {folder} and refresh the node list (R)")
    if not readable(root, path):
        what = "a hidden file (its name starts with '.')" if is_hidden(path.name) else "not a file"
        raise input_error(node, input_name, f"{relative!r} is {what}", f"pick {kind} from the list")
    return path


def fingerprint(path: Path) -> str:
    """Changes when the file does, so ComfyUI re-runs a loader whose file was edited."""
    stat = path.stat()
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"
