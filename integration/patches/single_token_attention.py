"""An exact saving for models whose cross-attention attends to one token (SVD, SV3D: one CLIP image embedding).

Softmax over a single key is exactly 1, so cross-attention's output is to_out(to_v(context)) for every query: the
queries' projection and the attention itself change nothing. The patch computes to_out(to_v(context)) once per
batch item and broadcasts it over the queries, in the spatial and the temporal transformer blocks alike. Calls with
more context tokens (text prompts), a mask, or one of ComfyUI's attn2 replace patches (which call the projections
themselves) take the original path, so the patch is safe on any model.
"""

from __future__ import annotations

from .attention_stand_ins import AttentionStandIn, attention_paths, with_stand_ins


class SingleTokenCrossAttention(AttentionStandIn):
    """Stands in for a cross-attention module (attn2) during sampling."""

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        keys = value if value is not None else context
        if context is None or mask is not None or context.shape[1] != 1 or keys.shape[1] != 1:
            return self.call_original(x, context, value, mask, transformer_options)
        return self.to_out(self.to_v(keys)).expand(-1, x.shape[1], -1)


def cross_attention_paths(diffusion_model) -> list[str]:
    """The names of every cross-attention module (attn2) of a UNet, stand-ins included."""
    return attention_paths(diffusion_model, "attn2", SingleTokenCrossAttention)


def with_single_token_attention(model):
    """A clone of the ModelPatcher whose cross-attention takes the single-token shortcut while it samples."""
    return with_stand_ins(model, "attn2", SingleTokenCrossAttention)
