"""MVDream's and ImageDream's computation on a stock ComfyUI SD model, as patches of a ModelPatcher clone:

- camera embedding: an emb patch adds camera_embed(camera) to the timestep embedding (MVDream's only use of it);
- multi-view attention: an attn1 replace on every transformer block attends over all views of a frame together
  (kernels/grid.py `views_together`); exact, since q, k and v are per-token projections;
- image prompt (ImageDream): an attn2 replace adds w attn(q, to_k_ip(tokens), to_v_ip(tokens)) to the text
  attention; the tokens are the resampler's output of the CLIP vision hidden states, once per UNet call;
- pixel controller (ImageDream): the last view of every frame is a conditioning slot whose UNet input is the clean
  latent of the input image (zeros for the unconditional pass), as in the official code; its sampled latent is no
  image, and MV4D Decode Grid drops it.

The adapter (camera MLP, resampler, image-prompt projections) is an additional model of the clone, so ComfyUI's
model management loads and offloads it with the UNet; cameras, image prompts and the grid come per call from the
conditioning (patches/conds.py). With no camera and no grid in the conditioning the model computes plain SD.
"""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.patcher_extension
import comfy.model_management
import comfy.ops
import torch

from ...kernels.grid import grid_of
from ...kernels.models.multiview import MultiviewAdapter, MultiviewFamily
from ...kernels.models.sd_unet import transformer_block_keys
from .conds import OPTIONS, call_data, carry_mv4d_conds
from .shared import SharedPatch

ADAPTER_KEY = "mv4d_multiview_adapter"
FAMILY_OPTION = "mv4d_multiview_family"  # transformer_options: the family id of a patched model
IMAGE_PROMPT_WRAPPER = "mv4d_image_prompt"


def attention(q, k, v, extra_options: dict) -> torch.Tensor:
    """ComfyUI's attention for this device (looked up per call: ComfyUI picks it at start-up)."""
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))


def multiview_self_attention(q, k, v, extra_options):
    """attn1 replace: every view of a frame attends to the tokens of all views of that frame."""
    grid = grid_of(extra_options)
    if grid.views == 1:
        return attention(q, k, v, extra_options)
    return grid.views_apart(attention(grid.views_together(q), grid.views_together(k), grid.views_together(v), extra_options))


class CameraEmbedding(SharedPatch):
    """emb patch: emb + camera_embed(camera), per batch item (ComfyUI calls it with (emb, model_channels, options))."""

    def __init__(self, adapter: MultiviewAdapter):
        self.adapter = adapter

    def __call__(self, emb, model_channels, transformer_options):
        camera = call_data(transformer_options).get("camera")
        if camera is None:
            return emb
        return emb + self.adapter.camera_embed(camera.to(emb))


class ImagePromptAttention(SharedPatch):
    """attn2 replace of one block: text attention + weight * attention over the image-prompt tokens."""

    def __init__(self, adapter: MultiviewAdapter, block):
        self.adapter, self.block = adapter, block

    def __call__(self, q, k, v, extra_options):
        out = attention(q, k, v, extra_options)
        data = call_data(extra_options)
        tokens, weight = data.get("image_prompt_tokens"), float(data.get("image_prompt_weight", 1.0))
        if tokens is None or weight == 0.0:
            return out
        projection = self.adapter.image_prompt_for(self.block)
        tokens = tokens.to(q)
        return out + weight * attention(q, projection.to_k(tokens), projection.to_v(tokens), extra_options)


class ImagePromptInputs(SharedPatch):
    """DIFFUSION_MODEL wrapper (inside the conds wrapper): the resampler's tokens of this call's CLIP vision hidden
    states, and the pixel controller's clean latent written into its view of the UNet input."""

    def __init__(self, adapter: MultiviewAdapter):
        self.adapter = adapter

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        data = call_data(transformer_options)
        if "image_prompt" in data:
            data = {**data, "image_prompt_tokens": self.adapter.image_embed(data["image_prompt"].to(x))}
        control_latent = data.get("control_latent")
        if control_latent is not None:
            grid = grid_of(transformer_options)
            control_view = grid.per_view(torch.arange(grid.views) == grid.views - 1).repeat(grid.chunks(len(x)))
            x = torch.where(control_view.to(x.device).view(-1, 1, 1, 1), control_latent.to(x), x)
        transformer_options = {**transformer_options, OPTIONS: data}
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def adapter_patcher(adapter: MultiviewAdapter):
    """The adapter as a ModelPatcher of its own, loaded and offloaded by ComfyUI with the UNet."""
    return comfy.model_patcher.ModelPatcher(adapter, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_adapter(shape, state_dict: dict) -> MultiviewAdapter:
    # manual_cast: weights are cast to the activations' dtype and device at each call, as ComfyUI's own layers do
    adapter = MultiviewAdapter(shape, operations=comfy.ops.manual_cast)
    adapter.load_state_dict(state_dict, strict=True)
    return adapter.eval().requires_grad_(False)


def with_multiview_patches(model, adapter: MultiviewAdapter, family: MultiviewFamily):
    """A clone of an SD ModelPatcher that computes as `family` does, with `adapter`'s weights."""
    patched = model.clone()
    carry_mv4d_conds(patched)
    patched.set_additional_models(ADAPTER_KEY, [adapter_patcher(adapter)])
    patched.set_model_emb_patch(CameraEmbedding(adapter))
    for block in transformer_block_keys(patched.model.diffusion_model.state_dict().keys()):
        patched.set_model_attn1_replace(multiview_self_attention, *block)
    if family.image_prompt:
        for block in adapter.block_keys:
            patched.set_model_attn2_replace(ImagePromptAttention(adapter, block), *block)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, IMAGE_PROMPT_WRAPPER,
                                     ImagePromptInputs(adapter))
    patched.model_options.setdefault("transformer_options", {})[FAMILY_OPTION] = family.id
    return patched


def multiview_family(model) -> str | None:
    """The family id a MODEL was patched as (None: not one of our multi-view models)."""
    return getattr(model, "model_options", {}).get("transformer_options", {}).get(FAMILY_OPTION)

