"""The one-tile short-sequence attention kernel (kernels/short_attention.py) against PyTorch's attention.

The kernel runs here under Triton's interpreter, in float32: the same kernel code a GPU compiles, executed on the
CPU. Triton decides between interpreter and compiler when the kernel is defined, so those checks run in a child
process started with TRITON_INTERPRET=1. The GPU lane (tests/gpu/test_gpu_speedups.py) runs it compiled, in bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mv4d.kernels import short_attention

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not short_attention.TRITON, reason="Triton is not installed here (pip install "
                                  "triton): the kernel's checks run it under Triton's interpreter")

REGISTER_MV4D = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("mv4d", {str(ROOT / "__init__.py")!r}, submodule_search_locations=[{str(ROOT)!r}])
sys.modules["mv4d"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["mv4d"])
"""


def run_under_interpreter(code: str) -> dict:
    """Run `code` (which ends by printing one JSON line) in a Python with Triton's interpreter on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-P", "-c", REGISTER_MV4D + textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
def test_the_kernel_matches_pytorch_attention_on_strided_projections():
    # (batch, tokens, heads, head channels): the temporal layers' 21 / 25, one token, a full 64-token tile, 33
    # tokens (a 64 tile mostly padding), head widths that are not powers of two (AnimateDiff's 40)
    shapes = [(3, 25, 2, 64), (2, 21, 3, 64), (4, 1, 1, 64), (2, 64, 2, 16), (2, 33, 1, 128), (3, 16, 2, 40)]
    found = run_under_interpreter(f"""
        import torch
        import mv4d.kernels.short_attention  # registers the operator
        generator = torch.Generator().manual_seed(0)
        differences = []
        for batch, tokens, heads, channels in {shapes!r}:
            width = heads * channels
            # q, k, v as slices of one fused projection: rows 3 * width apart, as a strided input
            fused = torch.randn(batch, tokens, 3 * width, generator=generator)
            q, k, v = fused.split(width, dim=-1)
            out = torch.ops.mv4d.short_attention(q, k, v, heads)
            split = lambda t: t.reshape(batch, tokens, heads, channels).transpose(1, 2)
            expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            expected = expected.transpose(1, 2).reshape(batch, tokens, width)
            differences.append([list(out.shape), out.is_contiguous(), float((out - expected).abs().max()),
                                float(expected.abs().max())])
        print(json.dumps({{"differences": differences}}))
    """)
    for (batch, tokens, heads, channels), (shape, contiguous, difference, scale) in zip(shapes, found["differences"]):
        assert shape == [batch, tokens, heads * channels] and contiguous
        assert difference <= 1e-5 * max(scale, 1.0), (batch, tokens, heads, channels, difference)


@needs_triton
def test_the_operator_traces_with_fake_tensors():
    """What torch.compile does first with the operator (a triton_op): shape and dtype come out right, nothing runs
    (a CUDA kernel that cannot run on this machine)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(7, 25, 320, dtype=torch.bfloat16, device="cuda")
        out = torch.ops.mv4d.short_attention(q, q, q, 5)
    assert (out.shape, out.dtype, out.device.type) == ((7, 25, 320), torch.bfloat16, "cuda")


def test_only_short_self_attention_fits():
    fits = short_attention.fits
    assert fits(25, 320, 5, torch.bfloat16) and fits(21, 1280, 20, torch.float16) and fits(64, 128, 1, torch.float32)
    assert not fits(65, 320, 5, torch.bfloat16)  # a spatial layer's tokens: PyTorch's kernels do those well
    assert not fits(0, 320, 5, torch.bfloat16)
    assert not fits(25, 320, 3, torch.bfloat16)  # heads that do not divide the width
    assert not fits(25, 160, 1, torch.bfloat16)  # heads wider than one tile
    assert not fits(25, 320, 5, torch.float64)


def test_the_kernel_runs_where_triton_does(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not short_attention.runs_on(torch.device("cpu"))
    assert short_attention.runs_on(torch.device("cuda")) == short_attention.TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert short_attention.runs_on(torch.device("cpu")) == short_attention.TRITON


def test_takes_only_calls_whose_channels_the_kernel_can_step_through(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel "runs" on the CPU, so only the call decides
    q = torch.randn(4, 16, 64)
    assert short_attention.takes(q, q, q, 8) == short_attention.TRITON
    fused = torch.randn(4, 16, 192)
    assert short_attention.takes(*fused.split(64, dim=-1), 8) == short_attention.TRITON  # strided tokens: fine
    transposed = torch.randn(4, 64, 16).transpose(1, 2)  # channels 16 apart: the kernel reads them as neighbours
    assert not short_attention.takes(transposed, q, q, 8)
    assert not short_attention.takes(q, torch.randn(4, 20, 64), torch.randn(4, 20, 64), 8)  # cross-attention
    assert not short_attention.takes(q, q, q.to(torch.float16), 8)
    assert not short_attention.takes(torch.randn(4, 65, 64), torch.randn(4, 65, 64), torch.randn(4, 65, 64), 8)
    trained = torch.randn(4, 16, 64, requires_grad=True)  # the kernel has no backward
    assert not short_attention.takes(trained, q, q, 8)
    with torch.no_grad():
        assert short_attention.takes(trained, q, q, 8) == short_attention.TRITON
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not short_attention.takes(q, q, q, 8)  # the CPU without the interpreter
