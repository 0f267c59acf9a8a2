"""How the composed guider runs its roles' UNet work within one evaluation: one after another (the default), or
side by side, each role after the first in a thread of its own and, on a GPU, on a CUDA stream of its own.

Why side by side: while one model's memory-bound kernels (norms, gates, mixes) run, the tensor cores are idle, and
the other model's matrix products could use them; on two streams the GPU may overlap them. It is exact: the same
calls on the same inputs, only their order on the GPU changes. Each role gets a thread because a compiled UNet
call launches thousands of kernels before it returns: one thread would queue one role's call before the other's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol

import torch

RoleWork = Callable[[], torch.Tensor]


class RoleOrder(Protocol):
    def run(self, works: list[RoleWork], device: torch.device) -> list[torch.Tensor]:
        """Each work's prediction, in the order of `works`, ready for the sampling thread's current stream."""
        ...


class OneAfterAnother:
    def run(self, works: list[RoleWork], device: torch.device) -> list[torch.Tensor]:
        return [work() for work in works]


class SideBySide:
    """The first work in the calling thread, each later one in a worker thread, on a side stream of its own on a
    GPU. A side stream first waits for the sampling stream (the grid and the conds were made there), and the
    sampling stream waits for every side stream before it reads the predictions, so memory made under one stream
    is never reused under another's kernels. A work that fails (an interrupt, an out-of-memory error) still lets the
    others finish before its error is raised, so no call is left running."""

    def __init__(self):
        self.streams: dict[tuple[torch.device, int], torch.cuda.Stream] = {}
        self.pool: ThreadPoolExecutor | None = None

    def run(self, works: list[RoleWork], device: torch.device) -> list[torch.Tensor]:
        if len(works) < 2:
            return [work() for work in works]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mv4d-role")
        main = torch.cuda.current_stream(device) if device.type == "cuda" else None
        modes = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        sides, futures = [], []
        for index, work in enumerate(works[1:]):
            stream = None
            if main is not None:
                if (device, index) not in self.streams:  # made once: a stream lives as long as the guider
                    self.streams[device, index] = torch.cuda.Stream(device)
                stream = self.streams[device, index]
                stream.wait_stream(main)
                sides.append(stream)
            futures.append(self.pool.submit(_in_worker, work, stream, *modes))
        try:
            first = works[0]()
        finally:
            for future in futures:
                future.exception()  # waits for it
            for stream in sides:
                main.wait_stream(stream)
        return [first, *(future.result() for future in futures)]  # raises the first failed work's error


def _in_worker(work: RoleWork, stream: torch.cuda.Stream | None, grad: bool, inference: bool) -> torch.Tensor:
    # grad and inference modes and the current stream are per thread: the worker takes the sampling thread's modes
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        if stream is None:
            return work()
        with torch.cuda.stream(stream):
            return work()
