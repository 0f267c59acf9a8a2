"""Finding the batch's inputs and checking, before anything is uploaded, that each one is what the workflow's
input node takes: an image, a video, or a folder of at least two images (one multi-view set).

Files are recognised by their first bytes, never by their name, so a text file renamed .png is caught here
rather than as a server-side error halfway through the batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunnerError

# What each kind of input node takes (see workflow.INPUT_NODES).
TAKES_IMAGE, TAKES_VIDEO, TAKES_MULTIVIEW = "image", "video", "multiview"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".gif")
# The views MV4D Load Multiview Images reads (no GIF: one frame per view).
VIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
VIDEO_FORMATS = ("MP4/MOV", "WebM/MKV", "AVI", "GIF")
HEAD_BYTES = 12


def sniff_format(head: bytes) -> str | None:
    """The container or image format from a file's first bytes, or None when it is none we know."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        return "MP4/MOV"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "WebM/MKV"
    return None


@dataclass
class InputItem:
    """One unit of the batch: a file, or a folder of views. `error` says why it cannot be used (then it is
    recorded in the manifest as failed and never uploaded)."""

    path: Path
    files: list[Path] = field(default_factory=list)  # what gets uploaded
    error: str | None = None


def check_file(path: Path, takes: str) -> str | None:
    """Why `path` is not a readable image (takes "image") or video (takes "video"); None when it is."""
    try:
        with open(path, "rb") as opened:
            head = opened.read(HEAD_BYTES)
    except OSError as error:
        return f"{path}: cannot read it ({error.strerror or error})"
    if not head:
        return f"{path}: the file is empty"
    found = sniff_format(head)
    wanted = IMAGE_FORMATS if takes == TAKES_IMAGE else VIDEO_FORMATS
    if found in wanted:
        return None
    noun = "an image" if takes == TAKES_IMAGE else "a video"
    if found is None:
        return f"{path}: not {noun}: its content is none of {', '.join(wanted)} (it starts with {head[:8]!r})"
    return f"{path}: not {noun}: it is {found}, and the workflow's input node takes {takes}s"


def natural_key(name: str) -> list:
    """view_2.png before view_10.png, as MV4D Load Multiview Images orders its views."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def files_in(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The folder's (non-hidden, non-recursive) files with these suffixes, in natural name order."""
    found = [entry for entry in folder.iterdir()
             if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in suffixes]
    return sorted(found, key=lambda entry: natural_key(entry.name))


def multiview_item(folder: Path) -> InputItem:
    views = files_in(folder, VIEW_SUFFIXES)
    if len(views) < 2:
        return InputItem(folder, views, f"{folder}: a multi-view folder needs at least 2 images ({', '.join(VIEW_SUFFIXES)}), "
                                        f"it holds {len(views)}")
    for view in views:
        problem = check_file(view, TAKES_IMAGE)
        if problem:
            return InputItem(folder, views, f"multi-view folder {folder}: {problem}")
    return InputItem(folder, views)


def read_list_file(list_file: Path) -> list[str]:
    """Paths from a text file, one a line; blank lines and lines starting with # are skipped, and relative
    paths are relative to the list file's folder (so a list travels with its inputs)."""
    try:
        lines = list_file.read_text().splitlines()
    except OSError as error:
        raise RunnerError(f"cannot read the --list file {list_file} ({error.strerror or error})") from error
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line).expanduser()
            paths.append(str(path if path.is_absolute() else list_file.parent / path))
    return paths


def discover_inputs(paths: list[str], takes: str) -> list[InputItem]:
    """The batch's items from the given paths, in order, each path once. For an image or video input node a
    folder stands for its image (or video) files, sorted by name, not recursive; for a multi-view input node
    each folder is one item."""
    items: list[InputItem] = []
    seen: set[Path] = set()

    def add(item: InputItem) -> None:
        if item.path not in seen:
            seen.add(item.path)
            items.append(item)

    for given in paths:
        path = Path(given).expanduser().resolve()
        if not path.exists():
            add(InputItem(path, [], f"{path}: no such file or folder"))
        elif takes == TAKES_MULTIVIEW:
            if path.is_dir():
                add(multiview_item(path))
            else:
                add(InputItem(path, [], f"{path}: the workflow's input node loads multi-view folders; this is a file "
                                        "(give the folder that holds the views)"))
        elif path.is_dir():
            suffixes = IMAGE_SUFFIXES if takes == TAKES_IMAGE else VIDEO_SUFFIXES
            found = files_in(path, suffixes)
            if not found:
                add(InputItem(path, [], f"{path}: the folder has no {takes} files ({', '.join(suffixes)})"))
            for file in found:
                add(InputItem(file, [file], check_file(file, takes)))
        else:
            add(InputItem(path, [path], check_file(path, takes)))
    return items
