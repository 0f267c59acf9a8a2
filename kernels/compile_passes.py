"""Graph rewrites that inductor applies while it compiles a UNet call (exact: the same products, other kernels).

Why: inductor runs 2-d convolutions in channels-last layout (its layout optimisation), which on an H200 is up to 3x
faster than NCHW for the UNets' 1x1 and 3x3 convolutions, but it leaves 3-d convolutions in the layout their input
happens to have. The video UNets' temporal convolutions (kernel (3, 1, 1) over frames, SVD / SV3D) therefore ran
NCDHW, with cuDNN converting to and from NDHWC around each, 0.57 s of a Diffusion² joint step against 0.32 s in
NDHWC (bench/matmul_shapes.py, bench/RESULTS.md). The pass asks for NDHWC (channels_last_3d) input and weights at
every 5-d convolution; the input usually is that memory already, as the channels-last (b t) c h w activations
rearranged to b c t h w are exactly the NDHWC layout, so the rearranges around the convolution stay views.
"""

from __future__ import annotations

import torch
from torch._inductor import inductor_prims
from torch._inductor.custom_graph_pass import CustomGraphPass

aten = torch.ops.aten


def channels_last_3d_strides(shape) -> list[int]:
    batch, channels, frames, height, width = shape
    return [channels * frames * height * width, 1, height * width * channels, width * channels, channels]


def is_video_convolution(node: torch.fx.Node) -> bool:
    """aten.convolution of a 5-d input and weight, not transposed and not grouped (what cuDNN runs well in NDHWC)."""
    if node.op != "call_function" or node.target is not aten.convolution.default:
        return False
    x, weight = node.args[0], node.args[1]
    if not all(isinstance(arg, torch.fx.Node) and arg.meta.get("val") is not None for arg in (x, weight)):
        return False
    transposed, groups = node.args[6], node.args[8]
    return weight.meta["val"].dim() == 5 and not transposed and groups == 1


class VideoConvolutionsChannelsLast(CustomGraphPass):
    """Post-grad pass: the input and weight of every 5-d convolution are asked for in channels_last_3d strides
    (inductor's force-stride-order prim: no copy where they already are, one copy where not)."""

    VERSION = "1"  # part of inductor's cache key (uuid): bump when the rewrite changes

    def __init__(self):
        self.rewritten = 0  # how many convolutions the last graph had rewritten (tests read it)

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewritten = 0
        for node in list(graph.nodes):
            if is_video_convolution(node):
                with graph.inserting_before(node):
                    arguments = list(node.args)
                    arguments[0], arguments[1] = (self.channels_last(graph, value) for value in node.args[:2])
                node.args = tuple(arguments)
                self.rewritten += 1
        if self.rewritten:
            graph.lint()

    @staticmethod
    def channels_last(graph: torch.fx.Graph, value: torch.fx.Node) -> torch.fx.Node:
        strides = channels_last_3d_strides(value.meta["val"].shape)
        forced = graph.call_function(inductor_prims.force_stride_order, (value, strides))
        forced.meta["val"] = inductor_prims.force_stride_order(value.meta["val"], strides)  # later passes read it
        return forced

    def uuid(self) -> str:
        return f"{type(self).__qualname__}-{self.VERSION}"


def inductor_options() -> dict:
    """The inductor options that install this module's passes (for torch.compile(options=...))."""
    return {"post_grad_custom_pre_pass": VideoConvolutionsChannelsLast()}
