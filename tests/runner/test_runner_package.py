"""The runner as a package: light (no torch, numpy, PIL or the rest of mv4d), relative imports only, and the
three ways it is invoked."""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "runner"
ALLOWED = {"aiohttp", "__future__", *sys.stdlib_module_names}


def test_runner_imports_only_the_standard_library_aiohttp_and_itself():
    for path in sorted(RUNNER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                assert {alias.name.split(".")[0] for alias in node.names} <= ALLOWED, (path.name, ast.unparse(node))
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 or (node.level == 0 and node.module.split(".")[0] in ALLOWED), (path.name, ast.unparse(node))


@pytest.fixture
def custom_nodes(tmp_path) -> Path:
    """A folder holding the pack as `mv4d`, as ComfyUI's custom_nodes does."""
    folder = tmp_path / "custom_nodes"
    folder.mkdir()
    (folder / "mv4d").symlink_to(ROOT, target_is_directory=True)
    return folder


def test_python_dash_m_from_a_custom_nodes_folder_loads_nothing_heavy(custom_nodes):
    script = ("import sys, runpy; sys.argv = ['mv4d-batch', '--help']\n"
              "try:\n    runpy.run_module('mv4d.runner', run_name='__main__')\nexcept SystemExit as exit_:\n    code = exit_.code\n"
              "heavy = [name for name in ('torch', 'numpy', 'PIL', 'mv4d.kernels', 'mv4d.nodes') if name in sys.modules]\n"
              "print('HEAVY', heavy, 'CODE', code)")
    result = subprocess.run([sys.executable, "-c", script], cwd=custom_nodes, capture_output=True, text=True, timeout=60)
    assert "usage: mv4d-batch" in result.stdout and "HEAVY [] CODE 0" in result.stdout, result.stderr


def test_console_script_and_extras_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["mv4d-batch"] == "mv4d.runner.cli:main"
    assert any(requirement.startswith("aiohttp") for requirement in project["project"]["optional-dependencies"]["runner"])
    assert any(requirement.startswith("aiohttp") for requirement in project["project"]["optional-dependencies"]["test"])
    assert "mv4d.runner" in project["tool"]["setuptools"]["packages"]


def test_bad_usage_exits_2_with_one_line(custom_nodes, tmp_path):
    workflow = tmp_path / "missing.json"
    result = subprocess.run([sys.executable, "-m", "mv4d.runner", str(workflow), "x.png", "--output", str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(custom_nodes)))
    assert result.returncode == 2
    assert result.stderr == f"mv4d-batch: cannot read the workflow {workflow} (No such file or directory)\n"
    result = subprocess.run([sys.executable, "-m", "mv4d.runner", str(workflow)], cwd=custom_nodes, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "the following arguments are required: --output" in result.stderr
