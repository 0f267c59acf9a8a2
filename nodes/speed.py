"""Nodes that make sampling faster at some cost in exactness (optional, off unless wired in)."""

from __future__ import annotations

from comfy_api.latest import io

from ..kernels.fp8_matmul import FP8_CAPABILITY, gpu_has_fp8_matmuls
from ..integration import host
from ..integration.patches.fp8_matmuls import with_fp8_matmuls
from ..integration.node_errors import input_error

FP8_NODE = "MV4D FP8 Matmuls"


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

