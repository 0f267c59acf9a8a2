"""Helpers for the host lane: run a node as ComfyUI does, and talk to a ComfyUI server over HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def run_node(node_class, **inputs):
    """Execute a V3 node the way ComfyUI's executor does: on a class clone of the node, under
    torch.inference_mode() (a node that needs gradients must turn them back on itself)."""
    import torch

    node_class.VALIDATE_CLASS()
    clone = node_class.PREPARE_CLASS_CLONE(None)
    with torch.inference_mode():
        return clone.execute(**inputs)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def post_prompt(server_url: str, prompt: dict) -> tuple[int, dict]:
    """POST /prompt; returns the HTTP status and the JSON answer (a prompt id, or validation errors)."""
    request = urllib.request.Request(
        server_url + "/prompt", data=json.dumps({"prompt": prompt}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_for_history(server_url: str, prompt_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = get_json(f"{server_url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def run_prompt(server_url: str, prompt: dict, timeout: float = 300) -> dict:
    status, answer = post_prompt(server_url, prompt)
    assert status == 200, answer
    return wait_for_history(server_url, answer["prompt_id"], timeout)


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data
    return None


def view(server_url: str, item: dict) -> bytes:
    query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item["subfolder"], "type": item["type"]})
    with urllib.request.urlopen(f"{server_url}/view?{query}", timeout=30) as response:
        return response.read()


def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / name).read_text())
