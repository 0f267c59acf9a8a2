"""Helpers for the host lane: run a node as ComfyUI does, and talk to a ComfyUI server over HTTP."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def pack_import_failures(log: str, packs: tuple[str, ...] = ("mv4d", "mv4d_test_models")) -> list[str]:
    """The lines of a ComfyUI log saying one of our packs failed to import. ComfyUI's own optional nodes may fail
    to import on a host (its audio nodes without torchaudio): not ours to check."""
    ours = re.compile(r"[/\\]custom_nodes[/\\](" + "|".join(map(re.escape, packs)) + r")(?=[\s/\\]|$)")
    return [line for line in log.splitlines() if ("Cannot import" in line or "IMPORT FAILED" in line) and ours.search(line)]


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


def post_prompt(server_url: str, prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
    """POST /prompt; returns the HTTP status and the JSON answer (a prompt id, or validation errors)."""
    body = {"prompt": prompt, **({"client_id": client_id} if client_id else {})}
    request = urllib.request.Request(
        server_url + "/prompt", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
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


# What a CPU test machine runs instead of the paper setting, by the titles of the workflows' PrimitiveInt boxes.
TINY_SETTING = {"views": 4, "frames": 3, "size": 64, "steps": 3}
TINY_FIT = {"iterations": 20, "initial_gaussians": 500, "max_gaussians": 4000}


def on_tiny_models(prompt: dict) -> dict:
    """A shipped prompt made runnable on a test machine: real checkpoint loaders (no weights can be downloaded
    here) swapped for the test-only tiny SVD / SV3D models, and views, frames, size, steps and the 4D fit shrunk
    for a CPU. Prompts without checkpoint loaders come back unchanged."""
    import copy

    if not any(node["class_type"] == "ImageOnlyCheckpointLoader" for node in prompt.values()):
        return prompt
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        title = node.get("_meta", {}).get("title", "")
        if kind == "ImageOnlyCheckpointLoader":
            name = inputs["ckpt_name"].lower()
            node["class_type"] = "MV4DTest_TinyCheckpoint"
            node["inputs"] = {"kind": "sv3d_p" if "sv3d_p" in name else "sv3d_u" if "sv3d" in name else "svd"}
        elif kind == "PrimitiveInt" and title in TINY_SETTING:
            inputs["value"] = TINY_SETTING[title]
        elif kind == "MV4D_Fit4DGaussians":
            inputs.update(TINY_FIT)
    return prompt


def wait_until_node_progresses(server_url: str, client_id: str, node_id: str, timeout: float = 120) -> None:
    """Block until the server reports progress of node_id for this client's prompt (its websocket)."""
    import asyncio

    import aiohttp  # a ComfyUI requirement

    async def listen():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server_url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as socket:
                async for message in socket:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(message.data)
                        if event.get("type") == "progress" and event["data"].get("node") == node_id and event["data"]["value"] >= 2:
                            return

    asyncio.run(asyncio.wait_for(listen(), timeout))
