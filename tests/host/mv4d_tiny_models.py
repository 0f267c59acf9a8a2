"""Tiny models of the real SVD / SV3D_u / SV3D_p architectures, built from ComfyUI's own classes.

Same UNet class, conditioning code (model_base.SVD_img2vid / SV3D_u / SV3D_p extra_conds and timestep embedders),
key layout and sampling settings (V-prediction EDM, sigma 0.002..700, SD latent format) as the real checkpoints,
with 32 channels instead of 320 and a 2-layer CLIP vision encoder. Weights are random from a seed: they produce
no meaningful images, only the exact computation the real ones go through. With REAL_SIZE the same builder
gives the released UNet architecture (for the benchmarks in bench/). Used by the host tests and by the
test-only node pack next to this file (tiny_model_nodes/) that the test server loads.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

CONTEXT_DIM = 32  # CLIP image embedding width = UNet cross-attention width (1024 in the real models)
KINDS = ("svd", "sv3d_u", "sv3d_p")


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds layers without initialising them (disable_weight_init): give every tensor a sane value.
    Drawn on the parameters' own device, so a real-size model initialises quickly on a GPU."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            generator = generators.setdefault(parameter.device, torch.Generator(device=parameter.device).manual_seed(seed))
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 1.0 / parameter[0].numel() ** 0.5, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)


# ComfyUI's model detection reads these from an SVD / SV3D checkpoint (model_detection.detect_unet_config)
REAL_SIZE = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 transformer_depth_middle=1, context_dim=1024, num_head_channels=64)
TINY_SIZE = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                 transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=CONTEXT_DIM, num_head_channels=16)


def svd_family_unet(kind: str, seed: int = 0, size: dict = TINY_SIZE, dtype: torch.dtype | None = None):
    """A ModelPatcher of an SVD / SV3D UNet with temporal layers: 2 levels of 32 channels by default, or the real
    architecture with size=REAL_SIZE (random weights: for benchmarks, compute does not depend on the values)."""
    import comfy.model_management as model_management
    import comfy.model_patcher
    import comfy.supported_models

    config_class = {"svd": comfy.supported_models.SVD_img2vid, "sv3d_u": comfy.supported_models.SV3D_u,
                    "sv3d_p": comfy.supported_models.SV3D_p}[kind]
    unet_config = dict(config_class.unet_config)
    unet_config.update(size)
    unet_config.update(  # what ComfyUI's model detection sets for every SVD-family checkpoint
        image_size=32, out_channels=4, use_spatial_transformer=True, extra_ff_mix_layer=True, use_spatial_context=True,
        merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
        disable_temporal_crossattention=False, max_ddpm_temb_period=10000, num_classes="sequential",
    )
    config = config_class(unet_config)
    config.unet_config["num_head_channels"] = size["num_head_channels"]
    if dtype is not None:
        config.set_inference_dtype(dtype, None)
    load_device = model_management.get_torch_device()
    model = config.get_model({}, device=load_device if load_device.type == "cuda" else None)
    init_weights(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device, model_management.unet_offload_device())


def tiny_clip_vision(seed: int = 100):
    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": CONTEXT_DIM,
              "image_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 2 * CONTEXT_DIM,
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 8, "projection_dim": CONTEXT_DIM, "torch_dtype": "float32"}
    # older ComfyUI versions only take a path to the JSON config
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    try:
        clip_vision = comfy.clip_vision.ClipVisionModel(file.name)
    finally:
        os.unlink(file.name)
    init_weights(clip_vision.model, seed)
    return clip_vision


def tiny_vae(seed: int = 200):
    """An SD-layout VAE (4 latent channels, 8x downscale) with 32 channels."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    source = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(source, seed)
    return comfy.sd.VAE(sd=source.state_dict(), config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def tiny_checkpoint(kind: str):
    """(MODEL, CLIP_VISION, VAE) as ImageOnlyCheckpointLoader gives them for an SVD / SV3D checkpoint."""
    seed = KINDS.index(kind)
    return svd_family_unet(kind, seed), tiny_clip_vision(100 + seed), tiny_vae(200 + seed)


def record_fp8_modes(monkeypatch) -> list:
    """Every fp8 function mode that MV4D FP8 Matmuls' model patch enters from now on (to count what it routed)."""
    import mv4d.integration.patches.fp8_matmuls as fp8_patch
    from mv4d.kernels.fp8_matmul import Fp8Matmuls

    modes = []

    class RecordedFp8Matmuls(Fp8Matmuls):
        def __init__(self):
            super().__init__()
            modes.append(self)

    monkeypatch.setattr(fp8_patch, "Fp8Matmuls", RecordedFp8Matmuls)
    return modes
