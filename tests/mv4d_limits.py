"""Bounds for tests of hostile input: a call must not hang past a time limit, nor allocate past a memory limit.

memory_limit caps the process's address space (RLIMIT_AS) at what it uses now plus a stated number of bytes:
an allocation beyond that fails at once (MemoryError, or torch's "can't allocate memory") instead of swapping,
so a test proves that a reader or a kernel refused a size before allocating it, not merely that it survived on a
large machine. Linux only (the limit is read from /proc); elsewhere those tests are skipped.
"""

from __future__ import annotations

import resource
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import pytest

MIB = 2**20
SLACK = 96 * MIB  # for the interpreter, the allocator's arenas and small temporaries around the call under test


class Hang(AssertionError):
    """The call under test ran past its time limit."""


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Fail with Hang when the block runs longer than `seconds` (a bound on hanging, not a speed claim)."""
    def alarm(signum, frame):
        raise Hang(f"{what} ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def address_space_in_use() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextmanager
def memory_limit(extra_bytes: float) -> Iterator[None]:
    """Inside the block the process may allocate at most `extra_bytes` (+ SLACK) more than it holds now."""
    if not sys.platform.startswith("linux"):
        pytest.skip("memory limits are set through Linux's RLIMIT_AS and /proc")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space_in_use() + int(extra_bytes) + SLACK
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
