"""Reading and writing files safely: never outside the folder they belong to, and never half-written.

Reading, one rule for every loader: a file is read (and listed) only when its real path, every link resolved,
lies inside the real path of its root folder (ComfyUI's input or output folder; the root itself may be a link).
A link to a file elsewhere is neither listed nor read. Listings walk the real folders without following links to
folders, so a link loop cannot hang them and nothing is listed twice, and skip hidden names (starting with '.':
macOS's '._x' AppleDouble files, our own '.x.partial-N' temporaries), as the batch runner does.

Writing: a file is written under a temporary name in its final folder and renamed into place (atomic on one file
system); a folder of files is built under a temporary name and renamed when complete; a set of files that belong
together is staged in a hidden folder and moved into place only when every one of them is written. On any
error, an interrupt included, the temporaries are removed.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InvalidInput, file_error
from .memory import check_memory


def inside(root: str | Path, relative: str | Path, argument: str = "filename_prefix", folder: str = "the output folder") -> Path:
    """root / relative with every link resolved, refused when it would leave root (.., absolute paths, links
    to somewhere else)."""
    if not isinstance(relative, (str, Path)) or not str(relative).strip():
        raise InvalidInput(argument, f"no file or folder given ({relative!r})", f"pick one inside {folder}")
    if "\0" in str(relative):
        raise InvalidInput(argument, f"{str(relative)!r} holds a NUL character", "use a plain name")
    root_path = Path(root).resolve()
    path = (root_path / relative).resolve()  # as the OS will open it: each link resolved before a '..' after it
    if path != root_path and root_path not in path.parents:
        lexical = Path(os.path.normpath(root_path / relative))  # only to say why
        if lexical == root_path or root_path in lexical.parents:
            raise InvalidInput(argument, f"{str(relative)!r} is a link to somewhere outside {folder}", f"copy the file itself into {folder}")
        raise InvalidInput(argument, f"{str(relative)!r} points outside {folder}", "use a plain name or a subfolder, without '..'")
    return path


MAX_NAME_BYTES = 200  # of the last part of an output prefix: file systems allow 255, our suffixes and temporaries add ~45
_NOT_PORTABLE = set('<>:"|?*\\')  # refused in names by Windows (and '\\' separates folders there)


def check_output_prefix(root: str | Path, prefix) -> None:
    """Refuse, before anything is written, an output prefix ('name' or 'sub/folder/name') that would fail or go
    wrong when written: empty, a hidden name, characters file systems refuse, over-long names, a folder part that
    is a file already, or a path outside root."""
    fix = "use a name such as mv4d/scene: letters, digits, '_', '-', '.', with '/' between subfolders"
    if not isinstance(prefix, str) or not prefix.strip():
        raise InvalidInput("filename_prefix", "is empty (the files would be named only by their counter, hidden)", fix)
    bad = sorted({character for character in prefix if ord(character) < 32 or character in _NOT_PORTABLE})
    if bad:
        raise InvalidInput("filename_prefix", f"{prefix!r:.80} holds characters file systems refuse ({', '.join(map(repr, bad))})", fix)
    parts = prefix.split("/")
    if any(part.strip() == "" for part in parts):
        raise InvalidInput("filename_prefix", f"{prefix!r:.80} has an empty folder or file name (a '/' at an end, or '//')", fix)
    if is_hidden(parts[-1]):
        raise InvalidInput("filename_prefix", f"the name {parts[-1]!r:.80} starts with '.': the files would be hidden", fix)
    long_part = next((part for part in parts if len(part.encode()) > MAX_NAME_BYTES), None)
    if long_part is not None:
        raise InvalidInput("filename_prefix", f"the name {long_part[:40]!r}... is {len(long_part.encode())} bytes long, more than "
                                              f"the {MAX_NAME_BYTES} a file name can hold here", "use a shorter name")
    inside(root, prefix, "filename_prefix", "the output folder")
    folder = Path(root)
    for part in parts[:-1]:
        folder = folder / part
        if folder.exists() and not folder.is_dir():
            raise InvalidInput("filename_prefix", f"{folder.relative_to(root).as_posix()!r} is a file in the output folder, so it "
                                                  "cannot be a folder", "use another subfolder name, or move that file")


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def readable(root: str | Path, path: str | Path) -> bool:
    """The reading rule: `path` is a file (or a link to one), not hidden, whose real path lies inside root."""
    path = Path(path)
    if is_hidden(path.name) or not path.is_file():
        return False
    real_root = Path(root).resolve()
    return real_root in path.resolve().parents


def files_in_folder(root: str | Path, folder: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files directly in `folder` (a folder under root) that the reading rule accepts, with these suffixes
    (lower case), unsorted."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    return [entry for entry in entries if entry.name.lower().endswith(suffixes) and readable(root, entry)]


def walk_folders(root: str | Path, max_depth: int | None = None) -> Iterator[Path]:
    """Every real, non-hidden folder under root (root included), never through a link to a folder; at most
    max_depth levels below root."""
    root = Path(root)
    for current, subfolders, _ in os.walk(root, followlinks=False):
        depth = len(Path(current).relative_to(root).parts)
        subfolders[:] = sorted(name for name in subfolders if not is_hidden(name))
        if max_depth is not None and depth >= max_depth:
            subfolders.clear()
        yield Path(current)


def files_under(root: str | Path, suffixes: tuple[str, ...]) -> list[str]:
    """Relative paths (with /) of the files anywhere under root that the reading rule accepts, whose names end
    with one of the suffixes (lower case), sorted."""
    root = Path(root)
    found = []
    for folder in walk_folders(root):
        found += [entry.relative_to(root).as_posix() for entry in files_in_folder(root, folder, suffixes)]
    return sorted(found)


def read_whole_file(path: str | Path, memory_per_byte: float, fix: str, argument: str = "file") -> bytes:
    """The bytes of a file a reader decodes, refused before reading when the reader's working memory (at most
    memory_per_byte times the file's size: its decoded arrays are sized by what the file holds, never by counts
    it merely declares) would not fit in free memory."""
    path = Path(path)
    try:
        size = path.stat().st_size
        check_memory(argument, size * memory_per_byte, f"reading {path.name} ({size} bytes)", fix)
        return path.read_bytes()
    except OSError as error:
        raise file_error(path, f"cannot be read ({error.strerror or error})", fix, argument) from None


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


class StagedSet:
    """Where the members of a file set are written before they are moved into `folder` together."""

    def __init__(self, folder: Path, staging: Path):
        self.folder = folder
        self.staging = staging

    def path(self, name: str) -> Path:
        """The staging path of `folder / name` (name: one file or folder name)."""
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"a member of a file set is one name in its folder, got {name!r}")
        return self.staging / name

    def commit(self) -> list[Path]:
        members = sorted(self.staging.iterdir())
        taken = [self.folder / member.name for member in members if (self.folder / member.name).exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} exists already")
        moved: list[Path] = []
        try:
            for member in members:
                os.replace(member, self.folder / member.name)
                moved.append(member)
        except BaseException:
            for member in moved:  # put back what was moved: the set appears whole or not at all
                os.replace(self.folder / member.name, member)
            raise
        return [self.folder / member.name for member in members]


@contextmanager
def atomic_file_set(folder: str | Path, tag: str) -> Iterator[StagedSet]:
    """Yields a StagedSet; every member written to it appears in `folder` only if the block completes, and
    none of them otherwise (an error or an interrupt while writing any one removes them all)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{tag}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        staged = StagedSet(folder, staging)
        yield staged
        staged.commit()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
