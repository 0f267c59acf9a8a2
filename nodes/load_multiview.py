"""MV4D Load Multiview Images: a multi-view set (one image per view, in camera order) from a folder of ComfyUI's
input directory, for the multi-view -> 4D workflow. The batch runner uploads each set into its own subfolder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps, UnidentifiedImageError

from ..integration.node_errors import input_error

LOAD_MULTIVIEW = "MV4D Load Multiview Images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
INPUT_VIEW_LAST = "last (SV3D order: input view at 360 deg)"
INPUT_VIEW_FIRST = "first"
MAX_FOLDER_DEPTH = 3  # input/<a>/<b>/<c>: deep enough for the batch runner's mv4d_batch/<hash> folders


def natural_key(name: str) -> list:
    """view_2.png before view_10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[Path]:
    files = [entry for entry in folder.iterdir() if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda entry: natural_key(entry.name))


def multiview_folders() -> list[str]:
    """Subfolders of the input directory holding at least two images, as paths relative to it."""
    root = Path(folder_paths.get_input_directory())
    found = []
    for current, subfolders, _ in os.walk(root):
        depth = len(Path(current).relative_to(root).parts)
        if depth >= MAX_FOLDER_DEPTH:
            subfolders.clear()
        if depth and len(image_files(Path(current))) >= 2:
            found.append(Path(current).relative_to(root).as_posix())
    return sorted(found, key=natural_key)


def resolve_folder(folder: str) -> Path:
    root = Path(folder_paths.get_input_directory()).resolve()
    path = (root / folder).resolve()
    if not path.is_relative_to(root) or path == root:
        raise input_error(LOAD_MULTIVIEW, "folder", f"'{folder}' is not a subfolder of ComfyUI's input folder",
                          "put the views in a folder inside ComfyUI/input and pick it")
    if not path.is_dir():
        raise input_error(LOAD_MULTIVIEW, "folder", f"no folder '{folder}' in ComfyUI's input folder",
                          "copy the multi-view set into ComfyUI/input/<name>/ (or upload it with the batch runner)")
    return path


def load_rgb(path: Path) -> np.ndarray:
    """RGB in [0, 1]; transparent pixels go on white, the background SV3D and SVD expect (as the official code
    prepares its inputs)."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise input_error(LOAD_MULTIVIEW, "folder", f"cannot read {path.name} as an image ({error})",
                          "remove or replace that file") from error
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


class LoadMultiviewImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_LoadMultiviewImages",
            display_name=LOAD_MULTIVIEW,
            category="mv4d/multiview video",
            description="Loads a multi-view set: every image of a folder inside ComfyUI's input folder, one per view, "
                        "in file-name order (view_2 before view_10). For Diffusion² it is the reference column: SV3D's "
                        "orbit order, input view last. Transparent pixels are put on white.",
            inputs=[
                io.Combo.Input("folder", options=multiview_folders(),
                               tooltip="A folder in ComfyUI/input with one image per view (at least 2)."),
                io.Int.Input("size", default=576, min=0, max=4096, step=8,
                             tooltip="Square size the views are centre-cropped and resized to (0 = keep; then all must match)."),
                io.Combo.Input("input_view", options=[INPUT_VIEW_LAST, INPUT_VIEW_FIRST], default=INPUT_VIEW_LAST,
                               tooltip="Which view is the input (front) view, returned alone for the video model."),
            ],
            outputs=[
                io.Image.Output("views", tooltip="One image per view, in file-name order."),
                io.Image.Output("input_view_image", tooltip="The input view alone."),
                io.Int.Output("view_count", tooltip="How many views the folder holds (for MV4D Orbit Cameras)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder) -> bool | str:
        # Defined so ComfyUI checks the folder itself rather than against the list made when the schema was
        # built: folders uploaded after that (the batch runner's) are valid too.
        try:
            views = image_files(resolve_folder(folder))
        except Exception as error:  # noqa: BLE001 - the message is what the user needs
            return str(error)
        if len(views) < 2:
            return f"{LOAD_MULTIVIEW}: input 'folder': '{folder}' holds {len(views)} image(s); a multi-view set needs at least 2"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, **_) -> str:
        # Re-run when the files change, as core LoadImage does for its file.
        files = image_files(resolve_folder(folder))
        return ";".join(f"{entry.name}:{entry.stat().st_size}:{entry.stat().st_mtime_ns}" for entry in files)

    @classmethod
    def execute(cls, folder, size, input_view) -> io.NodeOutput:
        files = image_files(resolve_folder(folder))
        if len(files) < 2:
            raise input_error(LOAD_MULTIVIEW, "folder", f"'{folder}' holds {len(files)} image(s)",
                              "put at least 2 views (SV3D: 21) in the folder")
        views = []
        for path in files:
            image = torch.from_numpy(load_rgb(path))[None]
            if size:
                image = comfy.utils.common_upscale(image.movedim(-1, 1), size, size, "bilinear", "center").movedim(1, -1)
            views.append(image)
        shapes = {tuple(view.shape[1:3]) for view in views}
        if len(shapes) > 1:
            raise input_error(LOAD_MULTIVIEW, "size", f"the views have different sizes {sorted(shapes)}",
                              "set size to a multiple of 8 (e.g. 576) so they are resized alike")
        batch = torch.cat(views)
        index = -1 if input_view == INPUT_VIEW_LAST else 0
        return io.NodeOutput(batch, batch[index:][:1], len(files))
