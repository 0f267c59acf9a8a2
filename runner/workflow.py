"""The API-format workflow: loading it, finding the node the inputs are fed into, applying --set overrides, and
checking it against a server's /object_info before anything is queued.

An API workflow is {node_id: {"class_type": ..., "inputs": {name: value or [source_node_id, slot]}, "_meta":
{"title": ...}}}; an input whose value is a [node_id, slot] pair is linked to another node's output.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import RunnerError
from .inputs import TAKES_IMAGE, TAKES_MULTIVIEW, TAKES_VIDEO


@dataclass(frozen=True)
class InputNodeType:
    input_name: str  # the input that receives the uploaded file (or folder)
    takes: str       # what one batch item is: an image, a video or a multi-view folder


INPUT_NODE_TYPES = {
    "LoadImage": InputNodeType("image", TAKES_IMAGE),
    "LoadVideo": InputNodeType("file", TAKES_VIDEO),
    "MV4D_LoadMultiviewImages": InputNodeType("folder", TAKES_MULTIVIEW),
}


@dataclass(frozen=True)
class InputNode:
    node_id: str
    class_type: str
    input_name: str
    takes: str


# Where a model file named in a loader's input is expected, by input name (digits dropped: clip_name2).
MODEL_FOLDERS = {
    "ckpt_name": "models/checkpoints",
    "vae_name": "models/vae",
    "clip_name": "models/text_encoders (or models/clip)",
    "lora_name": "models/loras",
    "unet_name": "models/diffusion_models (or models/unet)",
    "control_net_name": "models/controlnet",
    "base_ckpt": "models/checkpoints",  # MV4D Load 4DM's ImageDream base
    "fourdm": "models/animatediff_models",  # MV4D Load 4DM's 4dm.ckpt
}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".onnx")
MAX_LISTED = 12  # options or names quoted in one message line


def load_workflow(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as error:
        raise RunnerError(f"cannot read the workflow {path} ({error.strerror or error})") from error
    try:
        workflow = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunnerError(f"the workflow {path} is not JSON (line {error.lineno}, column {error.colno}: {error.msg})") from error
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise RunnerError(f"{path} is a UI workflow; the runner needs the API format: in ComfyUI use Workflow -> Export (API)")
    if not isinstance(workflow, dict) or not workflow or not all(
            isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs"), dict) for node in workflow.values()):
        raise RunnerError(f"{path} is not an API-format workflow ({{node_id: {{class_type, inputs}}}})")
    return workflow


def workflow_sha256(workflow: dict) -> str:
    """A hash of the workflow's content (key order and whitespace do not count), recorded to refuse resuming
    a batch with a different workflow."""
    return hashlib.sha256(json.dumps(workflow, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def own_title(node: dict) -> str:
    """The title given to the node in the editor ('' when none)."""
    return (node.get("_meta") or {}).get("title") or ""


def title_of(node: dict) -> str:
    return own_title(node) or node["class_type"]


def describe(node_id: str, node: dict) -> str:
    """'node 3 (LoadImage)', with the node's title when it has its own."""
    title = title_of(node)
    return f"node {node_id} ({node['class_type']})" if title == node["class_type"] else f"node {node_id} '{title}' ({node['class_type']})"


def find_input_node(workflow: dict, node_id: str | None = None, have_inputs: bool = True) -> InputNode | None:
    """The node the batch's inputs are fed into; None for a workflow without one when no inputs are given (it
    runs once, as it is)."""
    kinds = ", ".join(INPUT_NODE_TYPES)
    if node_id is not None:
        if node_id not in workflow:
            raise RunnerError(f"--input-node {node_id}: the workflow has no node {node_id}")
        class_type = workflow[node_id]["class_type"]
        if class_type not in INPUT_NODE_TYPES:
            raise RunnerError(f"--input-node {node_id}: it is a {class_type}; the runner feeds inputs into {kinds}")
        candidates = [node_id]
    else:
        candidates = [key for key, node in workflow.items() if node["class_type"] in INPUT_NODE_TYPES]
    if not candidates:
        if not have_inputs:
            return None
        raise RunnerError(f"the workflow has no input node to feed the inputs into (one of {kinds}); to run a workflow "
                          "without inputs once, give no inputs")
    if len(candidates) > 1:
        listed = ", ".join(describe(key, workflow[key]) for key in candidates)
        raise RunnerError(f"the workflow has several input nodes: {listed}; pick one with --input-node ID")
    chosen = candidates[0]
    class_type = workflow[chosen]["class_type"]
    kind = INPUT_NODE_TYPES[class_type]
    return InputNode(chosen, class_type, kind.input_name, kind.takes)


def set_input(workflow: dict, input_node: InputNode, value: str) -> dict:
    """A copy of the workflow whose input node loads `value` (an uploaded file or folder)."""
    patched = copy.deepcopy(workflow)
    patched[input_node.node_id]["inputs"][input_node.input_name] = value
    return patched


def parse_override(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE is JSON when it parses (5, 2.5, true, "x", [..]), else the plain string."""
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key:
        raise RunnerError(f"--set {text!r}: expected KEY=VALUE (e.g. seed=5, 6.cfg=2.5)")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def linked_error(key: str, node_id: str, node: dict, input_name: str) -> RunnerError:
    source = node["inputs"][input_name][0]
    return RunnerError(f"--set {key}: input '{input_name}' of {describe(node_id, node)} is linked to node {source}, "
                       f"so setting it would cut that link; set node {source} instead")


def override_targets(workflow: dict, key: str) -> list[tuple[str, str]]:
    """The (node_id, input_name) pairs one --set KEY addresses: NODE_ID.INPUT; else the `value` input of the
    nodes titled KEY (case-insensitive: primitive nodes named seed, steps, size, ...); else input KEY of every
    node where it is a literal. Linked inputs are never targets: addressing one is an error."""
    node_id, dot, input_name = key.partition(".")
    if dot and node_id in workflow:
        node = workflow[node_id]
        if input_name not in node["inputs"]:
            raise RunnerError(f"--set {key}: {describe(node_id, node)} has no input '{input_name}' in the workflow "
                              f"(its inputs: {', '.join(node['inputs'])})")
        if is_link(node["inputs"][input_name]):
            raise linked_error(key, node_id, node, input_name)
        return [(node_id, input_name)]
    titled = [node_id for node_id, node in workflow.items() if own_title(node).lower() == key.lower() and "value" in node["inputs"]]
    if titled:
        for node_id in titled:
            if is_link(workflow[node_id]["inputs"]["value"]):
                raise linked_error(key, node_id, workflow[node_id], "value")
        return [(node_id, "value") for node_id in titled]
    if dot:  # input names have no dots: this was meant as NODE_ID.INPUT
        raise RunnerError(f"--set {key}: the workflow has no node {node_id} (its nodes: {', '.join(workflow)})")
    having = [node_id for node_id, node in workflow.items() if key in node["inputs"]]
    for node_id in having:
        if is_link(workflow[node_id]["inputs"][key]):
            raise linked_error(key, node_id, workflow[node_id], key)
    if having:
        return [(node_id, key) for node_id in having]
    titles = sorted({own_title(node) for node in workflow.values()
                     if own_title(node) and "value" in node["inputs"] and not is_link(node["inputs"]["value"])})
    names = sorted({name for node in workflow.values() for name, value in node["inputs"].items() if not is_link(value)})
    raise RunnerError(f"--set {key}: nothing in the workflow matches; titled value nodes: {', '.join(titles) or 'none'}; "
                      f"literal inputs: {', '.join(names[:40])}{' ...' if len(names) > 40 else ''}; or use NODE_ID.INPUT")


def apply_overrides(workflow: dict, overrides: dict) -> dict:
    patched = copy.deepcopy(workflow)
    for key, value in overrides.items():
        for node_id, input_name in override_targets(patched, key):
            patched[node_id]["inputs"][input_name] = value
    return patched


def combo_options(spec) -> list | None:
    """The allowed values of a COMBO input spec, in either /object_info format: [[options...], {...}] (classic
    nodes) or ["COMBO", {"options": [...]}] (V3 nodes). None for other inputs and for combos whose options the
    server fetches elsewhere (remote)."""
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and not spec[1].get("remote"):
        options = spec[1].get("options")
        return options if isinstance(options, list) else None
    return None


def model_folder(input_name: str, value, class_type: str) -> str | None:
    """Where a missing model file belongs, when the input names one; None for other combo inputs."""
    folder = MODEL_FOLDERS.get(re.sub(r"\d+$", "", input_name))
    if folder:
        return folder
    if isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES):
        return f"the model folder of {class_type}"
    return None


def listed(values: list) -> str:
    shown = ", ".join(repr(value) for value in values[:MAX_LISTED])
    return shown + (f" ... ({len(values)} in all)" if len(values) > MAX_LISTED else "") if values else "none"


def check_against_object_info(workflow: dict, object_info: dict, input_node: InputNode | None) -> list[str]:
    """What the server would refuse, as one line each: node types it does not have, and literal values of
    COMBO inputs (model files above all) that are not among its options. The input node's own input is left
    out: it names the file uploaded for each item."""
    missing: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        if node["class_type"] not in object_info:
            missing.setdefault(node["class_type"], []).append(node_id)
    if missing:
        found = ", ".join(f"{class_type} (node {', '.join(ids)})" for class_type, ids in sorted(missing.items()))
        return [f"the workflow uses node types this server does not have: {found}: install the custom node pack "
                "that provides them (and restart ComfyUI), or update ComfyUI"]
    problems = []
    for node_id, node in workflow.items():
        info = object_info[node["class_type"]].get("input") or {}
        specs = {**info.get("optional", {}), **info.get("required", {})}
        for input_name, value in node["inputs"].items():
            if is_link(value) or (input_node and (node_id, input_name) == (input_node.node_id, input_node.input_name)):
                continue
            options = combo_options(specs.get(input_name))
            if options is None:
                continue
            bad = [entry for entry in (value if isinstance(value, list) else [value]) if entry not in options]
            for entry in bad:
                folder = model_folder(input_name, entry, node["class_type"])
                where = f"{describe(node_id, node)} input '{input_name}'"
                if folder:
                    problems.append(f"{where}: model file {entry!r} not found in {folder}: put it there or pick another "
                                    f"(available: {listed(options)})")
                else:
                    problems.append(f"{where}: {entry!r} is not one of {listed(options)}")
    return problems


def format_prompt_errors(answer: dict, workflow: dict) -> list[str]:
    """POST /prompt's validation answer ({"error": ..., "node_errors": {node_id: {"errors": [...]}}}) as one
    line per problem: node, class type, input, message."""
    lines = []
    for node_id, entry in (answer.get("node_errors") or {}).items():
        node = workflow.get(node_id, {"class_type": entry.get("class_type", "?")})
        for error in entry.get("errors", []):
            input_name = (error.get("extra_info") or {}).get("input_name")
            where = describe(node_id, node) + (f" input '{input_name}'" if input_name else "")
            details = error.get("details")
            lines.append(f"{where}: {error.get('message', 'invalid')}" + (f" ({details})" if details else ""))
    if not lines:
        error = answer.get("error")
        if isinstance(error, dict):
            details = error.get("details")
            lines.append(f"{error.get('message', 'the server refused the workflow')}" + (f" ({details})" if details else ""))
        else:
            lines.append(str(error or answer))
    return lines
