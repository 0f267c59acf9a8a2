"""The Triton kernel of geglu_matmul.py (imported only where Triton is: see that module for what and why).

Each output tile (BLOCK_M, BLOCK_N): the same x tile is multiplied by the weight's value
rows n and its gate rows N + n (two float32 accumulators, one pass over K), then bias, exact (erf) gelu and the
product are applied in registers and only the product is stored. Programs are ordered in groups of GROUP_M rows of
tiles so that neighbouring programs reuse the same weight tiles from L2 (the order of Triton's matmul tutorial).
K is a compile-time constant: the loop over it is static, and a UNet has three widths (one build each).
"""

from __future__ import annotations

import triton
import triton.language as tl

SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2); a constexpr: the kernel may read it


def configs() -> list[triton.Config]:
    """Launch configurations to choose from by timing. Two accumulators of BLOCK_N columns cost what one of
    2 * BLOCK_N does in a plain product, so the tiles are the plain product's good ones with BLOCK_N halved.
    FLATTEN lets Triton pipeline across tiles: the next tile's first loads overlap this tile's gate and store,
    which matters where K is short (320 channels: five steps of 64)."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (128, 64, 64, 3, 8), (256, 64, 64, 3, 8), (64, 128, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "FLATTEN": flatten},
                          num_stages=stages, num_warps=warps)
            for m, n, k, stages, warps in shapes for flatten in (True, False)]


@triton.jit
def geglu_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K: tl.constexpr,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, programs,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, FLATTEN: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    inner = tl.arange(0, BLOCK_K)
    # persistent: each program walks tiles program, program + programs, ... (programs: about one per SM)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs, flatten=FLATTEN):
        first_m = (tile // in_group) * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (tile % in_group) % group_rows
        tile_n = (tile % in_group) // group_rows

        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        column_ok = columns < N
        x_tile = x_ptr + rows[:, None].to(tl.int64) * stride_xm + inner[None, :] * stride_xk
        value_tile = w_ptr + columns[None, :] * stride_wn + inner[:, None] * stride_wk
        gate_tile = value_tile + N * stride_wn

        value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, tl.cdiv(K, BLOCK_K)):
            if K % BLOCK_K == 0:  # the models' widths: no mask along K
                x = tl.load(x_tile, mask=row_ok[:, None], other=0.0)
                value_weights = tl.load(value_tile, mask=column_ok[None, :], other=0.0)
                gate_weights = tl.load(gate_tile, mask=column_ok[None, :], other=0.0)
            else:
                inner_ok = inner < K - step * BLOCK_K
                x = tl.load(x_tile, mask=row_ok[:, None] & inner_ok[None, :], other=0.0)
                value_weights = tl.load(value_tile, mask=inner_ok[:, None] & column_ok[None, :], other=0.0)
                gate_weights = tl.load(gate_tile, mask=inner_ok[:, None] & column_ok[None, :], other=0.0)
            value = tl.dot(x, value_weights, value)
            gate = tl.dot(x, gate_weights, gate)
            x_tile += BLOCK_K * stride_xk
            value_tile += BLOCK_K * stride_wk
            gate_tile += BLOCK_K * stride_wk

        if HAS_BIAS:
            value += tl.load(b_ptr + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
            gate += tl.load(b_ptr + N + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
        product = value * (0.5 * gate * (1.0 + tl.math.erf(gate * SQRT_HALF)))
        out_tile = out_ptr + rows[:, None].to(tl.int64) * stride_om + columns[None, :] * stride_on
        tl.store(out_tile, product.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & column_ok[None, :])


def set_descriptor_blocks(arguments: dict) -> None:
    """A configuration's pre-hook: the tensor descriptors' blocks are the configuration's tiles."""
    block_m, block_n, block_k = arguments["BLOCK_M"], arguments["BLOCK_N"], arguments["BLOCK_K"]
    arguments["x_desc"].block_shape = [block_m, block_k]
    arguments["w_desc"].block_shape = [block_n, block_k]
    arguments["out_desc"].block_shape = [block_m, block_n]


def descriptor_configs(warp_specialize: bool = False) -> list[triton.Config]:
    """The tensor-memory-accelerator kernel's configurations (Hopper and newer)."""
    shapes = [(128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (128, 64, 64, 3, 8), (256, 64, 64, 3, 8), (128, 128, 64, 4, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "FLATTEN": flatten,
                           "WARP_SPECIALIZE": warp_specialize},
                          num_stages=stages, num_warps=warps, pre_hook=set_descriptor_blocks)
            for m, n, k, stages, warps in shapes for flatten in ((False,) if warp_specialize else (True, False))]


@triton.jit
def geglu_matmul_descriptor_kernel(x_desc, w_desc, b_ptr, out_desc, M, N, K: tl.constexpr, programs,
                                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr,
                                   WARP_SPECIALIZE: tl.constexpr):
    """geglu_matmul_kernel with its tiles moved by the tensor memory accelerator (out-of-range rows read as zeros
    and are not stored, so no masks)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs, flatten=FLATTEN):
        first_m = (tile // in_group) * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        first_row = (first_m + (tile % in_group) % group_rows) * BLOCK_M
        first_column = ((tile % in_group) // group_rows) * BLOCK_N
        value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
            x = x_desc.load([first_row, step * BLOCK_K])
            value = tl.dot(x, w_desc.load([first_column, step * BLOCK_K]).T, value)
            gate = tl.dot(x, w_desc.load([N + first_column, step * BLOCK_K]).T, gate)
        if HAS_BIAS:
            columns = first_column + tl.arange(0, BLOCK_N)
            value += tl.load(b_ptr + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
            gate += tl.load(b_ptr + N + columns, mask=columns < N, other=0.0).to(tl.float32)[None, :]
        product = value * (0.5 * gate * (1.0 + tl.math.erf(gate * SQRT_HALF)))
        out_desc.store([first_row, first_column], product.to(out_desc.dtype))
