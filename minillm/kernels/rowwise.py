"""Fused row-wise softmax and fused cross-entropy in Triton (chapter 02).

Fused means one kernel reads each row once, keeps it in registers/SRAM, and writes the result once: the
unfused torch version writes and re-reads intermediate tensors (the max, the exponentials, the sum).
Numerically stable: the row maximum is subtracted before exponentiating, so exp never overflows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._inputs import (comparable_targets, require_ignore_index, require_rows, require_same_device,
                      require_targets_in_range, require_tensor)

# Rows up to this many columns are held whole in one block (one read, one write); longer rows are streamed
# in blocks of LONG_ROW_BLOCK, reading the row three times (max, sum, write).
MAX_SINGLE_BLOCK_COLUMNS = 16384
LONG_ROW_BLOCK = 4096


@triton.jit
def softmax_kernel(out_ptr, in_ptr, in_row_stride, out_row_stride, n_rows, n_cols, BLOCK_SIZE: tl.constexpr):
    # A fixed number of programs each walk over rows first, first + step, ...: fewer launches than rows.
    first_row = tl.program_id(0)
    row_step = tl.num_programs(0)
    columns = tl.arange(0, BLOCK_SIZE)
    in_row = columns < n_cols
    for row in range(first_row, n_rows, row_step):
        # Padding lanes load -inf, so they add exp(-inf) = 0 to the sum and never win the max.
        x = tl.load(in_ptr + row * in_row_stride + columns, mask=in_row, other=-float("inf")).to(tl.float32)
        shifted = x - tl.max(x, axis=0)
        numerator = tl.exp(shifted)
        result = numerator / tl.sum(numerator, axis=0)
        tl.store(out_ptr + row * out_row_stride + columns, result.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def softmax_long_row_kernel(out_ptr, in_ptr, in_row_stride, out_row_stride, n_rows, n_cols,
                            BLOCK_SIZE: tl.constexpr):
    first_row = tl.program_id(0)
    row_step = tl.num_programs(0)
    columns = tl.arange(0, BLOCK_SIZE)
    for row in range(first_row, n_rows, row_step):
        running_max = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            x = tl.load(in_ptr + row * in_row_stride + start + columns, mask=start + columns < n_cols,
                        other=-float("inf")).to(tl.float32)
            running_max = tl.maximum(running_max, x)
        row_max = tl.max(running_max, axis=0)
        running_sum = tl.zeros([BLOCK_SIZE], tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            x = tl.load(in_ptr + row * in_row_stride + start + columns, mask=start + columns < n_cols,
                        other=-float("inf")).to(tl.float32)
            running_sum += tl.exp(x - row_max)
        row_sum = tl.sum(running_sum, axis=0)
        for start in range(0, n_cols, BLOCK_SIZE):
            x = tl.load(in_ptr + row * in_row_stride + start + columns, mask=start + columns < n_cols,
                        other=-float("inf")).to(tl.float32)
            result = tl.exp(x - row_max) / row_sum
            tl.store(out_ptr + row * out_row_stride + start + columns, result.to(out_ptr.dtype.element_ty),
                     mask=start + columns < n_cols)


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        processors = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, processors * 8))
    return max(1, min(n_rows, 4))  # the interpreter runs programs one after another: the count is free


def _num_warps(block_size: int) -> int:
    return 4 if block_size <= 2048 else 8 if block_size <= 8192 else 16


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of x (any leading shape), computed in fp32, returned in x's dtype."""
    require_tensor("softmax", "x", x)
    rows = require_rows("softmax", x)
    n_rows, n_cols = rows.shape
    # row * row stride is 32-bit in the kernel: the output's elements and the span of x it reads (a strided view
    # spans more than its elements) must stay below 2**31
    span = max(rows.numel(), (n_rows - 1) * rows.stride(0) + n_cols)
    if span >= 2**31:
        raise ValueError(f"softmax: a span of {span} elements; the kernel's row offsets are 32-bit (< 2**31 elements), "
                         "split the tensor (or .contiguous() a strided view) or use backend='torch'")
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if out.numel() == 0:   # no rows, or rows of no columns (a 0-d x is one row of one column)
        return out.reshape(x.shape)
    grid = (_num_programs(n_rows, x.device),)
    if n_cols <= MAX_SINGLE_BLOCK_COLUMNS:
        block = triton.next_power_of_2(n_cols)
        softmax_kernel[grid](out, rows, rows.stride(0), out.stride(0), n_rows, n_cols, BLOCK_SIZE=block,
                             num_warps=_num_warps(block))
    else:
        softmax_long_row_kernel[grid](out, rows, rows.stride(0), out.stride(0), n_rows, n_cols,
                                      BLOCK_SIZE=LONG_ROW_BLOCK, num_warps=8)
    return out.reshape(x.shape)


@triton.jit
def cross_entropy_forward_kernel(logits_ptr, targets_ptr, loss_ptr, row_max_ptr, log_sum_ptr, row_stride, n_cols,
                                 ignore_index, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_start = logits_ptr + row * row_stride
    columns = tl.arange(0, BLOCK_SIZE)
    running_max = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(row_start + start + columns, mask=start + columns < n_cols, other=-float("inf")).to(tl.float32)
        running_max = tl.maximum(running_max, x)
    row_max = tl.max(running_max, axis=0)
    running_sum = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(row_start + start + columns, mask=start + columns < n_cols, other=-float("inf")).to(tl.float32)
        running_sum += tl.exp(x - row_max)
    log_sum = tl.log(tl.sum(running_sum, axis=0))
    target = tl.load(targets_ptr + row)
    counted = target != ignore_index
    target_logit = tl.load(row_start + tl.where(counted, target, 0)).to(tl.float32)
    # loss = logsumexp - target logit, with the max taken off first as torch does: row_max + log_sum rounded
    # log_sum to the spacing of the max's float32 (1e-3 at logits of 1e4), e.g. 0.6914 for a tie of 2 classes
    tl.store(loss_ptr + row, tl.where(counted, (row_max - target_logit) + log_sum, 0.0))
    tl.store(row_max_ptr + row, row_max)
    tl.store(log_sum_ptr + row, log_sum)


@triton.jit
def cross_entropy_backward_kernel(logits_ptr, targets_ptr, row_max_ptr, log_sum_ptr, scale_ptr, grad_ptr, row_stride,
                                  grad_row_stride, n_cols, ignore_index, BLOCK_SIZE: tl.constexpr):
    # d loss / d logits = (softmax(logits) - one_hot(target)) * grad_output / rows counted
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_SIZE)
    target = tl.load(targets_ptr + row)
    scale = tl.where(target != ignore_index, tl.load(scale_ptr), 0.0)
    row_max = tl.load(row_max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    for start in range(0, n_cols, BLOCK_SIZE):
        in_row = start + columns < n_cols
        x = tl.load(logits_ptr + row * row_stride + start + columns, mask=in_row, other=0.0).to(tl.float32)
        probability = tl.exp((x - row_max) - log_sum)   # the max off first, as in the forward
        grad = (probability - tl.where(start + columns == target, 1.0, 0.0)) * scale
        tl.store(grad_ptr + row * grad_row_stride + start + columns, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        n_rows, n_cols = logits.shape
        block = min(triton.next_power_of_2(n_cols), LONG_ROW_BLOCK)
        losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        row_max, log_sum = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(2))
        cross_entropy_forward_kernel[(n_rows,)](logits, targets, losses, row_max, log_sum, logits.stride(0), n_cols,
                                                ignore_index, BLOCK_SIZE=block, num_warps=_num_warps(block))
        counted = (targets != ignore_index).sum().to(torch.float32)
        ctx.save_for_backward(logits, targets, row_max, log_sum, counted)
        ctx.ignore_index, ctx.block = ignore_index, block
        return losses.sum() / counted  # nan when every target is ignored, as in torch

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, row_max, log_sum, counted = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True: torch ops, whose gradient has a gradient of its own
            return _differentiable_backward(logits, targets, counted, grad_output, ctx.ignore_index), None, None
        grad = torch.empty_like(logits)
        scale = (grad_output.to(torch.float32) / counted).reshape(1)
        n_rows, n_cols = logits.shape
        cross_entropy_backward_kernel[(n_rows,)](logits, targets, row_max, log_sum, scale, grad, logits.stride(0),
                                                 grad.stride(0), n_cols, ctx.ignore_index, BLOCK_SIZE=ctx.block,
                                                 num_warps=_num_warps(ctx.block))
        return grad, None, None


def _differentiable_backward(logits, targets, counted, grad_output, ignore_index):
    """The backward kernel's formula in torch ops, for a second derivative (a kernel's output has no history)."""
    kept = targets != ignore_index
    one_hot = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, torch.where(kept, targets, 0).long()[:, None],
                                                                     1.0)
    scale = torch.where(kept, grad_output.float() / counted, 0.0)[:, None]
    return ((torch.softmax(logits.float(), dim=-1) - one_hot) * scale).to(logits.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (rows × vocab) logits against int64 targets; softmax fused, never materialised.

    Differentiable with respect to logits (the backward is a second kernel that writes the gradient; with
    create_graph=True it is torch ops, so that a second derivative exists).
    """
    require_tensor("cross_entropy", "logits", logits)
    require_tensor("cross_entropy", "targets", targets, dtypes=(torch.int64, torch.int32))
    require_same_device("cross_entropy", logits, targets)
    ignore_index = require_ignore_index("cross_entropy", ignore_index)   # int(1.5) was a silent 1
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected "
                         "(rows, vocab) logits and (rows,) targets; flatten with logits.view(-1, vocab)")
    if logits.shape[1] == 0:
        raise ValueError(f"cross_entropy: logits of shape {tuple(logits.shape)} have no classes")
    if logits.shape[0] == 0:   # the mean of no losses: nan, as in torch (and differentiable, with an empty gradient)
        return logits.float().sum() / 0.0
    targets = comparable_targets(targets, ignore_index)   # the kernel's count of kept rows compares in torch
    require_targets_in_range("cross_entropy", targets, logits.shape[1], ignore_index)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _CrossEntropy.apply(logits, targets.contiguous(), ignore_index)


# Triton fixes compiled-or-interpreted when a kernel is defined (TRITON_INTERPRET at import time).
INTERPRETED = type(softmax_kernel).__name__ == "InterpretedFunction"
