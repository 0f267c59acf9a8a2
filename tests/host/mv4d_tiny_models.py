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


def svd_family_config(kind: str, size: dict = TINY_SIZE):
    """ComfyUI's model config of an SVD / SV3D UNet of `size`, as its model detection makes it for a checkpoint."""
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
    return config


def svd_family_unet(kind: str, seed: int = 0, size: dict = TINY_SIZE, dtype: torch.dtype | None = None):
    """A ModelPatcher of an SVD / SV3D UNet with temporal layers: 2 levels of 32 channels by default, or the real
    architecture with size=REAL_SIZE (random weights: for benchmarks, compute does not depend on the values)."""
    import comfy.model_management as model_management
    import comfy.model_patcher

    config = svd_family_config(kind, size)
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


# Tiny MVDream / ImageDream checkpoints in the released key layouts (original .pt prefixes, diffusers folders).

TEXT_DIM = 64  # the tiny text encoder's width = the tiny SD UNets' cross-attention width (768 / 1024 for real)
IMAGE_HIDDEN = CONTEXT_DIM  # the tiny CLIP vision's hidden width (ViT-H/14's 1280 for real ImageDream)
TINY_SD = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 1, 2, 2], num_res_blocks=[2, 2, 2, 2],
               transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
               transformer_depth_middle=1, context_dim=TEXT_DIM, adm_in_channels=None, use_temporal_attention=False,
               use_temporal_resblock=False, image_size=32, use_spatial_transformer=True, legacy=False, use_checkpoint=False)
MULTIVIEW_KINDS = ("mvdream-sd15", "mvdream-sd21", "imagedream")


REAL_SD = {**TINY_SD, "model_channels": 320, "channel_mult": [1, 2, 4, 4]}  # SD1.5 / SD2.1 (context set by the base)
SD_CONTEXT = {"SD15": 768, "SD20": 1024}


def tiny_sd_model(base: str, seed: int = 0, size: dict = TINY_SD, dtype: torch.dtype | None = None, device=None):
    """A stock ComfyUI SD15 / SD20 BaseModel (eps) with the real block layout (16 transformer blocks): tiny by
    default, the released architecture with size=REAL_SD (random weights, for benchmarks)."""
    import comfy.model_base
    import comfy.supported_models

    unet = {**size, "use_linear_in_transformer": base == "SD20"}
    if size is REAL_SD:
        unet["context_dim"] = SD_CONTEXT[base]
    config = getattr(comfy.supported_models, base)(unet)
    if dtype is not None:
        config.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=device)
    init_weights(model, seed)
    return model


def tiny_multiview_unet(kind: str, seed: int = 0) -> dict:
    """The UNet of a tiny MVDream / ImageDream file, keys without prefix: SD's keys + camera_embed.* (+ image_embed.*
    and attn2.to_k_ip / to_v_ip for ImageDream), as the released files hold them."""
    from mv4d.kernels.models.sd_unet import block_prefix, transformer_block_keys

    generator = torch.Generator().manual_seed(seed + 1000)

    def weight(*shape):
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    unet = {key: value.clone() for key, value in tiny_sd_model("SD15" if kind == "mvdream-sd15" else "SD20", seed).diffusion_model.state_dict().items()}
    time_dim = 4 * TINY_SD["model_channels"]
    unet.update({"camera_embed.0.weight": weight(time_dim, 16), "camera_embed.0.bias": weight(time_dim),
                 "camera_embed.2.weight": weight(time_dim, time_dim), "camera_embed.2.bias": weight(time_dim)})
    if kind == "imagedream":
        dim, inner = TEXT_DIM, 64  # one 64-wide head, ImageDream's head width
        resampler = {"latents": weight(1, 16, dim), "proj_in.weight": weight(dim, IMAGE_HIDDEN), "proj_in.bias": weight(dim),
                     "proj_out.weight": weight(TEXT_DIM, dim), "proj_out.bias": weight(TEXT_DIM),
                     "norm_out.weight": 1 + weight(TEXT_DIM), "norm_out.bias": weight(TEXT_DIM)}
        for layer in range(2):
            resampler.update({f"layers.{layer}.0.norm1.weight": 1 + weight(dim), f"layers.{layer}.0.norm1.bias": weight(dim),
                              f"layers.{layer}.0.norm2.weight": 1 + weight(dim), f"layers.{layer}.0.norm2.bias": weight(dim),
                              f"layers.{layer}.0.to_q.weight": weight(inner, dim), f"layers.{layer}.0.to_kv.weight": weight(2 * inner, dim),
                              f"layers.{layer}.0.to_out.weight": weight(dim, inner),
                              f"layers.{layer}.1.0.weight": 1 + weight(dim), f"layers.{layer}.1.0.bias": weight(dim),
                              f"layers.{layer}.1.1.weight": weight(4 * dim, dim), f"layers.{layer}.1.3.weight": weight(dim, 4 * dim)})
        unet.update({f"image_embed.{key}": value for key, value in resampler.items()})
        keys = list(unet)
        for block in transformer_block_keys(keys):
            prefix = block_prefix(block, keys)
            inner_dim = unet[f"{prefix}attn2.to_k.weight"].shape[0]
            unet[f"{prefix}attn2.to_k_ip.weight"] = weight(inner_dim, TEXT_DIM)
            unet[f"{prefix}attn2.to_v_ip.weight"] = weight(inner_dim, TEXT_DIM)
    return unet


def tiny_multiview_checkpoint(kind: str, seed: int = 0) -> dict:
    """A tiny original-layout .pt state dict (model.diffusion_model.*; no encoders: the tiny text encoder, VAE and
    CLIP vision come from tiny_text_encoder / tiny_vae / tiny_clip_vision, as the loader says for such files)."""
    return {f"model.diffusion_model.{key}": value for key, value in tiny_multiview_unet(kind, seed).items()}


def write_diffusers_folder(folder, kind: str, seed: int = 0) -> None:
    """A diffusers-format folder as ashawkey/mvdream_diffusers writes it (unet/ with the LDM keys, no prefix)."""
    from pathlib import Path

    import safetensors.torch

    folder = Path(folder)
    (folder / "unet").mkdir(parents=True)
    safetensors.torch.save_file(tiny_multiview_unet(kind, seed), folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "MultiViewUNetModel", "camera_dim": 16}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "MVDreamPipeline", "unet": ["mv_unet", "MultiViewUNetModel"]}))


TINY_TEXT_CONFIG = {"hidden_act": "quick_gelu", "hidden_size": TEXT_DIM, "intermediate_size": 2 * TEXT_DIM,
                    "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408,
                    "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
                    "projection_dim": TEXT_DIM, "model_type": "clip_text_model"}


def tiny_text_encoder(seed: int = 300):
    """A CLIP (for CLIPTextEncode) with SD1.5's tokenizer and a 2-layer, 64-wide text transformer."""
    import functools

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    class TinyTextModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):  # ComfyUI's calling convention
            super().__init__(device=device, dtype=dtype, model_options=model_options or {}, textmodel_json_config=dict(TINY_TEXT_CONFIG),
                             return_projected_pooled=False)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                    functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=TinyTextModel))
    clip = comfy.sd.CLIP(target)
    init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_multiview_model(kind: str, seed: int = 0):
    """(MODEL, CLIP, VAE, CLIP_VISION) as MV4D Load Multi-view Model gives them for a tiny file of `kind`, loaded
    through the pack's own loader (the encoders from the tiny builders)."""
    from mv4d.integration.multiview_models import build_multiview_model
    from mv4d.kernels.models.multiview import split_checkpoint

    loaded = build_multiview_model(split_checkpoint(tiny_multiview_checkpoint(kind, seed)))
    clip_vision = tiny_clip_vision(110 + seed) if kind == "imagedream" else None
    return loaded.model, tiny_text_encoder(310 + seed), tiny_vae(210 + seed), clip_vision


# Tiny AnimateDiff motion modules and CameraCtrl for the tiny SD1.5 UNet (channels 64, 64, 128, 128), in the
# released key layouts.

TINY_MOTION_CHANNELS = (64, 64, 128, 128)
MOTION_VERSIONS = {"v1": (24, False), "v2": (32, True), "v3": (32, False)}


def tiny_motion_state_dict(version: str = "v3", seed: int = 500) -> dict:
    """An AnimateDiff file's keys (down_blocks.N.motion_modules.M.temporal_transformer.*, pos_encoder.pe included)
    with random weights, proj_out included (released modules are trained: a zero proj_out would hide them)."""
    from mv4d.kernels.models.motion import MotionModel, MotionVersion

    length, mid = MOTION_VERSIONS[version]
    model = MotionModel(MotionVersion(version, length, mid, version == "v1", "original"), TINY_MOTION_CHANNELS)
    init_weights(model, seed)
    return {key: value.clone() for key, value in model.state_dict().items()}


def tiny_sd15_checkpoint(seed: int = 0):
    """(MODEL, CLIP, VAE) as core's checkpoint loader gives them for an SD1.5 file: the tiny SD15 UNet (eps)."""
    import comfy.model_management
    import comfy.model_patcher

    model = comfy.model_patcher.ModelPatcher(tiny_sd_model("SD15", seed), comfy.model_management.get_torch_device(),
                                             comfy.model_management.unet_offload_device())
    return model, tiny_text_encoder(320 + seed), tiny_vae(220 + seed)


def tiny_motion_module(version: str = "v3", seed: int = 500):
    from mv4d.kernels.models.motion import load_motion_model, normalize_motion_state_dict
    import comfy.ops

    normalized, found = normalize_motion_state_dict(tiny_motion_state_dict(version, seed))
    return load_motion_model(normalized, found, operations=comfy.ops.manual_cast).eval().requires_grad_(False)


def tiny_cameractrl_checkpoint(seed: int = 600, zero_merge: bool = False) -> dict:
    """CameraCtrl's original two-dict .ckpt layout for the tiny motion modules (pose encoder at the tiny channels,
    position table 16, one qkv_merge per down / up motion module)."""
    from mv4d.kernels.models.cameractrl import CameraPoseEncoder

    encoder = CameraPoseEncoder(TINY_MOTION_CHANNELS, table_length=16)
    init_weights(encoder, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    merges = {}
    channels = {f"down_blocks.{b}": c for b, c in enumerate(TINY_MOTION_CHANNELS)}
    channels.update({f"up_blocks.{b}": c for b, c in enumerate(reversed(TINY_MOTION_CHANNELS))})
    for block, width in channels.items():
        for slot in range(2 if block.startswith("down") else 3):
            prefix = f"{block}.motion_modules.{slot}.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.qkv_merge"
            scale = 0.0 if zero_merge else 1.0 / width ** 0.5
            merges[f"{prefix}.weight"] = torch.randn(width, width, generator=generator) * scale
            merges[f"{prefix}.bias"] = torch.randn(width, generator=generator) * (0.0 if zero_merge else 0.02)
    return {"pose_encoder_state_dict": {k: v.clone() for k, v in encoder.state_dict().items()}, "attention_processor_state_dict": merges}


def tiny_cameractrl(seed: int = 600, zero_merge: bool = False):
    import comfy.ops

    from mv4d.integration.patches.camera_control import CameraControl
    from mv4d.kernels.models.cameractrl import load_pose_encoder, qkv_merge_layers, split_cameractrl

    checkpoint = split_cameractrl(tiny_cameractrl_checkpoint(seed, zero_merge))
    control = CameraControl(load_pose_encoder(checkpoint, operations=comfy.ops.manual_cast),
                            qkv_merge_layers(checkpoint, operations=comfy.ops.manual_cast))
    return control.eval().requires_grad_(False)


def tiny_cvd_checkpoint(seed: int = 700, zero: bool = False) -> dict:
    """CVD.ckpt's layout for the tiny motion modules: {'unet_trainable_dict': down_blocks.N.epi_modules.M.epi_transformer.*
    (20 modules at the tiny channels), 'epoch': 0}, as train_epi_control.py saves it (torch.save). zero: proj_out at
    zero, as CVD starts training (the modules then change nothing)."""
    from mv4d.kernels.models.cvd import CVDModel

    model = CVDModel(TINY_MOTION_CHANNELS)
    init_weights(model, seed)
    if zero:
        model.zero_init()
    return {"unet_trainable_dict": {key: value.clone() for key, value in model.state_dict().items()}, "epoch": 0}


def tiny_cvd_module(seed: int = 700, zero: bool = False):
    import comfy.ops

    from mv4d.kernels.models.cvd import load_cvd_model, normalize_cvd_state_dict

    normalized = normalize_cvd_state_dict(tiny_cvd_checkpoint(seed, zero))
    return load_cvd_model(normalized, operations=comfy.ops.manual_cast).eval().requires_grad_(False)
# A tiny 4DM (4Diffusion): motion modules at the tiny ImageDream's channels, in 4dm.ckpt's own layout.

# Where 4DM's UNet holds each AnimateDiff motion module (MODELS.md section 6), written out rather than computed,
# so the pack's key map is checked against the layout, not against itself.
FOURDM_POSITIONS = {
    "down_blocks.0.motion_modules.0": "input_blocks.1.2", "down_blocks.0.motion_modules.1": "input_blocks.2.2",
    "down_blocks.1.motion_modules.0": "input_blocks.4.2", "down_blocks.1.motion_modules.1": "input_blocks.5.2",
    "down_blocks.2.motion_modules.0": "input_blocks.7.2", "down_blocks.2.motion_modules.1": "input_blocks.8.2",
    "down_blocks.3.motion_modules.0": "input_blocks.10.1", "down_blocks.3.motion_modules.1": "input_blocks.11.1",
    "mid_block.motion_modules.0": "middle_block.2",
    "up_blocks.0.motion_modules.0": "output_blocks.0.1", "up_blocks.0.motion_modules.1": "output_blocks.1.1",
    "up_blocks.0.motion_modules.2": "output_blocks.2.1",
    "up_blocks.1.motion_modules.0": "output_blocks.3.2", "up_blocks.1.motion_modules.1": "output_blocks.4.2",
    "up_blocks.1.motion_modules.2": "output_blocks.5.2",
    "up_blocks.2.motion_modules.0": "output_blocks.6.2", "up_blocks.2.motion_modules.1": "output_blocks.7.2",
    "up_blocks.2.motion_modules.2": "output_blocks.8.2",
    "up_blocks.3.motion_modules.0": "output_blocks.9.2", "up_blocks.3.motion_modules.1": "output_blocks.10.2",
    "up_blocks.3.motion_modules.2": "output_blocks.11.2",
}


def tiny_4dm_checkpoint(seed: int = 700, zero_proj_out: bool = False, spatial: dict | None = None) -> dict:
    """What torch.load gives for 4dm.ckpt: {'state_dict': {'module.' + key}} with the motion modules at 4DM's UNet
    positions (v2's modules: mid block, 32-frame tables) and, if given, spatial UNet weights in the official UNet's
    shifted layout. zero_proj_out: every module an identity."""
    from mv4d.kernels.models.motion import MotionModel, MotionVersion

    model = MotionModel(MotionVersion("4dm", 32, True, False, "4dm"), TINY_MOTION_CHANNELS)
    init_weights(model, seed)
    state = {}
    for key, value in model.state_dict().items():
        module = next(name for name in FOURDM_POSITIONS if key.startswith(name + "."))
        if zero_proj_out and ".proj_out." in key:
            value = torch.zeros_like(value)
        state[f"module.{FOURDM_POSITIONS[module]}{key[len(module):]}"] = value.clone()
    state.update({f"module.{key}": value for key, value in (spatial or {}).items()})
    return {"state_dict": state, "epoch": 3, "global_step": 1000}


def write_4dm_files(folder, seed: int = 0, zero_proj_out: bool = False, spatial: dict | None = None):
    """(4dm.ckpt, base .pt) paths of a tiny 4DM and its tiny ImageDream base, written into `folder`."""
    from pathlib import Path

    folder = Path(folder)
    torch.save(tiny_4dm_checkpoint(700 + seed, zero_proj_out, spatial), folder / "4dm.ckpt")
    torch.save(tiny_multiview_checkpoint("imagedream", seed), folder / "sd-v2.1-base-4view-ipmv.pt")
    return folder / "4dm.ckpt", folder / "sd-v2.1-base-4view-ipmv.pt"


def tiny_4dm_model(seed: int = 0, zero_proj_out: bool = False):
    """(MODEL, CLIP, VAE, CLIP_VISION) as MV4D Load 4DM gives them for a tiny 4dm.ckpt on the tiny ImageDream file,
    loaded through the pack's own loader (the encoders: tiny_multiview_model('imagedream', seed)'s)."""
    from mv4d.integration.fourdm_models import load_4dm

    with tempfile.TemporaryDirectory() as folder:
        loaded = load_4dm(*write_4dm_files(folder, seed, zero_proj_out)).loaded
    return loaded.model, tiny_text_encoder(310 + seed), tiny_vae(210 + seed), tiny_clip_vision(110 + seed)
