"""Checks for chapter 00 (setup): counting the work of a matrix multiplication."""
from __future__ import annotations

import random

from ..grading import expect_close, exercise


@exercise("ex00.1", "matmul FLOP count", points=1)
def check_matmul_flops(matmul_flops) -> str:
    # Shapes chosen so that forgetting the factor 2, or swapping a dimension, gives a different number.
    fresh = random.Random()  # one shape the student cannot foresee: a table of the fixed cases' answers fails
    for m, k, n in [(1, 1, 1), (2, 3, 4), (128, 64, 32), (7, 13, 5), tuple(fresh.randint(2, 999) for _ in range(3))]:
        expect_close(matmul_flops(m, k, n), 2 * m * k * n, f"matmul_flops({m}, {k}, {n})",
                     hint="each of the m·n outputs is a dot product of length k: k multiplies and k adds")
    return "matches 2·m·k·n on 5 shapes, one drawn at random"


@exercise("ex00.2", "bytes moved by a copy", points=1)
def check_copy_bytes(copy_bytes) -> str:
    fresh = random.Random()
    for n, size in [(1, 4), (1000, 4), (1000, 2), (12345, 1), (fresh.randint(2, 10**6), fresh.choice([1, 2, 4, 8]))]:
        expect_close(copy_bytes(n, size), 2 * n * size, f"copy_bytes({n} elements, {size} bytes each)",
                     hint="a copy reads every element once and writes it once")
    return "matches 2 · elements · bytes per element"
