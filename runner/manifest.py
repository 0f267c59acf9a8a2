"""<output>/manifest.json: what the batch is, and per item what happened to it. It is rewritten whole (and
atomically) after every change of state, so it always describes the batch, even after a crash or Ctrl-C, and a
later run with the same --output resumes from it."""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import RunnerError
from .inputs import InputItem

MANIFEST_NAME = "manifest.json"
PENDING, RUNNING, DONE, ERROR, CANCELLED = "pending", "running", "done", "error", "cancelled"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def base_name(path: Path) -> str:
    """An item's name from its input: the file name without suffix, or the folder name; only characters that
    are safe in a folder name."""
    stem = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "item"


def write_json_atomically(path: Path, data: dict) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def new_entry(input_path: Path, name: str) -> dict:
    return {"input": str(input_path), "name": name, "status": PENDING, "server": None, "prompt_id": None,
            "files": [], "timings": {}, "error": None}


def reset_entry(entry: dict, status: str, error: str | None = None) -> None:
    """Forget an earlier attempt's results before the item is run (or found unreadable) again."""
    entry.update(status=status, server=None, prompt_id=None, files=[], timings={}, error=error)


class Manifest:
    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data

    @classmethod
    def open(cls, output_dir: Path, workflow_path: Path, workflow_hash: str, overrides: dict, restart: bool) -> Manifest:
        """The manifest of an earlier run into output_dir, to resume, when it was made by the same workflow and
        overrides; else (or with restart) a new one. Nothing is written until save()."""
        path = output_dir / MANIFEST_NAME
        if path.exists() and not restart:
            try:
                data = json.loads(path.read_text())
                recorded = (data["workflow_sha256"], data["overrides"])
                if not isinstance(data["items"], list):
                    raise TypeError("'items' is not a list")
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise RunnerError(f"{path} cannot be read as a batch manifest ({error}): use another --output, or --restart "
                                  "to start over") from error
            if recorded != (workflow_hash, overrides):
                what = "workflow" if recorded[0] != workflow_hash else f"overrides ({recorded[1]} then, {overrides} now)"
                raise RunnerError(f"{output_dir} holds a batch made with another {what}: resuming would mix results; use "
                                  "another --output, or --restart to start over there")
            data["workflow"] = str(workflow_path)
            return cls(path, data)
        return cls(path, {"workflow": str(workflow_path), "workflow_sha256": workflow_hash, "overrides": overrides,
                          "servers": [], "items": [], "started": None, "finished": None})

    @property
    def items(self) -> list[dict]:
        return self.data["items"]

    def entries_for(self, inputs: list[InputItem]) -> list[dict]:
        """The manifest entries of this run's inputs, in their order: the recorded entry of an input seen before
        (so its name never changes), else a new one named after the input, made unique among all items."""
        by_input = {entry["input"]: entry for entry in self.items}
        taken = {entry["name"] for entry in self.items}
        entries = []
        for item in inputs:
            entry = by_input.get(str(item.path))
            if entry is None:
                name = base = base_name(item.path)
                number = 2
                while name in taken:
                    name, number = f"{base}-{number}", number + 1
                taken.add(name)
                entry = new_entry(item.path, name)
                self.items.append(entry)
                by_input[entry["input"]] = entry
            entries.append(entry)
        return entries

    def is_intact(self, entry: dict) -> bool:
        """Done, and every file it downloaded is still there with its size: nothing to redo."""
        if entry["status"] != DONE:
            return False
        for file in entry["files"]:
            path = self.path.parent / file["path"]
            if not path.is_file() or path.stat().st_size != file["bytes"]:
                return False
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.path, self.data)
