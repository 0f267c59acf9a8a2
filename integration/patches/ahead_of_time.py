"""The patch behind MV4D Compile Ahead of Time: a DIFFUSION_MODEL wrapper that runs a UNet call as an AOTInductor
program (kernels/ahead_of_time.py), built the first time a call of that shape is met and kept under ComfyUI's user
folder, so later processes load it in seconds instead of compiling again.

What the trace sees is frozen into the program: ComfyUI's Python around the UNet (attention patches, other
wrappers, ControlNet) would stop reacting to the step. So each call first goes through rules (policy objects, one
question each); a call any rule refuses runs the UNet as before, and the refusal is logged once. Object patches
that swap modules (our single-token shortcut) are part of the module tree, so they are in the program and in its
key.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import folder_paths
import torch

from ...kernels.ahead_of_time import Program, ProgramKey, ProgramStore, build_program
from ..multi_gpu import keep_clones_matched

WRAPPER_KEY = "mv4d.ahead_of_time"
NODE = "MV4D Compile Ahead of Time"
STATIC_TYPES = (bool, int, float, str, type(None))


def is_static(value) -> bool:
    """Whether a keyword argument is plain data the program may freeze (it is part of the key): numbers, strings,
    and lists, dicts and dataclasses of them, such as the grid shape our conditioning carries."""
    if isinstance(value, STATIC_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_static(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_static(item) for key, item in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return is_static(dataclasses.asdict(value))
    return False


def program_folder() -> Path:
    """Where packages live: ComfyUI's user folder, which survives restarts and updates (not the temp folder, which
    ComfyUI empties at start)."""
    return Path(folder_paths.get_user_directory()) / "mv4d" / "compiled_unets"


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

    def tensor_names(self) -> list[str]:
        """The program's inputs in order: the UNet's tensors, then tensor keyword arguments by name."""
        names = [name for name in ("x", "timesteps", "context", "y") if getattr(self, name) is not None]
        return names + sorted(name for name, value in self.kwargs.items() if isinstance(value, torch.Tensor))

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) if hasattr(self, name) else self.kwargs[name] for name in self.tensor_names()]

    def static_kwargs(self) -> dict:
        return {name: value for name, value in self.kwargs.items() if not isinstance(value, torch.Tensor)}


class CallRule:
    """One reason a call must not run as a program; `refusal` returns it in words, or None."""

    def refusal(self, call: UNetCall) -> str | None:
        raise NotImplementedError


class GradientsOff(CallRule):
    def refusal(self, call):
        return "gradients are on (training through the UNet)" if torch.is_grad_enabled() else None


class NoControl(CallRule):
    def refusal(self, call):
        return "a ControlNet / T2I adapter feeds the call" if call.control is not None else None


class NoOptionPatches(CallRule):
    """Patches and overrides in transformer_options are Python the program would freeze."""

    KEYS = ("patches", "patches_replace", "optimized_attention_override")

    def refusal(self, call):
        present = [key for key in self.KEYS if call.transformer_options.get(key)]
        return f"the model has {', '.join(present)} (attention or block patches)" if present else None


class NoOtherWrappers(CallRule):
    """Another DIFFUSION_MODEL wrapper may depend on the step (cameras, masks): it must keep running each call."""

    def refusal(self, call):
        wrappers = call.transformer_options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
        others = [key for key, functions in wrappers.items() if key != WRAPPER_KEY and functions]
        return f"other model wrappers are attached ({', '.join(others)})" if others else None


class SimpleArguments(CallRule):
    def refusal(self, call):
        odd = [name for name, value in call.kwargs.items() if not isinstance(value, torch.Tensor) and not is_static(value)]
        return f"keyword arguments of other kinds ({', '.join(odd)})" if odd else None


class WeightsOnCallDevice(CallRule):
    """Low-VRAM loading streams weights from the CPU layer by layer; the program needs them all on the device."""

    def refusal(self, call):
        device = call.x.device
        if any(tensor.device != device for tensor in call.diffusion_model.parameters()):
            return "the model's weights are not all on the compute device (low-VRAM loading)"
        return None


@dataclass
class LargeEnough(CallRule):
    """Small calls (reference stages, previews) cost little eagerly and would each cost a build."""

    min_images: int

    def refusal(self, call):
        count = call.x.shape[0]
        return f"small calls ({count} images, fewer than min_images {self.min_images})" if count < self.min_images else None


def default_rules(min_images: int) -> tuple[CallRule, ...]:
    return (GradientsOff(), NoControl(), NoOptionPatches(), NoOtherWrappers(), SimpleArguments(), WeightsOnCallDevice(),
            LargeEnough(min_images))


class AheadOfTimeUNet:
    """The DIFFUSION_MODEL wrapper: program per call signature, from memory, from disk, or built."""

    def __init__(self, store: ProgramStore, rules: tuple[CallRule, ...], max_programs: int):
        self.store, self.rules, self.max_programs = store, rules, max_programs
        self.programs: dict[tuple[str, str], Program] = {}  # (key digest, device) -> loaded program
        self.refused: dict[str, str] = {}  # key digest -> why it runs eagerly (a build that failed)
        self.logged: set[str] = set()
        self.events: list[dict] = []  # what was built and loaded, with seconds (for the log and the benchmarks)
        self.lock = threading.Lock()  # multi-GPU runs call one wrapper from one thread per device

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        call = UNetCall(executor.class_obj, x, timesteps, context, y, control, transformer_options, kwargs)
        program = self.program_for(call, executor)
        if program is None:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        return program(call.diffusion_model, *call.tensors())

    def program_for(self, call: UNetCall, executor) -> Program | None:
        reason = next((reason for rule in self.rules if (reason := rule.refusal(call))), None)
        if reason:
            self.log_once(reason, "%s: %s: these calls run uncompiled", NODE, reason)
            return None
        key = self.key(call)
        slot = (key.digest, str(call.x.device))
        with self.lock:
            if slot in self.programs:
                return self.programs[slot]
            if key.digest in self.refused:
                return None
            if len({digest for digest, _ in self.programs}) >= self.max_programs:
                self.log_once("max", "%s: %d call shapes already have programs (max_programs): a new shape (%s) runs "
                              "uncompiled; fix videos_per_call / multiview_sets_per_call of the guider to keep shapes "
                              "few", NODE, self.max_programs, list(call.x.shape))
                return None
            path = self.store.path(key)
            if not path.exists():
                try:
                    self.build(call, executor, path)
                except Exception as error:  # NotExportable or a compiler failure: this shape runs eagerly, the run goes on
                    self.refused[key.digest] = str(error)
                    logging.warning("%s: could not build a program for calls of shape %s (%s: %s); they run "
                                    "uncompiled", NODE, list(call.x.shape), type(error).__name__, error)
                    return None
            started = time.perf_counter()
            program = Program.load(path, call.x.device)
            seconds = time.perf_counter() - started
            self.events.append({"loaded": path.name, "shape": list(call.x.shape), "seconds": round(seconds, 2)})
            logging.info("%s: loaded %s in %.1f s", NODE, path.name, seconds)
            self.programs[slot] = program
            return program

    def key(self, call: UNetCall) -> ProgramKey:
        return ProgramKey.of(call.diffusion_model, call.tensors(), input_names=call.tensor_names(),
                             static_kwargs=repr(call.static_kwargs()), options=sorted(call.transformer_options),
                             attention=getattr(comfy_attention.optimized_attention, "__name__", "?"))

    def build(self, call: UNetCall, executor, path: Path) -> None:
        names, static, options = call.tensor_names(), call.static_kwargs(), call.transformer_options
        logging.info("%s: building the program for calls of shape %s (once per shape; kept in %s)", NODE,
                     list(call.x.shape), path.parent)

        def forward(*tensors):
            given = dict(zip(names, tensors))
            positional = [given.pop(name, None) for name in ("x", "timesteps", "context", "y")]
            return executor(*positional, None, dict(options), **static, **given)  # control: refused unless None

        times = build_program(call.diffusion_model, forward, call.tensors(), path)
        self.events.append({"built": path.name, "shape": list(call.x.shape), "export_seconds": round(times.export_seconds, 1),
                            "compile_seconds": round(times.compile_seconds, 1)})
        logging.info("%s: built in %.1f s (export %.1f s, compile %.1f s)", NODE,
                     times.export_seconds + times.compile_seconds, times.export_seconds, times.compile_seconds)

    def log_once(self, topic: str, message: str, *args) -> None:
        if topic not in self.logged:
            self.logged.add(topic)
            logging.info(message, *args)


def with_ahead_of_time_programs(model, min_images: int, max_programs: int, folder: Path | None = None):
    """A clone of the ModelPatcher whose UNet calls run as ahead-of-time compiled programs where the rules allow."""
    patched = model.clone()
    wrapper = AheadOfTimeUNet(ProgramStore(folder or program_folder()), default_rules(min_images), max_programs)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
    keep_clones_matched(patched)
    return patched


def programs_of(model) -> list[AheadOfTimeUNet]:
    return list(model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY))
