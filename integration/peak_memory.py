"""A block's CUDA allocation peak, for the memory-sized chunks of the composed guider and the room MV4D Compile and
Keep leaves beside a run's calls."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

# One measurement at a time in this process (nested ones in one thread are fine): CUDA's peak statistic is one per
# device, so another thread's reset would drop this block's peak (the composed guider's roles side by side). What the
# other thread allocates meanwhile still counts, so a measurement then errs on the large side.
MEASURING = threading.RLock()


class PeakMemory:
    """The CUDA allocation peak of a block above what was allocated when it began (None off CUDA, or when not
    enabled). It resets CUDA's peak statistic."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    @contextmanager
    def measure(self, enabled: bool = True):
        if not enabled or self.device.type != "cuda":
            yield self
            return
        with MEASURING:
            base = torch.cuda.memory_allocated(self.device)  # the allocator's host-side counters: no device sync
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            self.bytes = torch.cuda.max_memory_allocated(self.device) - base
