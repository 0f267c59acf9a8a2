"""One joint Diffusion² composition step at the paper setting, through our actual guider inside ComfyUI.

Real-size SVD-XT and SV3D_p UNets are built from ComfyUI's own classes with the real configurations (1.52 B
parameters each; random weights: compute does not depend on the values), in bf16. A 21-view x 25-frame grid of
576 px (72 x 72 latents) with CFG on both models is denoised once by:
  - "fast": MV4D Composed Guider with automatic chunks (as many videos / multi-view sets per UNet call as fit)
    and its default exact savings (the single-token cross-attention shortcut, the short-sequence attention kernel);
  - "no_shortcut": "fast" without the shortcut (the path before it, for the saving it makes);
  - "no_short_attention": "fast" with PyTorch's attention in the temporal layers instead of mv4d's one-tile kernel;
  - "plain": the same guider with one video / one multi-view set per call (the per-row / per-column reference);
  - "fp8": "fast" with both models through MV4D FP8 Matmuls (optional speed-up; changes the result);
  - "alternate": "fast" with alternate_models (optional speed-up: one model per evaluation; changes the result),
    timed over the evaluations after the first (one runs the video model, the next the multi-view model);
  - "keep": both UNets through MV4D Compile and Keep (--keep-* options);
  - "side_by_side" / "keep_side_by_side" (after "keep"): "fast" / "keep" with the two models' calls of each
    evaluation side by side on two CUDA streams (roles_side_by_side; exact: the same calls in another order);

Reports seconds per step, UNet FLOPs (torch's flop counter), achieved TFLOP/s, the share of the step outside the
UNets (CUDA events around every UNet forward), peak VRAM, and the projected image -> 4D time. One JSON line.

    python -P bench/composition_step.py                        # paper setting, CUDA
    python -P bench/composition_step.py --memory-cap-gib 24    # as on a 24 GB card (another process holds the rest)
    python -P bench/composition_step.py --paths fast,fp8,alternate --no-flops   # the optional speed-ups, side by side
    python -P bench/composition_step.py --paths no_shortcut,fast --profile   # the exact saving, and where the time goes
    python -P bench/composition_step.py --paths fast --decode --no-flops   # also the row decode: seconds, TFLOP, channels-last
    OMP_NUM_THREADS=1 python -P bench/composition_step.py --tiny --views 3 --frames 4 --size 64   # CPU smoke run

Needs a ComfyUI source tree at $COMFYUI_DIR or ~/ComfyUI (its Python requirements installed).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# decoding and the 4D fit at the paper setting, measured separately (bench/RESULTS.md), for the projection
FIT_SECONDS_H200 = 27.6


def import_host(cpu: bool):
    host = Path(os.environ.get("COMFYUI_DIR", Path.home() / "ComfyUI"))
    if not (host / "comfy").is_dir():
        sys.exit(f"no ComfyUI at {host}: set COMFYUI_DIR")
    sys.path.insert(0, str(host))
    sys.path.insert(1, str(ROOT / "tests" / "host"))  # the SVD-family model builder the tests use
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    if "mv4d" not in sys.modules:  # the repository root is the package mv4d
        spec = importlib.util.spec_from_file_location("mv4d", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["mv4d"])
    import mv4d.integration.composed_guider as composed_guider  # no comfy_api needed: runs on a bare GPU machine

    return composed_guider


def emulate_card(cap_gib: float) -> subprocess.Popen | None:
    """As on a card of cap_gib: another process takes all but cap_gib of the GPU, so ComfyUI sees (and can use)
    what such a card has, and this process is capped at cap_gib as well. Returns the holding process."""
    free, total = torch.cuda.mem_get_info()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    ballast = free - int(cap_gib * 2**30)
    if ballast <= 0:
        return None
    # it holds the memory until its stdin closes, i.e. until this process ends, however it ends
    code = ("import torch, sys; x = torch.empty(%d, dtype=torch.uint8, device='cuda'); "
            "print('held', flush=True); sys.stdin.read()" % ballast)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def with_channels_last(model):
    """A clone whose UNet runs in channels-last layout: 4-d convolution weights channels_last, 5-d (the temporal
    (3, 1, 1) convolutions) channels_last_3d, and the input channels_last, so NHWC flows through the network and
    the (b c h w -> b (h w) c) rearranges become views. The weights are converted in place (layout only, the
    values are unchanged) at the first call after loading."""
    import comfy.patcher_extension

    def run(executor, x, *args, **kwargs):
        for module in executor.class_obj.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, torch.nn.modules.conv._ConvNd) and weight is not None:
                layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d if weight.dim() == 5 else None
                if layout is not None and not weight.is_contiguous(memory_format=layout):
                    weight.data = weight.data.contiguous(memory_format=layout)
        return executor(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_channels_last", run)
    return patched


def random_grid_conditioning(views: int, frames: int, latent: int, context_dim: int):
    """The guider's conditioning with random reference embeddings and latents (cost does not depend on them)."""
    import importlib

    build = importlib.import_module("mv4d.integration.grid_conditioning").grid_conditioning  # after import_host
    generator = torch.Generator().manual_seed(0)

    def references(count):
        return (torch.randn(count, 1, context_dim, generator=generator),
                torch.randn(count, 4, latent, latent, generator=generator))

    azimuths = [360.0 * (v + 1) / views for v in range(views)]
    from mv4d.kernels.composition import ReferenceSettings

    ref = ReferenceSettings()
    return build(*references(views), *references(frames), [10.0] * views, azimuths, ref.fps, ref.motion_bucket_id,
                 ref.video_augmentation, ref.multiview_augmentation)


class UNetTimer:
    """CUDA events around every UNet forward of the given models (no host sync inside the step)."""

    def __init__(self, models):
        self.pairs = []
        for model in models:
            unet = model.model.diffusion_model
            original = unet.forward

            def timed(*args, _original=original, **kwargs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = _original(*args, **kwargs)
                end.record()
                self.pairs.append((start, end))
                return out

            unet.forward = timed

    def take_seconds(self) -> float:
        torch.cuda.synchronize()
        seconds = sum(start.elapsed_time(end) for start, end in self.pairs) / 1000
        self.pairs.clear()
        return seconds


KERNEL_KINDS = (  # CUDA kernel name fragments -> where the time goes; the first kind that matches
    # first: inductor names its fused kernels after the operators they hold (triton_poi_fused_convolution_0), which
    # an earlier order counted as convolutions (0.6-0.9 s of the compiled step, bench/RESULTS.md)
    ("fused (triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("gemm / convolution", ("gemm", "sm90_", "sm80_", "cutlass", "xmma", "conv", "implicit", "nchwtonhwc", "nhwctonchw", "cudnn", "scaled_mm")),
    ("norms", ("norm",)),
)


def kernel_time_shares(events) -> dict:
    """Share of CUDA kernel time by kind, from torch.profiler's key averages (fused triton kernels of compiled code
    hold elementwise work, norms and reductions together)."""
    totals: dict[str, float] = {}
    for event in events:
        name, us = event.key.lower(), event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        if us <= 0 or name.startswith(("profilerstep", "aten::", "cuda")):
            continue
        kind = next((kind for kind, fragments in KERNEL_KINDS if any(f in name for f in fragments)), "other elementwise")
        totals[kind] = totals.get(kind, 0.0) + us
    whole = sum(totals.values()) or 1.0
    return {"kernel_seconds": round(whole / 1e6, 3), **{kind: round(us / whole, 3) for kind, us in sorted(totals.items(), key=lambda kv: -kv[1])}}


def seconds_per_run_and_peak(run, repeats: int, peak: "PeakVram | None") -> tuple[float, float | None]:
    """Mean seconds of `repeats` calls of run after one warm-up call (model loading, kernel selection, gsplat's
    first compile), and the peak VRAM of the timed calls (None without a GPU)."""
    run()
    if peak:
        torch.cuda.synchronize()
        peak.start()
    begin = time.perf_counter()
    for _ in range(repeats):
        run()
    if peak:
        torch.cuda.synchronize()
    return round((time.perf_counter() - begin) / repeats, 4), (peak.gib() if peak else None)


class PeakVram:
    """The CUDA allocation peak since start(), although the composed guider resets CUDA's peak statistic when it
    measures a call of a new size: every reset first adds the peak so far."""

    def __init__(self):
        self.before_resets = 0
        original = torch.cuda.reset_peak_memory_stats

        def reset_keeping_the_peak(device=None):
            self.before_resets = max(self.before_resets, torch.cuda.max_memory_allocated(device))
            original(device)

        self.reset = original
        torch.cuda.reset_peak_memory_stats = reset_keeping_the_peak

    def start(self) -> None:
        self.before_resets = 0
        self.reset()

    def gib(self) -> float:
        return round(max(self.before_resets, torch.cuda.max_memory_allocated()) / 2**30, 2)


class BatchSizes:
    """The batch of every UNet call per model (to report what automatic chunking chose)."""

    def __init__(self):
        import comfy.samplers

        self.calls: list[tuple[str, int]] = []
        original = comfy.samplers.calc_cond_batch

        def recorded(model, conds, x, *args, **kwargs):
            self.calls.append((type(model).__name__, x.shape[0]))
            return original(model, conds, x, *args, **kwargs)

        comfy.samplers.calc_cond_batch = recorded

    def take(self) -> dict:
        sizes: dict[str, list[int]] = {}
        for name, batch in self.calls:
            sizes.setdefault(name, []).append(batch)
        self.calls.clear()
        return sizes


def time_row_decode(frames: int, latent: int, cuda: bool) -> dict:
    """One row (a video at one view) decoded as MV4D Decode Grid does, with SVD's VAE architecture (ComfyUI builds
    it, temporal decoder included, when it sees this key; random weights): its seconds, its TFLOP (torch's flop
    counter: the convolutions and the mid-block attention), and the same with the decoder's weights channels-last
    (4-d and 5-d), the layout whose convolutions ran fastest in the UNets (bench/RESULTS.md), to see what the decode
    leaves on the table."""
    import comfy.sd
    from mv4d_tiny_models import init_weights
    from torch.utils.flop_counter import FlopCounterMode

    vae = comfy.sd.VAE(sd={"decoder.mid.block_1.mix_factor": torch.zeros(1)})
    init_weights(vae.first_stage_model, 3)
    row = torch.randn(frames, 4, latent, latent) * 0.5

    def timed() -> tuple[float, torch.Tensor]:
        vae.decode(row)  # warm-up: loading, kernel selection
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        images = vae.decode(row)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, images

    with torch.inference_mode():
        seconds, images = timed()
        with FlopCounterMode(display=False) as counter:
            vae.decode(row)
        for parameter in vae.first_stage_model.parameters():
            if parameter.dim() in (4, 5):
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last if parameter.dim() == 4 else torch.channels_last_3d)
        seconds_channels_last, images_channels_last = timed()
    tflop = counter.get_total_flops() / 1e12
    return {"decode_row_seconds": round(seconds, 3), "decode_row_tflop": round(tflop, 2),
            "decode_row_tflops_per_s": round(tflop / seconds, 1),
            "decode_row_seconds_channels_last": round(seconds_channels_last, 3),
            "decode_channels_last_max_difference": float(f"{(images_channels_last - images).abs().max().item():.3g}")}


def keep_events(models) -> list[dict]:
    from mv4d.integration.patches.precompiled_unet import compiled_unets_of

    return [event for model in models for wrapper in compiled_unets_of(model) for event in wrapper.events]


def step_anatomy(run_step, guider_module, folder: Path, clock_log) -> dict:
    """bench/step_anatomy.py's measurements of the compiled step, with the regions of the CPU's work named, and the
    step again as the guider ran it before its CPU-to-GPU copies per UNet call were removed (the copies put back)."""
    import contextlib

    import comfy.samplers
    from mv4d.integration.patches.precompiled_unet import CompiledUNet
    from mv4d.kernels.precompile import CompiledCall
    from step_anatomy import anatomy

    guider = guider_module.ComposedGuider
    regions = {(comfy.samplers, "calc_cond_batch"): "ComfyUI calc_cond_batch", (comfy.samplers, "cfg_function"): "ComfyUI cfg_function",
               (guider, "predict_noise"): "guider predict_noise", (guider, "_role_prediction"): "guider _role_prediction",
               (guider, "_denoise"): "guider _denoise", (CompiledUNet, "__call__"): "Compile and Keep's wrapper",
               (CompiledUNet, "compiled_for"): "Compile and Keep's rules, key and guard check",
               (CompiledCall, "__call__"): "the compiled code (its guards, then its launches)"}

    @contextlib.contextmanager
    def patched(**replacements):
        originals = {name: getattr(guider_module, name) for name in replacements}
        for name, value in replacements.items():
            setattr(guider_module, name, value)
        try:
            yield
        finally:
            for name, value in originals.items():
                setattr(guider_module, name, value)

    cfg_scales = guider_module.cfg_scales
    conds_left_on_the_cpu = {"conds_on_device": lambda conds, device: conds}
    scales_copied = {"cfg_scales": lambda first, last, count, device=None: cfg_scales(first, last, count).to(device)}
    variants = {"as before: conds on the CPU and CFG scales copied per call": lambda: patched(**conds_left_on_the_cpu, **scales_copied)}
    folder.mkdir(parents=True, exist_ok=True)
    return anatomy(run_step, regions, folder / "compiled_step_trace.json", clock_log, variants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=21)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", type=int, default=576, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run) instead of the real architectures")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per path after one warm-up step")
    parser.add_argument("--paths", default="fast,plain", help="comma-separated: fast, plain, no_shortcut, no_short_attention, fp8, alternate, channels_last, fused, fused_<fusion>, keep, side_by_side, keep_side_by_side (after keep)")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0, help="emulate a card of this size (0: whole GPU)")
    parser.add_argument("--no-flops", action="store_true", help="skip the flop count (one extra step)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both UNets as core TorchCompileModel does (inductor; the first step compiles)")
    parser.add_argument("--keep-folder", default="compiled_unets",
                        help="path keep (MV4D Compile and Keep on both UNets): the folder its compiled calls are kept in")
    parser.add_argument("--keep-min-images", type=int, default=64, help="path keep: min_images of the node")
    parser.add_argument("--keep-pieces", type=int, default=4,
                        help="MV4D Compile and Keep: pieces each UNet is compiled in (1: whole, one file per call)")
    parser.add_argument("--keep-first-compile", default="before the call", choices=["before the call", "beside the run"],
                        help="path keep: first_compile of the node; 'beside the run' times every step until the "
                             "compiles are in (at most --keep-beside-limit seconds)")
    parser.add_argument("--keep-beside-limit", type=float, default=420.0)
    parser.add_argument("--keep-without-compile-passes", action="store_true",
                        help="path keep: compile without kernels/compile_passes.py (the code before them, for a side-by-side "
                             "figure; in-process compiles only, so use it with --keep-first-compile 'before the call')")
    parser.add_argument("--per-call", default="0,0",
                        help="fast path: videos and multi-view sets per UNet call (0: as many as fit), e.g. 7,5")
    parser.add_argument("--decode", action="store_true",
                        help="also time decoding one row (all frames) with SVD's real-size temporal VAE decoder")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step (torch.profiler): top kernels to stderr, time shares by kernel kind in the JSON")
    parser.add_argument("--profile-rows", type=int, default=25, help="with --profile: how many kernels the table lists")
    parser.add_argument("--profile-ops", action="store_true", help="with --profile: also the top operators with the lines that call them")
    parser.add_argument("--profile-path", default="fast", help="the paths (comma-separated) whose step --profile profiles")
    parser.add_argument("--evaluations", type=int, default=1, choices=range(1, 6),
                        help="joint evaluations per sampling run; above 1 the step is timed over all but the first")
    parser.add_argument("--anatomy", default="", metavar="DIR",
                        help="path keep: after the timed steps, bench/step_anatomy.py's measurements (the compiled "
                             "step's products replayed alone, GPU idle gaps and their causes, clocks); its trace goes to DIR")
    parser.add_argument("--without-short-attention", action="store_true",
                        help="every path without the short-sequence attention kernel (PyTorch's attention in the temporal layers)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms per shape (ComfyUI's --fast autotune)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    clock_log = None
    if args.anatomy and cuda:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from step_anatomy import ClockLog

        clock_log = ClockLog()
        clock_log.mark("building the models")
    holder = emulate_card(args.memory_cap_gib) if cuda and args.memory_cap_gib else None
    guider_module = import_host(cpu=not cuda)
    ComposedGuider = guider_module.ComposedGuider
    import comfy.samplers
    from mv4d.kernels.composition import GuiderSettings
    from mv4d_tiny_models import CONTEXT_DIM, REAL_SIZE, TINY_SIZE, svd_family_unet

    size, context_dim = (TINY_SIZE, CONTEXT_DIM) if args.tiny else (REAL_SIZE, 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    video_model = svd_family_unet("svd", 0, size, dtype)
    multiview_model = svd_family_unet("sv3d_p", 1, size, dtype)
    build_seconds = time.perf_counter() - started
    latent = args.size // 8
    conditioning = random_grid_conditioning(args.views, args.frames, latent, context_dim)
    noise = torch.randn(args.views * args.frames, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    empty = torch.zeros_like(noise)
    # Euler steps of one sampling run; with more than one, the step's figure is the mean of the evaluations after the
    # first (the steady state of a long run: ComfyUI's per-run set-up, e.g. emptying PyTorch's cache, stays out)
    sigmas = torch.tensor([700.0, 500.0, 350.0, 250.0, 180.0, 120.0][:args.evaluations + 1])
    alternate_sigmas = torch.tensor([700.0, 500.0, 350.0, 250.0])
    sampler = comfy.samplers.sampler_object("euler")
    if args.compile:
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        for model in (video_model, multiview_model):  # what core TorchCompileModel does to a MODEL
            # static shapes: the two UNets share one forward() code object, and a "recompile" for the second
            # model's batch would otherwise switch dynamo to slow-to-compile dynamic shapes
            set_torch_compile_wrapper(model=model, backend="inductor", dynamic=False,
                                      options={"guard_filter_fn": lambda entries: [("transformer_options" not in e.name) for e in entries]})
    # The UNet timer's wrapped forward does not pickle, which sending a call to a compile process needs
    beside = "keep" in args.paths.split(",") and args.keep_first_compile == "beside the run"
    timer = UNetTimer([video_model, multiview_model]) if cuda and not args.compile and not beside else None
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "dtype": str(dtype),
              "views": args.views, "frames": args.frames, "size": args.size, "tiny": args.tiny,
              "memory_cap_gib": args.memory_cap_gib or None, "compile": args.compile, "cudnn_benchmark": args.cudnn_benchmark, "without_short_attention": args.without_short_attention, "per_call": args.per_call, "build_seconds": round(build_seconds, 1)}

    channels_last_models = None
    if "channels_last" in args.paths.split(","):
        channels_last_models = tuple(with_channels_last(m) for m in (video_model, multiview_model))
    fused_models = {}
    for path in [p for p in args.paths.split(",") if p.startswith("fused")]:
        from mv4d.integration.patches.fused_elementwise import ALL_FUSIONS, FUSIONS, with_fused_elementwise

        fusions = ALL_FUSIONS if path == "fused" else (FUSIONS[path.removeprefix("fused_")],)
        fused_models[path] = tuple(with_fused_elementwise(m, fusions) for m in (video_model, multiview_model))
    fp8_models = None
    if "fp8" in args.paths.split(","):
        from mv4d.integration.patches.fp8_matmuls import with_fp8_matmuls

        fp8_models = (with_fp8_matmuls(video_model), with_fp8_matmuls(multiview_model))
    keep_models = None
    if "keep" in args.paths.split(","):
        logging.getLogger().setLevel(logging.INFO)  # the compiles and loads, as they happen
        from mv4d.integration.patches.precompiled_unet import with_compile_and_keep
        from mv4d.kernels.precompile import keep_compile_caches_in

        keep_compile_caches_in(Path(args.keep_folder).resolve() / "torch_compile_cache")  # as the node does, beside the files
        if args.keep_without_compile_passes:
            import mv4d.kernels.compile_passes

            mv4d.kernels.compile_passes.inductor_options = lambda: {}
        keep_models = tuple(with_compile_and_keep(m, min_images=args.keep_min_images, max_shapes=4, folder=Path(args.keep_folder),
                                                  first_compile=args.keep_first_compile, pieces=args.keep_pieces)
                            for m in (video_model, multiview_model))
    batch_sizes = BatchSizes()
    peak = PeakVram() if cuda else None

    outputs = {}  # each path's sampled grid, to compare the exact ones with "fast"

    def run(path: str, per_call: tuple[int, int]) -> float:
        """One joint evaluation (for "alternate": three, timed over the last two); its seconds."""
        models = {"fp8": fp8_models, "channels_last": channels_last_models, "keep": keep_models, "keep_side_by_side": keep_models,
                  **fused_models}.get(path) or (video_model, multiview_model)
        settings = GuiderSettings(videos_per_call=per_call[0], multiview_sets_per_call=per_call[1],
                                  alternate_models=path == "alternate",  # otherwise the official defaults
                                  single_token_shortcut=path != "no_shortcut",
                                  short_sequence_attention=path != "no_short_attention" and not args.without_short_attention,
                                  roles_side_by_side=path.endswith("side_by_side"))
        guider = ComposedGuider(*models, conditioning, settings)
        seconds = []
        original = guider.predict_noise

        def timed_predict(*a, **k):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            return out

        guider.predict_noise = timed_predict
        with torch.inference_mode():
            outputs[path] = guider.sample(noise, empty, sampler, alternate_sigmas if path == "alternate" else sigmas, disable_pbar=True, seed=0).float().cpu()
        return sum(seconds[1:]) / len(seconds[1:]) if path == "alternate" or len(seconds) > 1 else seconds[0]

    flops = None
    for path in [p for p in args.paths.split(",") if p]:
        per_call = (1, 1) if path == "plain" else tuple(int(n) for n in args.per_call.split(","))
        started = time.perf_counter()
        if clock_log:
            clock_log.mark(f"{path}: warm-up" + (" and the steps beside the compiles" if path == "keep" and beside else ""))
        run(path, per_call)  # warm-up (model loading, allocator, kernel selection, measuring chunk memory, compiling)
        warm_up = time.perf_counter() - started
        if path == "keep" and args.keep_first_compile == "beside the run":
            from mv4d.integration.patches.precompiled_unet import compiled_unets_of

            wrappers = [wrapper for model in keep_models for wrapper in compiled_unets_of(model)]
            beside = [{"step_seconds": round(warm_up, 2), "done_at": round(warm_up, 1), "compiled_shapes": 0}]
            while any(w.jobs for w in wrappers) and time.perf_counter() - started < args.keep_beside_limit:  # until each compile is in
                seconds = run(path, per_call)
                beside.append({"step_seconds": round(seconds, 2), "done_at": round(time.perf_counter() - started, 1),
                               "compiled_shapes": sum(len(w.calls) for w in wrappers)})
                print(json.dumps({"keep_beside_step": beside[-1]}), file=sys.stderr, flush=True)
            result["keep_beside_the_run"] = {"steps": beside, "events": keep_events(keep_models)}
            warm_up = time.perf_counter() - started
        if path == "keep":  # before the timed steps, so a time limit still leaves it
            from torch._dynamo.utils import compilation_time_metrics

            print(json.dumps({"keep_warm_up_seconds": round(warm_up, 1), "keep_events": keep_events(keep_models),
                              "phases": {name: round(sum(values), 1) for name, values in compilation_time_metrics.items()
                                         if sum(values) >= 0.5}}), file=sys.stderr, flush=True)
        if timer:
            timer.take_seconds()
        batch_sizes.take()
        if peak:
            peak.start()
        steps, unet = [], []
        if clock_log:
            clock_log.mark(f"{path}: timed steps")
        for index in range(args.repeats):
            steps.append(run(path, per_call))
            unet.append(timer.take_seconds() if timer else float("nan"))
            if path == "keep":  # as it happens
                print(json.dumps({"keep_step": index, "seconds": round(steps[-1], 2), "events": keep_events(keep_models)}),
                      file=sys.stderr, flush=True)
        step = min(steps)
        entry = {"step_seconds": round(step, 3), "steps_seconds": [round(s, 3) for s in steps],
                 "warm_up_seconds": round(warm_up, 1),
                 "graphs_compiled_so_far": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                 "batches": {name: sorted(set(sizes)) for name, sizes in batch_sizes.take().items()}}
        if timer and path != "alternate":
            entry["unet_seconds"] = round(unet[steps.index(step)], 3)
            entry["outside_unet_share"] = round(1 - unet[steps.index(step)] / step, 4)
        if path == "keep":  # what the warm-up compiled or loaded, with seconds
            entry["keep_events"] = keep_events(keep_models)
        if cuda:
            entry["peak_vram_gib"] = peak.gib()
            entry["weights_loaded_gib"] = {type(m.model).__name__: [round(m.loaded_size() / 2**30, 2), round(m.model_size() / 2**30, 2)]
                                           for m in (video_model, multiview_model)}
        if path in ("fast", "no_shortcut") and not args.no_flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                run(path, per_call)
            if path == "fast":
                flops = counter.get_total_flops()
                result["step_tflop"] = round(flops / 1e12, 1)
            else:  # the same step's work, with what the shortcut skips
                entry["step_tflop"] = round(counter.get_total_flops() / 1e12, 1)
        if flops and path in ("fast", "plain"):
            entry["tflops_per_s"] = round(flops / step / 1e12, 1)
            if "unet_seconds" in entry:
                entry["unet_tflops_per_s"] = round(flops / entry["unet_seconds"] / 1e12, 1)
        if path == "keep" and clock_log:
            entry["anatomy"] = step_anatomy(functools.partial(run, path, per_call), guider_module, Path(args.anatomy), clock_log)
            print(json.dumps({"anatomy": entry["anatomy"]}), file=sys.stderr, flush=True)
        if path in args.profile_path.split(",") and args.profile and cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as recorder:
                run(path, per_call)
            events = recorder.key_averages()
            print(f"== {path}\n" + events.table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=110), file=sys.stderr)
            entry["kernel_time_shares"] = kernel_time_shares(events)
            if args.profile_ops:  # which PyTorch operators, called from which line, take the kernel time
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as recorder:
                    run(path, per_call)
                table = recorder.key_averages(group_by_stack_n=3).table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=40)
                print(f"== operators of {path}\n{table}", file=sys.stderr)
        result[path] = entry
        print(json.dumps({path: entry}), file=sys.stderr, flush=True)  # partial results survive a time limit
    if args.decode:
        result.update(time_row_decode(args.frames, latent, cuda))
        result["projected_decode_seconds"] = round(result["decode_row_seconds"] * args.views, 1)
    if "fast" in result and "plain" in result:
        result["speedup_fast_vs_plain"] = round(result["plain"]["step_seconds"] / result["fast"]["step_seconds"], 3)
    if args.compile or keep_models:
        from torch._dynamo.utils import compilation_time_metrics, counters

        # where compiling spent its time (seconds per phase, summed over graphs) and what PyTorch's caches served
        result["compile_phase_seconds"] = {name: round(sum(values), 1) for name, values in compilation_time_metrics.items()
                                           if sum(values) >= 0.5}
        result["compile_cache_counters"] = {key: value for key, value in counters["inductor"].items() if "cache" in key}
        result["compile_cache_counters"].update({f"aot_{key}": value for key, value in counters["aot_autograd"].items() if "cache" in key})
    speedups = ("fp8", "alternate", "channels_last", "fused", "fused_geglu", "fused_alpha_blend", "keep", "side_by_side")
    for path in speedups:  # the optional speed-ups against the exact fast path of the same run
        if "fast" in result and path in result:
            result[f"speedup_{path}_vs_fast"] = round(result["fast"]["step_seconds"] / result[path]["step_seconds"], 3)
    if "keep" in outputs and "keep_side_by_side" in outputs:  # the same compiled calls, in another order on the GPU
        result["keep_side_by_side"]["max_difference_vs_keep"] = (outputs["keep_side_by_side"] - outputs["keep"]).abs().max().item()
        result["speedup_side_by_side_vs_keep"] = round(result["keep"]["step_seconds"] / result["keep_side_by_side"]["step_seconds"], 3)
    for path in ("plain", "no_shortcut", "no_short_attention", "channels_last", "keep", "side_by_side", *fused_models):  # exact (up to rounding): their grid against "fast"
        if "fast" in outputs and path in outputs:
            difference = (outputs[path] - outputs["fast"]).abs().max() / outputs["fast"].abs().max()
            result[path]["max_difference_vs_fast_relative"] = float(f"{difference.item():.3g}")
    if "fast" in result and "no_shortcut" in result:
        result["speedup_shortcut"] = round(result["no_shortcut"]["step_seconds"] / result["fast"]["step_seconds"], 3)
    if "fast" in result and "no_short_attention" in result:
        result["speedup_short_attention"] = round(result["no_short_attention"]["step_seconds"] / result["fast"]["step_seconds"], 3)
    if "fast" in result:
        # 50 steps, the first 10 evaluated twice (rollback): 60 joint evaluations; the reference row and column
        # cost one row / one column per step with CFG (about 2 / (V + F) of a joint step each)
        step = result["fast"]["step_seconds"]
        sampling = 60 * step + 50 * step * 2 / (args.views + args.frames)
        result["projected_sampling_seconds"] = round(sampling, 1)
        result["projected_image_to_4d_seconds_without_decode"] = round(sampling + FIT_SECONDS_H200, 1)
        if "projected_decode_seconds" in result:
            result["projected_image_to_4d_seconds"] = round(
                sampling + FIT_SECONDS_H200 + result["projected_decode_seconds"] * (1 + 2 / args.views), 1)
    if holder:
        holder.kill()
    if clock_log:
        result["clocks_by_phase"] = clock_log.summary()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
