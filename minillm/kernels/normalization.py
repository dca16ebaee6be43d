"""RMSNorm in Triton (chapter 02): forward and backward kernels behind one autograd Function.

y = x / sqrt(mean(x²) + eps) * weight, row by row. The forward keeps 1/rms per row for the backward:
dx = (w·dy - x̂ · mean(x̂ · w·dy)) / rms and dweight = Σ_rows dy · x̂, with x̂ = x / rms.
Under create_graph=True (a gradient that is itself differentiated) the backward is the same formulas
in torch ops: a kernel's output has no history, so a second derivative through it silently lacked its part.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._inputs import require_rows, require_same_device, require_tensor

MAX_COLUMNS = 65536


@triton.jit
def rmsnorm_forward_kernel(x_ptr, weight_ptr, out_ptr, inverse_rms_ptr, x_row_stride, out_row_stride, n_cols, eps,
                           BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_SIZE)
    in_row = columns < n_cols
    x = tl.load(x_ptr + row * x_row_stride + columns, mask=in_row, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + columns, mask=in_row, other=0.0).to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(out_ptr + row * out_row_stride + columns, (x * inverse_rms * weight).to(out_ptr.dtype.element_ty),
             mask=in_row)
    tl.store(inverse_rms_ptr + row, inverse_rms)


@triton.jit
def rmsnorm_backward_kernel(x_ptr, weight_ptr, grad_out_ptr, inverse_rms_ptr, grad_x_ptr, grad_weight_rows_ptr,
                            x_row_stride, grad_out_row_stride, n_cols, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_SIZE)
    in_row = columns < n_cols
    x = tl.load(x_ptr + row * x_row_stride + columns, mask=in_row, other=0.0).to(tl.float32)
    grad_out = tl.load(grad_out_ptr + row * grad_out_row_stride + columns, mask=in_row, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + columns, mask=in_row, other=0.0).to(tl.float32)
    inverse_rms = tl.load(inverse_rms_ptr + row)
    x_hat = x * inverse_rms
    weighted_grad = grad_out * weight
    projection = tl.sum(x_hat * weighted_grad, axis=0) / n_cols
    grad_x = (weighted_grad - x_hat * projection) * inverse_rms
    tl.store(grad_x_ptr + row * n_cols + columns, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_row)
    # one row of dweight per input row, summed by torch afterwards (simple, and deterministic)
    tl.store(grad_weight_rows_ptr + row * n_cols + columns, grad_out * x_hat, mask=in_row)


def _num_warps(block_size: int) -> int:
    return 4 if block_size <= 2048 else 8 if block_size <= 8192 else 16


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = require_rows("rmsnorm", x)
        n_rows, n_cols = rows.shape
        block = triton.next_power_of_2(n_cols)
        out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        inverse_rms = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if rows.numel():
            rmsnorm_forward_kernel[(n_rows,)](rows, weight, out, inverse_rms, rows.stride(0), out.stride(0), n_cols,
                                              eps, BLOCK_SIZE=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x, rows, weight, inverse_rms)
        ctx.block, ctx.shape, ctx.eps = block, x.shape, eps
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_output):
        x, rows, weight, inverse_rms = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True: torch ops, whose gradient has a gradient of its own
            return (*_differentiable_backward(x, weight, grad_output, ctx.eps), None)
        n_rows, n_cols = rows.shape
        grad_out_rows = require_rows("rmsnorm backward", grad_output)
        grad_x = torch.empty((n_rows, n_cols), dtype=rows.dtype, device=rows.device)
        grad_weight_rows = torch.empty((n_rows, n_cols), dtype=torch.float32, device=rows.device)
        if rows.numel():
            rmsnorm_backward_kernel[(n_rows,)](rows, weight, grad_out_rows, inverse_rms, grad_x, grad_weight_rows,
                                               rows.stride(0), grad_out_rows.stride(0), n_cols, BLOCK_SIZE=ctx.block,
                                               num_warps=_num_warps(ctx.block))
        grad_weight = grad_weight_rows.sum(dim=0).to(weight.dtype)
        return grad_x.reshape(ctx.shape), grad_weight, None


def _differentiable_backward(x, weight, grad_output, eps):
    """The backward kernel's formulas in torch ops (for a second derivative, which the kernel cannot give)."""
    x32, weighted_grad = x.float(), grad_output.float() * weight.float()
    inverse_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    x_hat = x32 * inverse_rms
    grad_x = (weighted_grad - x_hat * (x_hat * weighted_grad).mean(dim=-1, keepdim=True)) * inverse_rms
    grad_weight = (grad_output.float() * x_hat).reshape(-1, x.shape[-1]).sum(dim=0)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of x with a per-column weight; differentiable in x and weight (twice)."""
    require_tensor("rmsnorm", "x", x)
    require_tensor("rmsnorm", "weight", weight)
    require_same_device("rmsnorm", x, weight)
    if x.dim() == 0:
        raise ValueError("rmsnorm: x is 0-dimensional; it normalises over the last dimension (reshape to (1,))")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} must have shape (x.shape[-1],) = "
                         f"{tuple(x.shape[-1:])}")
    if x.shape[-1] > MAX_COLUMNS:
        raise ValueError(f"rmsnorm: rows of {x.shape[-1]} columns exceed the kernel's {MAX_COLUMNS}; "
                         "use backend='torch'")
    if not eps > 0:
        raise ValueError(f"rmsnorm: eps={eps} must be > 0 (it keeps an all-zero row finite)")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))


# Triton fixes compiled-or-interpreted when a kernel is defined (TRITON_INTERPRET at import time).
INTERPRETED = type(rmsnorm_forward_kernel).__name__ == "InterpretedFunction"
