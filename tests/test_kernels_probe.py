"""An examiner's probe of minillm.kernels' public API (chapter 02) where the other kernel tests do not look.

Every public function against plain torch (1 element, sizes past the block sizes, transposed and sliced
operands), second derivatives through the kernels that borrow their backward from the dispatcher, ends
that are not contiguous, mixed dtypes, integer inputs, the dispatch's choices and errors, and the benchmark
on a CPU. The regressions it found are pinned at the end.

Like tests/test_kernels.py, TRITON_INTERPRET=1 is set (without a GPU) before triton and the kernel modules
are imported, then restored, and set again only while this module's tests run. Shapes stay <= 128.
"""

import pytest
import torch
import torch.nn.functional as F

from kernel_imports import GPU, interpreter_on, kernel_modules

# imported while the interpreter was switched on: the kernels compile for it, not for a missing GPU
KERNEL_MODULES = kernel_modules()
elementwise, grouped, normalization, rowwise, tiled_matmul = KERNEL_MODULES

from minillm import kernels  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
KERNEL_BACKEND = "triton" if GPU else "interpreter"
BACKENDS = ["triton", "auto", "torch"]
FP32 = dict(rtol=1e-2 if GPU else 1e-4, atol=1e-4)   # GPU fp32 products may use TF32, as torch's do


@pytest.fixture(autouse=True, scope="module")
def interpreter_without_gpu():
    last_backend_before = kernels.last_backend()   # process-wide: leave it as this module found it
    with interpreter_on():
        yield
    kernels._last_backend.clear()
    kernels._last_backend.update(last_backend_before)


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


def expected_backend(backend):
    return "torch" if backend == "torch" else KERNEL_BACKEND


# --- every public function against plain torch ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, columns", [(1, 1), (7, 33), (3, 65), (2, 127)], ids=str)
def test_rowwise_functions_equal_torch(rows, columns, backend):
    x = randn(columns, rows, seed=1).t()[:, :]              # transposed: column stride != 1
    weight = randn(2 * columns, seed=2)[::2]                # stepped
    targets = torch.randint(0, columns, (rows,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y = randn(rows, columns, seed=4)
    assert torch.equal(kernels.add(x, y, backend=backend), x + y)
    torch.testing.assert_close(kernels.softmax(x, backend=backend), F.softmax(x, dim=-1))
    assert kernels.last_backend("softmax") == expected_backend(backend)
    torch.testing.assert_close(kernels.rmsnorm(x, weight, 1e-5, backend=backend),
                               F.rms_norm(x, (columns,), weight, 1e-5))
    torch.testing.assert_close(kernels.cross_entropy(x, targets, backend=backend), F.cross_entropy(x, targets))
    assert kernels.last_backend("cross_entropy") == expected_backend(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 127, 1), (65, 7, 33), (33, 65, 7)], ids=str)
def test_matmul_and_grouped_kernels_equal_torch(m, k, n, backend):
    a, b = randn(k, m, seed=1).t(), randn(n + 3, k, seed=2)[3:].t()   # transposed, sliced and transposed
    torch.testing.assert_close(kernels.matmul(a, b, backend=backend), torch.matmul(a, b), **FP32)
    assert kernels.last_backend("matmul") == expected_backend(backend)
    counts = [m // 2, 0, m - m // 2]
    ends = torch.cumsum(torch.tensor(counts), 0).to(DEVICE)
    weights, c = randn(3, k, n, seed=3), randn(m, n, seed=4)
    loop, start = [], 0
    for expert, end in enumerate(ends.tolist()):
        loop.append(a[start:end] @ weights[expert])
        start = end
    torch.testing.assert_close(kernels.grouped_matmul(a, weights, ends, backend=backend), torch.cat(loop), **FP32)
    starts = [0] + ends.tolist()[:-1]
    expected = torch.stack([a[s:e].t() @ c[s:e] for s, e in zip(starts, ends.tolist())])
    torch.testing.assert_close(kernels.grouped_weight_grad(a, c, ends, backend=backend), expected, **FP32)


@pytest.mark.parametrize("name", ["softmax", "matmul", "grouped_matmul", "grouped_weight_grad"])
def test_second_derivatives_through_the_dispatchers_backward_equal_torch(name):
    # These kernels have no backward of their own: the dispatcher's is made of the same (dispatched) products,
    # so under create_graph=True a gradient penalty must see its true second derivative.
    ends = torch.tensor([5, 5, 12], device=DEVICE)
    inputs, call = {
        "softmax": ((randn(5, 33, scale=2.0, seed=1),), lambda x, backend: kernels.softmax(x, backend=backend)),
        "matmul": ((randn(9, 17, seed=1), randn(17, 6, seed=2)), lambda p, q, backend: kernels.matmul(p, q, backend)),
        "grouped_matmul": ((randn(12, 17, seed=1), randn(3, 17, 6, seed=2)),
                           lambda p, q, backend: kernels.grouped_matmul(p, q, ends, backend)),
        "grouped_weight_grad": ((randn(12, 17, seed=1), randn(12, 6, seed=2)),
                                lambda p, q, backend: kernels.grouped_weight_grad(p, q, ends, backend)),
    }[name]
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = call(*leaves, backend=backend)
        grads = torch.autograd.grad(out, leaves, randn(*out.shape, seed=9), create_graph=True)
        penalty = sum((g.sin() * g).sum() for g in grads)
        results[backend] = [g.detach() for g in grads] + list(torch.autograd.grad(penalty, leaves))
    for got, expected in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_grouped_kernels_take_ends_that_are_not_contiguous(dtype):
    a, b, c = randn(12, 9, seed=1), randn(3, 9, 5, seed=2), randn(12, 5, seed=3)
    stepped = torch.tensor([4, 99, 4, 99, 12, 99], dtype=dtype, device=DEVICE)[::2]
    expanded = torch.tensor([12], dtype=dtype, device=DEVICE).expand(3)   # experts 1 and 2 idle
    for ends in (stepped, expanded):
        for name, other in (("grouped_matmul", b), ("grouped_weight_grad", c)):
            torch.testing.assert_close(getattr(kernels, name)(a, other, ends, backend="triton"),
                                       getattr(kernels, name)(a, other, ends.contiguous(), backend="torch"), **FP32)


@pytest.mark.parametrize("x_dtype, weight_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)],
                         ids=str)
def test_rmsnorm_with_a_weight_of_another_dtype_agrees_across_backends(x_dtype, weight_dtype):
    x0, w0, upstream = randn(3, 4, 17, dtype=x_dtype, seed=1), randn(17, dtype=weight_dtype, seed=2), None
    results = {}
    for backend in ("triton", "torch"):
        x, weight = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = kernels.rmsnorm(x, weight, backend=backend)
        upstream = randn(*out.shape, dtype=out.dtype, seed=3)
        results[backend] = (out, *torch.autograd.grad(out, (x, weight), upstream))
    for got, expected in zip(results["triton"], results["torch"]):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert [t.dtype for t in results["torch"]] == [x_dtype, x_dtype, weight_dtype]


def test_integer_products_run_on_torch_under_auto_and_are_refused_by_triton():
    a, b = torch.arange(6, device=DEVICE).view(2, 3), torch.arange(6, device=DEVICE).view(3, 2)
    ends = torch.tensor([2], device=DEVICE)
    assert torch.equal(kernels.add(a, a), a + a) and kernels.last_backend("add") == "torch"
    assert torch.equal(kernels.matmul(a, b), a @ b) and kernels.last_backend("matmul") == "torch"
    assert torch.equal(kernels.grouped_matmul(a, b[None], ends), a @ b)
    assert torch.equal(kernels.grouped_weight_grad(a, a, ends), (a.t() @ a)[None])
    for name, args in (("add", (a, a)), ("matmul", (a, b)), ("grouped_matmul", (a, b[None], ends))):
        with pytest.raises(TypeError, match=r"dtype int64.*backend='torch'"):
            getattr(kernels, name)(*args, backend="triton")


# --- the dispatch ---------------------------------------------------------------------------------------

def test_dispatch_choices_and_errors(monkeypatch):
    x = randn(3, 5)
    for backend in (None, "Triton", "cuda", 3):
        with pytest.raises(ValueError, match=r"choose one of auto, triton, torch"):
            kernels.softmax(x, backend=backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.resolve_backend("auto", "cpu") == "torch"          # a CPU without the interpreter: torch
    assert kernels.resolve_backend("auto", "meta") == "torch"
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors .* TRITON_INTERPRET=1"):
        kernels.resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_backend("auto", "cpu") == "interpreter"
    assert kernels.resolve_backend("auto", "meta") == "torch"
    with pytest.raises(RuntimeError, match=r"needs CPU tensors, got meta"):
        kernels.resolve_backend("triton", "meta")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match=r"triton package is not installed .* backend='auto' or 'torch'"):
        kernels.softmax(x.cpu(), backend="triton")
    torch.testing.assert_close(kernels.softmax(x.cpu()), F.softmax(x.cpu(), dim=-1))
    assert kernels.last_backend("softmax") == "torch"


def test_bench_kernels_on_a_cpu_says_it_needs_a_gpu(capsys):
    if GPU:
        pytest.skip("on a GPU the benchmark runs for real")
    from minillm import bench
    result = bench.main(["kernels", "--size", "64"])
    assert "needs a CUDA GPU" in result["skipped"] and "needs a CUDA GPU" in capsys.readouterr().out


# --- regressions found here -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [2 ** 40, -2 ** 40, 2 ** 32 + 1], ids=str)
def test_int32_targets_with_an_ignore_index_outside_int32(ignore_index, backend):
    # torch compares an int32 tensor with a Python int in int32, wrapping it: `targets != 2**40` read as
    # `targets != 0`, so the kernel path counted the rows of target 0 as ignored and divided the summed loss
    # by too few rows (2.70 where F.cross_entropy gives 1.80), its gradient likewise.
    logits = randn(3, 5, seed=1)
    targets = torch.tensor([0, 1, 4], dtype=torch.int32, device=DEVICE)
    mine, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = kernels.cross_entropy(mine, targets, ignore_index, backend=backend)
    expected = F.cross_entropy(theirs, targets.long(), ignore_index=ignore_index)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, mine)[0], torch.autograd.grad(expected, theirs)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_target_that_wraps_onto_the_ignore_index_is_out_of_range(backend):
    # A target -5 with ignore_index 2**32 - 5 passed the range check (the int wrapped to -5, "ignored"), and
    # the kernel, comparing exactly, read the logit 5 elements before its row: memory outside the logits.
    buffer = randn(2, 7, seed=1)
    logits, targets = buffer[1:], torch.tensor([-5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\) .* found \[-5\]"):
        kernels.cross_entropy(logits, targets, 2 ** 32 - 5, backend=backend)
    with pytest.raises(ValueError, match=r"found \[-5\]"):
        rowwise.cross_entropy(logits, targets, 2 ** 32 - 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_kernels_refuse_ends_on_another_device(backend):
    # ends elsewhere than a was an unclear crash (from meta: "Cannot copy out of meta tensor; no data!"), and
    # backend="torch" took CPU ends with GPU rows that the kernels refuse: every backend now says so.
    a, b, c = randn(4, 3, seed=1), randn(2, 3, 5, seed=2), randn(4, 5, seed=3)
    ends = torch.tensor([1, 4], device="meta")
    with pytest.raises(ValueError, match=r"grouped_matmul: inputs are on different devices .*meta"):
        kernels.grouped_matmul(a, b, ends, backend=backend)
    with pytest.raises(ValueError, match=r"grouped_weight_grad: inputs are on different devices .*meta"):
        kernels.grouped_weight_grad(a, c, ends, backend=backend)
