"""The host lane: tests against a real ComfyUI source tree, in process and through its HTTP server.

The host is found at $COMFYUI_DIR or ~/ComfyUI; its requirements must be installed in the Python that runs the
tests. Without a host every test here is skipped with the reason below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from mv4d.runner.local_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def find_host() -> Path | None:
    for candidate in (os.environ.get("COMFYUI_DIR"), Path.home() / "ComfyUI"):
        if candidate and (Path(candidate) / "main.py").is_file() and (Path(candidate) / "comfy").is_dir():
            return Path(candidate).resolve()
    return None


HOST = find_host()
NO_HOST = (
    "no ComfyUI host found (looked at $COMFYUI_DIR and ~/ComfyUI): put a ComfyUI source tree there with its "
    "requirements installed in this Python, as README.md 'Running the tests' explains"
)


def pytest_collection_modifyitems(config, items):
    if HOST is None:
        for item in items:
            if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
                item.add_marker(pytest.mark.skip(reason=NO_HOST))


def pytest_report_header(config):
    return f"ComfyUI host: {HOST or 'none'}"


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported as a library in this process (CPU), with input/output/temp folders of its own."""
    if str(HOST) not in sys.path:
        sys.path.insert(0, str(HOST))  # first: ComfyUI's top-level `nodes` must win over any other
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
        import folder_paths
        from comfy_api.latest import io  # noqa: F401
    except ImportError as error:
        pytest.fail(f"ComfyUI at {HOST} cannot be imported here ({error}); install its requirements.txt into {sys.executable}")
    base = tmp_path_factory.mktemp("comfy_in_process")
    for name, setter in (("input", folder_paths.set_input_directory), ("output", folder_paths.set_output_directory),
                         ("temp", folder_paths.set_temp_directory)):
        (base / name).mkdir()
        setter(str(base / name))
    return folder_paths


@pytest.fixture(scope="session")
def mv4d_nodes(comfy):
    import mv4d.nodes

    return mv4d.nodes


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


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A ComfyUI server on 127.0.0.1 that loads this checkout in place as custom node pack 'mv4d'."""
    if HOST is None:
        pytest.skip(NO_HOST)
    base = tmp_path_factory.mktemp("comfy_server")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "mv4d").symlink_to(ROOT, target_is_directory=True)
    # test-only: tiny SVD / SV3D checkpoints in place of real ones (see tiny_model_nodes/__init__.py)
    (base / "custom_nodes" / "mv4d_test_models").symlink_to(Path(__file__).parent / "tiny_model_nodes", target_is_directory=True)
    for name in ("input", "output", "temp", "user"):
        (base / name).mkdir()
    # the inputs our workflows name
    write_input_image(base / "input" / "mv4d_input.png")
    write_input_video(base / "input" / "mv4d_input.mp4")
    write_input_views(base / "input" / "mv4d_views")
    paths = base / "extra_model_paths.yaml"
    paths.write_text(f"mv4d_tests:\n  base_path: {base}\n  custom_nodes: custom_nodes\n")
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
        process = subprocess.Popen(command, cwd=HOST, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", base, log, process)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"ComfyUI exited with {process.returncode} while starting:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/system_stats", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"ComfyUI did not answer within 180 s:\n{server.log_tail()}")
            time.sleep(0.5)
    yield server
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
