"""PyTorch references for minillm's Triton kernels (chapter 02): same signatures, plain torch ops.

They define what each kernel must compute and are the fallback everywhere Triton cannot run (a CPU
without the interpreter, Apple's mps). Reductions run in fp32 and the result is cast back to the input's
dtype, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension."""
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M×K) @ (K×N); on a CPU half-precision inputs are multiplied in fp32 (few CPUs have fp16 matmul)."""
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight over the last dimension (minillm.model.RMSNorm's formula)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (rows × vocab) logits against integer targets, in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
