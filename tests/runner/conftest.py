"""The runner lane: mv4d-batch against recorded /object_info data and a fake ComfyUI server (no ComfyUI, no
torch needed by these tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runner_fake_comfyui import FakeComfyUI, image_workflow

from mv4d.runner.cli import main


@pytest.fixture
def fake():
    with FakeComfyUI() as server:
        yield server


@pytest.fixture
def workflow_file(tmp_path):
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(image_workflow()))
    return path


@pytest.fixture
def run_cli(capsys):
    """main(argv) in this process; returns (exit code, stderr, manifest or None)."""

    def run(*argv) -> tuple[int, str, dict | None]:
        argv = [str(arg) for arg in argv]
        code = main(argv)
        stderr = capsys.readouterr().err
        output = Path(argv[argv.index("--output") + 1]) / "manifest.json"
        return code, stderr, json.loads(output.read_text()) if output.exists() else None

    return run
