"""Helpers for the host lane: run a node as ComfyUI does, and talk to a ComfyUI server over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"


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
TINY_AWARE = {"steps": "1, 2", "fit_iterations": 20, "initial_gaussians": 500, "fit_resolution": 32}  # of 3 steps
TINY_NODE_SETTINGS = {  # per node type, what a CPU test machine runs instead
    "MV4D_Fit4DGaussians": TINY_FIT,
    "MV4D_MakeDemoTrainingSet": {"clips": 2},
    "MV4D_3DAwareDenoising": TINY_AWARE,
    "MV4D_TrainAlignmentAdapters": {"steps": 2, "checkpoint_every": 1},
    "MV4D_Refine4DWithSDS": {"iterations": 3, "window_frames": 2},
}


TINY_LOADERS = {"ImageOnlyCheckpointLoader", "MV4D_LoadMultiviewModel", "CheckpointLoaderSimple", "MV4D_LoadMotionModule",
                "MV4D_LoadCameraCtrl", "MV4D_LoadCVDModule", "MV4D_Load4DM"}


def tiny_multiview_kind(ckpt_name: str) -> str:
    name = ckpt_name.lower()
    return "imagedream" if "ipmv" in name else "mvdream-sd15" if "v1.5" in name or "sd15" in name else "mvdream-sd21"


def on_tiny_models(prompt: dict) -> dict:
    """A shipped prompt made runnable on a test machine: real checkpoint loaders (no weights can be downloaded
    here) swapped for the test-only tiny SVD / SV3D / MVDream / ImageDream models, and views, frames, size, steps and
    the 4D fits (and 3D-aware steps) shrunk for a CPU. Prompts without checkpoint loaders come back unchanged."""
    import copy

    if not any(node["class_type"] in TINY_LOADERS for node in prompt.values()):
        return prompt
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        title = node.get("_meta", {}).get("title", "")
        if kind == "ImageOnlyCheckpointLoader":
            name = inputs["ckpt_name"].lower()
            node["class_type"] = "MV4DTest_TinyCheckpoint"
            node["inputs"] = {"kind": "sv3d_p" if "sv3d_p" in name else "sv3d_u" if "sv3d" in name else "svd"}
        elif kind == "MV4D_LoadMultiviewModel":
            node["class_type"] = "MV4DTest_TinyMultiviewModel"
            node["inputs"] = {"kind": tiny_multiview_kind(inputs["ckpt_name"])}
        elif kind == "CheckpointLoaderSimple":  # the workflows' SD1.5 checkpoints
            node["class_type"], node["inputs"] = "MV4DTest_TinySD15Checkpoint", {}
        elif kind == "MV4D_LoadMotionModule":
            name = inputs["motion_module"].lower()
            node["class_type"] = "MV4DTest_TinyMotionModule"
            node["inputs"] = {"version": "v2" if "v2" in name else "v1" if name.startswith("mm_sd_v15.") else "v3"}
        elif kind == "MV4D_LoadCameraCtrl":
            node["class_type"], node["inputs"] = "MV4DTest_TinyCameraCtrl", {}
        elif kind == "MV4D_LoadCVDModule":
            node["class_type"], node["inputs"] = "MV4DTest_TinyCVDModule", {}
        elif kind == "MV4D_Load4DM":
            node["class_type"], node["inputs"] = "MV4DTest_Tiny4DM", {}
        elif kind == "PrimitiveInt" and title in TINY_SETTING:
            inputs["value"] = TINY_SETTING[title]
        elif kind in TINY_NODE_SETTINGS:
            inputs.update(TINY_NODE_SETTINGS[kind])
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


# A test server: ComfyUI on 127.0.0.1 loading this checkout in place, with the inputs our workflows name.

@dataclass
class Server:
    url: str
    base: Path
    log: Path
    process: subprocess.Popen

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def test_picture(shift: int = 0):
    """A 64 x 64 RGB test card (uint8); `shift` moves its checkerboard, so frames and views differ."""
    import numpy as np

    y, x = np.mgrid[0:64, 0:64]
    return np.stack([x * 4, y * 4, (((x + shift) // 8 + y // 8) % 2) * 255], axis=-1).astype(np.uint8)


def write_input_image(path: Path) -> None:
    from PIL import Image  # a ComfyUI requirement

    Image.fromarray(test_picture()).save(path)


def write_input_views(folder: Path, views: int = 4) -> None:
    """A multi-view set as our multi-view workflow loads it: one image per view in a folder of input/."""
    from PIL import Image

    folder.mkdir(parents=True)
    for view in range(views):
        Image.fromarray(test_picture(shift=3 * view)).save(folder / f"view_{view:02d}.png")


def write_input_video(path: Path, frames: int = 6) -> None:
    """A short H.264 clip for the video workflow's LoadVideo (PyAV is a ComfyUI requirement)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for frame in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(test_picture(shift=2 * frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def start_test_server(host: Path, base: Path, start_timeout: float = 180) -> Server:
    """ComfyUI from `host` on a free port of 127.0.0.1, with its folders under `base`, loading this checkout as pack
    'mv4d' and the test-only tiny-model pack beside it. Raises RuntimeError (with the log tail) if it does not start."""
    from mv4d.runner.local_server import free_port

    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "mv4d").symlink_to(ROOT, target_is_directory=True)
    # test-only: tiny models in place of real ones (see tiny_model_nodes/__init__.py)
    (base / "custom_nodes" / "mv4d_test_models").symlink_to(Path(__file__).parent / "tiny_model_nodes", target_is_directory=True)
    for name in ("input", "output", "temp", "user"):
        (base / name).mkdir()
    write_input_image(base / "input" / "mv4d_input.png")
    write_input_video(base / "input" / "mv4d_input.mp4")
    write_input_views(base / "input" / "mv4d_views")
    paths = base / "extra_model_paths.yaml"
    # the folders our loaders and trainer use, inside the test's own tree (never the host's models/)
    paths.write_text(f"mv4d_tests:\n  base_path: {base}\n  custom_nodes: custom_nodes\n  mv4d_adapters: models/mv4d_adapters\n"
                     "  animatediff_models: models/animatediff_models\n")
    (base / "models" / "mv4d_adapters").mkdir(parents=True)
    (base / "models" / "animatediff_models").mkdir()
    port = free_port()
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--extra-model-paths-config", str(paths), "--input-directory", str(base / "input"),
        "--output-directory", str(base / "output"), "--temp-directory", str(base / "temp"),
        "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
        "--disable-all-custom-nodes", "--whitelist-custom-nodes", "mv4d", "mv4d_test_models", "--disable-auto-launch",
    ]
    log = base / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=host, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", base, log, process)
    deadline = time.monotonic() + start_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode} while starting:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/system_stats", timeout=2):
                return server
        except OSError:
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                raise RuntimeError(f"ComfyUI did not answer within {start_timeout:.0f} s:\n{server.log_tail()}") from None
            time.sleep(0.5)
