"""Writing files safely: never outside the folder they belong to, and never half-written.

A file is written under a temporary name in its final folder and renamed into place (atomic on one file
system); a folder of files is built under a temporary name and renamed when complete. On any error, an
interrupt included, the temporary is removed.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InvalidInput


def inside(root: str | Path, relative: str | Path, argument: str = "filename_prefix", folder: str = "the output folder") -> Path:
    """root / relative, refused when it would leave root (.., absolute paths, symlinks out)."""
    root_path = Path(root).resolve()
    path = (root_path / relative).resolve()
    if path != root_path and root_path not in path.parents:
        raise InvalidInput(argument, f"{str(relative)!r} points outside {folder}", "use a plain name or a subfolder, without '..'")
    return path


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; it becomes `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields a temporary folder to fill; it becomes `path` (which must not exist) only if the block completes."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    temporary.mkdir()
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
