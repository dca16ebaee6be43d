"""PyTorch references for minillm's Triton kernels (chapter 02): same signatures, plain torch ops.

They define what each kernel must compute and are the fallback everywhere Triton cannot run (a CPU
without the interpreter, Apple's mps). Reductions run in fp32 (float64 in float64) and the result is cast back
to the input's dtype, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._inputs import require_targets_in_range


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute norms, softmax and losses in: float32 for the half precisions, others kept."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32: half precisions are widened, float64 keeps its precision (and gradcheck passes)."""
    return x.to(wide_dtype(x.dtype))


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension."""
    return torch.softmax(_wide(x), dim=-1).to(x.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M×K) @ (K×N); on a CPU half-precision inputs are multiplied in fp32 (few CPUs have fp16 matmul)."""
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight over the last dimension (minillm.model.RMSNorm's formula)."""
    x32 = _wide(x)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.to(x32.dtype)).to(x.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (rows × vocab) logits against integer targets, in fp32 (float64 logits: in float64)."""
    require_targets_in_range("cross_entropy", targets, logits.shape[-1], ignore_index)   # torch: an IndexError
    return F.cross_entropy(_wide(logits), targets.long(), ignore_index=ignore_index)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of a (N, K) sorted by expert (expert e owns rows ends[e-1]..ends[e]) times b[e] (K, M): (N, M)."""
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        # idle experts too (an empty product): with every expert idle, skipping them left out outside autograd
        out[start:end] = matmul(a[start:end], b[expert])
        start = end
    return out


def grouped_weight_grad(a: torch.Tensor, c: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per expert e, a[rows of e]^T @ c[rows of e]: (E, K, M); zeros for an expert without rows."""
    out = a.new_zeros(ends.numel(), a.shape[1], c.shape[1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        out[expert] = matmul(a[start:end].t(), c[start:end])   # zeros for an idle expert, still differentiable
        start = end
    return out
