"""Tiled matrix multiplication in Triton (chapter 02).

Each program computes one BLOCK_M × BLOCK_N tile of C, walking along K one BLOCK_K slice at a time and
accumulating in fp32. Programs are numbered in groups of GROUP_M tile-rows, so programs that run at the
same time share tiles of A and B and find them in the L2 cache. On a GPU the block sizes are autotuned;
in the interpreter (TRITON_INTERPRET=1, no GPU) one small fixed configuration is used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._inputs import require_same_device, require_tensor

INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr = "ieee"):
    # Grouped ordering: walk down GROUP_M tile-rows before moving one tile-column right.
    program = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_tile_m = (program // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (program % programs_per_group) % group_rows
    tile_n = (program % programs_per_group) // group_rows

    # Rows and columns past the edge wrap around (% M, % N): loads stay in bounds without a mask, and
    # the store below drops those lanes.
    # int64 before multiplying by a stride: row * stride passes 2**31 on tensors of a few GB.
    rows = ((tile_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = ((tile_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn

    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k_block * BLOCK_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
        accumulator = tl.dot(a, b, accumulator, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    out_cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c_ptrs = c_ptr + out_rows[:, None] * stride_cm + out_cols[None, :] * stride_cn
    tl.store(c_ptrs, accumulator.to(c_ptr.dtype.element_ty), mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


def _gpu_configs() -> list:
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps: large tiles for big GPUs, small ones for small problems
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
        (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
        (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2),
    ]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_stages=stages, num_warps=warps)
            for m, n, k, stages, warps in shapes]


_autotuned_kernel = None


def _autotuned():
    global _autotuned_kernel  # built on first GPU use: autotuning needs a GPU, the interpreter has none
    if _autotuned_kernel is None:
        _autotuned_kernel = triton.autotune(configs=_gpu_configs(), key=["M", "N", "K", "INPUT_PRECISION"])(
            matmul_kernel)
    return _autotuned_kernel


def launch_settings(name: str, a: torch.Tensor) -> tuple[bool, str]:
    """(interpreted, tl.dot input precision) for a matmul-like kernel on a's device; bf16 refused in the interpreter.

    fp32 inputs use TF32 tensor cores only when torch allows it (torch.backends.cuda.matmul.allow_tf32),
    so the kernel and torch round the same way.
    """
    interpreted = a.device.type != "cuda"
    if interpreted and a.dtype == torch.bfloat16:
        raise TypeError(f"{name}: the Triton interpreter computes bf16 wrongly; use fp16/fp32 or backend='torch'")
    precision = "tf32" if (a.dtype == torch.float32 and not interpreted
                           and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return interpreted, precision


def nothing_to_multiply(c: torch.Tensor, inner: int) -> torch.Tensor | None:
    """c finished without a launch when it is empty, or zeros when the summed dimension (inner) is; else None."""
    if c.numel() == 0:
        return c
    return c.zero_() if inner == 0 else None


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M×K) @ (K×N) for 2-D fp32 or fp16 tensors (bf16 on GPUs that have it); result in a's dtype.

    fp32 inputs use TF32 tensor cores only when torch allows it (torch.backends.cuda.matmul.allow_tf32),
    so the kernel and torch round the same way.
    """
    require_tensor("matmul", "a", a)
    require_tensor("matmul", "b", b)
    require_same_device("matmul", a, b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain; expected (M, K) @ (K, N)")
    if a.dtype != b.dtype:
        raise ValueError(f"matmul: a is {a.dtype} and b is {b.dtype}; convert one so they match")
    M, K = a.shape
    N = b.shape[1]
    interpreted, precision = launch_settings("matmul", a)   # first: a refused dtype is refused whatever the shape
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if (done := nothing_to_multiply(c, K)) is not None:
        return done
    args = (a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    if interpreted:
        config = INTERPRETER_CONFIG
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        matmul_kernel[grid](*args, INPUT_PRECISION=precision, **config)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _autotuned()[grid](*args, INPUT_PRECISION=precision)
    return c


# Triton fixes compiled-or-interpreted when a kernel is defined (TRITON_INTERPRET at import time).
INTERPRETED = type(matmul_kernel).__name__ == "InterpretedFunction"
