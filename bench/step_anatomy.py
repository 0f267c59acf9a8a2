"""Where a compiled joint step's time goes beyond its kernels' isolated rates (used by composition_step.py --anatomy).

The compiled step's matrix products take about 0.9 s more than the same shapes timed alone in the layouts the eager
UNets use (bench/RESULTS.md), and some of the step has no kernel running. Three measurements tell the causes apart:

  - ProductRecorder: every extern kernel call of inductor's compiled code (cuBLAS products, cuDNN convolutions) with
    its arguments' shapes, strides and dtypes, and its GPU time inside the step (CUDA events around each call);
    replay_products then runs the same calls alone, in the graph's own layouts and contiguous, and all of them back
    to back in the step's order. Same layouts alone as fast as in the step: not the layouts; the sequence as slow
    as the step: the GPU under a sustained load (clocks, power), not the graph.
  - ClockLog: the GPU's SM clock, power draw and clock-event reasons (nvidia-smi, every 100 ms), by phase.
  - gpu_idle: from a profiler trace of one step, the gaps with no kernel running and what the CPU was doing then
    (synchronising runtime calls, and the innermost of the annotated Python regions).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import operator
import statistics
import subprocess
import threading
import time

import torch

# the CUDA runtime calls that can make the CPU wait for the GPU (or the GPU for the CPU)
WAITING_CALLS = ("Synchronize", "cudaMemcpy", "cudaFree", "cudaMalloc", "cudaHostAlloc", "cudaMemset")


def describe(value):
    """A hashable description of a call argument: tensors by shape, strides, dtype and alignment class."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), str(value.dtype), value.storage_offset() % 128)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(describe(v) for v in value))
    return ("value", value)


class ProductRecorder:
    """While entered, every call of inductor's extern kernels (torch._inductor.select_algorithm.extern_kernels,
    which compiled code looks up at each call) is recorded with its arguments' description and CUDA events."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, object, object]] = []
        self.originals: dict[str, object] = {}

    def __enter__(self):
        from torch._inductor.select_algorithm import extern_kernels

        self.namespace = extern_kernels
        for name, kernel in list(vars(extern_kernels).items()):
            if callable(kernel):
                self.originals[name] = kernel
                setattr(extern_kernels, name, self._recorded(name, kernel))
        return self

    def __exit__(self, *exc):
        for name, kernel in self.originals.items():
            setattr(self.namespace, name, kernel)

    def _recorded(self, name, kernel):
        def recorded(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = kernel(*args, **kwargs)
            end.record()
            self.calls.append((name, describe((args, tuple(sorted(kwargs.items())))), start, end))
            return result

        return recorded

    def take(self) -> list[tuple[str, tuple, float]]:
        """(kernel name, arguments' description, milliseconds) per call, in the step's order."""
        torch.cuda.synchronize()
        return [(name, signature, start.elapsed_time(end)) for name, signature, start, end in self.calls]


class ArgumentPool:
    """Builds a recorded call's arguments again as views of one random buffer per dtype (and one output buffer),
    so any number of calls can be replayed without holding their tensors."""

    def __init__(self, signatures, device):
        extents: dict[tuple[str, str], int] = collections.defaultdict(int)
        for signature in signatures:
            for role, tensor in self._tensors(signature):
                extents[(role, tensor[3])] = max(extents[(role, tensor[3])], self._extent(tensor))
        self.buffers = {}
        for (role, dtype), elements in extents.items():
            buffer = torch.empty(elements, dtype=getattr(torch, dtype.removeprefix("torch.")), device=device)
            self.buffers[(role, dtype)] = buffer.normal_() if buffer.is_floating_point() and role == "input" else buffer.zero_()

    @staticmethod
    def _extent(tensor) -> int:
        _, shape, stride, _, offset = tensor
        return offset + 1 + sum((size - 1) * step for size, step in zip(shape, stride))

    @staticmethod
    def _out_argument(item):
        """The described tensor of an ("out", tensor) keyword pair, else None (outputs come from their own buffer)."""
        if item[0] == "tuple" and len(item[1]) == 2 and item[1][0] == ("value", "out"):
            return item[1][1]
        return None

    @classmethod
    def _tensors(cls, description, role="input"):
        kind, payload = description[0], description[1:]
        if kind == "tensor":
            yield role, description
        elif kind in ("list", "tuple"):
            for item in payload[0]:
                out = cls._out_argument(item)
                yield from cls._tensors(out, "output") if out is not None else cls._tensors(item, role)

    def build(self, description, contiguous: bool = False, role="input"):
        kind = description[0]
        if kind == "tensor":
            _, shape, stride, dtype, offset = description
            buffer = self.buffers[(role, dtype)]
            if contiguous:
                stride, offset = torch.empty(shape, device="meta").stride(), 0
            return buffer.as_strided(shape, stride, offset)
        if kind in ("list", "tuple"):
            items = []
            for item in description[1]:
                out = self._out_argument(item)
                items.append(("out", self.build(out, contiguous, "output")) if out is not None else self.build(item, contiguous, role))
            return list(items) if kind == "list" else tuple(items)
        return description[1]


def gpu_milliseconds(function, repeats: int) -> float:
    """The median of `repeats` timed calls (CUDA events) after two warm-up calls."""
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def replay_products(calls, kernels: dict, clock_log: "ClockLog | None" = None, repeats: int = 5, top: int = 12) -> dict:
    """The recorded calls again, outside the step: each distinct call alone in the graph's layouts and contiguous
    (median of `repeats`, times its count in the step), and the whole sequence back to back, twice."""
    device = torch.device("cuda")
    by_signature: dict[tuple, list[float]] = collections.defaultdict(list)
    for name, signature, milliseconds in calls:
        by_signature[(name, signature)].append(milliseconds)
    pool = ArgumentPool([signature for _, signature in by_signature], device)

    def call_of(name, signature, contiguous=False):
        args, kwargs = pool.build(signature, contiguous)
        kernel = kernels[name]
        return lambda: kernel(*args, **dict(kwargs))

    rows = []
    for phase, contiguous in (("replay alone, the graph's layouts", False), ("replay alone, contiguous", True)):
        if clock_log:
            clock_log.mark(phase)
        for index, ((name, signature), in_step) in enumerate(by_signature.items()):
            alone = gpu_milliseconds(call_of(name, signature, contiguous), repeats)
            if not contiguous:
                rows.append({"kernel": name, "calls": len(in_step), "in_step_ms": round(sum(in_step), 2),
                             "alone_ms": round(alone * len(in_step), 2), "arguments": signature})
            else:
                rows[index]["contiguous_ms"] = round(alone * len(in_step), 2)
    if clock_log:
        clock_log.mark("replay, the step's sequence back to back")
    sequence = [call_of(name, signature) for name, signature, _ in calls]
    sequence_seconds = []
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for run in sequence:
            run()
        end.record()
        end.synchronize()
        sequence_seconds.append(start.elapsed_time(end) / 1000)
    sequence.clear()
    pool.buffers.clear()
    torch.cuda.empty_cache()

    totals = collections.defaultdict(lambda: collections.Counter())
    for row in rows:
        kind = "convolution" if "conv" in row["kernel"] else "matrix product"
        for column in ("in_step_ms", "alone_ms", "contiguous_ms"):
            totals[kind][column] += row[column]
            totals["all"][column] += row[column]
    rows.sort(key=lambda row: row["alone_ms"] - row["in_step_ms"])  # the most slowed-down in the step first
    return {"calls": len(calls), "distinct_calls": len(rows),
            "seconds": {kind: {column.removesuffix("_ms") + "_s": round(ms / 1000, 3) for column, ms in columns.items()}
                        for kind, columns in totals.items()},
            "sequence_back_to_back_s": [round(s, 3) for s in sequence_seconds],
            "slowest_in_step_against_alone": rows[:top]}


class ClockLog:
    """The GPU's SM clock, power and clock-event reasons every 100 ms through nvidia-smi, grouped by phase."""

    FIELDS = ("clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active")

    def __init__(self, interval_ms: int = 100):
        self.phase, self.samples, self.error = "start", [], None
        try:
            self.process = subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(self.FIELDS)}", "--format=csv,noheader,nounits",
                                             f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as error:
            self.process, self.error = None, str(error)
            return
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            parts = [part.strip() for part in line.split(",")]
            if len(parts) != len(self.FIELDS):
                self.error = line.strip()
                continue
            try:
                reasons = int(parts[3], 16) if parts[3].startswith("0x") else 0
                self.samples.append((self.phase, float(parts[0]), float(parts[1]), float(parts[2]), reasons))
            except ValueError:
                self.error = line.strip()

    def mark(self, phase: str) -> None:
        self.phase = phase

    def summary(self) -> dict:
        if self.process:
            self.process.terminate()
        phases: dict[str, list] = collections.defaultdict(list)
        for sample in self.samples:
            phases[sample[0]].append(sample)
        result = {phase: {"samples": len(rows), "sm_mhz_mean": round(statistics.mean(r[1] for r in rows)),
                          "sm_mhz_min": min(r[1] for r in rows), "sm_mhz_max": max(r[1] for r in rows),
                          "power_w_mean": round(statistics.mean(r[2] for r in rows)), "power_w_max": max(r[2] for r in rows),
                          "temperature_c_max": max(r[3] for r in rows),
                          "event_reasons": hex(functools.reduce(operator.or_, (r[4] for r in rows), 0))}
                  for phase, rows in phases.items()}
        if self.error:
            result["nvidia_smi_said"] = self.error
        return result


@contextlib.contextmanager
def annotated(regions: dict):
    """Wraps each `(owner, attribute)` -> label in a profiler range for the duration (to name what the CPU does)."""
    originals = {}
    for (owner, attribute), label in regions.items():
        original = getattr(owner, attribute)
        originals[(owner, attribute)] = original

        def wrapped(*args, _original=original, _label=label, **kwargs):
            with torch.profiler.record_function(_label):
                return _original(*args, **kwargs)

        setattr(owner, attribute, wrapped)
    try:
        yield
    finally:
        for (owner, attribute), original in originals.items():
            setattr(owner, attribute, original)


def gpu_idle(trace_path, minimum_us: float = 10.0, top: int = 12) -> dict:
    """From a profiler's Chrome trace: the time with no kernel, copy or memset on the GPU between the first and last
    kernel, in gaps of at least `minimum_us`; per gap, the CPU's waiting runtime calls overlapping it and the
    innermost annotated region at the launch of the kernel that ended it."""
    with open(trace_path) as file:
        events = json.load(file)["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("correlation")) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    waiting = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(w in e["name"] for w in WAITING_CALLS)]
    regions = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events if e.get("cat") == "user_annotation")
    if not gpu:
        return {"error": "no GPU kernels in the trace"}
    busy_end, gaps, busy = gpu[0][1], [], 0.0
    for start, end, correlation in gpu:
        if start - busy_end >= minimum_us:
            gaps.append((busy_end, start, launches.get(correlation)))
        busy += max(0.0, end - max(start, busy_end))
        busy_end = max(busy_end, end)
    by_region, by_wait, late_launch = collections.Counter(), collections.Counter(), 0.0
    for start, end, launched in gaps:
        length = end - start
        at = launched if launched is not None else start
        inside = [r for r in regions if r[0] <= at <= r[1]]
        by_region[min(inside, key=lambda r: r[1] - r[0])[2] if inside else "outside the annotated regions"] += length
        overlapping = {name for w_start, w_end, name in waiting if w_start < end and w_end > start}
        by_wait[", ".join(sorted(overlapping)) or "no waiting call (the CPU was launching)"] += length
        if launched is not None and launched > start:
            late_launch += min(length, launched - start)
    span = gpu[-1][1] - gpu[0][0]
    return {"span_s": round(span / 1e6, 3), "kernel_busy_s": round(busy / 1e6, 3),
            "idle_s": round(sum(e - s for s, e, _ in gaps) / 1e6, 3), "gaps": len(gaps),
            "idle_by_region_s": {k: round(v / 1e6, 3) for k, v in by_region.most_common(top)},
            "idle_by_waiting_call_s": {k: round(v / 1e6, 3) for k, v in by_wait.most_common(top)},
            "idle_until_the_next_kernel_was_launched_s": round(late_launch / 1e6, 3),
            "longest_gaps_us": sorted((round(e - s) for s, e, _ in gaps), reverse=True)[:top]}


def anatomy(run_step, regions: dict, trace_path, clock_log: "ClockLog | None" = None, variants: dict | None = None) -> dict:
    """One compiled step timed plainly, then once in each variant (label -> context manager factory), one profiled,
    and one with its products recorded, then replayed (last: the replay's buffers change what the allocator holds)."""
    result = {}

    def timed(label: str, context=contextlib.nullcontext) -> float:
        if clock_log:
            clock_log.mark(label)
        with context():
            started = time.perf_counter()
            seconds = run_step()  # the step's own figure where it gives one (e.g. the steady state of a longer run)
            return round(seconds if isinstance(seconds, float) else time.perf_counter() - started, 3)

    result["step_s"] = timed("compiled step")
    result["variants_step_s"] = {label: timed(f"compiled step, {label}", context) for label, context in (variants or {}).items()}
    from torch.profiler import ProfilerActivity, profile

    with annotated(regions), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as recorder:
        result["profiled_step_s"] = timed("compiled step, profiled")
    recorder.export_chrome_trace(str(trace_path))
    result["gpu_idle"] = gpu_idle(trace_path)
    if clock_log:
        clock_log.mark("compiled step, products recorded")
    with ProductRecorder() as recorder:
        run_step()
    result["products"] = replay_products(recorder.take(), recorder.originals, clock_log)
    if clock_log:
        clock_log.mark("after")
    return result
