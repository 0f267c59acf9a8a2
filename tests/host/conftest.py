"""The host lane: tests against a real ComfyUI source tree, in process and through its HTTP server.

The host is found at $COMFYUI_DIR or ~/ComfyUI; its requirements must be installed in the Python that runs the
tests. Without a host every test here is skipped with the reason below.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mv4d_host_helpers import start_test_server

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


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A ComfyUI server on 127.0.0.1 that loads this checkout in place as custom node pack 'mv4d'."""
    if HOST is None:
        pytest.skip(NO_HOST)
    try:
        server = start_test_server(HOST, tmp_path_factory.mktemp("comfy_server"))
    except RuntimeError as error:
        pytest.fail(str(error))
    yield server
    server.stop()
