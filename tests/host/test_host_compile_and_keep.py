"""MV4D Compile and Keep: UNet calls compiled by torch.compile and kept whole on disk, on tiny SVD / SV3D models (CPU).

Properties: the compiled call gives the UNet's prediction and leaves one file; a new wrapper over the same folder
loads the file instead of compiling, also for another checkpoint of the same architecture (weights are read from
the module) and after a weight patch; a fresh Python process loads it and traces nothing; calls the rules refuse
run the UNet as before and compile nothing; a compile that fails leaves no file and the call still returns the
eager prediction; the composed grid is the same with both models compiled. Each compile builds C++ kernels on this
machine (tens of seconds on two cores), so the tests share the compiles they need.

ComfyUI's CPU attention (sub-quadratic, sized from free memory) cannot be traced whole; the GPU default, PyTorch's
attention, can, so these tests select it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mv4d_host_helpers import run_node
from mv4d_tiny_models import svd_family_unet
from test_host_composition import cameras, composed_guider, grid_conditioning, grid_noise, models, references, sample  # noqa: F401
from test_host_exact_savings import svd_inputs

TOLERANCE = 1e-5  # float32: inductor's fused kernels reorder sums
HERE = Path(__file__).resolve().parent


def unet_call(patcher, x: torch.Tensor, context: torch.Tensor, **conds) -> torch.Tensor:
    """One denoising call as sampling makes it: object and weight patches applied, and the patcher's
    transformer_options (attention patches) and wrappers handed to the UNet."""
    options = dict(patcher.model_options.get("transformer_options", {}), wrappers=patcher.wrappers)
    patcher.patch_model()
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, torch.full((x.shape[0],), 3.0), c_crossattn=context,
                                             transformer_options=options, **conds)
    finally:
        patcher.unpatch_model()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def keep(comfy):
    import comfy.ldm.modules.attention as attention

    import mv4d.integration.patches.precompiled_unet as keep

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "optimized_attention", attention.attention_pytorch)
        yield keep


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled_unets")


def compiled(keep, model, folder, min_images=1, max_shapes=4, first_compile="before the call", pieces=1):
    """A Compile and Keep clone of `model`. One piece (the whole UNet, one file per call) unless asked: the tests of
    where compiles run count processes per call; the default of four pieces has tests of its own."""
    return keep.with_compile_and_keep(model, min_images=min_images, max_shapes=max_shapes, folder=folder,
                                      first_compile=first_compile, pieces=pieces)


@pytest.fixture
def no_compiles(keep, monkeypatch):
    """From here on a compile fails the test: what follows must come from memory or disk, or run uncompiled."""
    def refuse(*args, **kwargs):
        raise AssertionError("a UNet call was compiled")

    for placement in keep.FIRST_COMPILE.values():
        monkeypatch.setattr(placement, "begin", refuse)


@pytest.fixture(scope="module")
def first_compile(keep, folder):
    """One tiny SVD call (one video of 3 frames) through a fresh folder: the compile every later test reuses."""
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()
    eager = unet_call(model, x, context, **conds)
    wrapped = compiled(keep, model, folder)
    result = unet_call(wrapped, x, context, **conds)
    return eager, result, keep.compiled_unets_of(wrapped)[0]


def test_a_compiled_call_gives_the_unets_prediction_and_leaves_one_file(first_compile, folder):
    eager, result, wrapper = first_compile
    print(f"\ncompile and keep, tiny SVD: relative difference {relative(result, eager):.2e}; {wrapper.events}")
    assert relative(result, eager) <= TOLERANCE
    assert [event for event in wrapper.events if "compiled" in event]
    assert [path.suffix for path in folder.iterdir()] == [".compiled"]  # no partial file beside it


@pytest.mark.parametrize("kind", ["svd", "sv3d_p"])
@pytest.mark.parametrize("pieces", [2, 3, 4, 30])
def test_the_unets_pieces_run_one_after_the_other_give_its_prediction_bit_for_bit(keep, kind, pieces):
    """The pieces mirror the UNet's forward over its own blocks: uncompiled, they compute exactly what it does, for
    every cut (30 asks for more pieces than the tiny UNet has blocks: one block each)."""
    from mv4d.integration.patches.unet_pieces import cut_unet

    model = svd_family_unet(kind, seed=0)
    unet = model.model.diffusion_model
    x, context, conds = svd_inputs()
    conds["y"] = torch.randn(x.shape[0], unet.label_emb[0][0].in_features, generator=torch.Generator().manual_seed(1))
    cut = cut_unet(unet, pieces)
    assert len(cut) == min(pieces, len(unet.input_blocks) + 1 + len(unet.output_blocks))
    assert sum(len(piece.blocks) for piece in cut) == len(unet.input_blocks) + 1 + len(unet.output_blocks)
    eager = unet_call(model, x, context, **conds)
    wrapped = compiled(keep, model, None, first_compile="before the call", pieces=pieces)
    (wrapper,) = keep.compiled_unets_of(wrapped)
    wrapper.compiled_for = lambda unit: None  # every piece uncompiled: the mirror alone
    assert torch.equal(unet_call(wrapped, x, context, **conds), eager)


def test_a_unet_compiled_in_pieces_gives_its_prediction_and_keeps_one_file_per_piece(keep, tmp_path):
    """The node's default: four pieces, four files; a second wrapper loads them and compiles nothing."""
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()
    eager = unet_call(model, x, context, **conds)
    wrapped = keep.with_compile_and_keep(model, min_images=1, max_shapes=4, folder=tmp_path,
                                         first_compile="before the call")
    (wrapper,) = keep.compiled_unets_of(wrapped)
    result = unet_call(wrapped, x, context, **conds)
    print(f"\ncompile and keep in pieces, tiny SVD: relative difference {relative(result, eager):.2e}; {wrapper.events}")
    assert relative(result, eager) <= TOLERANCE
    assert [event["unit"] for event in wrapper.events if "compiled" in event] == [
        f"piece {number} of 4 of the UNet" for number in range(1, 5)]
    assert len(list(tmp_path.glob("*.compiled"))) == 4
    again = keep.with_compile_and_keep(model, min_images=1, max_shapes=4, folder=tmp_path, first_compile="before the call")
    (second,) = keep.compiled_unets_of(again)
    second.placement.begin = lambda unit, path: pytest.fail("a piece was compiled again")
    assert torch.equal(unet_call(again, x, context, **conds), result)
    assert [list(event)[0] for event in second.events] == ["loaded"] * 4


def test_another_checkpoint_of_the_same_architecture_loads_the_file(keep, folder, first_compile, no_compiles):
    other = svd_family_unet("svd", seed=5)  # other weights, same layout
    x, context, conds = svd_inputs(seed=1)
    wrapped = compiled(keep, other, folder)
    result = unet_call(wrapped, x, context, **conds)
    eager = unet_call(other, x, context, **conds)
    assert relative(result, eager) <= TOLERANCE
    assert relative(eager, first_compile[0]) > 0.1  # really another model's prediction
    (wrapper,) = keep.compiled_unets_of(wrapped)
    assert [list(event) for event in wrapper.events] == [["loaded", "unit", "shape", "seconds"]]


def test_a_weight_patch_reaches_the_compiled_call(keep, folder, first_compile, no_compiles):
    model = svd_family_unet("svd", seed=0)
    key = "diffusion_model.input_blocks.0.0.weight"
    weight = model.model.state_dict()[key]
    model.add_patches({key: (0.5 * torch.ones_like(weight),)}, strength_patch=1.0)
    x, context, conds = svd_inputs()
    eager = unet_call(model, x, context, **conds)
    result = unet_call(compiled(keep, model, folder), x, context, **conds)
    assert relative(result, eager) <= TOLERANCE
    assert relative(eager, first_compile[0]) > 1e-3  # the patch changed the prediction


def test_a_fresh_process_loads_the_file_and_traces_nothing(keep, folder, first_compile):
    """What a restart of ComfyUI does: a new Python loads the kept file; Dynamo traces no frame."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(HERE)!r})
        root_conftest = importlib.util.spec_from_file_location("root_conftest", {str(HERE.parent / "conftest.py")!r})
        root_conftest.loader.exec_module(importlib.util.module_from_spec(root_conftest))  # the checkout as `mv4d`
        from conftest import HOST
        sys.path.insert(0, str(HOST))
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.ldm.modules.attention as attention
        attention.optimized_attention = attention.attention_pytorch
        import torch
        from torch._dynamo.utils import counters
        from mv4d_tiny_models import svd_family_unet
        from test_host_exact_savings import svd_inputs
        from test_host_compile_and_keep import unet_call
        from mv4d.integration.patches.precompiled_unet import compiled_unets_of, with_compile_and_keep
        model = with_compile_and_keep(svd_family_unet("svd", seed=0), min_images=1, max_shapes=4, folder={str(folder)!r},
                                      first_compile="before the call", pieces=1)
        x, context, conds = svd_inputs()
        torch.save(unet_call(model, x, context, **conds), sys.argv[1])
        print("EVENTS", compiled_unets_of(model)[0].events, "FRAMES", counters["stats"]["unique_graphs"])
    """)
    output = Path(folder).parent / "fresh_process_prediction.pt"
    run = subprocess.run([sys.executable, "-P", "-c", script, str(output)], capture_output=True, text=True,
                         timeout=600, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout.strip().splitlines()[-1])
    events = run.stdout.split("EVENTS")[-1]
    assert "'loaded'" in events and "'compiled'" not in events and events.rstrip().endswith("FRAMES 0")
    assert relative(torch.load(output), first_compile[0]) <= TOLERANCE


def test_calls_the_rules_refuse_run_the_unet_as_before(keep, folder, first_compile, no_compiles, caplog):
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()

    def doubled_attention(q, k, v, extra_options):  # an attention patch: Python the compiled code would freeze
        import comfy.ldm.modules.attention as attention

        return 2.0 * attention.optimized_attention(q, k, v, extra_options["n_heads"])

    patched = model.clone()
    patched.set_model_attn1_replace(doubled_attention, "input", 1)
    with caplog.at_level(logging.INFO):
        eager = unet_call(patched, x, context, **conds)
        result = unet_call(compiled(keep, patched, folder), x, context, **conds)
        small = unet_call(compiled(keep, model, folder, min_images=4), x, context, **conds)
    assert torch.equal(result, eager)
    assert torch.equal(small, unet_call(model, x, context, **conds))
    assert "patches_replace" in caplog.text and "fewer than min_images 4" in caplog.text
    assert len(list(folder.iterdir())) == 1


def test_a_call_that_cannot_be_compiled_runs_uncompiled_and_leaves_nothing(keep, tmp_path, monkeypatch, caplog):
    """ComfyUI's CPU attention asks the OS for free memory inside the UNet: no whole graph, so no file, the
    eager prediction, and one warning (the failure is remembered, not retried each step)."""
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(attention, "optimized_attention", attention.attention_sub_quad)
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()
    wrapped = compiled(keep, model, tmp_path)
    with caplog.at_level(logging.WARNING):
        first = unet_call(wrapped, x, context, **conds)
        second = unet_call(wrapped, x, context, **conds)
    assert torch.equal(first, unet_call(model, x, context, **conds)) and torch.equal(first, second)
    assert caplog.text.count("could not compile") == 1
    assert list(tmp_path.iterdir()) == []


def wait_for_compiles(wrapper, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while any(job.running() for job in wrapper.jobs.values()):
        assert time.monotonic() < deadline, "the compile process did not finish"
        time.sleep(0.5)


def test_beside_the_run_calls_run_uncompiled_until_a_worker_process_has_compiled(keep, tmp_path, caplog):
    """The first call starts a compile in a process of its own and runs eagerly (bit for bit the UNet's own
    prediction); once that process has saved the file, the next call loads it and runs compiled, and this process
    traced nothing."""
    from torch._dynamo.utils import counters

    model = svd_family_unet("svd", seed=0)
    with torch.inference_mode():  # as ComfyUI samples: inference tensors, which the saved guards check
        x, context, conds = svd_inputs()
    eager = unet_call(model, x, context, **conds)
    wrapped = compiled(keep, model, tmp_path, first_compile="beside the run")
    (wrapper,) = keep.compiled_unets_of(wrapped)
    frames = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.INFO), torch.inference_mode():
        first = unet_call(wrapped, x, context, **conds)
        assert torch.equal(first, eager) and wrapper.jobs and not wrapper.calls
        job_folder = next(iter(wrapper.jobs.values())).job
        wait_for_compiles(wrapper)
        second = unet_call(wrapped, x, context, **conds)
    print(f"\nbeside the run: {wrapper.events}; compiled vs eager {relative(second, eager):.2e}")
    assert "beside the run" in caplog.text and "does not accept" not in caplog.text  # the worker's code runs here
    assert [list(event)[0] for event in wrapper.events] == ["compiled", "loaded"]
    assert relative(second, eager) <= TOLERANCE
    assert counters["stats"]["unique_graphs"] == frames  # the compile was the worker's
    assert [path.suffix for path in tmp_path.iterdir()] == [".compiled"]
    assert not job_folder.exists()  # the job's folder went with it


def test_a_worker_that_fails_leaves_the_calls_uncompiled_with_its_reason(keep, tmp_path, monkeypatch, caplog):
    """A worker that cannot rebuild the module (here: told another fingerprint) exits with its reason; the calls
    stay eager, one warning says why, and no file is left."""
    import mv4d.integration.compile_worker as compile_worker

    write_job = compile_worker.write_job

    def with_wrong_fingerprint(*args, **kwargs):
        job = write_job(*args, **kwargs)
        header = json.loads((job / compile_worker.HEADER).read_text())
        (job / compile_worker.HEADER).write_text(json.dumps({**header, "fingerprint": "another"}))
        return job

    monkeypatch.setattr(keep, "write_job", with_wrong_fingerprint)
    model = svd_family_unet("svd", seed=0)
    x, context, conds = svd_inputs()
    wrapped = compiled(keep, model, tmp_path, first_compile="beside the run")
    (wrapper,) = keep.compiled_unets_of(wrapped)
    with caplog.at_level(logging.WARNING):
        first = unet_call(wrapped, x, context, **conds)
        job_folder = next(iter(wrapper.jobs.values())).job
        wait_for_compiles(wrapper)
        second = unet_call(wrapped, x, context, **conds)
    eager = unet_call(model, x, context, **conds)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert caplog.text.count("could not compile") == 1 and "differs from the one sent" in caplog.text
    assert list(tmp_path.iterdir()) == [] and not job_folder.exists()


def test_a_call_that_cannot_be_sent_to_a_compile_process_compiles_before_the_call(keep, tmp_path, monkeypatch, caplog):
    """Something on the model that does not pickle (here: a function left on the UNet, as a timing hook would be):
    the shape goes to the compile before the call instead (stubbed here: nothing compiles), with a line saying why."""
    model = svd_family_unet("svd", seed=0)
    model.model.diffusion_model.hook = lambda: None  # a local function: pickle refuses it
    x, context, conds = svd_inputs()
    started = []
    monkeypatch.setattr(keep.CompileBeforeTheCall, "begin", lambda self, call, path: started.append(path))
    jobs_before = set(Path(tempfile.gettempdir()).glob("mv4d-compile-*"))
    with caplog.at_level(logging.INFO):
        result = unet_call(compiled(keep, model, tmp_path, first_compile="beside the run"), x, context, **conds)
    assert "cannot be sent to a compile process" in caplog.text and len(started) == 1
    assert torch.equal(result, unet_call(model, x, context, **conds))  # no compile came of it: the UNet as before
    assert set(Path(tempfile.gettempdir()).glob("mv4d-compile-*")) == jobs_before  # no job folder left behind


class StandInGpu:
    """A GPU as MV4D Compile and Keep's placement asks it (integration/patches/precompiled_unet.py CudaMemory), with
    set figures in GiB, for calls that run on the CPU."""

    def __init__(self, keep, free: float, call_peak: float, cached: float = 0.0):
        self.memory = keep.DeviceMemory(int(free * 2**30), int(cached * 2**30))
        self.call_peak, self.measured = int(call_peak * 2**30), 0

    def now(self, device):
        return self.memory

    def peak_of(self, device, run):
        self.measured += 1
        return run(), self.call_peak


class StandInProcess:
    """A compile process: running until `code` is set."""

    def __init__(self, code=None):
        self.code = code

    def poll(self):
        return self.code

    def wait(self):
        return self.code


@pytest.fixture
def beside_on_a_gpu(keep, tmp_path, monkeypatch):
    """A wrapper compiling beside the run whose GPU is a StandInGpu; compile processes are StandInProcesses (their
    job folders are not written), `started` lists them and `before` the shapes sent to compile before the call
    (where they stay under way)."""
    class UnderWay(keep.CompileJob):
        def running(self):
            return True

    model = svd_family_unet("svd", seed=0)
    started, before = [], []
    monkeypatch.setattr(keep, "WORKER_COMPILES", {})
    monkeypatch.setattr(keep, "write_job", lambda *args, **kwargs: tmp_path / "job")
    monkeypatch.setattr(keep, "start_worker", lambda job, threads: started.append(StandInProcess()) or started[-1])
    monkeypatch.setattr(keep.CompileBeforeTheCall, "begin", lambda self, call, path: before.append(path) or UnderWay())
    wrapped = compiled(keep, model, tmp_path / "files", first_compile="beside the run")
    (wrapper,) = keep.compiled_unets_of(wrapped)
    return model, wrapped, wrapper, started, before


def test_on_a_gpu_a_compile_process_starts_at_a_shapes_second_call_where_the_room_beside_its_calls_holds_it(
        keep, beside_on_a_gpu, caplog):
    """The first call of a shape runs uncompiled and measured; the second starts the process, granted the weights
    plus its overhead. Both calls give the UNet's prediction bit for bit."""
    model, wrapped, wrapper, started, before = beside_on_a_gpu
    gpu = wrapper.placement.gpu = StandInGpu(keep, free=8, call_peak=4, cached=1)
    x, context, conds = svd_inputs()
    eager = unet_call(model, x, context, **conds)
    with caplog.at_level(logging.INFO):
        first = unet_call(wrapped, x, context, **conds)
        assert gpu.measured == 1 and not started and not before
        second = unet_call(wrapped, x, context, **conds)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(started) == 1 and not before and gpu.measured == 1 and "beside the run" in caplog.text
    (process,) = keep.WORKER_COMPILES.values()
    # its example inputs as the UNet gets them: x with c_concat stacked on (8 channels), context, y, timesteps
    examples = 4 * (3 * 8 * 8 * 8 + context.numel() + conds["y"].numel() + 3)
    assert process.gpu_bytes == keep.weight_bytes(model.model.diffusion_model) + examples + keep.WORKER_OVERHEAD_BYTES


def test_on_a_gpu_without_room_beside_the_calls_a_shape_compiles_before_the_call(keep, beside_on_a_gpu, caplog):
    """8 GiB free less a 7 GiB call peak leaves no room for a compile process's 1.5 GiB: the compile goes before
    the call (the 24 GiB card case, where two processes beside the run both ran out of memory), with the figures."""
    model, wrapped, wrapper, started, before = beside_on_a_gpu
    wrapper.placement.gpu = StandInGpu(keep, free=8, call_peak=7)
    x, context, conds = svd_inputs()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            unet_call(wrapped, x, context, **conds)
    assert not started and len(before) == 1
    assert "1.0 GiB of GPU memory left beside the run's calls, less than a compile process's 1.5 GiB" in caplog.text


def test_on_a_gpu_a_shape_waits_while_another_compile_process_holds_the_room_then_starts(keep, beside_on_a_gpu,
                                                                                          tmp_path, caplog):
    model, wrapped, wrapper, started, before = beside_on_a_gpu
    other = keep.WorkerCompile(StandInProcess(), tmp_path / "other job", tmp_path / "other.compiled", 3 * 2**30, "cpu")
    keep.WORKER_COMPILES[other.path] = other
    wrapper.placement.gpu = StandInGpu(keep, free=8, call_peak=4)  # 4 GiB beside the calls, 3 of them granted
    x, context, conds = svd_inputs()
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            unet_call(wrapped, x, context, **conds)
        assert not started and not before and caplog.text.count("waits for the ones under way") == 1
        other.process.code = 0  # the other compile has finished
        unet_call(wrapped, x, context, **conds)
    assert len(started) == 1 and not before


def test_on_a_gpu_a_process_beside_another_also_leaves_the_calls_peak_free_for_the_other_models_calls(
        keep, beside_on_a_gpu, tmp_path, caplog):
    """12 GiB free less a 4 GiB peak less 3 GiB granted leaves 5 GiB: enough for a process alone (1.5 GiB), not
    beside another one, which must also leave the peak free once more (5.5 GiB); with 16 GiB free it starts."""
    model, wrapped, wrapper, started, before = beside_on_a_gpu
    other = keep.WorkerCompile(StandInProcess(), tmp_path / "other job", tmp_path / "other.compiled", 3 * 2**30, "cpu")
    keep.WORKER_COMPILES[other.path] = other
    gpu = wrapper.placement.gpu = StandInGpu(keep, free=12, call_peak=4)
    x, context, conds = svd_inputs()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            unet_call(wrapped, x, context, **conds)
        assert not started and "waits for the ones under way" in caplog.text
        gpu.memory = keep.DeviceMemory(16 * 2**30, 0)
        unet_call(wrapped, x, context, **conds)
    assert len(started) == 1 and not before


def test_a_compile_process_that_ran_out_of_gpu_memory_starts_again_alone_then_compiles_before_the_call(
        keep, beside_on_a_gpu, monkeypatch, caplog):
    """The processes beside it (or another program) took the room after it started: it starts again when no other
    compile process runs on the GPU; out of memory alone too, its unit compiles before the call instead of running
    uncompiled for the rest of the run."""
    model, wrapped, wrapper, started, before = beside_on_a_gpu
    wrapper.placement.gpu = StandInGpu(keep, free=40, call_peak=4)
    monkeypatch.setattr(keep, "start_worker", lambda job, threads: started.append(StandInProcess(code=1)) or started[-1])
    monkeypatch.setattr(keep, "log_tail", lambda job: "torch.AcceleratorError: CUDA error: out of memory")
    other = keep.WorkerCompile(StandInProcess(), Path("other job"), Path("other.compiled"), 2**30, "cpu")
    keep.WORKER_COMPILES[other.path] = other
    x, context, conds = svd_inputs()
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            unet_call(wrapped, x, context, **conds)
        assert len(started) == 1 and not before  # out of memory at the second call; the other process still runs
        other.process.code = 0
        unet_call(wrapped, x, context, **conds)
    assert len(started) == 2 and len(before) == 1
    assert "beside others: it starts again when no other compile process runs" in caplog.text
    assert "ran out of GPU memory alone: compiling before the call instead" in caplog.text
    assert "could not compile" not in caplog.text


def test_beside_the_run_the_pieces_of_a_unet_compile_in_processes_side_by_side(keep, beside_on_a_gpu, tmp_path, caplog):
    """Four pieces: at the shape's second call four processes start, each granted its piece's weights and example
    inputs (together the UNet's weights once); the calls meanwhile give the UNet's prediction bit for bit."""
    model, _, _, started, before = beside_on_a_gpu
    wrapped = compiled(keep, model, tmp_path / "pieces", first_compile="beside the run", pieces=4)
    (wrapper,) = keep.compiled_unets_of(wrapped)
    wrapper.placement.gpu = StandInGpu(keep, free=40, call_peak=4)
    wrapper.placement.max_workers = 8
    x, context, conds = svd_inputs()
    eager = unet_call(model, x, context, **conds)
    with caplog.at_level(logging.INFO):
        results = [unet_call(wrapped, x, context, **conds) for _ in range(2)]
    assert all(torch.equal(result, eager) for result in results)
    assert len(started) == 4 and not before
    assert caplog.text.count("beside the run (a process of its own") == 4
    granted = sum(process.gpu_bytes for process in keep.WORKER_COMPILES.values())
    assert granted > keep.weight_bytes(model.model.diffusion_model) + 4 * keep.WORKER_OVERHEAD_BYTES


def test_a_worker_compiles_with_the_threads_given_unless_the_user_set_inductors(comfy, tmp_path, monkeypatch):
    from mv4d.integration import compile_worker

    started = []
    monkeypatch.setattr(compile_worker.subprocess, "Popen", lambda command, **options: started.append(options["env"]))
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    compile_worker.start_worker(tmp_path, 8)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    compile_worker.start_worker(tmp_path, 8)
    assert [env["TORCHINDUCTOR_COMPILE_THREADS"] for env in started] == ["8", "3"]


def test_a_failed_save_leaves_no_file(comfy, tmp_path, monkeypatch):
    from torch._dynamo.aot_compile import AOTCompiledFunction

    import mv4d.kernels.precompile as precompile

    def half_written(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", half_written)
    with pytest.raises(OSError, match="disk full"):
        precompile.build(linear_call, torch.nn.Linear(4, 4), (torch.randn(2, 4),), tmp_path / "linear.compiled")
    assert list(tmp_path.iterdir()) == []


def linear_call(module, x):  # module level: what precompile.build compiles must be
    return module(x)


def test_the_composed_grid_is_the_same_with_both_models_compiled(keep, mv4d_nodes, models, cameras, references, folder):  # noqa: F811
    """One call per model and evaluation (4 videos, 3 sets): two more files."""
    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    grids = []
    for wrap in (lambda m: m, lambda m: compiled(keep, m, folder)):
        guider = composed_guider(mv4d_nodes, models, conditioning, video_model=wrap(models["svd"][0]),
                                 multiview_model=wrap(models["sv3d_p"][0]), videos_per_call=4, multiview_sets_per_call=3)
        grids.append(sample(guider, grid_noise(), latent))
    print(f"\ncomposed grid with compiled UNets: relative difference {relative(grids[1], grids[0]):.2e}")
    assert relative(grids[1], grids[0]) <= 1e-4  # four steps of float32 differences
    assert len(list(folder.glob("*.compiled"))) == 3  # the first test's and one per model here


def test_the_node_keeps_files_and_compile_caches_in_comfyuis_user_folder(keep, mv4d_nodes, models, monkeypatch):  # noqa: F811
    import folder_paths
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as inductor sets it; restored afterwards
    wrapped = run_node(mv4d_nodes.CompileAndKeepNode, model=models["svd"][0], min_images=64, max_shapes=2,
                       first_compile="beside the run").result[0]
    (wrapper,) = keep.compiled_unets_of(wrapped)
    assert isinstance(wrapper.placement, keep.CompileBesideTheRun)
    user = Path(folder_paths.get_user_directory())
    assert wrapper.store.directory.is_relative_to(user)
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(user)
    assert wrapper.max_shapes == 2 and not keep.compiled_unets_of(models["svd"][0])  # the loader's model is untouched
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/the/user/chose")
    run_node(mv4d_nodes.CompileAndKeepNode, model=models["svd"][0], min_images=64, max_shapes=2, first_compile="before the call")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/the/user/chose"
