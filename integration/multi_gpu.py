"""One composition job over the GPUs of one machine, through ComfyUI's own multi-GPU machinery (0.29+).

ComfyUI's MultiGPU CFG Split node (MultiGPU_WorkUnits) gives a MODEL deep clones on the other GPUs, kept as its
additional models under "multigpu", and CFGGuider's sampling then runs a thread pool with one worker per GPU.
Core spreads the cond and uncond halves of a call over two GPUs at most; the composed guider's work is many
independent videos and multi-view sets per evaluation, so it spreads those instead: each role's groups are
split over the GPUs its model has clones on, in shares by ComfyUI's load balance (each GPU's relative speed),
every GPU sizes its own calls by its own free memory, and the predictions are gathered on the sampling device.
One GPU, or a host without that machinery, runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

import comfy.model_management as model_management
import torch

MULTIGPU_KEY = "multigpu"  # ComfyUI's key for a model's clones on other devices
# model_options entries of core's own multi-GPU path: calls the guider has already placed on one device must not
# be split again by core's calc_cond_batch
CORE_MULTIGPU_OPTIONS = ("multigpu_clones", "multigpu_thread_pool")


def has_core_multigpu() -> bool:
    try:
        import comfy.multigpu  # noqa: F401
    except ImportError:
        return False
    return True


def device_clones(model_patcher) -> list:
    """The model's clones on other devices (ModelPatchers), [] when it has none or the host has no multi-GPU."""
    getter = getattr(model_patcher, "get_additional_models_with_key", None)
    return list(getter(MULTIGPU_KEY)) if getter is not None else []


def keep_clones_matched(model_patcher) -> None:
    """After patching a clone of a multi-GPU model: give its device clones the same patches (ComfyUI 0.29's
    match_multigpu_clones), so every GPU runs the patched model."""
    if device_clones(model_patcher) and hasattr(model_patcher, "match_multigpu_clones"):
        model_patcher.match_multigpu_clones()


def without_core_multigpu(model_options: dict) -> dict:
    return {key: value for key, value in model_options.items() if key not in CORE_MULTIGPU_OPTIONS}


def note_single_gpu(guider_name: str) -> None:
    """A log line when the machine has several GPUs but the host cannot spread the work over them."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 1 and not has_core_multigpu():
        logging.info("%s: %d GPUs, but this ComfyUI has no MultiGPU work units (ComfyUI 0.29+ with MultiGPU CFG Split "
                     "spreads the grid over them): sampling on one GPU", guider_name, torch.cuda.device_count())


@dataclass
class DeviceRun:
    """One device's copy of a role's model during a sampling run: its BaseModel, conds processed onto the device,
    model options, and its relative speed (ComfyUI's GPU options; 1.0 unless the user set them)."""

    device: torch.device
    model: object
    conds: dict
    options: dict
    speed: float = 1.0


def relative_speeds(model_patcher, devices: list[torch.device]) -> list[float]:
    """Each device's relative speed from the MODEL's multigpu_options (core's GPU options), 1.0 where unset."""
    options = model_patcher.model_options.get("multigpu_options", {})
    return [float(options.get(device, {}).get("relative_speed", 1.0)) for device in devices]


def shares(groups: list[int], runs: list[DeviceRun]) -> list[list[int]]:
    """Contiguous shares of the groups, one per device, sized by core's load balance (relative speeds)."""
    import comfy.multigpu

    options = {"multigpu_options": {index: {"relative_speed": run.speed} for index, run in enumerate(runs)},
               "multigpu_clones": {index: run for index, run in enumerate(runs)}}
    counts = comfy.multigpu.load_balance_devices(options, len(groups)).work_per_device
    result, first = [], 0
    for index in range(len(runs)):
        result.append(groups[first:first + counts[index]])
        first += counts[index]
    return result


class SpreadOverDevices:
    """A chunk policy: one role's groups in shares over its devices, the devices working at once (ComfyUI's
    MultiGPU thread pool, one worker per GPU; without a pool, one after the other), each running the `inner`
    policy on its share (so each GPU's calls are sized by its own free memory and measurements). With one device
    it is `inner` alone."""

    def __init__(self, inner):
        self.inner = inner
        self.lock = threading.Lock()  # evaluate() of several workers writes into one prediction

    def run(self, work, evaluate) -> None:
        runs = [run for run in work.devices if run is not None]
        if len(runs) <= 1:
            return self.inner.run(work, evaluate)

        def locked(groups, model) -> None:
            evaluate(groups, model, self.lock)

        # grad and inference modes are per thread: a pool worker starts with neither of the sampler's
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def share_job(device_work) -> None:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self.inner.run(device_work, locked)

        jobs = []
        for run, share in zip(runs, shares(work.groups, runs)):
            if share:
                device_work = dataclasses.replace(work, model=run.model, groups=share, devices=(run,),
                                                  sample=work.sample[:1].to(run.device))
                jobs.append((run.device, device_work))
        pool = work.pool
        in_pool = [pool is not None and device in pool.devices for device, _ in jobs]
        for (device, device_work), pooled in zip(jobs, in_pool):
            if pooled:
                pool.submit(device, share_job, device_work)
        errors = []
        for (_, device_work), pooled in zip(jobs, in_pool):  # the shares no pool worker takes, here
            if not pooled:
                try:
                    share_job(device_work)
                except Exception as error:  # collected so the pooled shares are still waited for
                    errors.append(error)
        for (device, _), pooled in zip(jobs, in_pool):
            if pooled:
                _, error = pool.get_result(device)
                if error is not None:
                    errors.append(error)
        if errors:
            # an interrupt in any worker is the user's Cancel; otherwise the first failure
            interrupted = [e for e in errors if isinstance(e, model_management.InterruptProcessingException)]
            raise (interrupted or errors)[0]
