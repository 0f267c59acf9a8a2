"""MV4D Compile Blocks' patch: the UNet's blocks compiled in place while the model samples, one graph per block shape.

Run with torch.compile's "eager" backend (Dynamo's graph capture without inductor's code generation, which would
take minutes on a CPU): which graphs are captured, how they are shared and what they compute are the same; the GPU
lane (tests/gpu/test_gpu_speedups.py) and bench/composition_step.py --paths blocks run inductor.
"""

from __future__ import annotations

import os

import pytest
import torch

from mv4d_tiny_models import svd_family_unet
from test_host_composition import cameras, grid_conditioning, grid_noise, models, references, sample  # noqa: F401
from test_host_exact_savings import svd_inputs, unet_call

TOLERANCE = 1e-6  # relative: the compiled blocks see contiguous inputs, which can change float32 summation order


@pytest.fixture
def fresh_dynamo(comfy, monkeypatch):
    """A clean compile cache, and PyTorch's attention (what ComfyUI picks on a GPU): the sub-quadratic attention
    it picks on a CPU reads the free memory from /proc at every call, which torch.compile cannot trace."""
    import comfy.ldm.modules.attention as attention
    import torch._dynamo
    from torch._dynamo.utils import counters

    from mv4d.integration.compiled_blocks import compiled_block_call

    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
    torch._dynamo.reset()
    compiled_block_call.cache_clear()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    compiled_block_call.cache_clear()


def wrapped_call(patcher, videos: int = 2, frames: int = 3, transformer_options: dict | None = None):
    """One UNet call of `videos` videos, through the patcher's wrappers and transformer options as sampling runs it."""
    x, context, conds = svd_inputs(frames * videos)
    conds["num_video_frames"] = frames
    conds["y"] = torch.randn(frames * videos, patcher.model.adm_channels, generator=torch.Generator().manual_seed(2))
    options = {**patcher.model_options.get("transformer_options", {}), **(transformer_options or {}), "wrappers": patcher.wrappers}
    return unet_call(patcher, x, context, transformer_options=options, **conds)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_blocks_are_every_resblock_transformer_and_resampler_without_nesting(comfy):
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    from mv4d.integration.compiled_blocks import block_paths

    unet = svd_family_unet("svd").model.diffusion_model
    paths = block_paths(unet)
    kinds = {type(unet.get_submodule(path)) for path in paths}
    assert kinds == {openaimodel.VideoResBlock, attention.SpatialVideoTransformer, openaimodel.Downsample, openaimodel.Upsample}
    # every module of those classes is compiled exactly once: as a block, or inside the block around it (SVD's
    # VideoResBlock holds a ResBlock of its own)
    types = (openaimodel.ResBlock, attention.SpatialTransformer, openaimodel.Downsample, openaimodel.Upsample)
    everything = [name for name, module in unet.named_modules() if isinstance(module, types)]
    assert all(sum(name == path or name.startswith(f"{path}.") for path in paths) == 1 for name in everything)


def test_compiled_blocks_give_the_same_prediction_and_are_removed_after_the_call(fresh_dynamo):
    from mv4d.integration.compiled_blocks import block_paths, compiled_block_count, with_compiled_blocks

    plain = svd_family_unet("svd", seed=0)
    compiled = with_compiled_blocks(plain, backend="eager", persistent_cache=False)
    assert compiled_block_count(compiled) == len(block_paths(plain.model.diffusion_model)) and compiled_block_count(plain) == 0
    expected = wrapped_call(plain)
    difference = relative_difference(wrapped_call(compiled), expected)
    print(f"\ncompiled blocks vs eager, tiny SVD, float32: relative difference {difference:.2e}")
    assert difference <= TOLERANCE
    assert fresh_dynamo["stats"]["unique_graphs"] > 0  # it did compile
    unet = plain.model.diffusion_model
    assert all(unet.get_submodule(path).__dict__.get("_compiled_call_impl") is None for path in block_paths(unet))


def block_shapes(unet) -> set:
    """The distinct blocks of a UNet by what a compiled graph depends on: class and parameter shapes."""
    from mv4d.integration.compiled_blocks import block_paths

    return {(type(block), tuple(tuple(p.shape) for p in block.parameters()))
            for block in map(unet.get_submodule, block_paths(unet))}


def test_one_graph_per_block_shape_shared_by_svd_sv3d_and_every_chunk_size(fresh_dynamo):
    """SVD (its frames) and SV3D (its views: another frame count, the same blocks) and every call size the
    composed guider picks while it learns the memory run the graphs the first call compiled."""
    from mv4d.integration.compiled_blocks import block_paths, with_compiled_blocks

    svd = with_compiled_blocks(svd_family_unet("svd", seed=0), backend="eager", persistent_cache=False)
    sv3d = with_compiled_blocks(svd_family_unet("sv3d_p", seed=1), backend="eager", persistent_cache=False)
    unet = svd.model.diffusion_model
    wrapped_call(svd, videos=2, frames=3)
    graphs = fresh_dynamo["stats"]["unique_graphs"]
    print(f"\ntiny SVD: {len(block_paths(unet))} blocks, {len(block_shapes(unet))} block shapes, {graphs} graphs")
    assert graphs == len(block_shapes(unet)) < len(block_paths(unet))
    for videos, frames in ((3, 3), (5, 3), (2, 4)):  # chunk sizes, and SV3D's other view count
        wrapped_call(svd, videos=videos, frames=frames)
        wrapped_call(sv3d, videos=videos, frames=frames)
    assert fresh_dynamo["stats"]["unique_graphs"] == graphs


def test_attention_patches_see_each_blocks_position(fresh_dynamo):
    """With a patch that depends on where it runs, blocks keep their positions in transformer_options (one graph
    per position): the compiled prediction is the patched eager one, which differs from the unpatched."""
    from mv4d.integration.compiled_blocks import with_compiled_blocks

    def by_position(n, extra_options):
        stage, index = extra_options["block"]
        return n * (1.0 + 0.1 * index + 0.2 * (stage == "output") + 0.05 * extra_options["block_index"])

    plain = svd_family_unet("svd", seed=0)
    patched = plain.clone()
    patched.set_model_attn2_output_patch(by_position)
    compiled = with_compiled_blocks(patched, backend="eager", persistent_cache=False)
    expected = wrapped_call(patched)
    assert relative_difference(expected, wrapped_call(plain)) > 1e-2
    assert relative_difference(wrapped_call(compiled), expected) <= TOLERANCE


def test_the_composed_grid_is_the_same_with_compiled_blocks(fresh_dynamo, mv4d_nodes, models, cameras, references):  # noqa: F811
    """Through MV4D Composed Guider (its chunks, CFG, the single-token shortcut), compiled models give the grid."""
    from mv4d.integration.compiled_blocks import with_compiled_blocks
    from mv4d.kernels.composition import GuiderSettings
    from mv4d.integration.composed_guider import ComposedGuider

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    grids = []
    for video, multiview in ((models["svd"][0], models["sv3d_p"][0]),
                             (with_compiled_blocks(models["svd"][0], backend="eager", persistent_cache=False),
                              with_compiled_blocks(models["sv3d_p"][0], backend="eager", persistent_cache=False))):
        grids.append(sample(ComposedGuider(video, multiview, conditioning, GuiderSettings()), grid_noise(), latent))
    difference = relative_difference(grids[1], grids[0])
    print(f"\ncomposed grid, compiled blocks vs eager: relative difference {difference:.2e}")
    assert difference <= 1e-5


def test_compiled_code_is_kept_under_comfyuis_user_folder_unless_the_user_chose(comfy, monkeypatch, tmp_path):
    import folder_paths
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from mv4d.integration.compiled_blocks import CACHE_FOLDER, with_compiled_blocks

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    with_compiled_blocks(svd_family_unet("svd"), backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / CACHE_FOLDER / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / CACHE_FOLDER / "triton")
    # inductor's own default, which it writes into the environment on first use, is not the user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    with_compiled_blocks(svd_family_unet("svd"), backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / CACHE_FOLDER / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    with_compiled_blocks(svd_family_unet("svd"), backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"


def test_the_node_leaves_a_cpu_model_unchanged_and_refuses_a_gpu_without_triton(mv4d_nodes, monkeypatch):
    import mv4d.kernels.fused_elementwise as kernels
    import mv4d.nodes.speed as speed
    from mv4d.integration.compiled_blocks import compiled_block_count
    from mv4d_host_helpers import run_node
    from test_host_composition import error_of

    plain = svd_family_unet("svd", seed=0)
    assert run_node(speed.CompileBlocksNode, model=plain, keep_compiled_code=False).result[0] is plain

    monkeypatch.setattr(speed.host, "compute_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(kernels, "has_triton", lambda: False)
    message = error_of(lambda: run_node(speed.CompileBlocksNode, model=plain, keep_compiled_code=False))
    assert message.startswith("MV4D Compile Blocks: input 'model'") and "Triton" in message and "Fix: install Triton" in message
    monkeypatch.setattr(kernels, "has_triton", lambda: True)
    compiled = run_node(speed.CompileBlocksNode, model=plain, keep_compiled_code=False).result[0]
    assert compiled_block_count(compiled) > 0
