"""fp8 linear layers: the rounding they apply, and that the function mode touches nothing it cannot run in fp8.
(The GPU lane checks torch._scaled_mm against the emulation and the speed-up on a model.)"""

from __future__ import annotations

import torch

from mv4d.kernels.fp8_matmul import FP8_MAX, Fp8Matmuls, emulated_fp8_linear, quantize_rows


def test_rows_round_to_e4m3_with_their_largest_value_at_448():
    matrix = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 64).view(-1, 1)
    fp8, scale = quantize_rows(matrix)
    assert fp8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.allclose(fp8.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))
    restored = fp8.float() * scale
    # e4m3 keeps 3 mantissa bits: within 2^-4 relative for normal values (smaller ones are subnormal: absolute)
    error = (restored - matrix).abs()
    assert bool((error <= matrix.abs() * 2**-4 + scale * 2**-9).all())


def test_emulated_fp8_linear_is_close_to_the_exact_product():
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(3, 50, 320, generator=generator), torch.randn(640, 320, generator=generator) / 18, torch.randn(640, generator=generator)
    exact = torch.nn.functional.linear(x, weight, bias)
    approx = emulated_fp8_linear(x, weight, bias)
    assert approx.shape == exact.shape
    relative = ((approx - exact).norm() / (exact - bias).norm()).item()
    print(f"fp8 linear vs exact: relative error {relative:.4f}")
    assert 1e-4 < relative < 0.05  # it does round, and only as much as 8-bit floats must


def test_the_mode_leaves_what_it_cannot_run_in_fp8_alone():
    layer = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    x = torch.randn(5, 32)
    with torch.no_grad():
        plain = layer(x)
        with Fp8Matmuls() as mode:  # on the CPU nothing is eligible
            routed = layer(x)
    assert torch.equal(plain, routed) and mode.routed == 0 and mode.skipped == 2
