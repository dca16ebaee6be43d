"""Property tests of minillm.kernels (chapter 02) against torch's own ops, the peer reference.

Every public kernel runs through backend="triton" and backend="auto" on shapes, memory layouts, dtypes and
values drawn by hypothesis: one row or column, sizes just past a block size, no rows, batch dimensions;
transposed, stepped, offset and broadcast (stride 0) views whose unused storage holds nan (so a read
outside the view shows); large magnitudes, -inf, +inf and nan entries. The peer is torch computing in
float32 (float64 for float64) and casting back; gradients are compared through torch.autograd.grad with
non-contiguous upstream gradients. Inputs must come back untouched and outputs must not share their memory.

Documented differences pinned here (not defects):
- backend="triton" refuses float64 with a TypeError naming the dtype and backend='torch'; "auto" runs torch.
- In Triton's interpreter, backend="triton" refuses bf16 for add, matmul and the grouped kernels (the
  interpreter computes bf16 arithmetic wrongly); softmax, rmsnorm and cross_entropy load bf16 into fp32 and
  take it. backend="auto" hands every bf16 call to torch there.
- A softmax row that is entirely -inf gives nan, as torch.softmax does; cross_entropy with every target
  ignored gives nan (the mean of no losses) and a zero gradient, as torch does.

Like tests/test_kernels.py, TRITON_INTERPRET=1 is set (without a GPU) before triton and the kernel modules
are imported, then restored, and set again only while this module's tests run.
"""
import math
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from kernel_imports import GPU, interpreter_on, kernel_modules

# imported while the interpreter was switched on: the kernels compile for it, not for a missing GPU
KERNEL_MODULES = kernel_modules()
elementwise, grouped, normalization, rowwise, tiled_matmul = KERNEL_MODULES

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from minillm import kernels  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
KERNEL_BACKEND = "triton" if GPU else "interpreter"
PROPERTY = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# one row/column, non-powers of two, and one past the block sizes (16: BLOCK_K and grouped BLOCK_M; 32:
# matmul BLOCK_M/N; 64: a softmax row's block); shapes stay <= 128 so the interpreter keeps up
SIZES = st.sampled_from([1, 2, 3, 16, 17, 31, 33, 64, 65, 127])
SIZES_OR_0 = st.sampled_from([1, 2, 3, 16, 17, 31, 33, 64, 65, 127, 0])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "stepped", "offset", "expanded_rows", "expanded_cols",
                           "batch_permuted"])
SCALES = st.sampled_from([1.0, 1.0, 3.0, 1e4, -1e4])
SPECIAL_VALUES = st.sampled_from([float("-inf"), float("inf"), float("nan")])
SPECIALS = st.lists(st.tuples(st.integers(0, 2 ** 20), SPECIAL_VALUES), max_size=2)

# Output tolerances: both sides compute in fp32 (fp64) and round once to the dtype, so they differ by the
# fp32 reassociation error, or by one unit in the last place of the dtype: torch's own defaults per dtype.
TOLERANCE = {torch.float32: dict(rtol=1.3e-6 * 8, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-5),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7)}
# Gradients of half precisions are built from half-precision intermediates on both sides (the saved output,
# the upstream gradient), in different orders: a few units in the last place.
GRAD_TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-3),
                  torch.bfloat16: dict(rtol=5e-2, atol=1e-2), torch.float64: dict(rtol=1e-7, atol=1e-7)}


# every (dtype, backend) pair is a pytest parameter, so that each is sure to be run
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def for_each_dtype_and_backend(test):
    test = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))(test)
    return pytest.mark.parametrize("backend", ["triton", "auto"])(test)


@pytest.fixture(autouse=True, scope="module")
def interpreter_without_gpu():
    # kernels.last_backend() is process-wide, and a test of tests/test_kernels.py compares all of it: leave it
    # as this module found it
    last_backend_before = kernels.last_backend()
    with interpreter_on():
        yield
    kernels._last_backend.clear()
    kernels._last_backend.update(last_backend_before)


# --- inputs -------------------------------------------------------------------------------------------

def values(shape, dtype, seed, scale=1.0, specials=()):
    """randn * scale in dtype on DEVICE, with each (position, value) of specials written in."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    flat = x.view(-1)
    for position, value in specials:
        if flat.numel():
            flat[position % flat.numel()] = value
    return x.to(dtype).to(DEVICE)


def laid_out(x: torch.Tensor, layout: str, requires_grad: bool = False) -> torch.Tensor:
    """x's values in another memory layout: a view into a fresh buffer whose other elements are poison.

    The broadcast layouts (stride 0) keep x's first row or column and repeat it. With requires_grad the
    buffer is a leaf that requires grad and the view is differentiable back to it.
    """
    nd = x.dim()
    if nd < 2 and layout in ("transposed", "expanded_rows", "batch_permuted"):
        layout = "stepped"
    if nd < 3 and layout == "batch_permuted":
        layout = "transposed"
    poison = float("nan") if x.is_floating_point() else 12345
    if layout in ("contiguous", "expanded_rows", "expanded_cols"):
        source = x if layout == "contiguous" else x[..., :1, :] if layout == "expanded_rows" else x[..., :1]
        buffer = source.clone()
        view = lambda b: b if layout == "contiguous" else b.expand_as(x)  # noqa: E731
    elif layout == "transposed":
        buffer = x.transpose(-1, -2).contiguous()
        view = lambda b: b.transpose(-1, -2)  # noqa: E731
    elif layout == "batch_permuted":
        buffer = x.transpose(0, 1).contiguous()
        view = lambda b: b.transpose(0, 1)  # noqa: E731
    elif layout == "stepped":   # every other row (and batch), every third column
        buffer = torch.full([2 * s for s in x.shape[:-1]] + [3 * x.shape[-1]], poison, dtype=x.dtype, device=x.device)
        view = lambda b: b[(slice(None, None, 2),) * (nd - 1) + (slice(None, None, 3),)]  # noqa: E731
        view(buffer).copy_(x)
    elif layout == "offset":    # a storage offset and a row stride wider than the row
        buffer = torch.full([s + 1 for s in x.shape[:-1]] + [x.shape[-1] + 5], poison, dtype=x.dtype,
                            device=x.device)
        view = lambda b: b[(slice(1, None),) * (nd - 1) + (slice(5, None),)]  # noqa: E731
        view(buffer).copy_(x)
    else:
        raise AssertionError(layout)
    if requires_grad:
        buffer.requires_grad_()
    out = view(buffer)
    assert out.shape == x.shape
    return out


def storage_of(x: torch.Tensor) -> torch.Tensor:
    """The whole buffer a view reads (its base), to see writes anywhere in it."""
    return x._base if x._base is not None else x


class Untouched:
    """Snapshots the buffers of the inputs; check() asserts they are unchanged and not shared by `out`."""

    def __init__(self, *inputs):
        self.inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
        self.before = [storage_of(t).detach().clone() for t in self.inputs]

    def check(self, out: torch.Tensor) -> None:
        for t, before in zip(self.inputs, self.before):
            torch.testing.assert_close(storage_of(t).detach(), before, rtol=0, atol=0, equal_nan=True,
                                       msg="the kernel wrote into an input's memory")
            if out.numel() and t.numel():
                assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr(), "output aliases an input"


def refusal(name: str, dtype: torch.dtype, backend: str) -> str | None:
    """The documented TypeError backend='triton' gives for this dtype (None where the kernel runs)."""
    if backend != "triton":
        return None
    if dtype == torch.float64:
        return r"float64.*backend='torch'"
    if dtype == torch.bfloat16 and not GPU and name in ("add", "matmul", "grouped_matmul", "grouped_weight_grad"):
        return r"interpreter computes bf16 wrongly"
    return None


def expected_backend(dtype: torch.dtype, backend: str) -> str:
    if backend == "auto" and (dtype == torch.float64 or (dtype == torch.bfloat16 and not GPU)):
        return "torch"
    return KERNEL_BACKEND


def run(name: str, dtype: torch.dtype, backend: str, *args, **kwargs):
    """kernels.<name>(*args) on `backend`: the output, or None after checking the documented refusal."""
    refused = refusal(name, dtype, backend)
    if refused:
        with pytest.raises(TypeError, match=refused):
            getattr(kernels, name)(*args, backend=backend, **kwargs)
        return None
    out = getattr(kernels, name)(*args, backend=backend, **kwargs)
    assert kernels.last_backend(name) == expected_backend(dtype, backend)
    return out


def wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_same(got: torch.Tensor, expected: torch.Tensor, tolerance: dict, what: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape, got.dtype)
    torch.testing.assert_close(got, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tolerance)


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream)


def shape_of(data):
    """(batch..., rows, columns) with rows possibly 0 and an optional batch dimension."""
    rows, columns = data.draw(SIZES_OR_0, "rows"), data.draw(SIZES, "columns")
    batch = data.draw(st.sampled_from([(), (), (2,), (3,)]), "batch")
    return (*batch, rows, columns)


# --- add ---------------------------------------------------------------------------------------------

@for_each_dtype_and_backend
@PROPERTY
@given(data=st.data())
def test_add_equals_torch_add(data, dtype, backend):
    shape = shape_of(data)
    specials = data.draw(SPECIALS, "specials")
    x = laid_out(values(shape, dtype, 1, data.draw(SCALES, "x scale"), specials), data.draw(LAYOUTS, "x layout"), True)
    y = laid_out(values(shape, dtype, 2, data.draw(SCALES, "y scale")), data.draw(LAYOUTS, "y layout"), True)
    untouched = Untouched(x, y)
    out = run("add", dtype, backend, x, y)
    if out is None:
        return
    untouched.check(out)
    assert_same(out, x + y, dict(rtol=0, atol=0), "add")
    upstream = laid_out(values(shape, dtype, 3), data.draw(LAYOUTS, "upstream layout"))
    for got, expected in zip(grads(out, (x, y), upstream), grads(x + y, (x, y), upstream)):
        assert_same(got, expected, dict(rtol=0, atol=0), "add gradient")


# --- softmax -----------------------------------------------------------------------------------------

@for_each_dtype_and_backend
@PROPERTY
@given(data=st.data())
def test_softmax_equals_torch_softmax(data, dtype, backend):
    shape = shape_of(data)
    if data.draw(st.booleans(), "1-D"):
        shape = shape[-1:]
    x = values(shape, dtype, data.draw(st.integers(0, 99), "seed"), data.draw(SCALES, "scale"),
               data.draw(SPECIALS, "specials"))
    if x.dim() >= 2 and x.shape[-2] and data.draw(st.booleans(), "a row of -inf"):
        x[..., data.draw(st.integers(0, x.shape[-2] - 1)), :] = float("-inf")
    if data.draw(st.booleans(), "-inf entries"):
        x.view(-1)[::3] = float("-inf")
    x = laid_out(x, data.draw(LAYOUTS, "layout"), requires_grad=True)
    streamed = data.draw(st.booleans(), "streamed")   # the long-row kernel, its blocks made small
    untouched = Untouched(x)
    with mock.patch.multiple(rowwise, MAX_SINGLE_BLOCK_COLUMNS=16, LONG_ROW_BLOCK=16) if streamed else nullcontext():
        out = run("softmax", dtype, backend, x)
    if out is None:
        return
    untouched.check(out)
    expected = torch.softmax(x.to(wide(dtype)), dim=-1).to(dtype)
    assert_same(out, expected, TOLERANCE[dtype], "softmax")
    upstream = laid_out(values(shape, dtype, 5), data.draw(LAYOUTS, "upstream layout"))
    assert_same(grads(out, x, upstream)[0], grads(expected, x, upstream)[0], GRAD_TOLERANCE[dtype],
                "softmax gradient")


# --- rmsnorm -----------------------------------------------------------------------------------------

@for_each_dtype_and_backend
@PROPERTY
@given(data=st.data())
def test_rmsnorm_equals_torch_rms_norm(data, dtype, backend):
    shape = shape_of(data)
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.1]), "eps")
    x = laid_out(values(shape, dtype, 1, data.draw(SCALES, "scale"), data.draw(SPECIALS, "specials")),
                 data.draw(LAYOUTS, "x layout"), requires_grad=True)
    weight = laid_out(values(shape[-1:], dtype, 2), data.draw(st.sampled_from(["contiguous", "stepped", "offset",
                                                                              "expanded_cols"]), "weight layout"),
                      requires_grad=True)
    untouched = Untouched(x, weight)
    out = run("rmsnorm", dtype, backend, x, weight, eps)
    if out is None:
        return
    untouched.check(out)
    expected = F.rms_norm(x.to(wide(dtype)), shape[-1:], weight.to(wide(dtype)), eps).to(dtype)
    assert_same(out, expected, TOLERANCE[dtype], "rmsnorm")
    upstream = laid_out(values(shape, dtype, 3), data.draw(LAYOUTS, "upstream layout"))
    for got, want, what in zip(grads(out, (x, weight), upstream), grads(expected, (x, weight), upstream), "xw"):
        tolerance = dict(GRAD_TOLERANCE[dtype])
        if what == "w":   # a sum over rows: its error grows with their number
            tolerance["atol"] *= math.sqrt(max(1, math.prod(shape[:-1])))
        assert_same(got, want, tolerance, f"rmsnorm gradient of {what}")


# --- cross_entropy -----------------------------------------------------------------------------------

@for_each_dtype_and_backend
@PROPERTY
@given(data=st.data())
def test_cross_entropy_equals_torch_cross_entropy(data, dtype, backend):
    rows, classes = data.draw(st.sampled_from([0, 1, 2, 3, 17, 33]), "rows"), data.draw(SIZES, "classes")
    ignore_index = data.draw(st.sampled_from([-100, -1, 0, classes - 1, 2 ** 40]), "ignore_index")
    logits = values((rows, classes), dtype, data.draw(st.integers(0, 99), "seed"), data.draw(SCALES, "scale"),
                    data.draw(SPECIALS, "specials"))
    if data.draw(st.booleans(), "-inf entries"):
        logits.view(-1)[1::4] = float("-inf")
    target_list = data.draw(st.lists(st.one_of(st.integers(0, classes - 1), st.just(ignore_index)),
                                     min_size=rows, max_size=rows), "targets")
    target_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]) if ignore_index < 2 ** 31
                             else st.just(torch.int64), "targets dtype")
    targets = laid_out(torch.tensor(target_list, dtype=target_dtype, device=DEVICE),
                       data.draw(st.sampled_from(["contiguous", "stepped", "offset"]), "targets layout"))
    logits_layouts = st.sampled_from(["contiguous", "transposed", "stepped", "offset", "expanded_rows",
                                      "expanded_cols"])
    logits = laid_out(logits, data.draw(logits_layouts, "logits layout"), requires_grad=True)
    streamed = data.draw(st.booleans(), "streamed")   # rows of several blocks, the blocks made small
    untouched = Untouched(logits, targets)
    with mock.patch.object(rowwise, "LONG_ROW_BLOCK", 16) if streamed else nullcontext():
        loss = run("cross_entropy", dtype, backend, logits, targets, ignore_index)
        if loss is None:
            return
        upstream = torch.tensor([float("nan"), data.draw(st.sampled_from([1.0, -2.5, 0.0]), "upstream")], device=DEVICE,
                                dtype=loss.dtype)[1]   # a 0-d view at a storage offset
        got_grad = grads(loss, logits, upstream)[0]
    untouched.check(loss)
    expected = F.cross_entropy(logits.to(wide(dtype)), targets.long(), ignore_index=ignore_index)
    assert_same(loss, expected, TOLERANCE[wide(dtype)] if dtype != torch.float64 else TOLERANCE[dtype],
                "cross_entropy")
    want_grad = grads(expected, logits, upstream)[0]
    assert_same(got_grad, want_grad, GRAD_TOLERANCE[dtype], "cross_entropy gradient")


@PROPERTY
@given(st.data())
def test_cross_entropy_targets_out_of_range_are_a_clear_error(data):
    rows, classes = data.draw(st.integers(1, 5), "rows"), data.draw(st.integers(1, 9), "classes")
    ignore_index = data.draw(st.sampled_from([-100, -1, 0]), "ignore_index")
    bad = data.draw(st.one_of(st.integers(classes, classes + 10 ** 6), st.integers(-10 ** 6, -1))
                    .filter(lambda t: t != ignore_index), "bad target")
    targets = torch.zeros(rows, dtype=torch.int64, device=DEVICE)
    targets[data.draw(st.integers(0, rows - 1), "where")] = bad
    for backend in ("triton", "auto", "torch"):
        with pytest.raises(ValueError, match=rf"targets must lie in \[0, {classes}\) or equal "
                                             rf"ignore_index={ignore_index}; found \[{bad}\]"):
            kernels.cross_entropy(values((rows, classes), torch.float32, 1), targets, ignore_index, backend=backend)


# --- matmul ------------------------------------------------------------------------------------------

def matmul_tolerance(dtype, inner, scale_a, scale_b):
    """fp32 sums of `inner` products in another order: an error that grows like sqrt(inner) * |a| |b|."""
    tolerance = dict(TOLERANCE[dtype])
    if GPU and dtype == torch.float32:   # TF32 where torch allows it, as torch does
        tolerance["rtol"] = 1e-2
    tolerance["atol"] = max(tolerance["atol"], 1e-5 * math.sqrt(max(inner, 1)) * abs(scale_a * scale_b))
    return tolerance


MATMUL_LAYOUTS = st.sampled_from(["contiguous", "transposed", "stepped", "offset", "expanded_rows",
                                  "expanded_cols"])


@for_each_dtype_and_backend
@PROPERTY
@given(data=st.data())
def test_matmul_equals_torch_matmul(data, dtype, backend):
    m, k, n = (data.draw(SIZES_OR_0, name) for name in "mkn")
    scale_a, scale_b = data.draw(st.sampled_from([1.0, 30.0]), "a scale"), data.draw(st.sampled_from([1.0, -30.0]))
    a = laid_out(values((m, k), dtype, 1, scale_a, data.draw(SPECIALS, "specials")),
                 data.draw(MATMUL_LAYOUTS, "a layout"), True)
    b = laid_out(values((k, n), dtype, 2, scale_b), data.draw(MATMUL_LAYOUTS, "b layout"), True)
    untouched = Untouched(a, b)
    out = run("matmul", dtype, backend, a, b)
    if out is None:
        return
    untouched.check(out)
    expected = (a.to(wide(dtype)) @ b.to(wide(dtype))).to(dtype)
    assert_same(out, expected, matmul_tolerance(dtype, k, scale_a, scale_b), "matmul")
    upstream = laid_out(values((m, n), dtype, 3), data.draw(MATMUL_LAYOUTS, "upstream layout"))
    got, want = grads(out, (a, b), upstream), grads(expected, (a, b), upstream)
    assert_same(got[0], want[0], matmul_tolerance(dtype, n, 1.0, scale_b), "matmul gradient of a")
    assert_same(got[1], want[1], matmul_tolerance(dtype, m, scale_a, 1.0), "matmul gradient of b")


# --- grouped_matmul and grouped_weight_grad -----------------------------------------------------------

def per_expert(function, ends, *tensors):
    """function(rows of expert e of each tensor, e) for every expert, the peer built from torch ops."""
    start, pieces = 0, []
    for expert, end in enumerate(ends.tolist()):
        pieces.append(function(*(t[start:end] for t in tensors), expert))
        start = end
    return pieces


@for_each_dtype_and_backend
@PROPERTY
@given(data=st.data())
def test_grouped_kernels_equal_a_loop_of_torch_matmuls(data, dtype, backend):
    counts = data.draw(st.lists(st.sampled_from([0, 0, 1, 5, 16, 17, 33]), min_size=1, max_size=4), "counts")
    k, n = data.draw(SIZES, "k"), data.draw(st.sampled_from([1, 3, 17, 33]), "n")
    rows, experts, w = sum(counts), len(counts), wide(dtype)
    ends_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), "ends dtype")
    ends = torch.cumsum(torch.tensor(counts), 0).to(ends_dtype).to(DEVICE)
    a = laid_out(values((rows, k), dtype, 1, 1.0, data.draw(SPECIALS, "specials")),
                 data.draw(MATMUL_LAYOUTS, "a layout"), True)
    b = laid_out(values((experts, k, n), dtype, 2), data.draw(LAYOUTS, "b layout"), True)
    c = laid_out(values((rows, n), dtype, 3), data.draw(MATMUL_LAYOUTS, "c layout"), True)
    untouched = Untouched(a, b, c, ends)
    out = run("grouped_matmul", dtype, backend, a, b, ends)
    weight_grad = run("grouped_weight_grad", dtype, backend, a, c, ends)
    if out is None:
        assert weight_grad is None
        return
    untouched.check(out)
    untouched.check(weight_grad)
    expected = torch.cat(per_expert(lambda a_, e: a_.to(w) @ b[e].to(w), ends, a) + [a.new_zeros(0, n, dtype=w)])
    expected_grad = torch.stack(per_expert(lambda a_, c_, e: a_.to(w).t() @ c_.to(w), ends, a, c)).to(dtype)
    assert_same(out, expected.to(dtype), matmul_tolerance(dtype, k, 1.0, 1.0), "grouped_matmul")
    assert_same(weight_grad, expected_grad, matmul_tolerance(dtype, rows, 1.0, 1.0), "grouped_weight_grad")
    upstream = laid_out(values((rows, n), dtype, 4), data.draw(MATMUL_LAYOUTS, "upstream layout"))
    for got, want, what in zip(grads(out, (a, b), upstream), grads(expected.to(dtype), (a, b), upstream), "ab"):
        assert_same(got, want, matmul_tolerance(dtype, max(n, rows), 1.0, 1.0), f"grouped_matmul gradient of {what}")
    upstream = laid_out(values((experts, k, n), dtype, 5), data.draw(LAYOUTS, "weight upstream layout"))
    for got, want, what in zip(grads(weight_grad, (a, c), upstream), grads(expected_grad, (a, c), upstream), "ac"):
        assert_same(got, want, matmul_tolerance(dtype, max(k, n), 1.0, 1.0), f"grouped_weight_grad gradient of {what}")


# --- documented behaviour and regressions the properties above found, pinned as plain examples

@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_degenerate_rows_give_nan_as_torch_does(backend):
    # Documented, and torch's own answer: a softmax row of only -inf is nan (0/0); the mean cross-entropy
    # of no counted targets is nan, and its gradient is zero.
    x = values((3, 5), torch.float32, 1)
    x[1] = float("-inf")
    got = kernels.softmax(x, backend=backend)
    assert got[1].isnan().all() and torch.softmax(x, -1)[1].isnan().all()
    torch.testing.assert_close(got[0::2], torch.softmax(x, -1)[0::2])
    logits = values((4, 5), torch.float32, 2).requires_grad_()
    targets = torch.full((4,), 3, device=DEVICE)
    loss = kernels.cross_entropy(logits, targets, ignore_index=3, backend=backend)
    expected = F.cross_entropy(logits, targets, ignore_index=3)
    assert loss.isnan() and expected.isnan()
    assert torch.equal(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])
    assert not torch.autograd.grad(kernels.cross_entropy(logits, targets, 3, backend=backend), logits)[0].any()


# --- regressions the properties above found, pinned as plain examples ---------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_grouped_kernels_without_rows_are_still_differentiable(backend):
    # With no rows (every expert idle) the torch path returned zeros that were outside autograd, where
    # torch's own a[0:0] @ b[e] and the Triton path are differentiable: autograd.grad raised
    # "element 0 of tensors does not require grad".
    a, b = values((0, 4), torch.float32, 1).requires_grad_(), values((2, 4, 3), torch.float32, 2).requires_grad_()
    c, ends = values((0, 3), torch.float32, 3).requires_grad_(), torch.tensor([0, 0], device=DEVICE)
    out = kernels.grouped_matmul(a, b, ends, backend=backend)
    grad_a, grad_b = torch.autograd.grad(out, (a, b), torch.ones_like(out))
    assert grad_a.shape == a.shape and grad_b.shape == b.shape and not grad_b.any()
    weight_grad = kernels.grouped_weight_grad(a, c, ends, backend=backend)
    assert weight_grad.shape == (2, 4, 3) and not weight_grad.any()
    grad_a, grad_c = torch.autograd.grad(weight_grad, (a, c), torch.ones_like(weight_grad))
    assert grad_a.shape == a.shape and grad_c.shape == c.shape


@pytest.mark.skipif(GPU, reason="compiled on a GPU, bf16 is computed correctly")
@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 3), (2, 4, 0)], ids=str)
def test_interpreter_refuses_bf16_products_whatever_the_shape(shape):
    # matmul and the grouped kernels refused bf16 in the interpreter only when there was something to
    # multiply: an empty or K = 0 product returned, a non-empty one raised (add refused both).
    m, k, n = shape
    a, b = values((m, k), torch.bfloat16, 1), values((k, n), torch.bfloat16, 2)
    ends = torch.tensor([m], device=DEVICE)
    calls = {"matmul": (a, b), "grouped_matmul": (a, b[None], ends),
             "grouped_weight_grad": (a, values((m, n), torch.bfloat16, 3), ends)}
    for name, args in calls.items():
        with pytest.raises(TypeError, match="interpreter computes bf16 wrongly"):
            getattr(kernels, name)(*args, backend="triton")
        assert getattr(kernels, name)(*args, backend="auto").dtype == torch.bfloat16   # "auto": torch
        assert kernels.last_backend(name) == "torch"


def test_kernels_with_32_bit_offsets_refuse_what_they_cannot_address():
    # softmax's rows are addressed as row * row stride in 32 bits: its guard counted the elements of x, but a
    # strided view spans more memory than it has elements. add's offsets (program * BLOCK_SIZE) had no guard:
    # past 2**31 elements they wrapped around. Meta tensors stand in for the gigabytes (nothing is allocated).
    strided = torch.empty_strided((2 ** 27 + 1, 10), (16, 1), device="meta")   # 1.3e9 elements, a 2**31 span
    assert strided.numel() < 2 ** 31
    with pytest.raises(ValueError, match=r"32-bit .* split the tensor .* backend='torch'"):
        rowwise.softmax(strided)
    long = torch.empty(2 ** 31 + 5, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match=r"2147483653 elements; the kernel's offsets are 32-bit .* backend='torch'"):
        elementwise.add(long, long)


@pytest.mark.parametrize("streamed", [False, True], ids=["one block", "blocks of 16"])
def test_cross_entropy_keeps_its_digits_at_large_logits(streamed):
    # The kernel formed logsumexp = max + log(sum) and subtracted the target logit from it: at logits of 3e4
    # the sum rounds log(sum) to float32's spacing there (2e-3), so a tie of two classes lost 0.6914 for
    # log 2 = 0.6931, and the gradient was off by 0.4%. torch takes the max off first; so does the kernel now.
    logits = torch.full((3, 2), 3e4, device=DEVICE)
    confident = values((5, 33), torch.float32, 1, scale=1e4)
    confident[:, 5] = confident.max() + 0.5
    cases = [(logits, torch.tensor([0, 1, 0], device=DEVICE)), (confident, torch.full((5,), 5, device=DEVICE))]
    with mock.patch.object(rowwise, "LONG_ROW_BLOCK", 16) if streamed else nullcontext():
        for x, targets in cases:
            mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
            got, expected = kernels.cross_entropy(mine, targets, backend="triton"), F.cross_entropy(theirs, targets)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(torch.autograd.grad(got, mine)[0], torch.autograd.grad(expected, theirs)[0],
                                       rtol=1e-5, atol=1e-8)
