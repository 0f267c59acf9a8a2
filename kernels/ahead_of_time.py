"""Ahead-of-time compiled programs of a module's forward: torch.export, then AOTInductor, kept on disk.

Why not torch.compile: its compiled code can be cached, but every new process redoes Dynamo's tracing and guard
building (about 35 s for the SVD + SV3D UNets at the Diffusion² paper setting, bench/RESULTS.md), which no cache of
PyTorch keeps. An AOTInductor package is a shared library plus kernels: a later process loads it in seconds and
runs it without Python tracing or guards.

A program is built for one exact input signature (static shapes). The module's weights are inputs of the program,
not part of it: one package serves every checkpoint of the same architecture, ComfyUI's weight patches (LoRA,
moving weights to and from the GPU) reach it, and inductor cannot fold a weight's trace-time value into the code
(it does for constants: a one-element tensor such as a video mixer's factor becomes a literal).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

PROGRAM_FORMAT = 1  # part of every key: bump when what is exported changes, so old packages are not loaded
# The C++ wrapper only launches kernels (the GPU work is in them), so compile it unoptimised and without debug line
# tables: for a whole UNet it is a very large file, and optimising it is most of a build's time.
WRAPPER_BUILD = {"aot_inductor.compile_wrapper_opt_level": "O0", "aot_inductor.enable_line_tables": False}
SIMPLE_ATTRIBUTES = (bool, int, float, str, type(None))


class NotExportable(RuntimeError):
    """The forward cannot become a program that is equal to it (e.g. it reads a tensor that is not an input)."""


def module_fingerprint(module: torch.nn.Module) -> str:
    """What the compiled code depends on besides the inputs: every submodule's class, its simple attributes (head
    counts, strides, flags) and its tensors' names, shapes, dtypes and strides. Not the weights' values."""
    digest = hashlib.sha256()
    for name, submodule in module.named_modules():
        kind = type(submodule)
        attributes = sorted((key, repr(value)) for key, value in vars(submodule).items()
                            if not key.startswith("_") and isinstance(value, SIMPLE_ATTRIBUTES))
        digest.update(repr((name, kind.__module__, kind.__qualname__, attributes)).encode())
    for name, tensor in named_tensors(module).items():
        digest.update(repr((name, tuple(tensor.shape), str(tensor.dtype), tensor.stride())).encode())
    return digest.hexdigest()


def named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers under every name they have (a tied weight appears under each of its names)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def tensor_signature(tensor: torch.Tensor) -> list:
    return [list(tensor.shape), str(tensor.dtype)]


def device_signature(device: torch.device) -> str:
    """The compiled code's target: the GPU model and its compute capability (kernels are built for them)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}:cuda{torch.version.cuda}"
    return device.type


@dataclass(frozen=True)
class ProgramKey:
    """Everything a program depends on, as JSON-able parts; its hash names the package on disk."""

    parts: dict

    @classmethod
    def of(cls, module: torch.nn.Module, inputs: Sequence[torch.Tensor], **extra) -> "ProgramKey":
        device = inputs[0].device
        return cls({"format": PROGRAM_FORMAT, "torch": torch.__version__, "device": device_signature(device),
                    "module": module_fingerprint(module), "inputs": [tensor_signature(t) for t in inputs], **extra})

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ModuleCall(torch.nn.Module):
    """`forward_of_module(*inputs)` (any function using `module`) as a module that has `module` as `root`."""

    def __init__(self, module: torch.nn.Module, forward_of_module: Callable[..., torch.Tensor]):
        super().__init__()
        self.root = module
        object.__setattr__(self, "forward_of_module", forward_of_module)  # a plain function, not a submodule

    def forward(self, *inputs):
        return self.forward_of_module(*inputs)


class WeightsAsInputs(torch.nn.Module):
    """What torch.export traces: `forward(weights, *inputs)` is the call with the module's tensors replaced by
    `weights` (in named_tensors order). The call is held outside this module's tree, so export lifts none of the
    module's tensors as constants."""

    def __init__(self, call: ModuleCall):
        super().__init__()
        object.__setattr__(self, "call", call)
        self.weight_names = [f"root.{name}" for name in named_tensors(call.root)]

    def forward(self, weights, *inputs):
        return torch.func.functional_call(self.call, dict(zip(self.weight_names, weights)), inputs)


@dataclass
class BuildTimes:
    export_seconds: float = 0.0
    compile_seconds: float = 0.0


def build_program(module: torch.nn.Module, forward_of_module: Callable[..., torch.Tensor],
                  inputs: Sequence[torch.Tensor], path: Path) -> BuildTimes:
    """Export `forward_of_module(*inputs)` (a function using `module`) with the module's tensors as inputs and compile it into an AOTInductor package at `path`.
    Written beside `path` and renamed into place, so a crash or a stop leaves no half-written package. Raises
    NotExportable when the trace would freeze a tensor that is neither an input nor one of the module's (a
    step-dependent value read from somewhere else would silently stop changing)."""
    times = BuildTimes()
    started = time.perf_counter()
    weights = list(named_tensors(module).values())
    with torch.no_grad():
        exported = torch.export.export(WeightsAsInputs(ModuleCall(module, forward_of_module)), (weights, *inputs),
                                       strict=False)
    frozen = sorted(exported.constants) + sorted(exported.state_dict)
    if frozen:
        raise NotExportable(f"the forward reads tensors that are neither inputs nor weights: {frozen[:3]}")
    times.export_seconds = time.perf_counter() - started
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs=known_configs(WRAPPER_BUILD))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    times.compile_seconds = time.perf_counter() - started
    return times


def known_configs(configs: dict) -> dict:
    """The inductor settings this PyTorch has (older versions lack some; an unknown one would be an error)."""
    known = torch._inductor.config.get_config_copy()
    return {key: value for key, value in configs.items() if key in known}


@dataclass
class Program:
    """A loaded package: call it with the module (its current tensors are passed as the weights) and the inputs."""

    runner: object

    @classmethod
    def load(cls, path: Path, device: torch.device) -> "Program":
        index = device.index if device.type == "cuda" and device.index is not None else -1
        return cls(torch._inductor.aoti_load_package(str(path), device_index=index))

    def __call__(self, module: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        weights = [tensor.detach() for tensor in named_tensors(module).values()]
        outputs = self.runner(weights, *(tensor.contiguous() for tensor in inputs))  # compiled for contiguous inputs
        return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


class ProgramStore:
    """The packages of one folder, named by their key's hash."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, key: ProgramKey) -> Path:
        return self.directory / f"{key.digest}.pt2"
