"""Nodes that make sampling faster (optional, off unless wired in): compiled UNet blocks (the same result up to
floating-point rounding) and fp8 matrix products (changes the result)."""

from __future__ import annotations

from comfy_api.latest import io

from ..kernels.fp8_matmul import FP8_CAPABILITY, gpu_has_fp8_matmuls
from ..integration import host
from ..integration.compiled_regions import CACHE_FOLDER, with_compiled_regions
from ..integration.patches.fp8_matmuls import with_fp8_matmuls
from ..integration.node_errors import input_error

FP8_NODE = "MV4D FP8 Matmuls"
COMPILE_NODE = "MV4D Compile Blocks"


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


class CompileBlocksNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MV4D_CompileBlocks",
            display_name=COMPILE_NODE,
            category="mv4d/speed",
            description="Optional speed-up: torch.compile (inductor) of the UNet's repeated blocks (ResBlocks with "
                        "their temporal layers, feed-forward layers) instead of the whole UNet, compiled at the "
                        "first sampling step. Blocks of one shape share one compiled graph (SVD and SV3D share "
                        "theirs), every chunk size of MV4D Composed Guider runs the same graph, and the compiled code "
                        f"is kept in ComfyUI's user folder ({CACHE_FOLDER}), so later runs, also after a restart, "
                        "load it instead of compiling. The result is the same up to floating-point rounding. Needs "
                        "a working torch.compile (on Windows: Triton for Windows). One per model, before the guider "
                        "or sampler; see the README for measured first-run and later-run costs.",
            inputs=[
                io.Model.Input("model", tooltip="A diffusion model (e.g. SVD-XT or SV3D_p from its loader)."),
                io.Boolean.Input("keep_compiled_code", default=True,
                                 tooltip="Cache the compiled code on disk under ComfyUI's user folder (unless "
                                         "TORCHINDUCTOR_CACHE_DIR is set), so later runs start in seconds."),
            ],
            outputs=[io.Model.Output("compiled_model", display_name="model",
                                     tooltip="The same model; its repeated blocks run compiled while it samples.")],
        )

    @classmethod
    def execute(cls, model, keep_compiled_code) -> io.NodeOutput:
        return io.NodeOutput(with_compiled_regions(model, persistent_cache=keep_compiled_code))
