"""The pack as ComfyUI and pip see it: cheap, safe import; kernels independent of ComfyUI; honest dependencies."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "nodes", "server", "execution", "latent_preview"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_kernels_never_import_comfyui():
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        assert not imported_modules(path) & HOST_MODULES, path


def test_importing_the_pack_is_cheap_and_needs_no_comfyui():
    # As ComfyUI does: load the root __init__.py as a package, in a clean interpreter.
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("mv4d", {str(ROOT / "__init__.py")!r}, submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec); sys.modules["mv4d"] = module; spec.loader.exec_module(module)
heavy = [name for name in ("torch", "gsplat", "diffusers", "kornia", "comfy", "comfy_api") if name in sys.modules]
assert not heavy, heavy
assert callable(module.comfy_entrypoint)
assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # it would make ComfyUI ignore comfy_entrypoint
import mv4d.kernels.epipolar, mv4d.kernels.pose_files
heavy = [name for name in ("gsplat", "diffusers", "comfy", "comfy_api", "folder_paths") if name in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


def test_dependencies_are_declared_loosely_and_never_pin_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"]
    names = {requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower() for requirement in declared}
    assert {"einops", "safetensors", "kornia", "gsplat", "packaging"} <= names
    assert not names & {"torch", "torchvision", "torchaudio", "xformers"}
    assert all("==" not in requirement and "<" not in requirement for requirement in declared)
    # ComfyUI-Manager and comfy-cli install requirements.txt: it must say the same
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(line for line in lines if line and not line.startswith("#")) == sorted(declared)
    assert project["name"] == "mv4d" and "comfyui" not in project["name"].lower()


def test_integration_never_imports_the_node_api():
    # integration/ is imported by tests and benchmarks where comfy_api (and its own dependencies) may be missing
    for path in sorted((ROOT / "integration").rglob("*.py")):
        assert "comfy_api" not in imported_modules(path), path


def test_every_package_folder_is_packaged():
    packaged = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"mv4d." + ".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.rglob("__init__.py")
               if init.parent != ROOT and init.parent.relative_to(ROOT).parts[0] in ("kernels", "integration", "nodes", "runner")}
    assert folders | {"mv4d"} == packaged
