"""Self-attention over short sequences (at most 64 tokens) as one Triton tile per sequence and head.

Why: the video UNets' temporal layers (SVD / SV3D) attend over 25 frames or 21 views per token, in calls of
hundreds of thousands of sequences. That work is bound by memory (q, k, v read once, the output written once), but
PyTorch's attention kernels tile by 64-128 queries, most of them padding here, and ran it at 0.9-1.3 TB/s on an
H200; this kernel holds a whole sequence in one tile and runs the same calls at 3.6-4.3 TB/s, about 5x faster
(bench/short_attention.py, bench/RESULTS.md). Exact up to rounding: scores and softmax in float32, the weights
rounded to the inputs' dtype before the second product, as flash attention does.

The operator `torch.ops.mv4d.short_attention` is a torch.library triton_op, so torch.compile sees the kernel and
a compiled UNet keeps it. It takes q, k, v as the projections give them, (batch, tokens, heads * head channels),
and returns the output in that layout. It needs Triton: a CUDA GPU, or Triton's interpreter on the CPU
(TRITON_INTERPRET=1, for tests); `runs_on(device)` says whether it is there.
"""

from __future__ import annotations

import importlib.util
import os

import torch

MAX_TOKENS = 64  # one tile of scores per program: 64 x 64 float32 still sits in registers
MAX_HEAD_CHANNELS = 128

TRITON = importlib.util.find_spec("triton") is not None

if TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def short_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, heads, tokens, head_channels,
                               q_batch, q_token, k_batch, k_token, v_batch, v_token, o_batch, o_token,
                               SCALE: tl.constexpr, TILE: tl.constexpr, CHANNELS: tl.constexpr, PRECISION: tl.constexpr):
        program = tl.program_id(0)
        batch, head = program // heads, program % heads
        rows = tl.arange(0, TILE)
        channels = tl.arange(0, CHANNELS)
        inside = (rows[:, None] < tokens) & (channels[None, :] < head_channels)
        columns = head * head_channels + channels[None, :]
        q = tl.load(q_ptr + batch * q_batch + rows[:, None] * q_token + columns, mask=inside, other=0.0)
        k = tl.load(k_ptr + batch * k_batch + rows[:, None] * k_token + columns, mask=inside, other=0.0)
        v = tl.load(v_ptr + batch * v_batch + rows[:, None] * v_token + columns, mask=inside, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE
        scores = tl.where(rows[None, :] < tokens, scores, float("-inf"))  # padded keys take no weight
        weights = tl.exp(scores - tl.max(scores, 1)[:, None])
        total = tl.sum(weights, 1)
        out = tl.dot(weights.to(v.dtype), v, input_precision=PRECISION) / total[:, None]
        tl.store(o_ptr + batch * o_batch + rows[:, None] * o_token + columns, out.to(o_ptr.dtype.element_ty), mask=inside)

    @triton_op("mv4d::short_attention", mutates_args=())
    def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """softmax(q kᵀ / √c) v per head, for (batch, tokens, heads * c) inputs (see `fits`)."""
        batch, tokens, width = q.shape
        head_channels = width // heads
        out = torch.empty(batch, tokens, width, device=q.device, dtype=q.dtype)
        tile = max(16, triton.next_power_of_2(tokens))  # tl.dot's smallest tile is 16
        # one warp per program was fastest for 21-25 tokens (bench/short_attention.py); larger tiles need more
        wrap_triton(short_attention_kernel)[(batch * heads,)](
            q, k, v, out, heads, tokens, head_channels,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            # a constant, not an argument: inside a compiled graph inductor typed the float argument fp64 (its
            # generated signature), which makes the scores and the softmax fp64; the kernel ran 2.4x slower there
            # than eager (bench/RESULTS.md). As a constant it is fp32, as in eager (the change not yet timed on a GPU)
            SCALE=head_channels ** -0.5, TILE=tile, CHANNELS=max(16, triton.next_power_of_2(head_channels)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32 rounding)
            num_warps=1 if tile <= 32 else 4)
        return out


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can run on this device here: Triton on a CUDA GPU, or Triton's interpreter."""
    if not TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fits(tokens: int, width: int, heads: int, dtype: torch.dtype) -> bool:
    """Whether a (batch, tokens, width) self-attention with this many heads is one the kernel takes."""
    return (0 < tokens <= MAX_TOKENS and width % heads == 0 and width // heads <= MAX_HEAD_CHANNELS
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def differentiated(*tensors: torch.Tensor) -> bool:
    """Whether autograd may ask a gradient through a call on these tensors (the kernel has no backward)."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether the kernel takes this (q, k, v, heads) call: a self-attention that `fits`, on a device where the
    kernel runs, with q, k and v of one shape whose channels are contiguous (the kernel steps through the tokens
    and the batch by their strides, not through the channels), and no gradient asked of it (the kernel has no
    backward: training, e.g. Vivid-ZOO's alignment adapters through the motion modules, takes PyTorch's)."""
    return (q.dim() == 3 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and all(tensor.stride(-1) == 1 for tensor in (q, k, v))
            and not differentiated(q, k, v)
            and runs_on(q.device) and fits(q.shape[1], q.shape[2], heads, q.dtype))
