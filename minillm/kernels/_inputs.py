"""Input checks shared by the Triton wrappers (chapter 02): clear errors before a kernel reads memory."""
from __future__ import annotations

import math
import operator
import weakref

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_tensor(name: str, what: str, tensor, dtypes=KERNEL_DTYPES) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: {what} has dtype {str(tensor.dtype).removeprefix('torch.')}; the Triton kernel "
                        f"takes {allowed} (convert with .to(...), or pass backend='torch')")


def require_same_device(name: str, *tensors: torch.Tensor) -> None:
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{name}: inputs are on different devices ({', '.join(sorted(devices))}); "
                         "move them to one device first")


def comparable_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """targets that compare exactly with ignore_index, as torch's F.cross_entropy compares them (in int64).

    torch casts a Python int to an int32 tensor's dtype, wrapping it: `targets != 2**32` read as `!= 0`, so a
    target 0 counted as ignored (a silently wrong mean) and a target -5 passed the range check as 2**32 - 5.
    int32 targets are widened when ignore_index lies outside int32 (no int32 target can equal it)."""
    if targets.dtype == torch.int32 and not -2 ** 31 <= ignore_index < 2 ** 31:
        return targets.long()
    return targets


def require_targets_in_range(name: str, targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    targets = comparable_targets(targets, ignore_index)
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= n_classes))
    if bool(out_of_range.any()):
        raise ValueError(f"{name}: targets must lie in [0, {n_classes}) or equal ignore_index={ignore_index}; "
                         f"found {targets[out_of_range][:5].tolist()}")


def require_ignore_index(name: str, ignore_index) -> int:
    """ignore_index as a Python int: any integer, as torch takes it (numpy's, a 0-d integer tensor), but no bool."""
    try:
        value = operator.index(ignore_index) if not isinstance(ignore_index, bool) else None
    except TypeError:
        value = None
    if value is None:
        raise TypeError(f"{name}: ignore_index={ignore_index!r} must be an int")
    if not -2 ** 63 <= value < 2 ** 63:   # compared with int64 targets
        raise ValueError(f"{name}: ignore_index={value} must fit in int64 (e.g. the usual -100)")
    return value


def require_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """A (rows × columns) view of x with unit column stride (copies only when it must).

    A 0-d tensor is one row of one column (as torch.softmax sees it); empty tensors give empty views, which
    the callers return without a launch (torch returns them empty too)."""
    columns = x.shape[-1] if x.dim() else 1
    rows = x.reshape(math.prod(x.shape[:-1]), columns)   # not (-1, columns): that fails for 0 columns
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class LastSeen:
    """What was last worked out from one tensor, valid while that very tensor is unmodified.

    An MoE training step hands the same expert counts to six grouped matmuls; checking them or building a
    tile table from them waits for the GPU each time. The tensor is held weakly; torch bumps `_version` on
    every in-place change a torch operation makes (through any view), which makes the entry stale. Writes
    that bypass torch (`.data`, numpy, DLPack) do not bump it, so on the CPU, where reading the values
    costs no wait, they are compared too; on a GPU such a write can leave a stale entry, which the grouped
    kernels survive without reading out of bounds (they also mask rows by the tensor's row count).
    Inference tensors have no version counter and are never remembered.
    """

    def __init__(self) -> None:
        self._entry: tuple = (None, None, None)

    @staticmethod
    def _key(tensor: torch.Tensor, extra) -> tuple | None:
        try:
            return (tensor._version, extra, tuple(tensor.tolist()) if tensor.device.type == "cpu" else None)
        except RuntimeError:   # "Inference tensors do not track version counter"
            return None

    def get(self, tensor: torch.Tensor, extra=None):
        """The remembered value for (tensor, extra), or None."""
        source, key, value = self._entry
        if source is not None and source() is tensor and key is not None and key == self._key(tensor, extra):
            return value
        return None

    def put(self, tensor: torch.Tensor, value, extra=None):
        key = self._key(tensor, extra)
        self._entry = (weakref.ref(tensor), key, value) if key is not None else (None, None, None)
        return value
