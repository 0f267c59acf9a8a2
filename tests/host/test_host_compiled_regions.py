"""MV4D Compile Blocks' patch: the repeated UNet blocks compiled in place while the model samples.

Run with torch.compile's "eager" backend (Dynamo's graph capture without inductor's code generation, which
would take minutes on a CPU): the capture, the dynamic batch and the in-place installation are the same; the
GPU lane and bench/composition_step.py --compile-blocks run inductor.
"""

from __future__ import annotations

import pytest
import torch

from mv4d_tiny_models import svd_family_unet
from test_host_exact_savings import svd_inputs, unet_call


@pytest.fixture
def fresh_dynamo(comfy):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def wrapped_call(patcher, videos: int, frames: int = 3):
    """One UNet call of `videos` videos, through the patcher's APPLY_MODEL wrappers as sampling runs it."""
    x, context, conds = svd_inputs(frames * videos)
    conds["num_video_frames"] = frames
    return unet_call(patcher, x, context, transformer_options={"wrappers": patcher.wrappers}, **conds)


def test_regions_are_the_resblocks_and_feed_forwards_without_nesting(comfy):
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    from mv4d.integration.compiled_regions import region_paths

    unet = svd_family_unet("svd").model.diffusion_model
    paths = region_paths(unet)
    modules = [unet.get_submodule(path) for path in paths]
    assert any(isinstance(m, openaimodel.VideoResBlock) for m in modules)
    assert any(isinstance(m, attention.FeedForward) for m in modules)
    # every block of those classes is in exactly one region: its own, or the one around it (SVD's VideoResBlock
    # holds a ResBlock of its own)
    everything = [name for name, module in unet.named_modules() if isinstance(module, (openaimodel.ResBlock, attention.FeedForward))]
    assert all(sum(name == path or name.startswith(f"{path}.") for path in paths) == 1 for name in everything)
    assert not any(a != b and b.startswith(f"{a}.") for a in paths for b in paths)


def test_compiled_blocks_give_the_same_prediction_and_are_removed_after_the_call(fresh_dynamo):
    from mv4d.integration.compiled_regions import region_paths, with_compiled_regions

    plain = svd_family_unet("svd", seed=0)
    compiled = with_compiled_regions(plain, backend="eager", persistent_cache=False)
    expected = wrapped_call(plain, videos=2)
    assert torch.allclose(wrapped_call(compiled, videos=2), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert fresh_dynamo["stats"]["unique_graphs"] > 0  # it did compile
    unet = plain.model.diffusion_model
    assert all(unet.get_submodule(path).__dict__.get("_compiled_call_impl") is None for path in region_paths(unet))


def test_every_chunk_size_runs_the_same_compiled_graphs(fresh_dynamo):
    from mv4d.integration.compiled_regions import with_compiled_regions

    compiled = with_compiled_regions(svd_family_unet("svd", seed=0), backend="eager", persistent_cache=False)
    wrapped_call(compiled, videos=2)
    graphs = fresh_dynamo["stats"]["unique_graphs"]
    for videos in (3, 5, 2):  # what automatic chunking picks while it learns the memory
        wrapped_call(compiled, videos=videos)
    assert fresh_dynamo["stats"]["unique_graphs"] == graphs


def test_compiled_code_is_kept_under_comfyuis_user_folder_unless_the_user_chose(comfy, monkeypatch, tmp_path):
    import folder_paths
    from mv4d.integration.compiled_regions import CACHE_FOLDER, with_compiled_regions

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    with_compiled_regions(svd_family_unet("svd"), backend="eager")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / CACHE_FOLDER / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / CACHE_FOLDER / "triton")
    # inductor's own default, which it writes into the environment on first use, is not the user's choice
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    with_compiled_regions(svd_family_unet("svd"), backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / CACHE_FOLDER / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    with_compiled_regions(svd_family_unet("svd"), backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
