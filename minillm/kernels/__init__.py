"""minillm's GPU kernels (chapter 02): Triton kernels, their PyTorch references, and ONE dispatch point.

    from minillm import kernels
    y = kernels.softmax(x)                  # backend="auto"
    kernels.last_backend("softmax")         # "triton", "interpreter" or "torch": what actually ran

backend="auto" runs the Triton kernel on a CUDA tensor, Triton's interpreter when TRITON_INTERPRET=1 (on
CPU tensors; correct but slow, for tests and the notebook), and the torch reference otherwise.
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
import os

import torch

from . import reference
from ._inputs import LastSeen

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


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels run on the CPU in its Python interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def _run(name: str, backend: str, device: torch.device, *args, **kwargs):
    chosen = resolve_backend(backend, device)
    function = getattr(reference, name) if chosen == "torch" else _triton_function(name, chosen)
    result = function(*args, **kwargs)
    _last_backend[name] = chosen
    if (name, chosen) not in _logged:
        _logged.add((name, chosen))
        logger.info("minillm.kernels.%s runs on %s (%s tensors)", name, chosen, device)
    return result


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
    """x + y (same shape and dtype)."""
    return _run("add", backend, _device_of("add", x), x, y)


def softmax(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Numerically stable softmax over the last dimension, one fused pass per row."""
    return _run("softmax", backend, _device_of("softmax", x), _floating("softmax", "x", x))


def matmul(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(M×K) @ (K×N), fp32 accumulation, result in the inputs' dtype."""
    return _run("matmul", backend, _device_of("matmul", a), a, b)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension (differentiable)."""
    return _run("rmsnorm", backend, _device_of("rmsnorm", x), _floating("rmsnorm", "x", x), weight, eps)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of (rows × vocab) logits, softmax fused (differentiable in logits)."""
    return _run("cross_entropy", backend, _device_of("cross_entropy", logits),
                _floating("cross_entropy", "logits", logits), targets, ignore_index)


# The last `ends` that passed the check below: checking copies it to the host (on a GPU, a wait), and an
# MoE step passes the same tensor six times.
_checked_ends = LastSeen()


def _expert_ends(name: str, ends, rows: int, experts: int) -> torch.Tensor:
    if not isinstance(ends, torch.Tensor) or ends.dim() != 1 or ends.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: ends must be a 1-D int32/int64 tensor of cumulative row counts, one per expert")
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
    """
    device = _device_of("grouped_matmul", a)
    if not isinstance(b, torch.Tensor) or b.dim() != 3 or a.dim() != 2:
        raise ValueError("grouped_matmul: expected a (N, K) and b (E, K, M)")
    return _run("grouped_matmul", backend, device, a, b, _expert_ends("grouped_matmul", ends, a.shape[0], b.shape[0]))


def grouped_weight_grad(a: torch.Tensor, c: torch.Tensor, ends: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per expert e, a[rows of e]^T @ c[rows of e]: the (E, K, M) weight gradient of grouped_matmul."""
    device = _device_of("grouped_weight_grad", a)
    if not isinstance(c, torch.Tensor) or a.dim() != 2 or c.dim() != 2:
        raise ValueError("grouped_weight_grad: expected a (N, K) and c (N, M)")
    experts = ends.numel() if isinstance(ends, torch.Tensor) else 0   # one weight gradient per entry of ends
    ends = _expert_ends("grouped_weight_grad", ends, a.shape[0], experts)
    return _run("grouped_weight_grad", backend, device, a, c, ends)
