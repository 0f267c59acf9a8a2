"""The elementwise glue between a UNet's matrix products, each as one fused kernel.

In eager PyTorch every elementwise operation reads and writes the whole activation: at the Diffusion² paper setting
the SVD-family step spends about 40 % of its kernel time there (bench/RESULTS.md, the operator profile), GEGLU's
gelu and product on the two strided halves of one projection and the video mixer's three passes among them. Each
function below is the eager formula; `FusedKernels` compiles them with torch.compile (inductor) into one kernel
each, shape-generic (dynamic shapes), small regions instead of a whole-UNet compile. Compiled kernels compute in
float32 inside and round once, so bf16 results differ from eager by rounding only. (A GroupNorm + SiLU kernel was
measured slower than PyTorch's GroupNorm followed by SiLU, and recompiled per layout: not offered.)
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """GEGLU's activation on the projection's output: the first half gated by gelu of the second."""
    value, gate = projected.chunk(2, dim=-1)
    return value * F.gelu(gate)


def alpha_blend(alpha: torch.Tensor, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """The video UNets' mix of the spatial and temporal paths (ComfyUI's AlphaBlender formula)."""
    return alpha.to(spatial.dtype) * spatial + (1.0 - alpha).to(spatial.dtype) * temporal


GLUE = {"geglu": geglu, "alpha_blend": alpha_blend}


class FusedKernels:
    """The glue functions for one backend: None runs them eagerly (the reference), a torch.compile backend name
    ("inductor" on a GPU; "aot_eager" traces without generating code) compiles each once, shape-generic."""

    def __init__(self, backend: str | None):
        self.backend = backend
        for name, function in GLUE.items():
            setattr(self, name, function if backend is None else torch.compile(function, backend=backend, dynamic=True))


@functools.cache
def fused_kernels(backend: str | None) -> FusedKernels:
    """One compiled set per backend for the process: every patched model shares its kernels and compile cache."""
    return FusedKernels(backend)


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def compile_backend(device: torch.device) -> str | None:
    """The torch.compile backend for the glue on this device: inductor on a CUDA GPU; None (the eager formulas,
    the model unchanged) elsewhere, where inductor would need a C++ toolchain for a small gain."""
    return "inductor" if device.type == "cuda" else None


def inductor_missing_reason(device: torch.device) -> str | None:
    """Why inductor cannot generate kernels for this device, or None. GPU kernels come from Triton, which PyTorch's
    Linux CUDA wheels bring and its Windows wheels do not."""
    if compile_backend(device) == "inductor" and not has_triton():
        return "torch.compile's GPU kernels need Triton, and this Python has none"
    return None
