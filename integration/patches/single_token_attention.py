"""An exact saving for models whose cross-attention attends to one token (SVD, SV3D: one CLIP image embedding).

Softmax over a single key is exactly 1, so cross-attention's output is to_out(to_v(context)) for every query: the
queries' projection and the attention itself change nothing. The patch computes to_out(to_v(context)) once per
batch item and broadcasts it over the queries, in the spatial and the temporal transformer blocks alike. Calls with
more context tokens (text prompts), a mask, or one of ComfyUI's attn2 replace patches (which call the projections
themselves) take the original path, so the patch is safe on any model.
"""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import torch

from ..multi_gpu import keep_clones_matched

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class SingleTokenCrossAttention(torch.nn.Module):
    """Stands in for a CrossAttention module during sampling. It registers the original's projections under the
    same names, so weight paths (LoRA, low-VRAM casting, ComfyUI's weight patches) are unchanged."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        for name in PROJECTIONS:
            setattr(self, name, getattr(attention, name))
        self.heads, self.dim_head = attention.heads, attention.dim_head
        self.attn_precision = getattr(attention, "attn_precision", None)
        object.__setattr__(self, "original", attention)  # not a submodule: its weights are the ones registered above

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        keys = value if value is not None else context
        if context is None or mask is not None or context.shape[1] != 1 or keys.shape[1] != 1:
            return self.original(x, context=context, value=value, mask=mask, transformer_options=transformer_options or {})
        return self.to_out(self.to_v(keys)).expand(-1, x.shape[1], -1)


def cross_attention_paths(diffusion_model: torch.nn.Module) -> list[str]:
    """The names of every cross-attention module (attn2) of a UNet. A model that another clone is sampling with
    holds that clone's object patches, so the stand-ins count too."""
    return [name for name, module in diffusion_model.named_modules() if name.rsplit(".", 1)[-1] == "attn2"
            and isinstance(module, (comfy_attention.CrossAttention, SingleTokenCrossAttention))]


def with_single_token_attention(model):
    """A clone of the ModelPatcher whose cross-attention takes the single-token shortcut while it samples."""
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    for path in cross_attention_paths(diffusion_model):
        key = f"diffusion_model.{path}"
        attention = patched.get_model_object(key)  # the original module, or this clone's own stand-in
        if not isinstance(attention, SingleTokenCrossAttention):
            patched.add_object_patch(key, SingleTokenCrossAttention(attention))
    keep_clones_matched(patched)  # the model's copies on other GPUs take the patch too
    return patched
