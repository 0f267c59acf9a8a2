"""The first compile of a UNet call shape in a process of its own, for MV4D Compile and Keep's "beside the run".

Why a process: a compile is minutes of Python (Dynamo's tracing, inductor's lowering and code generation) that, on a
thread of the sampling process, starved the sampling steps (bench/RESULTS.md); in a process of its own it takes
other cores, the calls of that shape run uncompiled meanwhile, and two models' compiles run side by side.

What the process gets (`write_job`): the module on the meta device (every class and attribute, no weights: they are
inputs of the compiled code, not part of it), the call's arguments likewise, ComfyUI's settings and attention
function, and the Python path and package name of the sampling process, so that the compiled code it saves refers
to the same modules. It checks that the module it rebuilt has the fingerprint of the one that was sent, compiles
it with uninitialised weights of the same layout on the same device, and saves the file where the sampling process
looks for it (kernels/precompile.py writes it whole or not at all).

Run by `start_worker` as `python -P compile_worker.py JOB_FOLDER`; it imports nothing of ComfyUI or of this package
before the job's settings are in place.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER, COMFY_ARGS, SKELETON, LOG = "job.json", "comfy_args.pickle", "skeleton.pt", "log.txt"


def write_job(module, arguments: tuple, function, path: Path, attention: dict[str, str]) -> Path:
    """A job folder (in the temp folder) for one compile of `function(module, *arguments)` saved at `path`."""
    import comfy.cli_args
    import torch

    from ..kernels.precompile import autograd_state, module_fingerprint, on_meta, tensors_in

    package = function.__module__.split(".")[0]
    job = Path(tempfile.mkdtemp(prefix="mv4d-compile-"))
    header = {
        "sys_path": [entry for entry in sys.path if entry], "package": package,
        "package_folder": str(Path(sys.modules[package].__file__).parent),
        "function": [function.__module__, function.__qualname__], "path": str(path),
        "device": str(tensors_in(arguments)[0].device),
        "autograd": autograd_state(), "fingerprint": module_fingerprint(module), "attention": attention,
        # global state the saved guards check (Dynamo's GLOBAL_STATE): compiled under other values, the sampling
        # process would refuse every call
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
    }
    try:
        (job / HEADER).write_text(json.dumps(header))
        (job / COMFY_ARGS).write_bytes(pickle.dumps(dict(vars(comfy.cli_args.args))))
        torch.save({"module": on_meta(module), "arguments": on_meta(arguments),
                    "inference": [tensor.is_inference() for tensor in tensors_in(arguments)]}, job / SKELETON)
    except BaseException:
        shutil.rmtree(job, ignore_errors=True)
        raise
    return job


def start_worker(job: Path, compile_threads: int) -> subprocess.Popen:
    """The worker process, at a lower CPU priority than sampling, its output in the job folder. compile_threads:
    inductor's processes for compiling kernels, unless the user set TORCHINDUCTOR_COMPILE_THREADS (kept as set)."""
    environment = {"TORCHINDUCTOR_COMPILE_THREADS": str(compile_threads), **os.environ}
    if os.name == "posix":
        priority = {"preexec_fn": lambda: os.nice(5)}
    else:  # Windows has no preexec_fn; its priority class says the same
        priority = {"creationflags": getattr(subprocess, "BELOW_NORMAL_PRIORITY_CLASS", 0)}
    with open(job / LOG, "wb") as log:
        return subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), str(job)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment, **priority)


def log_tail(job: Path, lines: int = 12) -> str:
    try:
        return "\n".join((job / LOG).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_job(job: Path) -> None:
    """The worker's side (after `main` has set up the imports)."""
    import torch

    from ..kernels.precompile import build, module_fingerprint, on_device

    header = json.loads((job / HEADER).read_text())
    skeleton = torch.load(job / SKELETON, weights_only=False)
    device = torch.device(header["device"])
    module = on_device(skeleton["module"], device)
    if module_fingerprint(module) != header["fingerprint"]:
        raise RuntimeError("the module rebuilt from the job differs from the one sent (a class or attribute that does "
                           "not survive pickling); compile in the sampling process instead")
    arguments = on_device(skeleton["arguments"], device, skeleton["inference"])
    function = getattr(importlib.import_module(header["function"][0]), header["function"][1])
    torch.set_default_dtype(getattr(torch, header["default_dtype"]))
    torch.set_num_threads(header["torch_threads"])
    mode = {"inference": torch.inference_mode(), "no_grad": torch.no_grad(), "grad": torch.enable_grad()}[header["autograd"]]
    with mode:
        built = build(function, module, arguments, Path(header["path"]))
    print(json.dumps({"compiled_seconds": round(built.seconds, 1), "bytes": built.bytes_written}), flush=True)
    # the file is what the sampling process needs; the job goes now, also if that process has ended meanwhile
    # (a failed job stays for the sampling process to read its log, and goes when it has)
    shutil.rmtree(job, ignore_errors=True)


def main(job: Path) -> None:
    header = json.loads((job / HEADER).read_text())
    sys.path[:0] = [entry for entry in header["sys_path"] if entry not in sys.path]
    import comfy.cli_args  # ComfyUI's settings as the sampling process has them, before ComfyUI reads them

    vars(comfy.cli_args.args).update(pickle.loads((job / COMFY_ARGS).read_bytes()))
    # The package under the sampling process's name (ComfyUI names a custom node pack after its folder), without
    # running its __init__ (the node registry is not needed here), so saved code and pickled classes resolve.
    name, folder = header["package"], Path(header["package_folder"])
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    sys.modules[name] = importlib.util.module_from_spec(spec)
    import comfy.ldm.modules.attention as comfy_attention

    for attribute, function_name in header["attention"].items():
        setattr(comfy_attention, attribute, getattr(comfy_attention, function_name))
    importlib.import_module(f"{name}.integration.compile_worker").run_job(job)


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except Exception as error:  # the trace for the log, then one line saying what failed (the parent's warning)
        import traceback

        traceback.print_exc()
        print(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}", flush=True)
        sys.exit(1)
