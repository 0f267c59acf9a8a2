"""GEGLU's projection and gate as one matrix-product kernel: out = (x Wv + bv) * gelu(x Wg + bg).

Why: a GEGLU feed-forward projects to twice its width and then multiplies one half by gelu of the other. Written as
a product followed by an elementwise kernel, the product writes the doubled width to memory and the elementwise
kernel reads it back; at the Diffusion² paper setting that elementwise pass alone was 0.65 s of the 8.5 s compiled
joint step (bench/RESULTS.md). Here each program of the kernel accumulates matching tiles of both halves (the
value rows and the gate rows of the one weight) and writes only the gated product: the doubled width never reaches
memory, and the product's arithmetic is the same.

Results equal the two-kernel path up to rounding: both halves accumulate in float32 like cuBLAS does, but they are
not rounded to the model's dtype before the gate (the two-kernel path rounds the projection once, then the product).

The kernel is Triton; Triton is imported at the first call only, so this module loads everywhere. `geglu_matmul`
is the operator `torch.ops.mv4d.geglu_matmul` (opaque to torch.compile: a compiled UNet calls it as one kernel, and
the precompiled files of MV4D Compile and Keep refer to it by name). `can_fuse` says where it runs; elsewhere the
callers keep the formula (`geglu_reference`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

OPERATOR = "mv4d::geglu_matmul"
DTYPES = (torch.bfloat16, torch.float16)


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The formula, as ComfyUI's GEGLU computes it: the projection, then the first half gated by gelu of the second."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def can_fuse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the one-kernel path runs these operands: a CUDA tensor in bf16 / fp16 with weights of the same dtype
    on the same device, no gradients asked for (the kernel has no backward), and Triton importable."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (x.is_cuda and x.dtype in DTYPES and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
            and weight.ndim == 2 and weight.shape[0] % 2 == 0 and weight.shape[1] == x.shape[-1] and x.numel() > 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and has_triton())


@functools.cache
def tuned_kernel():
    """The kernel with its launch configurations, chosen per (width, inner size) by timing them at the first call of
    each (Triton's autotuner; configurations a GPU has no room for are skipped)."""
    import triton

    from . import triton_geglu

    return triton.autotune(configs=triton_geglu.configs(), key=["N", "K"])(triton_geglu.geglu_matmul_kernel)


@functools.cache
def tuned_descriptor_kernel(warp_specialize: bool = False):
    """The Hopper variant (tensor descriptors), tuned the same way."""
    import triton

    from . import triton_geglu

    return triton.autotune(configs=triton_geglu.descriptor_configs(warp_specialize), key=["N", "K"])(
        triton_geglu.geglu_matmul_descriptor_kernel)


def launch_descriptors(x2d, weight, bias, out, warp_specialize: bool = False):
    """launch() with the Hopper variant: x, weight and out are passed as tensor descriptors."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, inner = x2d.shape
    width = weight.shape[0] // 2
    programs = persistent_programs(x2d.device)
    placeholder = [8, 8]  # each configuration's pre-hook sets the blocks

    def grid(meta):
        return (min(programs, -(-rows // meta["BLOCK_M"]) * -(-width // meta["BLOCK_N"])),)

    tuned_descriptor_kernel(warp_specialize)[grid](
        TensorDescriptor.from_tensor(x2d, placeholder), TensorDescriptor.from_tensor(weight, placeholder),
        bias if bias is not None else weight, TensorDescriptor.from_tensor(out, placeholder), rows, width, inner,
        programs, HAS_BIAS=bias is not None)
    return out


def persistent_programs(device: torch.device) -> int:
    """How many programs the persistent kernel runs: one per multiprocessor (a few on the CPU's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def launch(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, kernel=None,
           config: dict | None = None) -> torch.Tensor:
    """Writes the gated product of x2d (M, K) and weight (2N, K) into out (M, N). `kernel` / `config` pick a kernel
    and a fixed launch configuration (Triton's interpreter in the tests); by default the tuned kernel."""
    rows, inner = x2d.shape
    width = weight.shape[0] // 2
    kernel = kernel or tuned_kernel()
    bias_pointer = bias if bias is not None else weight  # not read when HAS_BIAS is false

    programs = persistent_programs(x2d.device)

    def grid(meta):
        return (min(programs, -(-rows // meta["BLOCK_M"]) * -(-width // meta["BLOCK_N"])),)

    kernel[grid](x2d, weight, bias_pointer, out, rows, width, inner,
                 x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                 programs, HAS_BIAS=bias is not None, **(config or {}))
    return out


def gated_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., K) x (2N, K) [+ (2N,)] -> (..., N): GEGLU's projection and gate in one kernel (see the module)."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty((x2d.shape[0], weight.shape[0] // 2), device=x.device, dtype=x.dtype)
    launch(x2d, weight, bias, out)
    return out.view(*x.shape[:-1], weight.shape[0] // 2)


def gated_product_shape(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


def registered_operator():
    """torch.ops.mv4d.geglu_matmul, registered once per process: ComfyUI and the tests may import this package under
    two names, and an operator cannot be defined twice."""
    namespace, name = OPERATOR.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except AttributeError:
        operator = torch.library.custom_op(OPERATOR, gated_product, mutates_args=())
        operator.register_fake(gated_product_shape)
        return getattr(getattr(torch.ops, namespace), name)


geglu_matmul = registered_operator()
