"""Linear layers as fp8 (e4m3) matrix multiplications on GPUs with fp8 tensor cores (compute capability 8.9+:
Ada, Hopper and newer). An optional speed-up that changes the result: both operands are rounded to 8-bit floats
with one scale per row of the activations and per output channel of the weights, products accumulate in float32
(torch._scaled_mm). Weights are quantized on the fly at each call: no second copy of the model is kept, and
ComfyUI's loading, offloading and weight patches (LoRA) work on the bf16 weights as usual.

Fp8Matmuls() is a torch function mode: inside `with Fp8Matmuls():` every eligible torch.nn.functional.linear call
(CUDA, bf16 or fp16, inner and output sizes multiples of 16, no autograd) runs in fp8; everything else (convolutions,
attention, ineligible linears) is untouched.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_CAPABILITY = (8, 9)


def gpu_has_fp8_matmuls(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 matrix, float32 scale per row) with matrix ~= fp8 * scale; each row's largest magnitude maps to 448.
    The scaling multiplies in the matrix's own dtype (no full-size float32 temporary: these passes over the
    activations are what an fp8 linear pays for its faster product)."""
    largest = torch.linalg.vector_norm(matrix, ord=float("inf"), dim=1, keepdim=True).float().clamp(min=1e-12)
    # the multiplier rounded to the matrix's dtype, and the scale that undoes exactly that multiplier
    multiplier = (FP8_MAX / largest).clamp(max=torch.finfo(matrix.dtype).max).to(matrix.dtype)
    return (matrix * multiplier).to(FP8), multiplier.float().reciprocal()


def eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.ndim == 2
            and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0 and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and gpu_has_fp8_matmuls(x.device))


def _linear_in_fp8(x, weight, bias, product) -> torch.Tensor:
    """x @ weight.T + bias with both operands rounded to fp8 (row-wise scales); `product` multiplies the fp8
    matrices and their scales into a bf16 result."""
    x_fp8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    w_fp8, w_scale = quantize_rows(weight)
    out = product(x_fp8, x_scale, w_fp8, w_scale).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias on fp8 tensor cores, result in x's dtype."""
    # row-wise scaled fp8 products are only produced in bf16; the column-major second operand is weight's transpose
    return _linear_in_fp8(x, weight, bias, lambda a, a_scale, b, b_scale: torch._scaled_mm(
        a, b.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=torch.bfloat16))


def emulated_fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What fp8_linear computes, on any device: the same rounding, products in float32 (the reference for tests)."""
    return _linear_in_fp8(x, weight, bias, lambda a, a_scale, b, b_scale: (
        (a.float() * a_scale) @ (b.float() * b_scale).t()).to(torch.bfloat16))


class Fp8Matmuls(TorchFunctionMode):
    """Routes eligible torch.nn.functional.linear calls through fp8_linear; counts what it routed."""

    def __init__(self):
        super().__init__()
        self.routed = self.skipped = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if eligible(x, weight):
                self.routed += 1
                return fp8_linear(x, weight, bias)
            self.skipped += 1
        return func(*args, **kwargs)
