"""Helpers shared by the runner lane's tests."""

from __future__ import annotations

from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_png(path: Path, payload: bytes = b"") -> Path:
    """A file that starts like a PNG, which is all the runner looks at (the fake server never decodes it);
    its name is part of its content, so different files never share an upload folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG_MAGIC + b"\0\0\0\rIHDR" + path.name.encode() + payload)
    return path
