"""What the runner accepts from a server's JSON answers. Each answer is checked against the shape ComfyUI's
server.py gives before anything is read from it, and handed on as plain typed values; an answer of another shape
is a ServerError naming the route and what is wrong, which fails that item (or the pre-flight check) with that
message instead of a traceback somewhere later in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ServerError(Exception):
    """The server answered, but not as its API does (an HTTP error status or a malformed answer)."""


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


class Shape:
    """Checks one answer; `where` names the route and server for the message."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str, value, expected: str) -> ServerError:
        shown = repr(value)
        return ServerError(f"{self.where}: unexpected answer: {what} is {_kind(value)} ({shown[:80]}{'...' if len(shown) > 80 else ''}), "
                           f"expected {expected}")

    def object(self, value, what: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(what, value, "an object")
        return value

    def list(self, value, what: str) -> list:
        if not isinstance(value, list):
            raise self.fail(what, value, "a list")
        return value

    def text(self, value, what: str, empty: bool = True) -> str:
        if not isinstance(value, str) or (not empty and not value) or "\0" in value:
            raise self.fail(what, value, "a string" if empty else "a non-empty string without NUL")
        return value


@dataclass
class Uploaded:
    name: str
    subfolder: str


def upload_answer(answer, where: str) -> Uploaded:
    """POST /upload/image: {"name", "subfolder", "type"}."""
    shape = Shape(where)
    answer = shape.object(answer, "the answer")
    return Uploaded(shape.text(answer.get("name"), "'name'", empty=False), shape.text(answer.get("subfolder"), "'subfolder'"))


def prompt_answer(answer, where: str) -> str:
    """POST /prompt: {"prompt_id", "number", "node_errors"}; the prompt id."""
    shape = Shape(where)
    return shape.text(shape.object(answer, "the answer").get("prompt_id"), "'prompt_id'", empty=False)


@dataclass
class HistoryEntry:
    """A finished prompt's /history entry: its status and outputs."""

    status_str: str | None
    messages: list[tuple[str, dict]] = field(default_factory=list)  # [(event kind, its data)]
    outputs: dict[str, object] = field(default_factory=dict)  # node id -> that node's UI output (any JSON)


def history_answer(answer, prompt_id: str, where: str) -> HistoryEntry | None:
    """GET /history/ID: {ID: {"prompt", "outputs", "status": {"status_str", "completed", "messages"}}}, or {}
    while the prompt has not finished (None then)."""
    shape = Shape(where)
    if answer is None:
        return None
    entry = shape.object(answer, "the answer").get(prompt_id)
    if entry is None:
        return None
    entry = shape.object(entry, f"the entry of {prompt_id}")
    status = shape.object(entry.get("status") or {}, "its 'status'")
    status_str = status.get("status_str")
    if status_str is not None:
        shape.text(status_str, "its 'status_str'")
    messages = []
    for message in shape.list(status.get("messages") or [], "its status 'messages'"):
        if not (isinstance(message, list) and len(message) == 2 and isinstance(message[0], str) and isinstance(message[1], dict)):
            raise shape.fail("a status message", message, "a [kind, {data}] pair")
        messages.append((message[0], message[1]))
    outputs = shape.object(entry.get("outputs") or {}, "its 'outputs'")
    for node_id, output in outputs.items():
        shape.object(output, f"the outputs of node {node_id}")
    return HistoryEntry(status_str, messages, outputs)


def queue_answer(answer, where: str) -> tuple[list[str], list[str]]:
    """GET /queue: {"queue_running": [[number, prompt_id, ...]], "queue_pending": [...]}; the two id lists."""
    shape = Shape(where)
    answer = shape.object(answer, "the answer")
    lists = []
    for key in ("queue_running", "queue_pending"):
        ids = []
        for entry in shape.list(answer.get(key, []), f"'{key}'"):
            if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[1], str)):
                raise shape.fail(f"an entry of '{key}'", entry, "a [number, prompt_id, ...] list")
            ids.append(entry[1])
        lists.append(ids)
    return lists[0], lists[1]


def object_info_answer(answer, where: str) -> dict[str, dict]:
    """GET /object_info: {class_type: {"input": {"required": {...}, "optional": {...}}, ...}}."""
    shape = Shape(where)
    for class_type, info in shape.object(answer, "the answer").items():
        info = shape.object(info, f"the entry of {class_type}")
        inputs = shape.object(info.get("input") or {}, f"the 'input' of {class_type}")
        for group in ("required", "optional"):
            shape.object(inputs.get(group) or {}, f"the '{group}' inputs of {class_type}")
    return answer


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    filename: str
    subfolder: str
    type: str


def output_files(outputs: dict[str, object], where: str) -> list[OutputFile]:
    """Every file a prompt's outputs name: any object with a "filename" string, under any key (images, gifs,
    animated, 3d, our 4D files, ...), once each; its subfolder and type must be strings when given."""
    shape = Shape(where)
    found: list[OutputFile] = []
    seen: set[tuple[str, str, str]] = set()

    def walk(node_id: str, value) -> None:
        if isinstance(value, dict):
            if "filename" in value and isinstance(value["filename"], str):
                file = OutputFile(node_id, shape.text(value["filename"], f"a file name of node {node_id}", empty=False),
                                  shape.text(value.get("subfolder") or "", f"the subfolder of {value['filename']!r}"),
                                  shape.text(value.get("type") or "output", f"the type of {value['filename']!r}", empty=False))
                if (file.type, file.subfolder, file.filename) not in seen:
                    seen.add((file.type, file.subfolder, file.filename))
                    found.append(file)
            else:
                for inner in value.values():
                    walk(node_id, inner)
        elif isinstance(value, list):
            for inner in value:
                walk(node_id, inner)

    for node_id, output in outputs.items():
        walk(node_id, output)
    return found
