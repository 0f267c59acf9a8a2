"""MV4D Load Multiview Images: a multi-view set (one image per view, in camera order) from a folder of ComfyUI's
input directory, for the multi-view -> 4D workflow. The batch runner uploads each set into its own subfolder."""

from __future__ import annotations

import re
from pathlib import Path

import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps, UnidentifiedImageError

from ..kernels.files import files_in_folder, walk_folders
from ..kernels.memory import check_memory
from ..integration import host
from ..integration.node_errors import input_error, kernel_errors_as_node_errors

LOAD_MULTIVIEW = "MV4D Load Multiview Images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
INPUT_VIEW_LAST = "last (SV3D order: input view at 360 deg)"
INPUT_VIEW_FIRST = "first"
MAX_FOLDER_DEPTH = 3  # input/<a>/<b>/<c>: deep enough for the batch runner's mv4d_batch/<hash> folders


def natural_key(name: str) -> list:
    """view_2.png before view_10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def image_files(folder: Path) -> list[Path]:
    """The views of a folder under the input folder, as the reading rule of kernels/files.py accepts them (not
    hidden, like macOS's ._ files; a link only to a file inside the input folder), in natural name order."""
    files = files_in_folder(folder_paths.get_input_directory(), folder, IMAGE_SUFFIXES)
    return sorted(files, key=lambda entry: natural_key(entry.name))


def multiview_folders() -> list[str]:
    """Subfolders of the input directory holding at least two images, as paths relative to it."""
    root = Path(folder_paths.get_input_directory())
    found = [folder.relative_to(root).as_posix() for folder in walk_folders(root, MAX_FOLDER_DEPTH)
             if folder != root and len(image_files(folder)) >= 2]
    return sorted(found, key=natural_key)


def resolve_folder(folder) -> Path:
    root = Path(folder_paths.get_input_directory()).resolve()
    if not isinstance(folder, str) or not folder.strip():
        raise input_error(LOAD_MULTIVIEW, "folder", f"no folder chosen ({folder!r}): ComfyUI's input folder has no subfolder "
                          "of at least 2 images, or the list is out of date",
                          "copy the multi-view set into ComfyUI/input/<name>/ and refresh the node list (R)")
    path = (root / folder).resolve()
    if not path.is_relative_to(root) or path == root:
        raise input_error(LOAD_MULTIVIEW, "folder", f"'{folder}' is not a subfolder of ComfyUI's input folder",
                          "put the views in a folder inside ComfyUI/input and pick it")
    if not path.is_dir():
        raise input_error(LOAD_MULTIVIEW, "folder", f"no folder '{folder}' in ComfyUI's input folder",
                          "copy the multi-view set into ComfyUI/input/<name>/ (or upload it with the batch runner)")
    return path


UNREADABLE = (UnidentifiedImageError, OSError, Image.DecompressionBombError)


def pixel_count(path: Path) -> int:
    """Width x height from the image's header, without decoding it."""
    try:
        with Image.open(path) as opened:
            return opened.size[0] * opened.size[1]
    except UNREADABLE as error:
        raise input_error(LOAD_MULTIVIEW, "folder", f"cannot read {path.name} as an image ({error})",
                          "remove or replace that file") from error


def check_views_memory(files: list[Path], size: int) -> None:
    """The views as float32 RGB and their batch (24 bytes a pixel of the output), and the decoding of the
    largest one (RGBA, float and resized copies: about 32 bytes a pixel of the file), against free memory."""
    counts = [pixel_count(path) for path in files]
    output = sum(counts) if size == 0 else len(files) * size * size
    with kernel_errors_as_node_errors(LOAD_MULTIVIEW, {"size": "size"}):
        check_memory("size", 24 * output + 32 * max(counts), f"{len(files)} views at {size or 'their own'} px",
                     "lower size, or use fewer or smaller images")


def load_rgb(path: Path) -> np.ndarray:
    """RGB in [0, 1]; transparent pixels go on white, the background SV3D and SVD expect (as the official code
    prepares its inputs)."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except UNREADABLE as error:
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
        except ValueError as error:
            return str(error)
        if len(views) < 2:
            return f"{LOAD_MULTIVIEW}: input 'folder': '{folder}' holds {len(views)} image(s); a multi-view set needs at least 2"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, **_) -> str:
        # Re-run when the files change, as core LoadImage does for its file.
        try:
            files = image_files(resolve_folder(folder))
        except ValueError:
            return str(folder)
        return ";".join(f"{entry.name}:{entry.stat().st_size}:{entry.stat().st_mtime_ns}" for entry in files)

    @classmethod
    def execute(cls, folder, size, input_view) -> io.NodeOutput:
        files = image_files(resolve_folder(folder))
        if len(files) < 2:
            raise input_error(LOAD_MULTIVIEW, "folder", f"'{folder}' holds {len(files)} image(s)",
                              "put at least 2 views (SV3D: 21) in the folder")
        check_views_memory(files, size)
        views, on_view = [], host.progress()
        for number, path in enumerate(files, start=1):
            image = torch.from_numpy(load_rgb(path))[None]
            if size:
                image = comfy.utils.common_upscale(image.movedim(-1, 1), size, size, "bilinear", "center").movedim(1, -1)
            views.append(image)
            on_view(number, len(files))
        shapes = {tuple(view.shape[1:3]) for view in views}
        if len(shapes) > 1:
            raise input_error(LOAD_MULTIVIEW, "size", f"the views have different sizes {sorted(shapes)}",
                              "set size to a multiple of 8 (e.g. 576) so they are resized alike")
        batch = torch.cat(views)
        index = -1 if input_view == INPUT_VIEW_LAST else 0
        return io.NodeOutput(batch, batch[index:][:1], len(files))
