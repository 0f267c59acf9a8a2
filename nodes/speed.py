"""Nodes that make sampling faster at some cost in exactness (optional, off unless wired in)."""

from __future__ import annotations

from comfy_api.latest import io

import logging

from ..kernels.fp8_matmul import FP8_CAPABILITY, gpu_has_fp8_matmuls
from ..kernels.fused_elementwise import compile_backend, inductor_missing_reason
from ..kernels.precompile import keep_compile_caches_in, precompile_missing_reason
from ..integration import host
from ..integration.patches.fp8_matmuls import with_fp8_matmuls
from ..integration.patches.fused_elementwise import fused_module_count, with_fused_elementwise
from ..integration.patches.precompiled_unet import (NODE as KEEP_NODE, DEFAULT_PIECES, FIRST_COMPILE, compile_caches_folder,
                                                    compiled_folder, with_compile_and_keep)
from ..integration.node_errors import input_error

FP8_NODE = "MV4D FP8 Matmuls"
FUSE_NODE = "MV4D Fuse Elementwise"


class Fp8MatmulsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_FP8Matmuls",
            display_name=FP8_NODE,
            category="mv4d/speed",
            description="Optional speed-up, changes the result: the model's linear layers (attention projections, "
                        "feed-forward) run as fp8 (e4m3) matrix multiplications with per-row scales, quantized at each "
                        "call, so no second copy of the weights is kept. Needs fp8 tensor cores (compute capability "
                        "8.9+: RTX 40xx, L4 / L40, H100 / H200 or newer). Its effect on real-model quality is not "
                        "measured. Put it between a loader and MV4D Composed Guider (one per model).",
            inputs=[io.Model.Input("model", tooltip="A diffusion model (e.g. SVD-XT or SV3D_p from its loader).")],
            outputs=[io.Model.Output("fp8_model", display_name="model",
                                     tooltip="The same model; its linear layers run in fp8 while it samples.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        device = host.compute_device()
        if not gpu_has_fp8_matmuls(device):
            name = host.device_name(device)
            raise input_error(FP8_NODE, "model",
                              f"the compute device ({name}) has no fp8 tensor cores (needs compute capability "
                              f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer)",
                              "bypass or delete this node on this machine (Ctrl+B in the graph)")
        return io.NodeOutput(with_fp8_matmuls(model))



class FuseElementwiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_FuseElementwise",
            display_name=FUSE_NODE,
            category="mv4d/speed",
            description="Optional speed-up, the same result up to bf16 rounding: the model's GEGLU activations and the "
                        "video UNets' spatial / temporal mix run as one fused GPU kernel each (torch.compile, inductor), "
                        "instead of several passes over the activations. Measured on an H200 at the Diffusion² paper "
                        "setting: about 4 % less time per step; a few seconds of compilation in the first run, cached "
                        "by PyTorch for later runs. Needs Triton (Linux CUDA PyTorch has it). Works on any SD / SVD "
                        "family UNet and beside core TorchCompileModel. On the CPU the model is left unchanged.",
            inputs=[io.Model.Input("model", tooltip="A diffusion model (e.g. SVD-XT or SV3D_p from its loader).")],
            outputs=[io.Model.Output("fused_model", display_name="model",
                                     tooltip="The same model; its elementwise glue runs as fused kernels while it samples.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        device = host.compute_device()
        reason = inductor_missing_reason(device)
        if reason:
            raise input_error(FUSE_NODE, "model", reason,
                              "install Triton for this PyTorch (on Windows the 'triton-windows' package), or bypass "
                              "this node (Ctrl+B in the graph)")
        backend = compile_backend(device)
        if backend is None:
            logging.info("%s: fused kernels are compiled for CUDA GPUs only; on %s the model runs unchanged", FUSE_NODE,
                         host.device_name(device))
        fused = with_fused_elementwise(model, backend=backend)
        logging.info("%s: %d modules of the UNet fused", FUSE_NODE, fused_module_count(fused))
        return io.NodeOutput(fused)


class CompileAndKeepNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_CompileAndKeep",
            display_name=KEEP_NODE,
            category="mv4d/speed",
            description="Optional speed-up, the same result up to rounding: each UNet call shape is compiled once by "
                        "torch.compile (inductor, each UNet in a few pieces) and the compiled functions are kept whole "
                        "under ComfyUI's user folder (user/mv4d/compiled_unets, PyTorch's caches beside it). The first "
                        "run of a shape compiles it (about 1-1.5 minutes at the Diffusion² paper setting on an H200), by "
                        "default the pieces side by side in processes of their own while sampling starts uncompiled; later "
                        "runs, also after a restart, load it in seconds without tracing again. Weights are not in the "
                        "file, so any checkpoint of the same architecture reuses it. Calls with attention patches, "
                        "ControlNets, other model wrappers or low-VRAM loading run uncompiled. Fix the guider's videos_per_call / multiview_sets_per_call so shapes stay few. "
                        "Use instead of TorchCompileModel, one per model.",
            inputs=[
                io.Model.Input("model", tooltip="A diffusion model (e.g. SVD-XT or SV3D_p from its loader)."),
                io.Int.Input("min_images", default=64, min=1, max=100000,
                             tooltip="Calls with fewer images (batch items) run uncompiled: small calls, such as a "
                                     "reference row, cost little and would each cost a compile."),
                io.Int.Input("max_shapes", default=4, min=1, max=64,
                             tooltip="At most this many call shapes are compiled per model and run; calls of further "
                                     "shapes run uncompiled."),
                io.Combo.Input("first_compile", options=list(FIRST_COMPILE), default="beside the run",
                               tooltip="Where a shape's first compile runs. 'beside the run': in a process of its own "
                                       "(the models' compiles side by side) while sampling starts at once uncompiled "
                                       "and speeds up when the files are ready; it needs GPU room for a copy of each "
                                       "piece's weights, else that piece compiles before the call. 'before the call': "
                                       "the run waits for the compile."),
                io.Int.Input("pieces", default=DEFAULT_PIECES, min=1, max=32, optional=True,
                             tooltip="Each UNet is compiled in this many pieces (runs of its blocks), a file and, "
                                     "beside the run, a process each: the first compile takes about 1 / pieces as "
                                     "long where the machine has two CPU cores per process. 1: the whole UNet."),
            ],
            outputs=[io.Model.Output("compiled_model", display_name="model",
                                     tooltip="The same model; its UNet calls run compiled while it samples.")],
        )

    @classmethod
    def execute(cls, model, min_images, max_shapes, first_compile, pieces=DEFAULT_PIECES) -> io.NodeOutput:
        reason = precompile_missing_reason() or inductor_missing_reason(host.compute_device())
        if reason:
            raise input_error(KEEP_NODE, "model", reason,
                              "install PyTorch 2.10 or newer with Triton (Linux CUDA wheels have it), or bypass this "
                              "node (Ctrl+B in the graph)")
        keep_compile_caches_in(compile_caches_folder())
        logging.info("%s: compiled UNets are kept in %s", KEEP_NODE, compiled_folder())
        return io.NodeOutput(with_compile_and_keep(model, min_images=min_images, max_shapes=max_shapes,
                                                   first_compile=first_compile, pieces=pieces))

