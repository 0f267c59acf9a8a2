"""Exact savings: work skipped because it cannot change the result, each checked equal to the path it replaces.

The single-token cross-attention shortcut: SVD / SV3D attend to one CLIP token, so the queries' projection and the
attention are skipped; the composed grid is the same with it, text-conditioned models are untouched, and weight
patches (LoRA) still reach the projections it uses.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mv4d_tiny_models import CONTEXT_DIM, svd_family_unet, tiny_sd_model
from test_host_composition import cameras, grid_conditioning, grid_noise, models, references, sample  # noqa: F401

TOLERANCE = 1e-5  # float32: one projection of one token instead of the same projection broadcast over all queries


@pytest.fixture(scope="module")
def shortcut(comfy):
    from mv4d.integration.patches.single_token_attention import with_single_token_attention

    return with_single_token_attention


def unet_call(patcher, x: torch.Tensor, context: torch.Tensor, **conds) -> torch.Tensor:
    """One denoising call of the patcher's model, with its object and weight patches applied as sampling does."""
    patcher.patch_model()
    try:
        sigma = torch.full((x.shape[0],), 3.0)
        with torch.no_grad():
            return patcher.model.apply_model(x, sigma, c_crossattn=context, **conds)
    finally:
        patcher.unpatch_model()


def svd_inputs(frames: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, 4, 8, 8, generator=generator)
    context = torch.randn(frames, 1, CONTEXT_DIM, generator=generator)
    conds = {"c_concat": torch.randn(frames, 4, 8, 8, generator=generator),
             "y": torch.randn(frames, 768, generator=generator), "num_video_frames": frames}
    return x, context, conds


def test_the_shortcut_gives_the_same_svd_prediction_with_fewer_flops(comfy, shortcut):
    plain = svd_family_unet("svd", seed=0)
    patched = shortcut(plain)
    x, context, conds = svd_inputs()
    counted = {}
    for name, model in (("plain", plain), ("patched", patched)):
        with FlopCounterMode(display=False) as flops:
            counted[name] = (unet_call(model, x, context, **conds), flops.get_total_flops())
    difference = (counted["patched"][0] - counted["plain"][0]).abs().max() / counted["plain"][0].abs().max()
    saved = 1 - counted["patched"][1] / counted["plain"][1]
    print(f"\nsingle-token shortcut, tiny SVD: relative difference {float(difference):.2e}, FLOPs saved {saved:.1%}")
    assert difference <= TOLERANCE
    assert counted["patched"][1] < counted["plain"][1]
    # the plain model itself is untouched by its clone's patch
    assert not any(type(m).__name__ == "SingleTokenCrossAttention" for m in plain.model.diffusion_model.modules())


def count_shortcuts(monkeypatch) -> list:
    """Every call that took the shortcut, from now on."""
    from mv4d.integration.patches.single_token_attention import SingleTokenCrossAttention

    taken, original = [], SingleTokenCrossAttention.forward

    def counting(self, x, context=None, value=None, mask=None, transformer_options=None):
        taken.append(context is not None and context.shape[1] == 1 and mask is None)
        return original(self, x, context, value, mask, transformer_options)

    monkeypatch.setattr(SingleTokenCrossAttention, "forward", counting)
    return taken


def test_the_composed_grid_is_the_same_with_the_shortcut(mv4d_nodes, models, cameras, references, monkeypatch):  # noqa: F811
    """The composed guider takes the shortcut by default; GuiderSettings(single_token_shortcut=False) is today's path."""
    from mv4d.integration.composed_guider import ComposedGuider
    from mv4d.kernels.composition import GuiderSettings

    conditioning, latent = grid_conditioning(mv4d_nodes, models, cameras, references)
    taken = count_shortcuts(monkeypatch)
    grids = []
    for shortcut in (False, True):
        guider = ComposedGuider(models["svd"][0], models["sv3d_p"][0], conditioning, GuiderSettings(single_token_shortcut=shortcut))
        grids.append(sample(guider, grid_noise(), latent))
        assert all(taken) and bool(taken) == shortcut  # the plain run takes none, the default one only shortcuts
    # the MODELs given carry no patch of it: the guider patched clones of them
    assert not models["svd"][0].object_patches and not models["sv3d_p"][0].object_patches
    difference = float((grids[1] - grids[0]).abs().max() / grids[0].abs().max())
    print(f"\ncomposed grid with vs without the shortcut: relative difference {difference:.2e}")
    assert difference <= TOLERANCE


def test_text_conditioned_models_take_the_original_path(comfy, shortcut):
    import comfy.model_management
    import comfy.model_patcher

    model = tiny_sd_model("SD15")
    plain = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), comfy.model_management.unet_offload_device())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features,
                          generator=generator)
    assert torch.equal(unet_call(shortcut(plain), x, context), unet_call(plain, x, context))


def test_weight_patches_reach_the_projections_the_shortcut_uses(comfy, shortcut):
    plain = svd_family_unet("svd", seed=0)
    key = next(k for k in plain.model_state_dict() if k.endswith("attn2.to_v.weight"))
    lora_like = {key: (torch.full_like(plain.model_state_dict()[key], 0.05),)}
    x, context, conds = svd_inputs()
    plain_with_patch, patched_with_patch = plain.clone(), shortcut(plain)
    for model in (plain_with_patch, patched_with_patch):
        model.add_patches(lora_like, 1.0)
    # while sampling (object patches applied), the weight paths are the original ones
    patched_with_patch.patch_model()
    try:
        assert set(patched_with_patch.model.state_dict()) == set(plain.model_state_dict())
    finally:
        patched_with_patch.unpatch_model()
    expected = unet_call(plain_with_patch, x, context, **conds)
    assert not torch.allclose(expected, unet_call(plain, x, context, **conds))
    assert torch.allclose(unet_call(patched_with_patch, x, context, **conds), expected, rtol=0, atol=TOLERANCE * float(expected.abs().max()))
