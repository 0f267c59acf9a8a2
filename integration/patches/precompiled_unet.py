"""The patch behind MV4D Compile and Keep: a DIFFUSION_MODEL wrapper that runs each UNet call shape as a few compiled
functions (kernels/precompile.py), one per piece of the UNet (unet_pieces.py: the pieces compile side by side),
compiled the first time the shape is met and kept under ComfyUI's user folder, so later processes, also after a
restart, load them in seconds instead of compiling or tracing again.

What the trace sees is frozen into the compiled code: ComfyUI's Python around the UNet (attention patches, other
wrappers, ControlNet, weights cast or patched at call time) would stop reacting to the step. So each call first goes
through rules (policy objects, one question each); a call any rule refuses runs the UNet as before, and the refusal
is logged once. Object patches that swap modules (our single-token shortcut, MV4D Fuse Elementwise) are part of the
module tree, so they are in the compiled code and in its key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import folder_paths
import torch

from ...kernels.precompile import SIMPLE_ATTRIBUTES, Built, CompiledCall, CompiledStore, CompileKey, build, tensors_in
from ..compile_worker import log_tail, start_worker, write_job
from ..multi_gpu import keep_clones_matched
from ..peak_memory import PeakMemory
from .unet_pieces import PieceRun, cut_unet, piece_forward

WRAPPER_KEY = "mv4d.compile_and_keep"
NODE = "MV4D Compile and Keep"
UNET_TENSORS = ("x", "timesteps", "context", "y")
# One compile at a time in the process: Dynamo and inductor keep process-wide state and are not made for two
# compiles at once (multi-GPU runs call the models' wrappers from one thread per device).
COMPILE_LOCK = threading.Lock()
# What a compile process holds on the GPU besides its copy of the weights and its example inputs: CUDA context and
# compile buffers (SVD-XT's whole-UNet process used 1.1-1.3 GiB beyond its weights on an H200), with some margin.
WORKER_OVERHEAD_BYTES = 3 * 2**29
# Pieces a UNet is compiled in (integration/patches/unet_pieces.py): each compiles in a process of its own beside
# the run, so a first compile takes about a quarter as long where the machine has cores for them.
DEFAULT_PIECES = 4


def unet_forward(module, x, timesteps, context, y, tensor_kwargs, static_kwargs):
    """What is compiled: the UNet's own forward, below ComfyUI's wrapper machinery, with fresh transformer_options
    (the rules have made sure nothing in them matters) and no ControlNet. Module level, so the saved code can
    refer to it; its first parameter is the module (kernels/precompile.py leaves guards rooted there out)."""
    forward = getattr(module, "_forward", module.forward)  # _forward: the UNet without the DIFFUSION_MODEL wrappers
    return forward(x, timesteps, context, y, None, {}, **static_kwargs, **tensor_kwargs)


def is_static(value) -> bool:
    """Whether a keyword argument is plain data the compiled code may freeze (it is part of the key): numbers,
    strings, and lists, dicts and dataclasses of them."""
    if isinstance(value, SIMPLE_ATTRIBUTES):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_static(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_static(item) for key, item in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return is_static(dataclasses.asdict(value))
    return False


def compiled_folder() -> Path:
    """Where compiled calls live: ComfyUI's user folder, which survives restarts and updates (not the temp folder,
    which ComfyUI empties at start)."""
    return Path(folder_paths.get_user_directory()) / "mv4d" / "compiled_unets"


def compile_caches_folder() -> Path:
    """Where PyTorch's compile caches go (kernels/precompile.py keep_compile_caches_in), beside the compiled calls."""
    return Path(folder_paths.get_user_directory()) / "mv4d" / "torch_compile_cache"


@dataclass
class UNetCall:
    """One call of the UNet's forward as a DIFFUSION_MODEL wrapper receives it."""

    diffusion_model: torch.nn.Module
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor | None
    y: torch.Tensor | None
    control: object
    transformer_options: dict
    kwargs: dict

    def tensor_kwargs(self) -> dict:
        return {name: value for name, value in sorted(self.kwargs.items()) if isinstance(value, torch.Tensor)}

    def static_kwargs(self) -> dict:
        return {name: value for name, value in sorted(self.kwargs.items()) if not isinstance(value, torch.Tensor)}

    def arguments(self) -> tuple:
        """unet_forward's arguments after the module."""
        return self.x, self.timesteps, self.context, self.y, self.tensor_kwargs(), self.static_kwargs()

    def tensors(self) -> dict[str, torch.Tensor]:
        given = {name: getattr(self, name) for name in UNET_TENSORS if getattr(self, name) is not None}
        return {**given, **self.tensor_kwargs()}

    def shape_key(self) -> str:
        """The call's signature as far as compiled code tells calls apart (max_shapes counts these)."""
        return repr(([(name, list(tensor.shape), str(tensor.dtype)) for name, tensor in self.tensors().items()],
                     self.static_kwargs()))


@dataclass
class CompileUnit:
    """What one compiled file runs, `function(module, *arguments)`, in a UNet call: the whole UNet, or one piece."""

    call: UNetCall
    module: torch.nn.Module
    function: Callable
    arguments: tuple
    label: str  # for the log: "the UNet", "piece 2 of 4 of the UNet"

    def run(self):
        return self.function(self.module, *self.arguments)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {str(number): tensor for number, tensor in enumerate(tensors_in(self.arguments))}

    def example_bytes(self) -> int:
        return tensor_bytes(tensors_in(self.arguments))

    def describe(self) -> str:
        return f"{self.label} in calls of shape {list(self.call.x.shape)}"


def plain_structure(value):
    """The arguments' non-tensor parts (frozen into the compiled code, so part of the key), tensors as a mark."""
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (list, tuple)):
        return [plain_structure(item) for item in value]
    if isinstance(value, dict):
        return {name: plain_structure(item) for name, item in value.items()}
    return repr(value)


class CallRule:
    """One reason a call must not run compiled; `refusal` returns it in words, or None."""

    def refusal(self, call: UNetCall) -> str | None:
        raise NotImplementedError


class GradientsOff(CallRule):
    def refusal(self, call):
        return "gradients are on (training through the UNet)" if torch.is_grad_enabled() else None


class NoControl(CallRule):
    def refusal(self, call):
        return "a ControlNet / T2I adapter feeds the call" if call.control is not None else None


class NoOptionPatches(CallRule):
    """Patches and overrides in transformer_options are Python the compiled code would freeze."""

    KEYS = ("patches", "patches_replace", "optimized_attention_override")

    def refusal(self, call):
        present = [key for key in self.KEYS if call.transformer_options.get(key)]
        return f"the model has {', '.join(present)} (attention or block patches)" if present else None


class NoOtherWrappers(CallRule):
    """Another DIFFUSION_MODEL wrapper may depend on the step (cameras, masks, the grid): it must run each call."""

    def refusal(self, call):
        wrappers = call.transformer_options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
        others = [key for key, functions in wrappers.items() if key != WRAPPER_KEY and functions]
        return f"other model wrappers are attached ({', '.join(others)})" if others else None


class SimpleArguments(CallRule):
    def refusal(self, call):
        odd = [name for name, value in call.kwargs.items() if not isinstance(value, torch.Tensor) and not is_static(value)]
        return f"keyword arguments of other kinds ({', '.join(odd)})" if odd else None


class WeightsResident(CallRule):
    """Low-VRAM loading streams weights from the CPU layer by layer, and LoRA on such models is applied at call time
    (weight functions); the compiled code needs every weight on the device, as it is."""

    def refusal(self, call):
        device = call.x.device
        if call.transformer_options.get("prefetch_dynamic_vbars"):
            return "the model streams its weights (dynamic VRAM)"
        if any(tensor.device != device for tensor in call.diffusion_model.parameters()):
            return "the model's weights are not all on the compute device (low-VRAM loading)"
        if any(getattr(module, "weight_function", None) or getattr(module, "bias_function", None)
               for module in call.diffusion_model.modules()):
            return "weights are patched at call time (low-VRAM LoRA)"
        return None


@dataclass
class LargeEnough(CallRule):
    """Small calls (reference stages, previews) cost little eagerly and would each cost a compile."""

    min_images: int

    def refusal(self, call):
        count = call.x.shape[0]
        return f"small calls ({count} images, fewer than min_images {self.min_images})" if count < self.min_images else None


def default_rules(min_images: int) -> tuple[CallRule, ...]:
    return (GradientsOff(), NoControl(), NoOptionPatches(), NoOtherWrappers(), SimpleArguments(), WeightsResident(),
            LargeEnough(min_images))


class CompileJob:
    """A first compile of one call shape: running, or finished with a file (`outcome` gives its cost) or an error
    (`outcome` raises it)."""

    def running(self) -> bool:
        raise NotImplementedError

    def outcome(self) -> Built:
        raise NotImplementedError


@dataclass
class FinishedCompile(CompileJob):
    built: Built | None = None
    error: Exception | None = None

    def running(self):
        return False

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.built


class WorkerCompile(CompileJob):
    """A compile in a worker process (integration/compile_worker.py); its job folder goes when it has finished."""

    def __init__(self, process: subprocess.Popen, job: Path, path: Path, gpu_bytes: int = 0, device: str = ""):
        self.process, self.job, self.path, self.started = process, job, path, time.perf_counter()
        self.gpu_bytes, self.device = gpu_bytes, device  # the GPU memory granted to the process when it started
        self.finished: FinishedCompile | None = None

    def running(self):
        return self.finished is None and self.process.poll() is None

    def outcome(self):
        if self.finished is None:
            code = self.process.wait()
            seconds = time.perf_counter() - self.started
            if code == 0 and self.path.exists():
                self.finished = FinishedCompile(Built(seconds, self.path.stat().st_size))
            else:
                output = log_tail(self.job)
                last = output.splitlines()[-1] if output else "no output"
                # PyTorch's OutOfMemoryError, or CUDA's "out of memory" where the process could not even start
                failure = WorkerOutOfMemory if "out of memory" in output.lower() else RuntimeError
                self.finished = FinishedCompile(error=failure(f"the compile process exited with code {code}: {last}\n{output}"))
            shutil.rmtree(self.job, ignore_errors=True)
        return self.finished.outcome()


class CompilePlacement:
    """Where the first compile of a unit (a piece of the UNet in calls of one shape) runs. `begin` returns its job, or
    None when it cannot start now (the unit then runs uncompiled, and the next call of the shape asks again)."""

    def begin(self, unit: CompileUnit, path: Path) -> CompileJob | None:
        raise NotImplementedError

    def watch(self, call: UNetCall, run):
        """Runs `run()`, a UNet call the rules let compile; the placement may measure it."""
        return run()

    def after_failure(self, unit: CompileUnit, path: Path, error: Exception) -> CompileJob | None:
        """Another try for a unit whose compile failed with `error`: a job, START_AGAIN (`begin` at its next call),
        or None: it runs uncompiled."""
        return None


START_AGAIN = FinishedCompile()  # after_failure's "begin again at the next call"


class CompileBeforeTheCall(CompilePlacement):
    """In the sampling process, before the call goes on: the run waits for the compile."""

    def begin(self, unit, path):
        logging.info("%s: compiling %s (once per shape and machine, a minute or more for a large UNet; kept in %s)",
                     NODE, unit.describe(), path.parent)
        try:
            with COMPILE_LOCK:
                return FinishedCompile(build(unit.function, unit.module, unit.arguments, path))
        except Exception as error:  # a graph break, an unsavable value, a compiler failure: eager, the run goes on
            return FinishedCompile(error=error)


class WorkerOutOfMemory(RuntimeError):
    """A compile process ran out of GPU memory (something else took the room it was granted)."""


@dataclass(frozen=True)
class DeviceMemory:
    """A GPU's memory as a new compile process would find it."""

    free: int  # held by no process (cudaMemGetInfo)
    cached: int  # held by this process's allocator unused: this process's next calls take it before `free`


class CudaMemory:
    """What a compile placement asks the GPU (a policy object, so that tests can stand in for one)."""

    def now(self, device: torch.device) -> DeviceMemory | None:
        if device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return DeviceMemory(free, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))

    def peak_of(self, device: torch.device, run) -> tuple[object, int]:
        """run()'s result and its CUDA allocation peak. The composed guider's measurement of a whole chunk around
        it still sees everything allocated from here on, which holds its chunk's peak."""
        with PeakMemory(device).measure() as peak:
            result = run()
        return result, peak.bytes


# Worker compiles of this process by the file they write: a wrapper made again (the node run again while one
# compiles) finds the compile under way instead of starting a second.
WORKER_COMPILES: dict[Path, WorkerCompile] = {}


def default_worker_count() -> int:
    """Compile processes at once: one per two cores (each process's Python runs on one; its kernel builds share
    the rest), at least two (the two models of a composition)."""
    return max(2, (os.cpu_count() or 2) // 2)


@dataclass
class CompileBesideTheRun(CompilePlacement):
    """In a process of its own while sampling goes on uncompiled (two models' compiles side by side): the run starts
    at once and gets faster when the files are ready.

    A process holds a second copy of its piece's weights and example inputs (uninitialised, of the same layout), so
    on the GPU it starts only where that fits beside what the run's calls use: each shape's first call runs
    uncompiled and measured, and the compiles of the shape's pieces start from its second call if the memory left
    then, less that call's measured peak and what running compile processes were granted, holds the process. Where
    another process holds the room, or `max_workers` run, a piece waits; where no room is left even then, and for
    calls a process cannot rebuild (an attention function ComfyUI does not name), the piece compiles before the
    call; so does a piece whose process ran out of memory all the same (another program took the room)."""

    max_workers: int = dataclasses.field(default_factory=default_worker_count)
    before: CompilePlacement = dataclasses.field(default_factory=CompileBeforeTheCall)
    gpu: CudaMemory = dataclasses.field(default_factory=CudaMemory)
    call_peaks: dict[tuple, int] = dataclasses.field(default_factory=dict)  # call shape -> its uncompiled peak
    waiting: set[Path] = dataclasses.field(default_factory=set)  # units that were told to wait (logged once)
    alone: set[Path] = dataclasses.field(default_factory=set)  # units whose process ran out of memory beside others

    def begin(self, unit, path):
        call = unit.call
        reason = self.unsendable_attention()
        if reason:
            logging.info("%s: %s: compiling before the call instead of beside the run", NODE, reason)
            return self.before.begin(unit, path)
        memory = self.gpu.now(call.x.device)
        shape = tuple(call.x.shape)
        if memory is not None and shape not in self.call_peaks:
            return None  # this call runs uncompiled and measured (watch); the next one decides
        with COMPILE_LOCK:
            if path in WORKER_COMPILES:
                return WORKER_COMPILES[path]
            running = [compile for compile in WORKER_COMPILES.values() if compile.running()]
            if len(running) >= self.max_workers:
                return None
            if path in self.alone and any(compile.device == str(call.x.device) for compile in running):
                return None
            need = 0
            if memory is not None:
                need = weight_bytes(unit.module) + unit.example_bytes() + WORKER_OVERHEAD_BYTES
                # Granted bytes count in full, also where a process has taken them already (then `free` counts
                # them too): on a card this full, waiting is cheaper than a process that runs out of memory.
                here = [compile for compile in running if compile.device == str(call.x.device)]
                granted = sum(compile.gpu_bytes for compile in here)
                room = memory.free + memory.cached - self.call_peaks[shape] - granted
                # Beside another process, keep this call's peak free once more: the other model's calls, not
                # measured yet, may need as much (three pieces' processes beside the run left a 24 GiB card's
                # sampling process out of memory without it)
                margin = self.call_peaks[shape] if here else 0
                if room < need + margin and running:
                    if path not in self.waiting:
                        self.waiting.add(path)
                        logging.info("%s: no GPU room for another compile process beside the run: %s waits for "
                                     "the ones under way", NODE, unit.describe())
                    return None
                if room < need:
                    reason = (f"{max(room, 0) / 2**30:.1f} GiB of GPU memory left beside the run's calls, less than "
                              f"a compile process's {need / 2**30:.1f} GiB")
            if not reason:
                threads = max(1, (os.cpu_count() or 2) // self.max_workers)
                job = None
                try:
                    job = write_job(unit.module, unit.arguments, unit.function, path, attention_functions())
                    WORKER_COMPILES[path] = WorkerCompile(start_worker(job, threads), job, path, need, str(call.x.device))
                except Exception as error:  # e.g. another node pack left a function on the model that does not pickle
                    reason = f"the call cannot be sent to a compile process ({type(error).__name__}: {error})"
                    if job is not None:
                        shutil.rmtree(job, ignore_errors=True)
        if reason:  # outside the lock: the compile before the call takes it
            logging.info("%s: %s: compiling before the call instead of beside the run", NODE, reason)
            return self.before.begin(unit, path)
        logging.info("%s: compiling %s beside the run (a process of its own; it runs uncompiled until it is ready; "
                     "kept in %s)", NODE, unit.describe(), path.parent)
        return WORKER_COMPILES[path]

    def watch(self, call, run):
        shape = tuple(call.x.shape)
        if shape in self.call_peaks or self.gpu.now(call.x.device) is None:
            return run()
        result, self.call_peaks[shape] = self.gpu.peak_of(call.x.device, run)
        return result

    def after_failure(self, unit, path, error):
        if not isinstance(error, WorkerOutOfMemory):
            return None
        WORKER_COMPILES.pop(path, None)
        if path not in self.alone:  # the processes beside it took more than they were granted: try it alone
            self.alone.add(path)
            logging.info("%s: the compile process for %s ran out of GPU memory beside others: it starts again when "
                         "no other compile process runs on the GPU", NODE, unit.describe())
            return START_AGAIN
        logging.info("%s: the compile process for %s ran out of GPU memory alone: compiling before the call instead",
                     NODE, unit.describe())
        return self.before.begin(unit, path)

    @staticmethod
    def unsendable_attention() -> str | None:
        missing = [name for name in attention_functions().values() if not hasattr(comfy_attention, name)]
        return f"the attention function {missing[0]} is not one of ComfyUI's" if missing else None


def weight_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(module.state_dict().values())


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def attention_functions() -> dict[str, str]:
    """The attention functions ComfyUI's UNets call, by name (part of the key, and what a worker selects)."""
    return {name: getattr(getattr(comfy_attention, name), "__name__", "?")
            for name in ("optimized_attention", "optimized_attention_masked")}


FIRST_COMPILE = {"beside the run": CompileBesideTheRun, "before the call": CompileBeforeTheCall}


class CompiledUNet:
    """The DIFFUSION_MODEL wrapper: each call the rules allow runs as compiled units (the UNet's pieces, or the whole
    UNet), one compiled file per unit and call signature, from memory, from disk, or compiled now by its placement
    (beside the run, or before the call); a unit without compiled code runs eagerly, the same computation."""

    def __init__(self, store: CompiledStore, rules: tuple[CallRule, ...], max_shapes: int, placement: CompilePlacement,
                 pieces: int = DEFAULT_PIECES):
        self.store, self.rules, self.max_shapes, self.placement = store, rules, max_shapes, placement
        self.pieces = pieces
        self.shapes: set[str] = set()  # call signatures let compile (at most max_shapes)
        self.calls: dict[str, CompiledCall] = {}  # key digest -> loaded compiled unit
        self.jobs: dict[str, CompileJob] = {}  # key digest -> its compile, while it runs
        self.refused: dict[str, str] = {}  # key digest -> why it runs eagerly (a compile that failed)
        self.logged: set[str] = set()
        self.events: list[dict] = []  # what was compiled and loaded, with seconds (for the log and the benchmarks)
        self.lock = threading.Lock()  # multi-GPU runs call one wrapper from one thread per device

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        call = UNetCall(executor.class_obj, x, timesteps, context, y, control, transformer_options, kwargs)
        if not self.may_compile(call):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        return self.placement.watch(call, lambda: self.run(call))

    def may_compile(self, call: UNetCall) -> bool:
        reason = next((reason for rule in self.rules if (reason := rule.refusal(call))), None)
        if reason:
            self.log_once(reason, "%s: %s: these calls run uncompiled", NODE, reason)
            return False
        signature = call.shape_key()
        with self.lock:
            if signature not in self.shapes and len(self.shapes) >= self.max_shapes:
                self.log_once("max", "%s: %d call shapes already compiled (max_shapes): a new shape (%s) runs "
                              "uncompiled; fix videos_per_call / multiview_sets_per_call of the guider to keep shapes "
                              "few", NODE, self.max_shapes, list(call.x.shape))
                return False
            self.shapes.add(signature)
        return True

    def run(self, call: UNetCall):
        """The call as its units in order: the UNet's pieces (a piece's inputs are the outputs of those before it),
        or the whole UNet where it is not cut."""
        pieces = cut_unet(call.diffusion_model, self.pieces)
        if pieces is None:
            return self.run_unit(CompileUnit(call, call.diffusion_model, unet_forward, call.arguments(), "the UNet"))
        run = PieceRun(call.x)
        for number, piece in enumerate(pieces, 1):
            arguments = run.arguments(piece, call.timesteps, call.y, call.context, call.tensor_kwargs(),
                                      call.static_kwargs())
            unit = CompileUnit(call, piece, piece_forward, arguments, f"piece {number} of {len(pieces)} of the UNet")
            run.advance(piece, self.run_unit(unit))
        return run.h

    def run_unit(self, unit: CompileUnit):
        compiled = self.compiled_for(unit)
        return compiled(unit.module, *unit.arguments) if compiled is not None else unit.run()

    def compiled_for(self, unit: CompileUnit) -> CompiledCall | None:
        key = self.key(unit)
        with self.lock:
            compiled = self.calls.get(key.digest) or self.load_or_compile(unit, key)
        if compiled is None or not compiled.accepts(unit.module, *unit.arguments):
            if compiled is not None and f"guards {key.digest}" not in self.logged:  # the reason costs a guard walk
                self.log_once(f"guards {key.digest}", "%s: the compiled code for %s does not accept this call (%s); it "
                              "runs uncompiled", NODE, unit.describe(), compiled.refusal(unit.module, *unit.arguments))
            return None
        return compiled

    def load_or_compile(self, unit: CompileUnit, key: CompileKey) -> CompiledCall | None:
        if key.digest in self.refused:
            return None
        path = self.store.path(key)
        job = self.jobs.get(key.digest)
        if job is None and path.exists():
            return self.load(path, key, unit)
        if job is None:
            if self.store.directory.is_dir():
                self.store.remove_stale_partials()
            job = self.placement.begin(unit, path)
            if job is None:
                return None
            self.jobs[key.digest] = job
        if job.running():
            return None
        del self.jobs[key.digest]
        try:
            built = job.outcome()
        except Exception as error:
            retry = self.placement.after_failure(unit, path, error)
            if retry is START_AGAIN:
                return None
            if retry is not None:  # the next call of the shape takes it up
                self.jobs[key.digest] = retry
                return None
            self.refused[key.digest] = str(error)
            logging.warning("%s: could not compile %s (%s: %s); it runs uncompiled", NODE, unit.describe(),
                            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return None
        self.events.append({"compiled": path.name, "unit": unit.label, "shape": list(unit.call.x.shape),
                            "seconds": round(built.seconds, 1), "megabytes": round(built.bytes_written / 2**20, 1)})
        logging.info("%s: compiled %s in %.1f s (%.1f MB kept)", NODE, unit.describe(), built.seconds,
                     built.bytes_written / 2**20)
        return self.load(path, key, unit)

    def load(self, path: Path, key: CompileKey, unit: CompileUnit) -> CompiledCall | None:
        started = time.perf_counter()
        try:
            compiled = CompiledCall.load(path)
        except Exception as error:  # e.g. a file cut short by a full disk: say which, and go on uncompiled
            self.refused[key.digest] = str(error)
            logging.warning("%s: could not load %s (%s: %s); %s runs uncompiled; delete the file to compile it "
                            "again", NODE, path, type(error).__name__, error, unit.describe())
            return None
        seconds = time.perf_counter() - started
        self.events.append({"loaded": path.name, "unit": unit.label, "shape": list(unit.call.x.shape),
                            "seconds": round(seconds, 2)})
        logging.info("%s: loaded %s (%s) in %.1f s", NODE, path.name, unit.describe(), seconds)
        self.calls[key.digest] = compiled
        return compiled

    def key(self, unit: CompileUnit) -> CompileKey:
        return CompileKey.of(unit.module, unit.tensors(), call_device=str(unit.call.x.device),
                             function=f"{unit.function.__module__}.{unit.function.__qualname__}",
                             arguments=plain_structure(unit.arguments),
                             attention=attention_functions()["optimized_attention"])

    def log_once(self, topic: str, message: str, *args) -> None:
        if topic not in self.logged:
            self.logged.add(topic)
            logging.info(message, *args)


def with_compile_and_keep(model, min_images: int, max_shapes: int, folder: Path | None = None,
                          first_compile: str = "beside the run", pieces: int = DEFAULT_PIECES):
    """A clone of the ModelPatcher whose UNet calls run compiled (and kept on disk) where the rules allow, the UNet
    in `pieces` pieces; the first compile of a shape runs where `first_compile` (a key of FIRST_COMPILE) says."""
    patched = model.clone()
    wrapper = CompiledUNet(CompiledStore(folder or compiled_folder()), default_rules(min_images), max_shapes,
                           FIRST_COMPILE[first_compile](), pieces)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
    keep_clones_matched(patched)
    return patched


def compiled_unets_of(model) -> list[CompiledUNet]:
    return list(model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY))
