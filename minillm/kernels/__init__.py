"""minillm's GPU kernels (chapter 02): Triton kernels, their PyTorch references, and ONE dispatch point.

    from minillm import kernels
    y = kernels.softmax(x)                  # backend="auto"
    kernels.last_backend("softmax")         # "triton", "interpreter" or "torch": what actually ran

backend="auto" runs the Triton kernel on a CUDA tensor, Triton's interpreter when TRITON_INTERPRET=1 (on
CPU tensors; correct but slow, for tests and the notebook), and the torch reference otherwise, or for
dtypes the kernels do not take (float64, integers; bf16 in the interpreter, which computes it wrongly).
backend="triton" insists on Triton (GPU or interpreter) and says why when it cannot; backend="torch"
always runs the reference. The first use of each (kernel, backend) pair is logged once at INFO level.

Triton is optional: this module imports without it, and the kernel modules (which import triton) load on
first use. TRITON_INTERPRET=1 must be set before that first use: Triton decides at decoration time
whether a kernel is compiled or interpreted (its own library functions such as tl.max included, so set
it before `import triton`).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
import os

import torch

from . import reference
from ._inputs import KERNEL_DTYPES, LastSeen, require_ignore_index, require_same_device

__all__ = ["KERNELS", "BACKENDS", "add", "softmax", "matmul", "rmsnorm", "cross_entropy", "grouped_matmul",
           "grouped_weight_grad", "triton_available",
           "interpreting", "resolve_backend", "last_backend", "reference"]

KERNELS = {  # kernel name -> module that holds its Triton version
    "add": "elementwise", "softmax": "rowwise", "matmul": "tiled_matmul", "rmsnorm": "normalization",
    "cross_entropy": "rowwise", "grouped_matmul": "grouped", "grouped_weight_grad": "grouped",
}
BACKENDS = ("auto", "triton", "torch")

logger = logging.getLogger(__name__)
_last_backend: dict[str, str] = {}
_logged: set[tuple[str, str]] = set()


def triton_available() -> bool:
    """True when the triton package is installed (it may still have no GPU to run on)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken install, or triton blocked in sys.modules
        return False


# The values Triton itself reads as "on" for TRITON_INTERPRET (its knobs lower-case the variable).
_TRUE = ("1", "true", "yes", "on", "y")


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 (or true/yes/on): Triton kernels run on the CPU in its Python interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Which implementation `backend` means for tensors on `device`: 'triton', 'interpreter' or 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if not triton_available():
        if backend == "triton":
            raise RuntimeError("backend='triton' but the triton package is not installed "
                               "(pip install triton, Linux with an NVIDIA GPU); use backend='auto' or 'torch'")
        return "torch"
    if interpreting():
        if device.type == "cpu":
            return "interpreter"
        if backend == "triton":
            raise RuntimeError(f"backend='triton' with TRITON_INTERPRET=1 needs CPU tensors, got {device}; "
                               "move them with .cpu() or unset TRITON_INTERPRET")
        return "torch"
    if device.type == "cuda":
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set before "
                           "the first kernel call to run Triton's interpreter on the CPU")
    return "torch"


def last_backend(name: str | None = None):
    """The backend each kernel last ran on, e.g. {'softmax': 'interpreter'}; with a name, just that one."""
    if name is None:
        return dict(_last_backend)
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; the kernels are {', '.join(KERNELS)}")
    return _last_backend.get(name)


def _triton_function(name: str, backend: str):
    module = importlib.import_module(f"{__name__}.{KERNELS[name]}")
    if module.INTERPRETED != (backend == "interpreter"):
        state = "with" if module.INTERPRETED else "without"
        raise RuntimeError(f"minillm.kernels.{KERNELS[name]} was loaded {state} TRITON_INTERPRET=1 and the setting "
                           "has changed since; Triton fixes it when triton and the kernels are imported. Restart "
                           "Python (the notebook kernel) and set TRITON_INTERPRET before importing triton.")
    return getattr(module, name)


def _kernel_takes(chosen: str, args) -> bool:
    """Whether the Triton kernels take these inputs' dtypes: fp32/fp16/bf16 data, no bf16 in the interpreter."""
    data = [t for i, t in enumerate(args) if isinstance(t, torch.Tensor) and (i == 0 or t.is_floating_point())]
    return all(t.dtype in KERNEL_DTYPES and not (chosen == "interpreter" and t.dtype == torch.bfloat16)
               for t in data)


def _run(name: str, backend: str, device: torch.device, *args, **kwargs):
    chosen = resolve_backend(backend, device)
    if backend == "auto" and chosen != "torch" and not _kernel_takes(chosen, args):
        chosen = "torch"   # "auto": the kernel where it can run; float64, integers (bf16 when interpreted): torch
    if chosen != "torch" and name in _BACKWARDS and torch.is_grad_enabled() \
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return _Differentiable.apply(name, backend, *args)
    function = getattr(reference, name) if chosen == "torch" else _triton_function(name, chosen)
    result = function(*args, **kwargs)
    _last_backend[name] = chosen
    if (name, chosen) not in _logged:
        _logged.add((name, chosen))
        logger.info("minillm.kernels.%s runs on %s (%s tensors)", name, chosen, device)
    return result


class _Differentiable(torch.autograd.Function):
    """A Triton kernel without a backward of its own, made differentiable (the torch references already are).

    The backward of each product is made of the same products, dispatched the same way, so on a GPU the
    gradients run on Triton too: for C = A @ B, dA = dC @ B^T and dB = A^T @ dC; per expert likewise for
    grouped_matmul and grouped_weight_grad. add passes the gradient through; softmax's backward,
    y * (dy - sum(dy * y)), is a few torch ops.
    """

    @staticmethod
    def forward(ctx, name, backend, *inputs):
        output = _run(name, backend, inputs[0].device, *inputs)   # forward runs without grad: no recursion
        ctx.name, ctx.backend = name, backend
        ctx.save_for_backward(*(inputs if name != "softmax" else (output,)))
        return output

    @staticmethod
    def backward(ctx, grad):
        return (None, None) + _BACKWARDS[ctx.name](grad, ctx.saved_tensors, ctx.needs_input_grad[2:], ctx.backend)


def _softmax_backward(grad, saved, needed, backend):
    (y,) = saved
    y32, grad32 = y.float(), grad.float()
    return ((y32 * (grad32 - (grad32 * y32).sum(dim=-1, keepdim=True))).to(y.dtype),)


def _matmul_backward(grad, saved, needed, backend):
    a, b = saved
    return (matmul(grad, b.t(), backend) if needed[0] else None,
            matmul(a.t(), grad, backend) if needed[1] else None)


def _grouped_matmul_backward(grad, saved, needed, backend):
    a, b, ends = saved
    return (grouped_matmul(grad, b.transpose(1, 2), ends, backend) if needed[0] else None,
            grouped_weight_grad(a, grad, ends, backend) if needed[1] else None, None)


def _grouped_weight_grad_backward(grad, saved, needed, backend):
    a, c, ends = saved   # G[e] = A_e^T C_e, so dA_e = C_e dG[e]^T and dC_e = A_e dG[e]
    return (grouped_matmul(c, grad.transpose(1, 2), ends, backend) if needed[0] else None,
            grouped_matmul(a, grad, ends, backend) if needed[1] else None, None)


_BACKWARDS = {"add": lambda grad, saved, needed, backend: (grad, grad), "softmax": _softmax_backward,
              "matmul": _matmul_backward, "grouped_matmul": _grouped_matmul_backward,
              "grouped_weight_grad": _grouped_weight_grad_backward}


def _device_of(name: str, tensor) -> torch.device:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    return tensor.device


def _floating(name: str, what: str, tensor: torch.Tensor) -> torch.Tensor:
    # softmax and friends of integers are meaningless; torch's fallback would silently round them to 0
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: {what} has dtype {str(tensor.dtype).removeprefix('torch.')}; it needs a "
                        "floating-point tensor (convert with .float())")
    return tensor


def add(x: torch.Tensor, y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x + y (same shape and dtype; differentiable on every backend)."""
    device = _device_of("add", x)
    _same_dtype_and_device("add", x, y)   # every backend: torch's x + y would broadcast and promote silently
    if x.shape != y.shape:
        raise ValueError(f"add: x is {tuple(x.shape)} but y is {tuple(y.shape)}; the kernel adds tensors of one "
                         "shape and dtype (broadcast first, e.g. y.expand_as(x), or use torch's x + y)")
    return _run("add", backend, device, x, y)


def softmax(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Numerically stable softmax over the last dimension, one fused pass per row (differentiable)."""
    return _run("softmax", backend, _device_of("softmax", x), _floating("softmax", "x", x))


def _same_dtype_and_device(name: str, first: torch.Tensor, *others) -> None:
    """The checks every backend makes (the Triton kernels add their own dtype limits)."""
    for other in others:
        _device_of(name, other)
    require_same_device(name, first, *others)
    for other in others:
        if other.dtype != first.dtype:
            raise TypeError(f"{name}: inputs are {str(first.dtype).removeprefix('torch.')} and "
                            f"{str(other.dtype).removeprefix('torch.')}; convert one so they match")


def matmul(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(M×K) @ (K×N), fp32 accumulation, result in the inputs' dtype (differentiable on every backend)."""
    device = _device_of("matmul", a)
    _same_dtype_and_device("matmul", a, b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain; expected (M, K) @ (K, N) "
                         "(2-D only: for batches use torch.matmul)")
    return _run("matmul", backend, device, a, b)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension (differentiable)."""
    device = _device_of("rmsnorm", x)
    _device_of("rmsnorm", weight)
    _floating("rmsnorm", "x", x)
    _floating("rmsnorm", "weight", weight)
    require_same_device("rmsnorm", x, weight)
    if x.dim() == 0:
        raise ValueError("rmsnorm: x is 0-dimensional; it normalises over the last dimension (reshape to (1,))")
    if weight.shape != x.shape[-1:]:   # checked for every backend: torch would broadcast a (rows, n) weight
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} must have shape (x.shape[-1],) = "
                         f"{tuple(x.shape[-1:])}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"rmsnorm: eps={eps!r} must be a number, e.g. 1e-6")
    if not 0 < eps < math.inf:
        raise ValueError(f"rmsnorm: eps={eps!r} must be a finite number > 0 (it keeps an all-zero row finite)")
    return _run("rmsnorm", backend, device, x, weight, eps)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of (rows × vocab) logits, softmax fused (differentiable in logits)."""
    device = _device_of("cross_entropy", logits)
    _floating("cross_entropy", "logits", logits)
    _device_of("cross_entropy", targets)
    require_same_device("cross_entropy", logits, targets)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cross_entropy: targets have dtype {str(targets.dtype).removeprefix('torch.')}; they must be "
                        "int64 (or int32) class indices (convert with .long())")
    ignore_index = require_ignore_index("cross_entropy", ignore_index)
    # Checked for every backend: torch's F.cross_entropy reads (N, C, d...) logits with class dim 1, a silent
    # different meaning for (batch, time, vocab) logits.
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected "
                         "(rows, vocab) logits and (rows,) targets; flatten with logits.view(-1, vocab)")
    if logits.shape[1] == 0:
        raise ValueError(f"cross_entropy: logits of shape {tuple(logits.shape)} have no classes")
    # the range of the targets is checked by each backend (once: on a GPU reading the answer waits for it)
    return _run("cross_entropy", backend, device, logits, targets, ignore_index)


# The last `ends` that passed the check below: checking copies it to the host (on a GPU, a wait), and an
# MoE step passes the same tensor six times.
_checked_ends = LastSeen()


def _expert_ends(name: str, ends, a: torch.Tensor, experts: int) -> torch.Tensor:
    if not isinstance(ends, torch.Tensor) or ends.dim() != 1 or ends.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: ends must be a 1-D int32/int64 tensor of cumulative row counts, one per expert")
    require_same_device(name, a, ends)   # every backend: the kernels need it, torch's loop read it from anywhere
    rows = a.shape[0]
    if ends.numel() != experts:
        raise ValueError(f"{name}: ends has {ends.numel()} entries for {experts} experts")
    if _checked_ends.get(ends, (rows, experts)) is not None:
        return ends
    values = ends.tolist()
    rising = all(v >= 0 for v in values) and all(b >= a for a, b in zip(values, values[1:]))
    if not rising or (values[-1] if values else 0) != rows:
        raise ValueError(f"{name}: ends must rise from 0 to the {rows} rows (cumulative counts per expert, e.g. "
                         f"torch.cumsum(counts, 0)); got {values[:8]}{' ...' if len(values) > 8 else ''}")
    _checked_ends.put(ends, True, (rows, experts))
    return ends


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rows of a (N, K) sorted by expert times that expert's b[e] (K, M), all experts in one launch: (N, M).

    ends (E,) are the cumulative row counts: expert e owns rows ends[e-1] .. ends[e]. Chapter 04's experts.
    Differentiable in a and b on every backend.
    """
    device = _device_of("grouped_matmul", a)
    _same_dtype_and_device("grouped_matmul", a, b)
    if b.dim() != 3 or a.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"grouped_matmul: expected a (N, K) and b (E, K, M); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return _run("grouped_matmul", backend, device, a, b, _expert_ends("grouped_matmul", ends, a, b.shape[0]))


def grouped_weight_grad(a: torch.Tensor, c: torch.Tensor, ends: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per expert e, a[rows of e]^T @ c[rows of e]: the (E, K, M) weight gradient of grouped_matmul.

    Differentiable in a and c on every backend (a second derivative, should a learner want one)."""
    device = _device_of("grouped_weight_grad", a)
    _same_dtype_and_device("grouped_weight_grad", a, c)
    if a.dim() != 2 or c.dim() != 2 or a.shape[0] != c.shape[0]:
        raise ValueError(f"grouped_weight_grad: expected a (N, K) and c (N, M) with the same rows; got "
                         f"{tuple(a.shape)} and {tuple(c.shape)}")
    experts = ends.numel() if isinstance(ends, torch.Tensor) else 0   # one weight gradient per entry of ends
    ends = _expert_ends("grouped_weight_grad", ends, a, experts)
    return _run("grouped_weight_grad", backend, device, a, c, ends)
