"""What the attention patches share: a stand-in that registers a CrossAttention's projections as its own, and the
clone of a ModelPatcher with stand-ins at every attention module of one kind (attn1 or attn2)."""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import torch

from ..multi_gpu import keep_clones_matched

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class AttentionStandIn(torch.nn.Module):
    """Stands in for a CrossAttention module during sampling. It registers the original's projections under the
    same names, so weight paths (LoRA, low-VRAM casting, ComfyUI's weight patches) are unchanged."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        for name in PROJECTIONS:
            setattr(self, name, getattr(attention, name))
        self.heads, self.dim_head = attention.heads, attention.dim_head
        self.attn_precision = getattr(attention, "attn_precision", None)
        object.__setattr__(self, "original", attention)  # not a submodule: its weights are the ones registered above

    def call_original(self, x, context, value, mask, transformer_options):
        return self.original(x, context=context, value=value, mask=mask, transformer_options=transformer_options or {})


def attention_paths(diffusion_model: torch.nn.Module, kind: str, stand_in: type[AttentionStandIn]) -> list[str]:
    """The names of every attention module named `kind` ("attn1", "attn2") of a UNet. A model that another clone is
    sampling with holds that clone's object patches, so the stand-ins count too."""
    return [name for name, module in diffusion_model.named_modules() if name.rsplit(".", 1)[-1] == kind
            and isinstance(module, (comfy_attention.CrossAttention, stand_in))]


def with_stand_ins(model, kind: str, stand_in: type[AttentionStandIn]):
    """A clone of the ModelPatcher with `stand_in` object patches at every `kind` attention module (once each)."""
    patched = model.clone()
    diffusion_model = patched.get_model_object("diffusion_model")
    for path in attention_paths(diffusion_model, kind, stand_in):
        key = f"diffusion_model.{path}"
        attention = patched.get_model_object(key)  # the original module, or this clone's own stand-in
        if not isinstance(attention, stand_in):
            patched.add_object_patch(key, stand_in(attention))
    keep_clones_matched(patched)  # the model's copies on other GPUs take the patch too
    return patched
