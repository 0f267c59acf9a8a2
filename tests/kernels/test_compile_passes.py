"""kernels/compile_passes.py: inside inductor's graph, 5-d (video) convolutions take channels_last_3d input and
weights, with the same numbers; transposed or grouped ones and 2-d ones are left as they are."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from mv4d.kernels.compile_passes import VideoConvolutionsChannelsLast, inductor_options


def video_block(x, temporal, bias, grouped, image):
    y = F.conv3d(x, temporal, bias, padding=(1, 0, 0))  # a video UNet's temporal convolution: asked for in NDHWC
    y = F.conv3d(torch.relu(y), grouped, None, padding=1, groups=2)  # grouped: left as it is
    frames = y.shape[2]
    y = y.permute(0, 2, 1, 3, 4).reshape(-1, *y.shape[1:2], *y.shape[3:])  # b c t h w -> (b t) c h w
    return F.conv2d(y, image, None, padding=1), frames  # 2-d: inductor's own layout choice


def inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 5, 6, 7, generator=generator), torch.randn(4, 4, 3, 1, 1, generator=generator),
            torch.randn(4, generator=generator), torch.randn(4, 2, 3, 3, 3, generator=generator),
            torch.randn(3, 4, 3, 3, generator=generator))


def forced_convolutions(graph: torch.fx.Graph) -> list[bool]:
    """For each convolution, whether its input and weight come through the force-stride-order prim."""
    from torch._inductor import inductor_prims

    return [all(getattr(arg, "target", None) is inductor_prims.force_stride_order for arg in node.args[:2])
            for node in graph.nodes if node.target is torch.ops.aten.convolution.default]


def test_only_ungrouped_video_convolutions_are_asked_for_in_channels_last_3d_and_the_graph_computes_the_same():
    arguments = inputs()
    module = make_fx(lambda *a: video_block(*a)[0], tracing_mode="fake")(*arguments)
    assert forced_convolutions(module.graph) == [False, False, False]
    rewrite = VideoConvolutionsChannelsLast()
    rewrite(module.graph)
    module.recompile()
    assert rewrite.rewritten == 1
    assert forced_convolutions(module.graph) == [True, False, False]
    assert torch.allclose(module(*arguments), video_block(*arguments)[0], rtol=1e-5, atol=1e-5)


def test_torch_compile_with_the_pass_matches_eager():
    arguments = inputs()
    options = inductor_options()
    compiled = torch.compile(lambda *a: video_block(*a)[0], options={**options, "fx_graph_cache": False})
    with torch.inference_mode():
        result = compiled(*arguments)
    assert options["post_grad_custom_pre_pass"].rewritten == 1  # the pass ran inside inductor
    assert torch.allclose(result, video_block(*arguments)[0], rtol=1e-4, atol=1e-4)


def test_the_pass_names_its_version_for_inductors_cache():
    assert VideoConvolutionsChannelsLast().uuid() == VideoConvolutionsChannelsLast().uuid()
    assert "VideoConvolutionsChannelsLast" in VideoConvolutionsChannelsLast().uuid()
