"""MV4D Fuse Elementwise's patch: stand-ins for GEGLU and the video UNets' spatial / temporal mixer.

On the CPU the stand-ins run the eager formulas (backend None), so every prediction must be bit-identical to the
unpatched model: that checks each stand-in calls the right layers with the right parameters. torch.compile's
tracing (backend "aot_eager": the same graphs inductor compiles, run without generating code) must give the same
values too; the inductor kernels themselves are checked in bf16 on a GPU (tests/gpu/test_gpu_speedups.py).
"""

from __future__ import annotations

import pytest
import torch

from mv4d_tiny_models import svd_family_unet, tiny_sd_model
from test_host_composition import cameras, grid_conditioning, grid_noise, models, references, sample  # noqa: F401
from test_host_exact_savings import svd_inputs, unet_call


@pytest.fixture(scope="module")
def patch(comfy):
    from mv4d.integration.patches import fused_elementwise

    return fused_elementwise


def stand_ins_by_fusion(patch, model) -> dict:
    counts = {}
    for module in model.object_patches.values():
        for name, fusion in patch.FUSIONS.items():
            if isinstance(module, fusion.stand_in):
                counts[name] = counts.get(name, 0) + 1
    return counts


def test_every_fusion_finds_its_modules_in_svd_and_the_prediction_is_bit_identical(patch):
    plain = svd_family_unet("svd", seed=0)
    fused = patch.with_fused_elementwise(plain, backend=None)
    counts = stand_ins_by_fusion(patch, fused)
    print(f"\nfused stand-ins in the tiny SVD: {counts}")
    assert set(counts) == set(patch.FUSIONS) and patch.fused_module_count(fused) == sum(counts.values())
    x, context, conds = svd_inputs(frames=3)
    assert torch.equal(unet_call(fused, x, context, **conds), unet_call(plain, x, context, **conds))
    assert not plain.object_patches  # the clone was patched, not the model given


def test_a_text_model_fuses_its_geglu_and_is_unchanged(patch, comfy):
    import comfy.model_management
    import comfy.model_patcher

    model = tiny_sd_model("SD15")
    plain = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), comfy.model_management.unet_offload_device())
    fused = patch.with_fused_elementwise(plain, backend=None)
    assert set(stand_ins_by_fusion(patch, fused)) == {"geglu"}  # no video mixer in SD1.5
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features,
                          generator=generator)
    assert torch.equal(unet_call(fused, x, context), unet_call(plain, x, context))


def test_traced_kernels_give_the_same_prediction(patch):
    plain = svd_family_unet("svd", seed=0)
    fused = patch.with_fused_elementwise(plain, backend="aot_eager")
    x, context, conds = svd_inputs(frames=3)
    expected = unet_call(plain, x, context, **conds)
    difference = float((unet_call(fused, x, context, **conds) - expected).abs().max() / expected.abs().max())
    print(f"\ntraced fused glue vs eager, float32: relative difference {difference:.2e}")
    assert difference <= 1e-6


def test_weight_patches_reach_every_stand_in(patch):
    """A LoRA-like patch on a GEGLU projection and a mixer's factor changes the fused model's prediction
    exactly as it changes the plain model's, and the weight paths stay the original ones while sampling."""
    plain = svd_family_unet("svd", seed=0)
    state = plain.model_state_dict()
    keys = [next(k for k in state if k.endswith(suffix)) for suffix in
            ("ff.net.0.proj.weight", "time_mixer.mix_factor")]
    offsets = {key: (torch.full_like(state[key], 0.05),) for key in keys}
    plain_with_patch, fused_with_patch = plain.clone(), patch.with_fused_elementwise(plain, backend=None)
    for model in (plain_with_patch, fused_with_patch):
        model.add_patches(offsets, 1.0)
    fused_with_patch.patch_model()
    try:
        assert set(fused_with_patch.model.state_dict()) == set(state)
    finally:
        fused_with_patch.unpatch_model()
    x, context, conds = svd_inputs(frames=3)
    expected = unet_call(plain_with_patch, x, context, **conds)
    assert not torch.equal(expected, unet_call(plain, x, context, **conds))
    assert torch.equal(unet_call(fused_with_patch, x, context, **conds), expected)


def test_the_composed_grid_is_the_same_with_fused_models(patch, mv4d_nodes, models, cameras, references):  # noqa: F811
    """Beside the guider's own single-token shortcut, fused models give the same grid."""
    from mv4d.integration.composed_guider import ComposedGuider
    from mv4d.kernels.composition import GuiderSettings

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    grids = []
    for video, multiview in ((models["svd"][0], models["sv3d_p"][0]),
                             (patch.with_fused_elementwise(models["svd"][0], backend=None),
                              patch.with_fused_elementwise(models["sv3d_p"][0], backend=None))):
        grids.append(sample(ComposedGuider(video, multiview, conditioning, GuiderSettings()), grid_noise(), latent))
    assert torch.equal(grids[1], grids[0])


def test_patching_twice_keeps_one_stand_in_per_module(patch):
    plain = svd_family_unet("svd", seed=0)
    once = patch.with_fused_elementwise(plain, backend=None)
    twice = patch.with_fused_elementwise(once, backend=None)
    assert twice.object_patches.keys() == once.object_patches.keys()
    assert all(twice.object_patches[k] is once.object_patches[k] for k in once.object_patches)


def test_the_node_patches_on_this_machine_and_refuses_a_gpu_without_triton(patch, mv4d_nodes, monkeypatch):
    """On the CPU the node gives the stand-ins with the eager formulas (nothing to compile for); on a CUDA device
    without Triton it refuses, naming node, input and fix."""
    import mv4d.kernels.fused_elementwise as kernels
    import mv4d.nodes.speed as speed
    from mv4d_host_helpers import run_node
    from test_host_composition import error_of

    plain = svd_family_unet("svd", seed=0)
    fused = run_node(speed.FuseElementwiseNode, model=plain).result[0]
    assert patch.fused_module_count(fused) == 36
    assert all(m.kernels is patch.fused_kernels(None) for m in fused.object_patches.values() if isinstance(m, patch.FusedGEGLU))
    x, context, conds = svd_inputs(frames=3)
    assert torch.equal(unet_call(fused, x, context, **conds), unet_call(plain, x, context, **conds))

    monkeypatch.setattr(speed.host, "compute_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(kernels, "has_triton", lambda: False)
    message = error_of(lambda: run_node(speed.FuseElementwiseNode, model=plain))
    assert message.startswith("MV4D Fuse Elementwise: input 'model'") and "Triton" in message and "Fix: install Triton" in message
