"""Files the pack's previews write for the browser: the 4D player's .mv4dweb, in ComfyUI's temp folder (emptied
when the server starts, like core image previews)."""

from __future__ import annotations

import os

import folder_paths

from ..kernels.splats.model import Splats4D
from ..kernels.splats.player_file import SUFFIX, write_player_file

PLAYER_PREFIX = "mv4d/preview_4d"


def write_player_preview(scene: Splats4D, background: tuple[float, float, float], fps: float) -> dict:
    """Write the scene as a new numbered .mv4dweb under temp/ and return its {filename, subfolder, type}."""
    temp = folder_paths.get_temp_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(PLAYER_PREFIX, temp)
    filename = f"{name}_{counter:05}_{SUFFIX}"
    write_player_file(os.path.join(folder, filename), scene, background, fps)
    return {"filename": filename, "subfolder": subfolder, "type": "temp"}
