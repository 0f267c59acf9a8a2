"""Where training sets live for the nodes: folders of clip files under ComfyUI's output folder (where MV4D Make
Demo Training Set writes them) or input folder (where a user copies their own), named as 'folder [output]'."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from ..kernels.errors import InvalidInput
from ..kernels.files import inside

ROOTS = {"output": folder_paths.get_output_directory, "input": folder_paths.get_input_directory}


def resolve_training_set(choice: str) -> tuple[Path, Path]:
    """(root, folder) of a listed training set."""
    name, _, kind = str(choice).rpartition(" [")
    kind = kind.rstrip("]")
    if kind not in ROOTS or not name:
        raise InvalidInput("dataset", f"{choice!r} is not a listed training set", "pick one from the list (refresh with R)")
    root = Path(ROOTS[kind]())
    folder = inside(root, name, "dataset", f"the {kind} folder")
    if not folder.is_dir():
        raise InvalidInput("dataset", f"{name!r} is not a folder of the {kind} folder", "make it with MV4D Make Demo Training Set")
    return root, folder
