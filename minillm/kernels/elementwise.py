"""Vector add in Triton (chapter 02): the smallest kernel, one program per block, a mask for the tail."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._inputs import require_same_device, require_tensor


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    program = tl.program_id(axis=0)
    offsets = program * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    # The last block runs past the end of the vectors: the mask keeps those lanes from touching memory.
    in_bounds = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=in_bounds)
    y = tl.load(y_ptr + offsets, mask=in_bounds)
    tl.store(out_ptr + offsets, x + y, mask=in_bounds)


def add(x: torch.Tensor, y: torch.Tensor, block_size: int = 1024) -> torch.Tensor:
    """x + y for two tensors of the same shape and dtype (no broadcasting)."""
    require_tensor("add", "x", x)
    require_tensor("add", "y", y)
    require_same_device("add", x, y)
    # tl.arange needs a power of 2; 0 divides by zero, and a negative size launched no program at all and
    # returned torch.empty's uninitialised memory
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
            or block_size & (block_size - 1):
        raise ValueError(f"add: block_size={block_size!r} must be a power of 2 such as 1024")
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"add: x is {tuple(x.shape)} {x.dtype} but y is {tuple(y.shape)} {y.dtype}; the kernel "
                         "adds tensors of one shape and dtype (broadcast or convert first, or backend='torch')")
    if x.device.type != "cuda" and x.dtype == torch.bfloat16:   # the kernel adds in bf16, which the interpreter garbles
        raise TypeError("add: the Triton interpreter computes bf16 wrongly; use fp16/fp32 or backend='torch'")
    if x.numel() >= 2**31:   # program * BLOCK_SIZE is 32-bit in the kernel: past 2**31 the offsets wrap around
        raise ValueError(f"add: {x.numel()} elements; the kernel's offsets are 32-bit (< 2**31 elements), "
                         "split the tensor or use backend='torch'")
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n_elements = x.numel()
    if n_elements:
        add_kernel[(triton.cdiv(n_elements, block_size),)](x, y, out, n_elements, BLOCK_SIZE=block_size)
    return out


# Triton fixes compiled-or-interpreted when a kernel is defined (TRITON_INTERPRET at import time).
INTERPRETED = type(add_kernel).__name__ == "InterpretedFunction"
