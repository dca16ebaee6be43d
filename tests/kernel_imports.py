"""The Triton kernel modules for the kernel tests, compiled for Triton's interpreter when there is no CUDA GPU.

Triton decides compiled-or-interpreted when it and the kernel modules are imported, so TRITON_INTERPRET=1 is
set for that import and then restored, and set again only while a kernel test module runs
(`interpreter_on`): other test modules keep the plain torch fallbacks of backend="auto". Without Triton
installed, the calling test module is skipped.
"""
import contextlib
import os

import pytest
import torch

GPU = torch.cuda.is_available()


@contextlib.contextmanager
def interpreter_on():
    """TRITON_INTERPRET=1 inside (without a GPU), as it was before afterwards."""
    before = os.environ.get("TRITON_INTERPRET")
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def kernel_modules() -> tuple:
    """(elementwise, grouped, normalization, rowwise, tiled_matmul), imported as described above."""
    with interpreter_on():
        pytest.importorskip("triton")
        from minillm.kernels import elementwise, grouped, normalization, rowwise, tiled_matmul
    return elementwise, grouped, normalization, rowwise, tiled_matmul
