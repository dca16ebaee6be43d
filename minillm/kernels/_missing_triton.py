"""Stand-ins for `triton` and `triton.language` when Triton is not installed (chapter 02's notebook).

They let the notebook's kernel cells be defined (a decorator, annotations) so that the rest of the
chapter runs; launching such a "kernel" raises an error that says to install Triton.
"""
from __future__ import annotations


class _MissingKernel:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise RuntimeError(f"{self.fn.__name__}: Triton is not installed, so kernels cannot run here; "
                           "pip install triton (Linux), or open the chapter on Colab")


class _Triton:
    @staticmethod
    def jit(fn=None, **options):
        return _MissingKernel(fn) if fn is not None else _MissingKernel

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)


class _Language:
    def __getattr__(self, name):
        return object  # annotations such as `BLOCK_SIZE: tl.constexpr` evaluate to something harmless


triton = _Triton()
tl = _Language()
