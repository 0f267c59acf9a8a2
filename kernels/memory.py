"""Memory bounds: a size a user can type (views, frames, pixels, Gaussians, a file's declared counts) is turned
into an estimate of the bytes it needs, and refused with a clear error before anything that big is allocated,
instead of swapping the machine to a halt or being killed by the operating system.

The bound is the memory free right now on the device the allocation goes to: available RAM for the CPU (what
the operating system could hand out without swapping), free memory of a CUDA device (what its driver reports
plus what PyTorch holds cached). Each estimate says in a comment what it counts.
"""

from __future__ import annotations

import os

import torch

from .errors import InvalidInput

GIB = 2**30


def format_bytes(count: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def _available_ram() -> int | None:
    try:
        import psutil  # a ComfyUI requirement; optional here so the kernels work anywhere

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can be allocated now on `device`; None when the platform does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return _available_ram()


def check_memory(argument: str, needed: float, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Refuse `needed` bytes for `what` when they exceed what `device` has free (InvalidInput naming the
    argument, the estimate, the bound and the fix)."""
    limit = available_bytes(device)
    if limit is not None and needed > limit:
        where = "the GPU" if torch.device(device).type == "cuda" else "this machine"
        raise InvalidInput(argument, f"{what} needs about {format_bytes(needed)}, more than the {format_bytes(limit)} "
                                     f"{where} has free", fix)
