"""MVDream / ImageDream in plain PyTorch: family detection and key maps on the released layouts, the camera
convention against MVDream's own camera function, and the adapter's modules."""

import pytest
import torch

from mv4d.kernels.cameras import mvdream_cameras, orbit_rig
from mv4d.kernels.errors import InvalidInput
from mv4d.kernels.models.multiview import (IMAGEDREAM, MVDREAM_SD15, MVDREAM_SD21, MultiviewAdapter, Resampler,
                                           detect_family, split_checkpoint)
from mv4d.kernels.models.sd_unet import block_key_of, transformer_block_keys

# MVDream 618f844, mvdream/camera_utils.py: get_camera(4, elevation=15, azimuth_start=90) (its t2i defaults), and
# ImageDream 26c3972 get_camera(4, elevation=5, azimuth_start=0): computed with their code, rounded to 1e-8.
C, S = 0.96592581, 0.25881904
MVDREAM_DEFAULT_CAMERAS = [
    [0, -S, C, C, 1, 0, 0, 0, 0, C, S, S, 0, 0, 0, 1],
    [-1, 0, 0, 0, 0, -S, C, C, 0, C, S, S, 0, 0, 0, 1],
    [0, S, -C, -C, -1, 0, 0, 0, 0, C, S, S, 0, 0, 0, 1],
    [1, 0, 0, 0, 0, S, -C, -C, 0, C, S, S, 0, 0, 0, 1],
]
C5, S5 = 0.99619472, 0.08715574
IMAGEDREAM_DEFAULT_CAMERAS = [
    [1, 0, 0, 0, 0, S5, -C5, -C5, 0, C5, S5, S5, 0, 0, 0, 1],
    [0, -S5, C5, C5, 1, 0, 0, 0, 0, C5, S5, S5, 0, 0, 0, 1],
    [-1, 0, 0, 0, 0, -S5, C5, C5, 0, C5, S5, S5, 0, 0, 0, 1],
    [0, S5, -C5, -C5, -1, 0, 0, 0, 0, C5, S5, S5, 0, 0, 0, 1],
]


def test_mvdream_cameras_match_mvdream_and_imagedream_camera_functions_on_the_same_orbit():
    # MVDream's azimuth a is ours a - 90 (its cameras are normalised onto the unit sphere: radius plays no part)
    ours = mvdream_cameras(orbit_rig(4, 15.0, 3.7, 40.0, 256, 256, start_azimuth_deg=0.0))
    assert torch.allclose(ours, torch.tensor(MVDREAM_DEFAULT_CAMERAS), atol=1e-6)
    ours = mvdream_cameras(orbit_rig(4, 5.0, 2.0, 33.8, 256, 256, start_azimuth_deg=-90.0))
    assert torch.allclose(ours, torch.tensor(IMAGEDREAM_DEFAULT_CAMERAS), atol=1e-6)


def test_a_camera_at_the_origin_is_refused():
    rig = orbit_rig(2, 10.0, 2.0, 33.8, 64, 64)
    with pytest.raises(InvalidInput, match="origin"):
        mvdream_cameras(rig.__class__(torch.eye(4).expand(2, 4, 4), rig.intrinsics, 64, 64))


def fake_unet(linear_proj: bool, context: int, camera=True, image_prompt=False) -> dict:
    """The keys (tiny tensors) that family detection and the key maps read."""
    unet = {"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "input_blocks.1.1.proj_in.weight": torch.zeros(8, 8) if linear_proj else torch.zeros(8, 8, 1, 1),
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context),
            "middle_block.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8),
            "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context)}
    if camera:
        unet.update({"camera_embed.0.weight": torch.zeros(32, 16), "camera_embed.0.bias": torch.zeros(32),
                     "camera_embed.2.weight": torch.zeros(32, 32), "camera_embed.2.bias": torch.zeros(32)})
    if image_prompt:
        unet.update({"image_embed.latents": torch.zeros(1, 4, 16), "image_embed.proj_in.weight": torch.zeros(16, 12),
                     "image_embed.proj_in.bias": torch.zeros(16), "image_embed.proj_out.weight": torch.zeros(context, 16),
                     "image_embed.proj_out.bias": torch.zeros(context), "image_embed.norm_out.weight": torch.zeros(context),
                     "image_embed.norm_out.bias": torch.zeros(context),
                     "image_embed.layers.0.0.to_q.weight": torch.zeros(64, 16), "image_embed.layers.0.1.1.weight": torch.zeros(64, 16)})
        for block in ("input_blocks.1.1", "output_blocks.3.1"):
            unet[f"{block}.transformer_blocks.0.attn2.to_k_ip.weight"] = torch.zeros(8, context)
            unet[f"{block}.transformer_blocks.0.attn2.to_v_ip.weight"] = torch.zeros(8, context)
    return unet


def test_families_are_told_apart_by_their_keys():
    assert detect_family(fake_unet(False, 768)) is MVDREAM_SD15
    assert detect_family(fake_unet(True, 1024)) is MVDREAM_SD21
    assert detect_family(fake_unet(True, 1024, image_prompt=True)) is IMAGEDREAM
    with pytest.raises(InvalidInput, match="plain Stable Diffusion model.*core Load Checkpoint"):
        detect_family(fake_unet(False, 768, camera=False))


def test_original_prefixes_split_into_parts():
    mvdream = {f"model.diffusion_model.{k}": v for k, v in fake_unet(False, 768).items()}
    mvdream.update({"first_stage_model.decoder.conv_in.weight": torch.zeros(1),
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
                    "betas": torch.zeros(1000)})
    checkpoint = split_checkpoint(mvdream)
    assert checkpoint.family is MVDREAM_SD15 and checkpoint.text_format == "hf" and not checkpoint.missing_parts
    assert "camera_embed.0.weight" in checkpoint.adapter and not any(k.startswith("camera_embed") for k in checkpoint.unet)
    assert list(checkpoint.vae) == ["decoder.conv_in.weight"] and list(checkpoint.text) == ["text_model.final_layer_norm.weight"]

    imagedream = {f"model.diffusion_model.{k}": v for k, v in fake_unet(True, 1024, image_prompt=True).items()}
    imagedream.update({"vae_model.decoder.conv_in.weight": torch.zeros(1), "clip_model.model.token_embedding.weight": torch.zeros(1),
                       "clip_model.model.visual.conv1.weight": torch.zeros(1)})
    checkpoint = split_checkpoint(imagedream)
    assert checkpoint.family is IMAGEDREAM and checkpoint.text_format == "open_clip"
    assert list(checkpoint.text) == ["token_embedding.weight"] and list(checkpoint.clip_vision) == ["visual.conv1.weight"]
    assert not any(k.endswith(("to_k_ip.weight", "to_v_ip.weight")) or k.startswith("image_embed") for k in checkpoint.unet)
    shape = checkpoint.adapter_shape
    assert shape.image_prompt_blocks == (("input", 1, 0), ("output", 3, 0))
    assert shape.resampler.heads == 1 and shape.resampler.dim_head == 64 and shape.resampler.queries == 4
    assert checkpoint.adapter["image_prompt.1.to_v.weight"] is imagedream[
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v_ip.weight"]

    no_encoders = split_checkpoint({f"model.diffusion_model.{k}": v for k, v in fake_unet(True, 1024, image_prompt=True).items()})
    assert no_encoders.missing_parts == ["vae", "text", "clip_vision"]


def test_files_of_other_families_are_refused():
    with pytest.raises(InvalidInput, match="no Stable Diffusion UNet"):
        split_checkpoint({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(4)})


def test_transformer_block_keys_follow_comfyui_addressing():
    keys = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "output_blocks.11.1.transformer_blocks.0.norm1.weight",
            "middle_block.1.transformer_blocks.1.attn2.to_k.weight", "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
            "input_blocks.1.0.in_layers.0.weight"]
    assert transformer_block_keys(keys) == [("input", 1, 0), ("input", 4, 0), ("middle", 0, 1), ("output", 11, 0)]
    assert block_key_of(keys[2]) == (("middle", 0, 1), "attn2.to_k.weight") and block_key_of(keys[4]) is None


def test_resampler_turns_hidden_states_into_tokens_and_the_adapter_loads_its_own_keys():
    resampler = Resampler(dim=32, depth=2, dim_head=16, heads=2, queries=5, embedding_dim=24, output_dim=40)
    tokens = resampler(torch.randn(3, 11, 24))
    assert tokens.shape == (3, 5, 40) and torch.isfinite(tokens).all()
    checkpoint = split_checkpoint({f"model.diffusion_model.{k}": torch.randn(v.shape) for k, v in fake_unet(True, 1024, image_prompt=True).items()
                                   if not k.startswith("image_embed.layers")} | {
        f"model.diffusion_model.image_embed.{k}": torch.randn(v.shape) for k, v in Resampler(16, 1, 64, 1, 4, 12, 1024).state_dict().items()})
    adapter = MultiviewAdapter(checkpoint.adapter_shape)
    adapter.load_state_dict(checkpoint.adapter, strict=True)
    assert adapter.image_prompt_for(("output", 3, 0)).to_k.weight.shape == (8, 1024)
