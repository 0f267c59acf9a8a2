"""MVDream and ImageDream as additions to a stock Stable Diffusion UNet, and the key maps of their files.

MVDream (Shi et al. 2023; bytedance/MVDream) is SD1.5 or SD2.1 with
- a camera MLP added once to the timestep embedding: emb + camera_embed(camera), camera = the flattened 4 x 4
  camera-to-world matrix (`cameras.mvdream_cameras`), Sequential(Linear(16, 4C), SiLU, Linear(4C, 4C));
- every self-attention taken over all views of a frame together (the tokens of the V views concatenated); the
  weights are SD's own, so this is a change of computation, not of parameters (the patch in integration/).
ImageDream (Wang & Shi 2023; bytedance/ImageDream) is MVDream-2.1 plus an image prompt:
- a Resampler (IP-Adapter-Plus style) turning CLIP ViT-H/14 penultimate hidden states (257 x 1280) into 16 tokens;
- per cross-attention, to_k_ip / to_v_ip: out = attn(q, k_text, v_text) + w attn(q, to_k_ip(ip), to_v_ip(ip));
- the "pixel controller": an extra view per frame that carries the clean latent of the input image (zero camera).

Everything else of the UNet is SD's, so the MODEL the pack builds is a stock ComfyUI SD model; `MultiviewAdapter`
holds the added weights and rides along as an additional model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import InvalidInput
from .fourdm import NOT_A_BASE, is_4dm_state_dict
from .sd_unet import BlockKey, block_key_of, transformer_block_keys

CAMERA_DIM = 16
ORIGINAL_UNET_PREFIX = "model.diffusion_model."  # MVDream / ImageDream .pt files (LDM layout)
_IMAGE_PROMPT_SUFFIXES = ("attn2.to_k_ip.weight", "attn2.to_v_ip.weight")
_NON_UNET_PREFIXES = ("first_stage_model.", "vae_model.", "cond_stage_model.", "clip_model.")


@dataclass(frozen=True)
class MultiviewFamily:
    id: str
    name: str
    base: str  # ComfyUI's supported-model class the UNet is: "SD15" or "SD20"
    image_prompt: bool  # ImageDream's resampler and image-prompt cross-attention
    trained_views: int = 4

    @property
    def pixel_controller(self) -> bool:
        """ImageDream's "ipmv" checkpoints were trained with the extra clean-image view."""
        return self.image_prompt


MVDREAM_SD15 = MultiviewFamily("mvdream-sd15", "MVDream (SD1.5, 4 views)", "SD15", False)
MVDREAM_SD21 = MultiviewFamily("mvdream-sd21", "MVDream (SD2.1-base, 4 views)", "SD20", False)
IMAGEDREAM = MultiviewFamily("imagedream", "ImageDream (SD2.1-base, 4 views + image prompt)", "SD20", True)
FAMILIES = {family.id: family for family in (MVDREAM_SD15, MVDREAM_SD21, IMAGEDREAM)}


# Modules. `operations` is a namespace with Linear and LayerNorm (torch.nn, or comfy.ops in ComfyUI).

def camera_mlp(time_embed_dim: int, operations=nn) -> nn.Sequential:
    return nn.Sequential(operations.Linear(CAMERA_DIM, time_embed_dim), nn.SiLU(), operations.Linear(time_embed_dim, time_embed_dim))


class PerceiverAttention(nn.Module):
    """The resampler's attention: latent queries over the image features and the latents together."""

    def __init__(self, dim: int, dim_head: int, heads: int, operations=nn):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim)
        self.norm2 = operations.LayerNorm(dim)
        self.to_q = operations.Linear(dim, inner, bias=False)
        self.to_kv = operations.Linear(dim, 2 * inner, bias=False)
        self.to_out = operations.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        batch, queries, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # softmax in float32, as the official code does for fp16 stability
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).float().softmax(dim=-1).to(v.dtype)
        return self.to_out((weights @ v).transpose(1, 2).reshape(batch, queries, -1))


class Resampler(nn.Module):
    """ImageDream's image-prompt encoder (IP-Adapter-Plus layout): CLIP hidden states (B, N, embedding_dim) ->
    (B, queries, output_dim) tokens. Keys: latents, proj_in, proj_out, norm_out, layers.i.0 (attention),
    layers.i.1 (LayerNorm, Linear, GELU, Linear: indices 0, 1, 3)."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4, operations=nn):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = operations.Linear(embedding_dim, dim)
        self.proj_out = operations.Linear(dim, output_dim)
        self.norm_out = operations.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads, operations),
                nn.Sequential(operations.LayerNorm(dim), operations.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              operations.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(features).expand(len(features), -1, -1)
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImagePromptProjection(nn.Module):
    """One cross-attention's image-prompt keys and values (to_k_ip, to_v_ip)."""

    def __init__(self, context_dim: int, inner_dim: int, operations=nn):
        super().__init__()
        self.to_k = operations.Linear(context_dim, inner_dim, bias=False)
        self.to_v = operations.Linear(context_dim, inner_dim, bias=False)


@dataclass(frozen=True)
class ResamplerShape:
    dim: int
    depth: int
    dim_head: int
    heads: int
    queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int


@dataclass(frozen=True)
class AdapterShape:
    """What a MultiviewAdapter is built from, read off a checkpoint's keys and shapes."""

    time_embed_dim: int
    resampler: ResamplerShape | None = None
    image_prompt_blocks: tuple[BlockKey, ...] = ()
    image_prompt_dims: tuple[tuple[int, int], ...] = ()  # (context_dim, inner_dim) per block


class MultiviewAdapter(nn.Module):
    """The weights an MVDream / ImageDream checkpoint adds to its SD UNet. State-dict keys: camera_embed.* and
    image_embed.* as in the original files; image_prompt.{i}.to_k / to_v for the i-th block of `block_keys`."""

    def __init__(self, shape: AdapterShape, operations=nn):
        super().__init__()
        self.shape = shape
        self.camera_embed = camera_mlp(shape.time_embed_dim, operations)
        self.image_embed = None if shape.resampler is None else Resampler(**vars(shape.resampler), operations=operations)
        self.block_keys = list(shape.image_prompt_blocks)
        self.image_prompt = nn.ModuleList(ImagePromptProjection(c, i, operations) for c, i in shape.image_prompt_dims)

    def image_prompt_for(self, block: BlockKey) -> ImagePromptProjection:
        return self.image_prompt[self.block_keys.index(block)]


# Key maps.

@dataclass
class MultiviewCheckpoint:
    """A multi-view checkpoint split into the parts ComfyUI loads with its own loaders and our adapter.

    unet: SD UNet keys without prefix. vae: LDM or diffusers VAE keys without prefix (or empty). text: text encoder
    keys in `text_format` ("hf": transformers CLIPTextModel, 'text_model.*'; "open_clip": SD2's 'transformer.*',
    'token_embedding.*', ...), or empty. clip_vision: image encoder keys ('visual.*' open_clip, or HF
    'vision_model.*'), or empty. adapter: MultiviewAdapter keys."""

    family: MultiviewFamily
    unet: dict
    adapter: dict
    adapter_shape: AdapterShape
    vae: dict
    text: dict
    text_format: str
    clip_vision: dict

    @property
    def missing_parts(self) -> list[str]:
        needed = ["vae", "text"] + (["clip_vision"] if self.family.image_prompt else [])
        return [part for part in needed if not getattr(self, part)]


def _strip(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _unet_prefix(state_dict: dict, argument: str) -> str:
    for prefix in (ORIGINAL_UNET_PREFIX, ""):
        if f"{prefix}input_blocks.0.0.weight" in state_dict:
            return prefix
    if is_4dm_state_dict(state_dict):
        raise InvalidInput(argument, *NOT_A_BASE)  # 4dm.ckpt picked as a checkpoint
    raise InvalidInput(argument, "this file holds no Stable Diffusion UNet (no input_blocks.0.0.weight under "
                       "model.diffusion_model. or at the top level)",
                       "pick an MVDream / ImageDream checkpoint (sd-v1.5-4view.pt, sd-v2.1-base-4view.pt, "
                       "sd-v2.1-base-4view-ipmv.pt) or the unet file of its diffusers folder")


def detect_family(unet: dict, argument: str = "ckpt_name") -> MultiviewFamily:
    """The family of a UNet state dict (no prefix): MVDream by its camera MLP, ImageDream by its image prompt,
    SD1.5 or SD2.1 by its transformer projections (convolution or linear proj_in)."""
    if "camera_embed.0.weight" not in unet:
        raise InvalidInput(argument, "this UNet has no MVDream camera MLP (camera_embed.*): it is a plain Stable "
                           "Diffusion model, not an MVDream / ImageDream one",
                           "load plain SD checkpoints with core Load Checkpoint; this loader is for MVDream "
                           "(sd-v1.5-4view.pt, sd-v2.1-base-4view.pt) and ImageDream (sd-v2.1-base-4view-ipmv.pt)")
    if tuple(unet["camera_embed.0.weight"].shape[1:]) != (CAMERA_DIM,):
        raise InvalidInput(argument, f"camera_embed.0.weight has shape {tuple(unet['camera_embed.0.weight'].shape)}, "
                           f"MVDream's takes {CAMERA_DIM} camera numbers", "use an original MVDream / ImageDream file")
    proj_in = next((value for key, value in unet.items() if key.endswith(".proj_in.weight")), None)
    if proj_in is None:
        raise InvalidInput(argument, "this UNet has no spatial transformers", "use an MVDream / ImageDream file")
    linear = proj_in.ndim == 2  # SD2.x: Linear proj_in; SD1.x: 1x1 convolution
    if "image_embed.latents" in unet:
        if not linear:
            raise InvalidInput(argument, "an image-prompt (ImageDream) UNet on an SD1.5 base is not a released model",
                               "use ImageDream's sd-v2.1-base-4view-ipmv.pt")
        return IMAGEDREAM
    return MVDREAM_SD21 if linear else MVDREAM_SD15


def adapter_keys(unet: dict) -> list[str]:
    return [key for key in unet if key.startswith(("camera_embed.", "image_embed.")) or key.endswith(_IMAGE_PROMPT_SUFFIXES)]


RESAMPLER_HEAD_DIM = 64  # ImageDream's resampler heads (12 x 64); a file holds only their product


def adapter_state_dict(unet: dict, argument: str = "ckpt_name") -> tuple[dict, AdapterShape]:
    """Our adapter's keys and shape from the added keys of an MVDream / ImageDream UNet (no prefix)."""
    state = {key: value for key, value in unet.items() if key.startswith("camera_embed.")}
    time_embed_dim = unet["camera_embed.0.weight"].shape[0]
    if "image_embed.latents" not in unet:
        return state, AdapterShape(time_embed_dim)
    image = _strip(unet, "image_embed.")
    inner, dim = image["layers.0.0.to_q.weight"].shape
    if inner % RESAMPLER_HEAD_DIM:
        raise InvalidInput(argument, f"the image-prompt resampler's attention is {inner} wide, not a whole number of "
                           f"{RESAMPLER_HEAD_DIM}-wide heads", "use ImageDream's released checkpoint")
    resampler = ResamplerShape(
        dim=dim, depth=1 + max(int(key.split(".")[1]) for key in image if key.startswith("layers.")),
        dim_head=RESAMPLER_HEAD_DIM, heads=inner // RESAMPLER_HEAD_DIM, queries=image["latents"].shape[1],
        embedding_dim=image["proj_in.weight"].shape[1], output_dim=image["proj_out.weight"].shape[0],
        ff_mult=image["layers.0.1.1.weight"].shape[0] // dim)
    state.update({f"image_embed.{key}": value for key, value in image.items()})
    projections: dict = {}  # block -> {"to_k": weight, "to_v": weight}
    for key, value in unet.items():
        located = block_key_of(key)
        if located is not None and located[1] in _IMAGE_PROMPT_SUFFIXES:
            projections.setdefault(located[0], {})["to_k" if "to_k_ip" in located[1] else "to_v"] = value
    blocks = [block for block in transformer_block_keys(unet) if block in projections]
    for index, block in enumerate(blocks):
        for name, weight in projections[block].items():
            state[f"image_prompt.{index}.{name}.weight"] = weight
    dims = tuple((projections[block]["to_k"].shape[1], projections[block]["to_k"].shape[0]) for block in blocks)
    return state, AdapterShape(time_embed_dim, resampler, tuple(blocks), dims)


def split_checkpoint(state_dict: dict, argument: str = "ckpt_name", edit_unet: Callable[[dict], dict] | None = None) -> MultiviewCheckpoint:
    """An original MVDream / ImageDream checkpoint (model.diffusion_model.*, with first_stage_model.* and
    cond_stage_model.* for MVDream, vae_model.* and clip_model.model.* for ImageDream, any of them possibly
    absent) or a bare UNet file, split into its parts. edit_unet: applied to the UNet's keys (no prefix) before
    anything is read from them (4DM's weights over ImageDream's)."""
    prefix = _unet_prefix(state_dict, argument)
    unet = _strip(state_dict, prefix) if prefix else {k: v for k, v in state_dict.items() if not k.startswith(_NON_UNET_PREFIXES)}
    if edit_unet is not None:
        unet = edit_unet(unet)
    family = detect_family(unet, argument)
    adapter, shape = adapter_state_dict(unet, argument)
    for key in adapter_keys(unet):
        del unet[key]
    vae = _strip(state_dict, "first_stage_model.") or _strip(state_dict, "vae_model.")
    if any(key.startswith("clip_model.model.") for key in state_dict):  # ImageDream: one open_clip ViT-H/14
        clip = _strip(state_dict, "clip_model.model.")
        text = {key: value for key, value in clip.items() if not key.startswith("visual.")}
        clip_vision = {key: value for key, value in clip.items() if key.startswith("visual.")}
        text_format = "open_clip"
    elif any(key.startswith("cond_stage_model.model.") for key in state_dict):  # SD2.x: open_clip text tower
        text, clip_vision, text_format = _strip(state_dict, "cond_stage_model.model."), {}, "open_clip"
    else:  # SD1.x: transformers CLIPTextModel, with or without its text_model. level
        text = {key if key.startswith("text_model.") else f"text_model.{key}": value
                for key, value in _strip(state_dict, "cond_stage_model.transformer.").items()}
        clip_vision, text_format = {}, "hf"
    return MultiviewCheckpoint(family, unet, adapter, shape, vae, text, text_format, clip_vision)


def from_diffusers_components(unet: dict, vae: dict, text_encoder: dict, image_encoder: dict,
                              argument: str = "ckpt_name") -> MultiviewCheckpoint:
    """A diffusers-format MVDream / ImageDream folder (ashawkey/mvdream_diffusers: unet/ keeps the LDM keys without
    prefix, vae/ is a diffusers AutoencoderKL, text_encoder/ and image_encoder/ are transformers CLIP models)."""
    checkpoint = split_checkpoint(unet, argument)
    checkpoint.vae, checkpoint.text, checkpoint.text_format = vae, text_encoder, "hf"
    checkpoint.clip_vision = image_encoder
    return checkpoint
