"""A module call compiled once by torch.compile (Dynamo + inductor) and kept on disk whole, for later processes.

Why: PyTorch's own caches keep inductor's code, but every new process still redoes Dynamo's tracing and guard
building (about 35 s of the 53 s warm start of the two UNets at the Diffusion² paper setting, bench/RESULTS.md).
PyTorch's precompile (`torch.compile(...).aot_compile`, `torch.compiler.load_compiled_function`) saves the traced
bytecode, the guards and inductor's compiled graph with its kernels in one file: loading it traces nothing.

What the saved function checks by itself is kept small on purpose: only the call's tensors (shape, dtype, device,
strides) and global state such as grad mode. Guards on the module (its classes, attributes, tensor metadata) are
left out: ComfyUI's operation classes cannot be saved in a guard, and thousands of them take seconds to rebuild.
The module is covered instead by `module_fingerprint`, part of the key that names the file, so a file is only ever
loaded for a module of the same structure. The module's weights are read from the module at each call (they are
inputs of the compiled graph), so one file serves every checkpoint of the architecture and weight patches reach it.
Inductor compiles with the graph passes of `compile_passes.py` (exact layout choices it does not make by itself).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import compile_passes

FORMAT = 4  # part of every key: bump when what is compiled changes, so old files are not loaded (2: compile_passes;
# 3: the short-attention kernel's scale a constant, so compiled code runs it in fp32 as eager does)
SIMPLE_ATTRIBUTES = (bool, int, float, str, type(None))
MODULE_ARGUMENT = "module"  # the compiled function's first parameter: guards rooted there are left out


def module_fingerprint(module: torch.nn.Module) -> str:
    """What the compiled code depends on besides the inputs: every submodule's class, its simple attributes (head
    counts, strides, flags) and its tensors' names, shapes, dtypes and strides. Not the weights' values."""
    digest = hashlib.sha256()
    for name, submodule in module.named_modules():
        kind = type(submodule)
        attributes = sorted((key, repr(value)) for key, value in vars(submodule).items()
                            if not key.startswith("_") and isinstance(value, SIMPLE_ATTRIBUTES))
        digest.update(repr((name, kind.__module__, kind.__qualname__, attributes)).encode())
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for name, tensor in tensors.items():
        digest.update(repr((name, tuple(tensor.shape), str(tensor.dtype), tensor.stride())).encode())
    return digest.hexdigest()


def tensor_signature(tensor: torch.Tensor) -> list:
    return [list(tensor.shape), str(tensor.dtype), list(tensor.stride())]


def device_signature(device: torch.device) -> str:
    """The compiled code's target: the GPU model and its compute capability (kernels are built for them)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}:cuda{torch.version.cuda}"
    return device.type


def autograd_state() -> str:
    """Compiled code is specialised to it (an inference-mode graph cannot run under no_grad and back)."""
    return "inference" if torch.is_inference_mode_enabled() else ("grad" if torch.is_grad_enabled() else "no_grad")


@dataclass(frozen=True)
class CompileKey:
    """Everything a compiled call depends on, as JSON-able parts; its hash names the file on disk."""

    parts: dict

    @classmethod
    def of(cls, module: torch.nn.Module, tensors: dict[str, torch.Tensor], **extra) -> "CompileKey":
        device = next(iter(tensors.values())).device
        return cls({"format": FORMAT, "torch": torch.__version__, "device": device_signature(device),
                    "autograd": autograd_state(), "module": module_fingerprint(module),
                    "tensors": {name: tensor_signature(tensor) for name, tensor in tensors.items()}, **extra})

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def call_guards_only(guard_entries) -> list[bool]:
    """Guard filter: keep the guards PyTorch calls portable (tensor metadata, global state, shapes) that are not
    rooted at the module. Keeping only portable guards also lets PyTorch leave the module out of the saved guard
    state (which it otherwise pickles, and ComfyUI's modules do not pickle)."""
    portable = torch.compiler.keep_portable_guards_unsafe(guard_entries)
    return [keep and not entry.name.startswith(MODULE_ARGUMENT) for entry, keep in zip(guard_entries, portable)]


@dataclass
class Built:
    seconds: float
    bytes_written: int


def build(function: Callable, module: torch.nn.Module, arguments: Sequence, path: Path) -> Built:
    """Compile `function(module, *arguments)` (a module-level function: its code is saved by reference to its
    module's globals) and save it at `path`. Written beside `path` and renamed into place, so a crash or a stop
    leaves no half-written file. Raises what torch.compile raises (a graph break, an unsavable value)."""
    started = time.perf_counter()
    # PyTorch 2.10 / 2.11 attach aot_compile only under this flag; later versions always do and dropped it
    flag = {"enable_aot_compile": True} if hasattr(torch._dynamo.config, "enable_aot_compile") else {}
    with torch._dynamo.config.patch(**flag):
        # dynamic=False: one function is compiled for every model and shape, and Dynamo would otherwise take the
        # second shape it sees as a sign to compile for symbolic shapes (slower code, and minutes more to compile)
        compiler = torch.compile(function, fullgraph=True, dynamic=False,
                                 options={"guard_filter_fn": call_guards_only, **compile_passes.inductor_options()})
    compiled = compiler.aot_compile(((module, *arguments), {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        compiled.save_compiled_function(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return Built(time.perf_counter() - started, path.stat().st_size)


@dataclass
class CompiledCall:
    """A loaded file: `compiled_call(module, *arguments)` runs the compiled code when its guards pass."""

    compiled: Callable

    @classmethod
    def load(cls, path: Path) -> "CompiledCall":
        with open(path, "rb") as file:
            return cls(torch.compiler.load_compiled_function(file))

    def accepts(self, module: torch.nn.Module, *arguments) -> bool:
        return bool(self.compiled.guard_check(module, *arguments))

    def refusal(self, module: torch.nn.Module, *arguments) -> str:
        """Which of the saved guards a call fails, in PyTorch's words (for the log; PyTorch's private API, so any
        failure to say gives "not known")."""
        try:
            f_locals = self.compiled.prepare_f_locals(module, *arguments)
            failed = self.compiled._artifacts.guard_manager.check_verbose(f_locals)
            return "; ".join(str(part) for part in failed.verbose_code_parts) or "not known"
        except Exception:
            return "not known"

    def __call__(self, module: torch.nn.Module, *arguments):
        return self.compiled(module, *arguments)


class CompiledStore:
    """The files of one folder, named by their key's hash."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, key: CompileKey) -> Path:
        return self.directory / f"{key.digest}.compiled"

    def remove_stale_partials(self) -> list[Path]:
        """Delete what a process killed while saving left behind (`<name>.partial-<pid>` of a process that is gone);
        a partial file of a running process is its save in progress and stays."""
        removed = []
        for partial in self.directory.glob("*.partial-*"):
            pid = partial.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not process_alive(int(pid)):
                partial.unlink(missing_ok=True)
                removed.append(partial)
        return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def on_meta(value):
    """A copy of `value` (a module, or arguments: tensors in lists, tuples and dicts) whose tensors are on the meta
    device: shapes, dtypes and strides without the data, so a module of gigabytes pickles in kilobytes. Made by
    deepcopy with every tensor mapped ahead, so no weight is ever copied."""
    module = isinstance(value, torch.nn.Module)
    memo = {}
    for tensor in [*value.parameters(), *value.buffers()] if module else tensors_in(value):
        meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta
    return copy.deepcopy(value, memo)


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in tensors_in(item)]
    return []


def on_device(value, device: torch.device, inference: list[bool] | None = None):
    """`on_meta`'s copy made real on `device`: uninitialised tensors of the same shapes, dtypes and strides (what a
    compile needs: its trace and kernels depend on those, not on the values). `inference`: for each tensor (in
    `tensors_in` order) whether the original was an inference tensor, which the saved guards check (sampling makes
    its tensors under inference mode)."""
    flags = iter(inference or [])
    return _on_device(value, device, flags)


def _on_device(value, device, flags):
    if isinstance(value, torch.nn.Module):
        return value.to_empty(device=device)
    if isinstance(value, torch.Tensor):
        with torch.inference_mode(next(flags, False)):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(item, device, flags) for item in value)
    if isinstance(value, dict):
        return {name: _on_device(item, device, flags) for name, item in value.items()}
    return value


def keep_compile_caches_in(directory: Path) -> None:
    """Point PyTorch's compile caches (inductor's kernels and, beside them, the autotuning results that pick each
    kernel's launch configuration) at `directory`, unless the user chose a folder (TORCHINDUCTOR_CACHE_DIR). The
    default folder is the temp folder, which a restart empties: the kept files would then load, but every kernel
    would be autotuned again (about 25 s for the two UNets at the paper setting, bench/RESULTS.md)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):  # inductor writes its default there
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)


def precompile_missing_reason() -> str | None:
    """Why this PyTorch cannot save compiled functions, or None (the API came with PyTorch 2.10)."""
    if not (hasattr(torch.compiler, "load_compiled_function") and hasattr(torch.compiler, "keep_portable_guards_unsafe")):
        return f"PyTorch {torch.__version__} cannot save compiled functions (torch.compiler.load_compiled_function)"
    return None
