"""Self-attention over short sequences through mv4d's one-tile Triton kernel (kernels/short_attention.py).

The video UNets' temporal layers (SVD, SV3D) attend over 25 frames or 21 views per token; PyTorch's attention
kernels run those calls about 5x slower than their memory traffic allows, and the kernel does not. The patch stands
in for every self-attention module (attn1) of a UNet: calls of at most 64 tokens, without a mask and without
gradients, on a device where the kernel runs, take the kernel; every other call (the spatial layers' thousands of
tokens, a mask, a model run on the CPU, one of ComfyUI's attention overrides, a call that may be differentiated)
takes the original module unchanged. Same result up to rounding,
as a change of attention backend gives.
"""

from __future__ import annotations

import torch

from ...kernels import short_attention as kernel
from .attention_stand_ins import AttentionStandIn, attention_paths, with_stand_ins


class ShortSequenceSelfAttention(AttentionStandIn):
    """Stands in for a CrossAttention module used as self-attention (attn1) during sampling."""

    def takes_kernel(self, x, context, value, mask, transformer_options) -> bool:
        return (context is None and value is None and mask is None and x.dim() == 3
                and "optimized_attention_override" not in (transformer_options or {})
                and not kernel.differentiated(x, *self.parameters())  # the kernel has no backward
                and kernel.runs_on(x.device) and kernel.fits(x.shape[1], self.to_q.out_features, self.heads, x.dtype))

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        if not self.takes_kernel(x, context, value, mask, transformer_options):
            return self.call_original(x, context, value, mask, transformer_options)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.to_out(torch.ops.mv4d.short_attention(q, k, v, self.heads))


def self_attention_paths(diffusion_model) -> list[str]:
    """The names of every self-attention module (attn1) of a UNet, stand-ins included."""
    return attention_paths(diffusion_model, "attn1", ShortSequenceSelfAttention)


def with_short_sequence_attention(model):
    """A clone of the ModelPatcher whose self-attention over short sequences runs the one-tile kernel while it
    samples (where the kernel cannot run, e.g. without Triton or on the CPU, every call takes the original)."""
    return with_stand_ins(model, "attn1", ShortSequenceSelfAttention)
