"""Grouped matrix multiplication in Triton (chapter 04): every expert's matmul in one launch.

The rows of A are sorted by expert: expert e owns rows ends[e-1] .. ends[e] (its count may be 0). Two
kernels cover the three matmuls of a mixture-of-experts layer's forward and backward passes:

- grouped_matmul: C[rows of e] = A[rows of e] @ B[e]. The grid walks a tile table (expert, first row)
  built on the host from the counts, so no program is spent on another expert's rows or on padding.
  With B[e] passed transposed (strides only, no copy) the same kernel gives the input gradient.
- grouped_weight_grad: G[e] = A[rows of e]^T @ C[rows of e], the weights' gradient: one program per
  (expert, tile of G) sums over that expert's rows, BLOCK_R at a time; idle experts get zeros.

Like the tiled matmul of chapter 02, tiles accumulate in fp32 and wrap nothing: masks keep every load
in bounds. On a GPU one fixed configuration is used (the tile table depends on BLOCK_M, so it is not
autotuned); in the interpreter (TRITON_INTERPRET=1, no GPU) a small one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._inputs import LastSeen, require_same_device, require_tensor
from .tiled_matmul import launch_settings, nothing_to_multiply

INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)
GPU_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
INTERPRETER_GRAD_CONFIG = dict(BLOCK_K=32, BLOCK_N=32, BLOCK_R=16)
GPU_GRAD_CONFIG = dict(BLOCK_K=64, BLOCK_N=64, BLOCK_R=32, num_warps=4, num_stages=3)


@triton.jit
def grouped_matmul_kernel(a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, M, N, K,
                          stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr = "ieee"):
    tile = tl.program_id(0)
    tile_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    end = tl.load(ends_ptr + expert).to(tl.int64)
    rows = tl.load(tile_row_ptr + tile).to(tl.int64) + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # >= 0 and < M too: never outside a and c, whatever ends says (a negative entry gives negative rows)
    row_ok = (rows >= 0) & (rows < end) & (rows < M)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k_block * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (ks[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(ks[:, None] < k_left) & col_ok[None, :], other=0.0)
        accumulator = tl.dot(a, b, accumulator, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, accumulator.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_weight_grad_kernel(a_ptr, c_ptr, g_ptr, starts_ptr, ends_ptr, M, K, N,
                               stride_am, stride_ak, stride_cm, stride_cn, stride_ge, stride_gk, stride_gn,
                               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                               INPUT_PRECISION: tl.constexpr = "ieee"):
    expert = tl.program_id(0)
    tile_k = tl.program_id(1)
    tile_n = tl.program_id(2)
    start = tl.load(starts_ptr + expert).to(tl.int64)
    end = tl.load(ends_ptr + expert).to(tl.int64)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    col_ok = cols < N
    accumulator = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for first in range(start, end, BLOCK_R):
        rows = first + tl.arange(0, BLOCK_R)
        row_ok = (rows >= 0) & (rows < end) & (rows < M)
        a_t = tl.load(a_ptr + rows[None, :] * stride_am + ks[:, None] * stride_ak,
                      mask=k_ok[:, None] & row_ok[None, :], other=0.0)          # (BLOCK_K, BLOCK_R): A^T
        c = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)          # (BLOCK_R, BLOCK_N)
        accumulator = tl.dot(a_t, c, accumulator, input_precision=INPUT_PRECISION)
    g_ptrs = g_ptr + expert.to(tl.int64) * stride_ge + ks[:, None] * stride_gk + cols[None, :] * stride_gn
    tl.store(g_ptrs, accumulator.to(g_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def _check(name: str, a: torch.Tensor, other: torch.Tensor, ends: torch.Tensor) -> None:
    require_tensor(name, "a", a)
    require_tensor(name, "the second matrix", other)
    require_same_device(name, a, other, ends)
    if a.dtype != other.dtype:
        raise ValueError(f"{name}: a is {a.dtype} and the other matrix is {other.dtype}; convert one so they match")
    if ends.dim() != 1 or ends.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: ends must be a 1-D integer tensor, one cumulative row count per expert")


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(N, K) rows sorted by expert, times (E, K, M) per-expert matrices: (N, M). ends: (E,) cumulative counts."""
    _check("grouped_matmul", a, b, ends)
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[1] or ends.numel() != b.shape[0]:
        raise ValueError(f"grouped_matmul: expected a (N, K), b (E, K, M) and ends (E,); got {tuple(a.shape)}, "
                         f"{tuple(b.shape)} and {tuple(ends.shape)}")
    (rows, inner), n_cols = a.shape, b.shape[2]
    interpreted, precision = launch_settings("grouped_matmul", a)   # first: refused whatever the shape
    c = torch.empty((rows, n_cols), dtype=a.dtype, device=a.device)
    if (done := nothing_to_multiply(c, inner)) is not None:
        return done
    config = dict(INTERPRETER_CONFIG if interpreted else GPU_CONFIG)
    tile_expert, first_row, ends32 = _tile_table(ends, config["BLOCK_M"])
    if tile_expert.numel() == 0:
        return c.zero_()
    grid = (tile_expert.numel(), triton.cdiv(n_cols, config["BLOCK_N"]))
    grouped_matmul_kernel[grid](a, b, c, tile_expert, first_row, ends32, rows, n_cols, inner, a.stride(0), a.stride(1),
                                b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
                                INPUT_PRECISION=precision, **config)
    return c


# The last tile table built: an MoE step multiplies by the same counts four times, and building the table
# waits for the GPU (repeat_interleave needs the number of tiles on the host).
_last_table = LastSeen()


def _tile_table(ends: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each expert, one entry per BLOCK_M of its rows: (expert, first row) as int32, and ends as int32."""
    table = _last_table.get(ends, block_m)
    if table is not None:
        return table
    ends64 = ends.to(torch.int64)
    counts = torch.diff(ends64, prepend=ends64.new_zeros(1))
    tiles = ((counts + block_m - 1) // block_m).clamp(min=0)   # falling ends (unchecked here): no tiles
    tile_expert = torch.repeat_interleave(torch.arange(ends.numel(), device=ends.device), tiles)
    tile_start = torch.cumsum(tiles, 0) - tiles
    first_row = (ends64 - counts)[tile_expert] + (torch.arange(tile_expert.numel(), device=ends.device)
                                                   - tile_start[tile_expert]) * block_m
    ends32 = ends.to(torch.int32, copy=True)   # a copy: the table must not keep `ends` itself alive
    return _last_table.put(ends, (tile_expert.to(torch.int32), first_row.to(torch.int32), ends32), block_m)


def grouped_weight_grad(a: torch.Tensor, c: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per expert e, A[rows of e]^T @ C[rows of e]: (E, K, M) from a (N, K) and c (N, M); zeros for idle experts."""
    _check("grouped_weight_grad", a, c, ends)
    if a.dim() != 2 or c.dim() != 2 or a.shape[0] != c.shape[0]:
        raise ValueError(f"grouped_weight_grad: expected a (N, K) and c (N, M) with the same rows; got "
                         f"{tuple(a.shape)} and {tuple(c.shape)}")
    experts, (rows, inner), n_cols = ends.numel(), a.shape, c.shape[1]
    interpreted, precision = launch_settings("grouped_weight_grad", a)   # first: refused whatever the shape
    g = torch.empty((experts, inner, n_cols), dtype=a.dtype, device=a.device)
    if (done := nothing_to_multiply(g, rows)) is not None:     # rows are the summed dimension here
        return done
    config = dict(INTERPRETER_GRAD_CONFIG if interpreted else GPU_GRAD_CONFIG)
    ends = ends.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    grid = (experts, triton.cdiv(inner, config["BLOCK_K"]), triton.cdiv(n_cols, config["BLOCK_N"]))
    grouped_weight_grad_kernel[grid](a, c, g, starts.to(torch.int32), ends.to(torch.int32), rows, inner, n_cols,
                                     a.stride(0), a.stride(1), c.stride(0), c.stride(1), g.stride(0), g.stride(1),
                                     g.stride(2), INPUT_PRECISION=precision, **config)
    return g


# Triton fixes compiled-or-interpreted when a kernel is defined (TRITON_INTERPRET at import time).
INTERPRETED = type(grouped_matmul_kernel).__name__ == "InterpretedFunction"
