"""Checks for chapter 02 (GPU linear algebra): arithmetic intensity and three Triton kernels.

The kernel checks launch the student's `@triton.jit` function on small ragged shapes (sizes that are not
multiples of the block) and compare with torch. Matrices are strided views (rows padded, some transposed) so
that a kernel using the wrong stride, or assuming rows are packed, gets wrong numbers; outputs sit in guarded
buffers, so that stray writes are caught rather than corrupting memory. On a CPU the notebook sets
TRITON_INTERPRET=1 before defining its kernels, so they run in Triton's interpreter on CPU tensors; on a GPU
they are compiled.
"""
from __future__ import annotations

import ast
import inspect
import random
import re
import textwrap

import torch

from ..cost import matmul_arithmetic_intensity as reference_intensity
from ..grading import expect_close, expect_unchanged, exercise, snapshot


def _kernel_device(kernel) -> torch.device:
    if type(kernel).__name__ == "InterpretedFunction":
        return torch.device("cpu")
    if not hasattr(kernel, "__getitem__"):
        raise AssertionError(f"expected a @triton.jit kernel, got {type(kernel).__name__}. "
                             "Hint: keep the @triton.jit line above your function")
    if not torch.cuda.is_available():
        raise AssertionError("this kernel was compiled for a GPU but there is none. Hint: run the cell that sets "
                             "TRITON_INTERPRET=1, restart the kernel if triton was imported before it, and rerun")
    return torch.device("cuda")


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch; a stub's NotImplementedError surfaces as itself, other failures as an AssertionError with a hint."""
    try:
        kernel[grid](*args, **meta)
    except NotImplementedError:
        raise
    except Exception as error:
        causes, cause = [], error   # the error and what it was raised from (Triton wraps a compile error)
        while cause is not None:
            if isinstance(cause, NotImplementedError) or "NotImplementedError" in str(cause):
                raise NotImplementedError(_stub_message(cause)) from None
            causes.append(cause)
            cause = cause.__cause__
        text = "".join(f"{type(e).__name__}: {e} " for e in causes)
        if "Expected dtype" in text:   # e.g. tl.exp on fp16 on a GPU: Triton's math takes fp32/fp64 only
            hint = ("a tl.* math function refused the input's dtype; convert after loading, e.g. "
                    "x = tl.load(...).to(tl.float32), compute in fp32, and convert back before the store")
        else:
            hint = ("inside a kernel use tl.* operations on blocks, and check each tl.load/tl.store's pointer "
                    "arithmetic and mask")
        raise AssertionError(f"the kernel failed to run: {type(error).__name__}: {str(error)[:400]}. "
                             f"Hint: {hint}") from error


def _stub_message(error: BaseException) -> str:
    """The exercise stub's own message, out of a NotImplementedError or the Triton error that quotes it
    ("...NotImplementedError('exercise ex02.2: replace this line with your code')...")."""
    if isinstance(error, NotImplementedError) and error.args:
        return str(error.args[0])
    quoted = re.search(r"NotImplementedError\((['\"])(.*?)\1\)", str(error), re.DOTALL)
    return quoted.group(2) if quoted else str(error)


def _source_tree(kernel) -> ast.AST | None:
    """The parsed source of the kernel; None when it cannot be read (the numeric checks still run)."""
    try:
        source = getattr(kernel, "src", None) or inspect.getsource(getattr(kernel, "fn", kernel))
        return ast.parse(textwrap.dedent(source))
    except (OSError, TypeError, SyntaxError):
        return None


def _memory_ops_without_mask(kernel) -> list[str]:
    """The tl.load / tl.store calls in the kernel's source that pass no mask (nor boundary_check).

    An unmasked load in the last block reads past the end of the vectors; the masked store then throws
    those values away, so no output shows it (and neither the interpreter nor a GPU faults on a small
    overrun): only the source tells. [] when the source cannot be read; the numeric checks still run.
    """
    tree = _source_tree(kernel)
    if tree is None:
        return []
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "store"):
            # mask=None is no mask at all
            keywords = {keyword.arg for keyword in node.keywords
                        if not (isinstance(keyword.value, ast.Constant) and keyword.value.value is None)}
            # The mask is load's second argument and store's third: load(pointer, mask), store(pointer, value, mask).
            positional_mask = len(node.args) >= (2 if node.func.attr == "load" else 3)
            if not positional_mask and not keywords & {"mask", "boundary_check", None}:   # None: **options
                missing.append(ast.unparse(node))
    return missing


def _masked_loads_without_other(kernel) -> list[str]:
    """The masked tl.load calls that give no `other`: their masked lanes are undefined (Triton's documentation).

    The CPU interpreter fills them with 0, so the numbers cannot show it; where they feed a sum (tl.dot), a GPU
    may add whatever the registers held. A kernel that calls tl.where (to clear those lanes itself) is let be."""
    tree = _source_tree(kernel)
    if tree is None:
        return []
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    if any(call.func.attr == "where" for call in calls):
        return []
    missing = []
    for node in calls:
        if node.func.attr != "load":
            continue
        keywords = {keyword.arg for keyword in node.keywords
                    if not (isinstance(keyword.value, ast.Constant) and keyword.value.value is None)}
        masked = len(node.args) >= 2 or "mask" in keywords
        if masked and len(node.args) < 3 and not keywords & {"other", None}:   # load(pointer, mask, other)
            missing.append(ast.unparse(node))
    return missing


def _require_masks(kernel, lanes: str, masks: str) -> None:
    unmasked = _memory_ops_without_mask(kernel)
    if unmasked:
        raise AssertionError(f"`{unmasked[0][:100]}` has no mask: {lanes} read or write past the end of the "
                             f"data (memory that is not yours; on a GPU it may hold anything, or fault). Hint: pass "
                             f"{masks} to every tl.load and tl.store")


def _guarded(n: int, dtype, device, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """A length-n view at the start of a longer buffer: writes past n show up in the guard region."""
    buffer = torch.full((n + 256,), fill, dtype=dtype, device=device)
    return buffer, buffer[:n]


def _strided(rows: int, cols: int, layout: str, generator, dtype, device) -> torch.Tensor:
    """A rows×cols view that is not packed: 'padded' rows (row stride cols + 5) or 'transposed' (column-major),
    at the start of a buffer three times its size, so that a kernel striding too far still reads owned memory.
    The rest of the buffer is NaN: a load past the K edge without a mask (its lane then multiplied by the
    other operand's masked zero) still turns the result into NaN, as reading memory that is not yours may."""
    if layout == "transposed":
        buffer = torch.full((3 * cols + 16, rows), float("nan"))
        buffer[:cols] = torch.randn(cols, rows, generator=generator)
        return buffer.to(dtype).to(device)[:cols].T
    buffer = torch.full((3 * rows + 16, cols + 5), float("nan"))
    buffer[:rows, :cols] = torch.randn(rows, cols, generator=generator)
    return buffer.to(dtype).to(device)[:rows, :cols]


def _guarded_matrix(rows: int, cols: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled rows×cols output (row stride cols + 3) in a larger buffer of 12345s: writes that miss the
    output land in the buffer, where _guard_intact sees them."""
    buffer = torch.full((3 * rows + 16, cols + 3), 12345.0, dtype=dtype, device=device)
    buffer[:rows, :cols] = float("nan")
    return buffer, buffer[:rows, :cols]


def _guard_intact(buffer: torch.Tensor, rows: int, cols: int) -> bool:
    guard = torch.ones(buffer.shape, dtype=torch.bool, device=buffer.device)
    guard[:rows, :cols] = False
    return bool(torch.all(buffer[guard] == 12345.0))


@exercise("ex02.1", "arithmetic intensity of a matmul", points=1)
def check_matmul_intensity(matmul_arithmetic_intensity) -> str:
    fresh = random.Random()  # one shape the student cannot foresee: a table of the fixed cases' answers fails
    for m, k, n, size in [(1, 1, 1, 4), (4096, 4096, 4096, 2), (8, 4096, 4096, 2), (7, 13, 5, 4),
                          (*(fresh.randint(2, 5000) for _ in range(3)), fresh.choice([1, 2, 4, 8]))]:
        expected = reference_intensity(m, k, n, size)
        # rtol 1e-6: an answer computed in float32 (numpy, torch) is right too; an error of one element in the
        # small shapes is off by far more
        expect_close(matmul_arithmetic_intensity(m, k, n, size), expected,
                     f"matmul_arithmetic_intensity({m}, {k}, {n}, {size})", rtol=1e-6,
                     hint="FLOPs (2·m·k·n) divided by the bytes of A, B and C each moved once: "
                          "(m·k + k·n + m·n) · bytes_per_element")
    return "matches 2mkn / ((mk + kn + mn) · bytes) on 5 shapes, one drawn at random"


@exercise("ex02.2", "masked vector add kernel", points=2)
def check_add_kernel(add_kernel) -> str:
    device = _kernel_device(add_kernel)
    _require_masks(add_kernel, "when n is not a multiple of BLOCK_SIZE, the last block's extra lanes",
                   "mask=offsets < n_elements")
    generator = torch.Generator().manual_seed(2)
    for n, block in [(1, 16), (13, 16), (100, 32), (65, 64)]:
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(n, generator=generator).to(dtype).to(device)
            y = torch.randn(n, generator=generator).to(dtype).to(device)
            buffer, out = _guarded(n, dtype, device, 12345.0)
            expected, saved = x + y, snapshot(x=x, y=y)
            _launch(add_kernel, ((n + block - 1) // block,), x, y, out, n, BLOCK_SIZE=block)
            expect_unchanged(saved, f"add_kernel on n={n}", hint="store the sum through out_ptr only")
            if not torch.all(buffer[n:] == 12345.0):
                raise AssertionError(f"n={n}, BLOCK_SIZE={block}: the kernel wrote past the end of the output. "
                                     "Hint: pass mask=offsets < n_elements to tl.store (and tl.load)")
            expect_close(out, expected, f"add_kernel on n={n} {str(dtype)[6:]} (BLOCK_SIZE={block})",
                         hint="offsets = program_id * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE); load x and y at "
                              "those offsets with the mask, add, store with the same mask")
    return "matches x + y on 8 ragged sizes, no writes past the end"


@exercise("ex02.3", "fused softmax row loop", points=2)
def check_softmax_kernel(softmax_kernel) -> str:
    device = _kernel_device(softmax_kernel)
    _require_masks(softmax_kernel, "when n_cols is not a power of two, the lanes past the last column",
                   "mask=columns < n_cols (and other=-float('inf') on the load)")
    generator = torch.Generator().manual_seed(3)
    cases = [torch.randn(1, 1, generator=generator), torch.randn(7, 13, generator=generator),
             torch.randn(9, 33, generator=generator) * 30,
             # 5 rows for 3 programs: a max kept from a program's first row (or a running max) overflows
             # or underflows on its second row, a thousand away.
             torch.tensor([[1000.0, 999.0, -1000.0], [-1000.0, -1001.0, -999.0], [float("-inf"), 3.0, float("-inf")],
                           [-1000.0, -1000.5, -1002.0], [1000.0, 1001.0, 998.0]])]
    for x in cases:
        for dtype in (torch.float32, torch.float16):
            if dtype == torch.float16 and x.abs().max() > 6e4:
                continue
            n_rows, n_cols = x.shape
            # Rows padded differently in the input (+7) and the output (+3): swapping the two strides, or
            # assuming row * n_cols, reads or writes the wrong rows. The output's padding must stay untouched.
            # Both live in buffers with spare rows, so that a mixed-up stride reads or writes inside memory the
            # check owns (and can inspect) instead of corrupting the process.
            x_buffer = torch.zeros(2 * n_rows + 8, n_cols + 7)
            x_buffer[:n_rows, :n_cols] = x
            x = x_buffer.to(dtype).to(device)[:n_rows, :n_cols]
            out_buffer, out = _guarded_matrix(n_rows, n_cols, dtype, device)
            block = 1 << max(n_cols - 1, 0).bit_length()
            expected = torch.softmax(x.float(), dim=-1).to(dtype)
            saved = snapshot(x=x)
            programs = min(n_rows, 3)  # fewer programs than rows: each must loop over several rows
            _launch(softmax_kernel, (programs,), out, x, x.stride(0), out.stride(0), n_rows, n_cols, BLOCK_SIZE=block)
            expect_unchanged(saved, f"softmax_kernel on {n_rows}×{n_cols}", hint="store the result through out_ptr")
            if not _guard_intact(out_buffer, n_rows, n_cols):
                raise AssertionError(f"softmax_kernel on {n_rows}×{n_cols} ({str(dtype)[6:]}) wrote outside the rows "
                                     "of the output. Hint: store at out_ptr + row * out_row_stride + columns with "
                                     "mask=columns < n_cols (the output's row stride is not n_cols)")
            if torch.isnan(out).any() and not torch.isnan(x).any():
                raise AssertionError(f"softmax_kernel on {n_rows}×{n_cols} ({str(dtype)[6:]}) left NaN in the output. "
                                     "Hint: loop `for row in range(first_row, n_rows, row_step)` so that every row is "
                                     "written, load padding lanes as -inf, and subtract each row's own max (computed "
                                     "inside the loop) before tl.exp")
            expect_close(out, expected, f"softmax_kernel on {n_rows}×{n_cols} ({str(dtype)[6:]})",
                         rtol=1e-3, atol=1e-3,
                         hint="per row: x - max(x), exp, divide by the sum; padding lanes load other=-inf; "
                              "read row r at in_ptr + r * in_row_stride and write it at out_ptr + r * out_row_stride")
    # In place (out is the input): a program that also handles rows of other programs (a loop with step 1, say)
    # softmaxes them a second time. The output above cannot show it: repeated work stores the same values.
    x = torch.randn(7, 13, generator=generator).to(device)
    expected = torch.softmax(x, dim=-1)
    _launch(softmax_kernel, (3,), x, x, x.stride(0), x.stride(0), 7, 13, BLOCK_SIZE=16)
    expect_close(x, expected, "softmax_kernel in place on 7×13 rows with 3 programs", rtol=1e-3, atol=1e-3,
                 hint="each row must be handled by exactly one program: for row in range(first_row, n_rows, "
                      "row_step), where row_step = tl.num_programs(0)")
    return "matches torch.softmax on ragged and extreme rows with padded strides"


@exercise("ex02.4", "tiled matmul K loop", points=3)
def check_matmul_kernel(matmul_kernel) -> str:
    device = _kernel_device(matmul_kernel)
    _require_masks(matmul_kernel, "when M, N or K is not a multiple of its block, the lanes past the edge",
                   "masks such as ks[None, :] < k_left (with other=0.0) on the loads and rows < M & cols < N on "
                   "the store")
    no_other = _masked_loads_without_other(matmul_kernel)
    if no_other:
        raise AssertionError(f"`{no_other[0][:100]}` has a mask but no other=: Triton leaves the masked lanes "
                             "undefined (the CPU interpreter happens to give 0, a GPU need not), and they enter "
                             "tl.dot. Hint: pass other=0.0 to every masked tl.load, so that the lanes past K add "
                             "nothing")
    generator = torch.Generator().manual_seed(4)
    # (m, k, n) and the layouts of A and B: "padded" rows (a view of a wider matrix) or "transposed" (a .T view,
    # so the K stride is not 1). C is always a padded view, so stride_cm differs from stride_am and from n.
    cases = [(1, 1, 1, "padded", "padded"), (7, 13, 5, "padded", "transposed"),
             (33, 40, 17, "transposed", "padded"), (40, 70, 65, "transposed", "transposed")]
    for (m, k, n, a_layout, b_layout) in cases:
        for dtype in (torch.float32, torch.float16):
            a = _strided(m, k, a_layout, generator, dtype, device)
            b = _strided(k, n, b_layout, generator, dtype, device)
            c_buffer, c = _guarded_matrix(m, n, dtype, device)
            meta = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
            grid = (((m + 15) // 16) * ((n + 15) // 16),)
            expected, saved = (a.float() @ b.float()).to(dtype), snapshot(a=a, b=b)
            _launch(matmul_kernel, grid, a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                    c.stride(0), c.stride(1), **meta)
            what = f"matmul_kernel on ({m}×{k}, {a_layout}) @ ({k}×{n}, {b_layout}) {str(dtype)[6:]}"
            expect_unchanged(saved, what, hint="only the final tl.store writes, through c_ptr")
            if not _guard_intact(c_buffer, m, n):
                raise AssertionError(f"{what}: the kernel wrote outside C. Hint: keep the given tl.store, with "
                                     "stride_cm, stride_cn and its mask")
            # fp16 results are rounded once at the end; fp32 on a GPU may use TF32 (10-bit mantissa)
            tolerance = 2e-2 if dtype == torch.float16 or device.type == "cuda" else 1e-4
            expect_close(c, expected, what, rtol=tolerance, atol=tolerance * max(k, 1) ** 0.5,
                         hint="for each K block: load A and B, both with a mask on the K index (other=0), "
                              "accumulator = tl.dot(a, b, accumulator), then advance both pointers by BLOCK_K "
                              "times their K stride (stride_ak for A, stride_bk for B; never assume 1 or N)")
    return "matches a @ b on ragged shapes (K not a multiple of BLOCK_K), padded and transposed layouts"
