"""minillm.kernels (chapter 02): every Triton kernel against its torch reference, dispatch, checks, benchmark.

Without a CUDA GPU the kernels run in Triton's interpreter. Triton decides compiled-or-interpreted when it
and the kernel modules are imported, so TRITON_INTERPRET=1 is set here, before those imports; it is then
restored, and set again only while this module's tests run, so other test modules keep the plain torch
fallbacks of backend="auto". With a GPU the same tests run compiled on it, plus GPU-only tests.
"""
import os
import subprocess
import sys

import pytest
import torch

from kernel_imports import GPU, interpreter_on, kernel_modules

elementwise, grouped, normalization, rowwise, tiled_matmul = kernel_modules()
import triton  # noqa: E402  (installed: kernel_modules() skips this module otherwise)

from minillm import grading, kernels  # noqa: E402
from minillm.kernels import reference  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
EXPECTED_BACKEND = "triton" if GPU else "interpreter"
RAGGED = [(1, 1), (7, 13), (33, 65), (5, 130)]
DTYPES = [torch.float32, torch.float16]
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-3)}


@pytest.fixture(autouse=True, scope="module")
def interpreter_without_gpu():
    with interpreter_on():
        yield


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RAGGED, ids=str)
def test_add_softmax_rmsnorm_match_reference(shape, dtype):
    x, y = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    weight = randn(shape[-1], dtype=dtype, seed=3)
    assert torch.equal(kernels.add(x, y), reference.add(x, y))
    torch.testing.assert_close(kernels.softmax(x), reference.softmax(x), **TOLERANCE[dtype])
    torch.testing.assert_close(kernels.rmsnorm(x, weight), reference.rmsnorm(x, weight), **TOLERANCE[dtype])
    # only the kernels this test ran: others (grouped GEMMs, say) may have run before it in this process
    assert {name: kernels.last_backend(name) for name in ("add", "softmax", "rmsnorm")} == dict.fromkeys(
        ("add", "softmax", "rmsnorm"), EXPECTED_BACKEND)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (7, 13, 5), (33, 65, 17), (40, 17, 70)])
def test_matmul_matches_reference(m, k, n, dtype):
    a, b = randn(m, k, dtype=dtype, seed=4), randn(k, n, dtype=dtype, seed=5)
    got, expected = kernels.matmul(a, b), reference.matmul(a, b)
    tolerance = 1e-2 if dtype == torch.float16 or GPU else 1e-4  # GPU fp32 may use TF32 like torch
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance * k ** 0.5)
    assert got.dtype == dtype and kernels.last_backend("matmul") == EXPECTED_BACKEND


def test_matmul_takes_strided_inputs():
    a = randn(20, 33, seed=6)
    b = randn(17, 33, seed=7).t()  # (33, 17), column-major
    torch.testing.assert_close(kernels.matmul(a, b), a @ b, rtol=1e-4 if not GPU else 1e-2,
                               atol=1e-3 if not GPU else 5e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_extreme_rows(dtype):
    big = 6e4 if dtype == torch.float16 else 1e30
    x = torch.tensor([[big, big / 2, -big, 0.0, 1.0],
                      [-big, -big, -big * 0.5, -big, -big],
                      [float("-inf"), float("-inf"), 2.0, float("-inf"), float("-inf")],
                      [1e-3, 2e-3, 3e-3, 4e-3, 5e-3]]).to(dtype).to(DEVICE)
    got = kernels.softmax(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference.softmax(x), **TOLERANCE[dtype])
    assert got[2].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


def test_softmax_long_rows_take_the_streaming_kernel():
    from minillm.kernels import rowwise
    x = randn(3, rowwise.MAX_SINGLE_BLOCK_COLUMNS + 37, scale=5.0, seed=8)
    x[1, :-1] = float("-inf")
    torch.testing.assert_close(kernels.softmax(x), reference.softmax(x))


def test_softmax_keeps_leading_dimensions_and_non_contiguous_input():
    x = randn(2, 3, 11, seed=9)
    torch.testing.assert_close(kernels.softmax(x), reference.softmax(x))
    transposed = randn(11, 6, seed=10).t()
    torch.testing.assert_close(kernels.softmax(transposed), reference.softmax(transposed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_backward_matches_autograd(dtype):
    x = randn(7, 13, dtype=dtype, seed=11).requires_grad_()
    weight = randn(13, dtype=dtype, seed=12).requires_grad_()
    upstream = randn(7, 13, dtype=dtype, seed=13)
    (kernels.rmsnorm(x, weight) * upstream).sum().backward()
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    (reference.rmsnorm(x, weight) * upstream).sum().backward()
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], x.grad, **tolerance)
    torch.testing.assert_close(grads[1], weight.grad, **tolerance)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 65), (4, 5000)], ids=str)
def test_cross_entropy_forward_and_backward(shape):
    logits = randn(*shape, scale=3.0, seed=14).requires_grad_()
    targets = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(15)).to(DEVICE)
    if shape[0] > 2:
        targets[1] = -100  # ignored row: no loss, no gradient
    loss = kernels.cross_entropy(logits, targets)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    expected = reference.cross_entropy(logits, targets)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-4, atol=1e-6)


# Rows per expert: idle experts first, last and in the middle, a tile boundary crossed, a single row.
GROUPS = [[5, 0, 17, 1], [0, 0, 3], [33, 31, 0, 64], [1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("counts", GROUPS, ids=str)
def test_grouped_matmul_and_weight_grad_match_reference(counts, dtype):
    rows, experts, k, n = sum(counts), len(counts), 24, 40
    ends = torch.cumsum(torch.tensor(counts), 0).to(DEVICE)
    a, b = randn(rows, k, dtype=dtype, seed=1), randn(experts, k, n, dtype=dtype, seed=2)
    c = randn(rows, n, dtype=dtype, seed=3)
    b_transposed = randn(experts, n, k, dtype=dtype, seed=4).transpose(1, 2)   # strides only: the input-gradient case
    for weights in (b, b_transposed):
        got = kernels.grouped_matmul(a, weights, ends)
        assert kernels.last_backend("grouped_matmul") == EXPECTED_BACKEND
        torch.testing.assert_close(got, reference.grouped_matmul(a, weights, ends), **TOLERANCE[dtype])
    got = kernels.grouped_weight_grad(a, c, ends.int())
    assert kernels.last_backend("grouped_weight_grad") == EXPECTED_BACKEND and got.shape == (experts, k, n)
    torch.testing.assert_close(got, reference.grouped_weight_grad(a, c, ends), **TOLERANCE[dtype])
    for expert, count in enumerate(counts):
        if count == 0:
            assert not got[expert].any()             # an idle expert's gradient is exactly zero


def test_grouped_matmul_agrees_with_torch_grouped_mm():
    # The peer: torch's own grouped GEMM (torch.nn.functional.grouped_mm, fp32 rows 16-byte aligned).
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    counts = [9, 0, 23, 16]
    ends = torch.cumsum(torch.tensor(counts), 0).to(torch.int32).to(DEVICE)
    a, b, c = randn(sum(counts), 32, seed=6), randn(4, 32, 48, seed=7), randn(sum(counts), 48, seed=8)
    try:
        expected, expected_grad = grouped_mm(a, b, offs=ends), grouped_mm(a.t(), c, offs=ends)
    except RuntimeError as error:   # a build or device without it for these dtypes
        pytest.skip(f"torch.nn.functional.grouped_mm refuses these inputs here: {error}")
    torch.testing.assert_close(kernels.grouped_matmul(a, b, ends), expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(kernels.grouped_weight_grad(a, c, ends), expected_grad, **TOLERANCE[torch.float32])


def test_grouped_matmul_refuses_ends_that_do_not_cover_the_rows():
    a, b = randn(6, 8), randn(3, 8, 4)
    with pytest.raises(ValueError, match="rise from 0 to the 6 rows"):
        kernels.grouped_matmul(a, b, torch.tensor([2, 4, 5], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="rise from 0"):
        kernels.grouped_matmul(a, b, torch.tensor([4, 2, 6], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="3 experts"):
        kernels.grouped_matmul(a, b, torch.tensor([2, 6], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="rise from 0 to the 6 rows"):     # no experts, but rows
        kernels.grouped_matmul(a, randn(0, 8, 4), torch.zeros(0, dtype=torch.long, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="int32/int64"):
        kernels.grouped_weight_grad(a, randn(6, 4), torch.tensor([2.0, 6.0], device=DEVICE), backend="triton")


def test_grouped_matmul_checks_and_tiles_a_reused_ends_once_but_sees_in_place_changes():
    # An MoE step passes one `ends` to several calls: the check and the tile table are remembered for that
    # very tensor, and forgotten when it changes in place (else the kernel would read a stale table).
    a, b = randn(40, 8, seed=1), randn(3, 8, 4, seed=2)
    ends = torch.tensor([10, 30, 40], device=DEVICE)
    first = kernels.grouped_matmul(a, b, ends, backend="triton")
    torch.testing.assert_close(kernels.grouped_matmul(a, b, ends, backend="triton"), first)
    ends[0] = 25                                     # counts 25, 5, 10: new tiles
    torch.testing.assert_close(kernels.grouped_matmul(a, b, ends, backend="triton"),
                               reference.grouped_matmul(a, b, ends), **TOLERANCE[torch.float32])
    ends[1:].copy_(torch.tensor([20, 40]))          # through a view; 20 < 25 no longer rises
    with pytest.raises(ValueError, match="rise from 0"):
        kernels.grouped_matmul(a, b, ends, backend="triton")
    with torch.inference_mode():                     # no version counter: simply not remembered
        frozen = torch.tensor([5, 30, 40], device=DEVICE)
        for _ in range(2):
            torch.testing.assert_close(kernels.grouped_matmul(a, b, frozen, backend="triton"),
                                       reference.grouped_matmul(a, b, frozen), **TOLERANCE[torch.float32])


def test_moe_triton_dispatch_equals_the_torch_one():
    from minillm.moe import MoE, MoEConfig

    torch.manual_seed(0)
    layer = MoE(32, MoEConfig(n_routed=6, top_k=2, expert_hidden=16, n_shared=1)).to(DEVICE)
    x = randn(2, 9, 32, seed=5).requires_grad_()
    results = {}
    for kind in ("fused", "triton"):
        layer.config.dispatch = kind
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        out.square().mean().backward()
        results[kind] = [out.detach(), x.grad] + [p.grad for p in (layer.router.weight, layer.w_gate_up, layer.w_down)]
    assert kernels.last_backend("grouped_matmul") == EXPECTED_BACKEND
    assert kernels.last_backend("grouped_weight_grad") == EXPECTED_BACKEND
    for got, expected in zip(results["triton"], results["fused"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_backend_choice_is_explicit_and_observable(monkeypatch):
    x = randn(3, 5)
    kernels.softmax(x, backend="torch")
    assert kernels.last_backend("softmax") == "torch"
    with pytest.raises(ValueError, match="backend="):
        kernels.softmax(x, backend="cuda")
    with pytest.raises(KeyError, match="unknown kernel"):
        kernels.last_backend("attention")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.resolve_backend("auto", "cpu") == "interpreter"


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="one shape and dtype"):
        kernels.add(randn(3), randn(4), backend="triton")
    with pytest.raises(ValueError, match="do not chain"):
        kernels.matmul(randn(3, 4), randn(5, 6), backend="triton")
    with pytest.raises(TypeError, match="dtype int64"):
        kernels.softmax(torch.ones(3, 4, dtype=torch.int64, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        kernels.cross_entropy(randn(2, 5), torch.tensor([1, 7], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="weight"):
        kernels.rmsnorm(randn(2, 5), randn(4), backend="triton")


def test_every_backend_makes_the_same_checks():
    # backend="torch" once accepted what the kernels refuse: a K mismatch with no rows, mixed dtypes
    # (silently fp16), 3-D operands, and rows of c beyond those of a.
    e = torch.tensor([2, 4, 6], device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="same rows"):
            kernels.grouped_weight_grad(randn(6, 8), randn(9, 4), e, backend=backend)
        with pytest.raises(TypeError, match="float16 and float32"):
            kernels.grouped_matmul(randn(6, 8, dtype=torch.float16), randn(3, 8, 4), e, backend=backend)
        with pytest.raises(ValueError, match=r"a \(N, K\) and b \(E, K, M\)"):
            kernels.grouped_matmul(randn(0, 8), randn(3, 7, 4), torch.zeros(3, dtype=torch.long, device=DEVICE),
                                   backend=backend)
        with pytest.raises(TypeError, match="float16 and float32"):
            kernels.matmul(randn(2, 3, dtype=torch.float16), randn(3, 2), backend=backend)
        with pytest.raises(ValueError, match="do not chain"):
            kernels.matmul(randn(2, 3, 4), randn(4, 5), backend=backend)


@pytest.mark.parametrize("name", ["add", "softmax", "matmul", "grouped_matmul", "grouped_weight_grad"])
def test_kernels_without_a_backward_of_their_own_are_still_differentiable(name):
    # Autograd flows through the Triton path as through the torch references (it used to stop silently).
    counts = [5, 0, 9, 3]
    ends = torch.cumsum(torch.tensor(counts), 0).to(DEVICE)
    rows = sum(counts)
    inputs = {"add": (randn(7, 13, seed=1), randn(7, 13, seed=2)), "softmax": (randn(7, 13, scale=3, seed=1),),
              "matmul": (randn(9, 20, seed=1), randn(20, 11, seed=2)),
              "grouped_matmul": (randn(rows, 12, seed=1), randn(4, 12, 10, seed=2), ends),
              "grouped_weight_grad": (randn(rows, 12, seed=1), randn(rows, 10, seed=2), ends)}[name]
    grad_seed = {"add": (7, 13), "softmax": (7, 13), "matmul": (9, 11), "grouped_matmul": (rows, 10),
                 "grouped_weight_grad": (4, 12, 10)}[name]
    upstream = randn(*grad_seed, seed=3)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        out = getattr(kernels, name)(*leaves, backend=backend)
        assert out.requires_grad, f"{name} on {backend}: the output does not require grad"
        out.backward(upstream)
        results[backend] = (out.detach(), [t.grad for t in leaves if t.is_floating_point()])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], **TOLERANCE[torch.float32])
    for got, expected in zip(results["triton"][1], results["torch"][1]):
        torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])
    with torch.no_grad():   # and no graph where none is wanted
        assert not getattr(kernels, name)(*[t.clone().requires_grad_() if t.is_floating_point() else t
                                            for t in inputs], backend="triton").requires_grad


def test_auto_hands_dtypes_the_kernels_do_not_take_to_torch():
    a, b = randn(5, 7, dtype=torch.float64, seed=1), randn(7, 3, dtype=torch.float64, seed=2)
    torch.testing.assert_close(kernels.matmul(a, b), a @ b)
    assert kernels.last_backend("matmul") == "torch"
    assert torch.autograd.gradcheck(kernels.matmul, (a.requires_grad_(), b.requires_grad_()))
    assert kernels.softmax(randn(3, 4, dtype=torch.float64)).dtype == torch.float64
    assert kernels.last_backend("softmax") == "torch"
    kernels.matmul(randn(5, 7), randn(7, 3))
    assert kernels.last_backend("matmul") == EXPECTED_BACKEND
    with pytest.raises(TypeError, match="float64"):                  # "triton" still insists
        kernels.matmul(a.detach(), b.detach(), backend="triton")


def test_interpreting_reads_the_variable_as_triton_does(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("On", True), (" yes ", True), ("0", False),
                            ("false", False), ("", False)]:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert kernels.interpreting() is expected, value


def test_grouped_kernels_see_ends_changed_behind_torchs_back():
    # Writes through .data or numpy do not bump the version counter; on the CPU the values are compared too.
    a, b, c = randn(40, 8, seed=1), randn(3, 8, 4, seed=2), randn(40, 4, seed=3)
    ends = torch.tensor([10, 30, 40], device=DEVICE)
    kernels.grouped_matmul(a, b, ends, backend="triton")
    if GPU:
        pytest.skip("on a GPU such writes are not looked for (reading ends back would wait for the GPU)")
    ends.numpy()[0] = 25
    torch.testing.assert_close(kernels.grouped_matmul(a, b, ends, backend="triton"),
                               reference.grouped_matmul(a, b, ends), **TOLERANCE[torch.float32])
    kernels.grouped_weight_grad(a, c, ends, backend="triton")
    ends.data[2] = 400                                # past the rows: refused, never read out of bounds
    with pytest.raises(ValueError, match="rise from 0"):
        kernels.grouped_weight_grad(a, c, ends, backend="triton")
    # The kernels themselves (no check of ends in front) stop at a's last row whatever ends says.
    clipped = torch.tensor([25, 30, 40], device=DEVICE)
    torch.testing.assert_close(grouped.grouped_weight_grad(a, c, ends), reference.grouped_weight_grad(a, c, clipped),
                               **TOLERANCE[torch.float32])


def test_import_without_triton_falls_back_to_torch():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, minillm, minillm.kernels as k\n"
            "x = torch.randn(3, 4)\n"
            "assert torch.allclose(k.softmax(x), torch.softmax(x, -1)) and k.last_backend('softmax') == 'torch'\n"
            "try:\n    k.softmax(x, backend='triton')\nexcept RuntimeError as e:\n    print('clear:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr
    assert "not installed" in run.stdout


def test_checks_accept_the_library_kernels(capsys):
    grading.check("ex02.1", lambda m, k, n, size: 2 * m * k * n / ((m * k + k * n + m * n) * size))
    grading.check("ex02.2", elementwise.add_kernel)
    grading.check("ex02.3", rowwise.softmax_kernel)
    grading.check("ex02.4", tiled_matmul.matmul_kernel)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["✓", f"ex02.{i}"] for i in range(1, 5)]


def test_checks_reject_wrong_kernels():
    import triton.language as tl

    @triton.jit
    def add_without_store_mask(x_ptr, y_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask, other=0.0)
                 + tl.load(y_ptr + offsets, mask=mask, other=0.0))

    @triton.jit
    def softmax_first_row_only(out_ptr, in_ptr, in_row_stride, out_row_stride, n_rows, n_cols,
                               BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.arange(0, BLOCK_SIZE)
        x = tl.load(in_ptr + row * in_row_stride + columns, mask=columns < n_cols, other=-float("inf"))
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(out_ptr + row * out_row_stride + columns, e / tl.sum(e, axis=0), mask=columns < n_cols)

    @triton.jit
    def stub(x_ptr, y_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
        raise NotImplementedError("exercise ex02.2: replace this line with your code")

    with pytest.raises(AssertionError, match="Hint: pass mask"):
        grading.check("ex02.2", add_without_store_mask)
    with pytest.raises(AssertionError, match="Hint: loop"):
        grading.check("ex02.3", softmax_first_row_only)
    with pytest.raises(NotImplementedError, match="ex02.2") as stopped:
        grading.check("ex02.2", stub)
    # the stub's own words, not the repr Triton's interpreter quotes it in
    assert str(stopped.value) == "exercise ex02.2: replace this line with your code"
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex02.1", lambda m, k, n, size: 2 * m * k * n / ((m * k + k * n) * size))


def test_benchmark_without_gpu_says_so(capsys):
    if GPU:
        pytest.skip("on a GPU the benchmark runs for real (see test_benchmark_on_gpu)")
    from minillm.kernels.bench import bench_kernels
    assert "needs a CUDA GPU" in bench_kernels()["skipped"]
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_benchmark_grouped_rows_check_the_kernel_before_timing_it(monkeypatch):
    # The grouped-GEMM rows of `python -m minillm.bench kernels` at a tiny size, timer stubbed (the
    # interpreter proves correctness, not speed): each row is checked against the loop of matmuls first,
    # and a wrong kernel stops the benchmark instead of being timed.
    from minillm.kernels import bench
    monkeypatch.setattr(bench, "_median_ms", lambda fn: (fn(), 1.0)[1])
    rows = bench._grouped_rows(16, DEVICE)
    assert {row["kernel"] for row in rows} == {"grouped_fwd", "grouped_dgrad", "grouped_wgrad"}
    assert all(row["relative_error"] < 1e-2 and row["baseline"] for row in rows)
    doubled = lambda a, c, ends: 2 * reference.grouped_weight_grad(a, c, ends)  # noqa: E731
    monkeypatch.setattr(grouped, "grouped_weight_grad", doubled)
    with pytest.raises(AssertionError, match="grouped_wgrad"):
        bench._grouped_rows(16, DEVICE)


def test_benchmark_relative_error_and_size_checks():
    from minillm.kernels.bench import bench_kernels, relative_error
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0           # was 0 / 0 = nan: a false failure
    assert relative_error(torch.ones(3), torch.zeros(3)) == float("inf")
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])) == pytest.approx(0.5 ** 0.5)
    for size in (3, 0, -8, 64.5, True):
        with pytest.raises(ValueError, match="at least 64"):
            bench_kernels(size=size)


# --- GPU only ----------------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


@gpu_only
@pytest.mark.gpu
def test_bf16_and_large_matmul_on_gpu():
    dtypes = [torch.float16] + ([torch.bfloat16] if torch.cuda.get_device_capability() >= (8, 0) else [])
    for dtype in dtypes:
        a = torch.randn(1000, 777, device="cuda", dtype=dtype)
        b = torch.randn(777, 1030, device="cuda", dtype=dtype)
        torch.testing.assert_close(kernels.matmul(a, b).float(), (a @ b).float(), rtol=3e-2, atol=0.5)


@gpu_only
@pytest.mark.gpu
def test_large_rowwise_kernels_on_gpu():
    x = torch.randn(3000, 5000, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(kernels.softmax(x), torch.softmax(x.float(), -1).half(), rtol=1e-2, atol=1e-3)
    weight = torch.randn(5000, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(kernels.rmsnorm(x, weight), reference.rmsnorm(x, weight), rtol=1e-2, atol=1e-2)
    labels = torch.randint(0, 5000, (3000,), device="cuda")
    torch.testing.assert_close(kernels.cross_entropy(x.float(), labels), reference.cross_entropy(x.float(), labels))


@gpu_only
@pytest.mark.gpu
def test_benchmark_on_gpu(tmp_path):
    from minillm.kernels.bench import bench_kernels
    result = bench_kernels(size=1024, out_dir=str(tmp_path))
    assert result["rows"] and os.path.exists(result["path"])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_integer_inputs_to_softmax_family_are_a_clear_error(backend):
    from minillm import kernels

    ints = torch.arange(6).view(2, 3)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.softmax(ints, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.rmsnorm(ints, torch.ones(3), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        kernels.cross_entropy(ints, torch.tensor([0, 1]), backend=backend)


def test_add_refuses_bf16_in_the_interpreter():
    # The add kernel adds in the inputs' dtype, and the interpreter's bf16 arithmetic is garbage (~1e38 for
    # numbers near 1): backend="triton" used to return it; "auto" hands bf16 to torch.
    if GPU:
        pytest.skip("compiled on a GPU, bf16 adds correctly")
    x, y = randn(3, 5, dtype=torch.bfloat16, seed=1), randn(3, 5, dtype=torch.bfloat16, seed=2)
    with pytest.raises(TypeError, match="bf16"):
        kernels.add(x, y, backend="triton")
    assert torch.equal(kernels.add(x, y), x + y) and kernels.last_backend("add") == "torch"


def test_float64_keeps_its_precision():
    # The torch path (what "auto" runs for float64) computed softmax, rmsnorm and cross_entropy in fp32:
    # errors of ~1e-7 and a failing gradcheck, where torch itself is exact in float64.
    x, weight = randn(4, 6, dtype=torch.float64, seed=1), randn(6, dtype=torch.float64, seed=2)
    targets = torch.tensor([0, 5, 2, 1], device=DEVICE)
    torch.testing.assert_close(kernels.softmax(x), torch.softmax(x, dim=-1))
    torch.testing.assert_close(kernels.rmsnorm(x, weight), torch.nn.functional.rms_norm(x, (6,), weight, 1e-6))
    torch.testing.assert_close(kernels.cross_entropy(x, targets), torch.nn.functional.cross_entropy(x, targets))
    x.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(kernels.softmax, (x,))
    assert torch.autograd.gradcheck(kernels.rmsnorm, (x, weight))
    assert torch.autograd.gradcheck(lambda logits: kernels.cross_entropy(logits, targets), (x,))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_and_0d_inputs_behave_as_in_torch(backend):
    # Rows of no columns and a 0-d softmax were refused by the kernels but not by torch; no rows of logits
    # was refused where torch gives nan (the mean of no losses, as when every target is ignored).
    for shape in [(5, 0), (0,), (2, 0, 3), (0, 4), ()]:
        x = randn(*shape, seed=1) if shape else randn(1, seed=1).reshape(())
        x.requires_grad_()
        got = kernels.softmax(x, backend=backend)
        torch.testing.assert_close(got, torch.softmax(x, dim=-1))
        got.sum().backward()
        assert x.grad.shape == x.shape
        if shape:
            weight = randn(shape[-1], seed=2)
            got = kernels.rmsnorm(x, weight, backend=backend)
            assert got.shape == x.shape and got.dtype == x.dtype
    logits = randn(0, 5, seed=3).requires_grad_()
    loss = kernels.cross_entropy(logits, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert loss.isnan() and loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.shape == (0, 5)
    with pytest.raises(ValueError, match="0-dimensional"):
        kernels.rmsnorm(randn(1, seed=4).reshape(()), randn(1, seed=5).reshape(()), backend=backend)
    with pytest.raises(ValueError, match="no classes"):
        kernels.cross_entropy(randn(3, 0), torch.zeros(3, dtype=torch.long, device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_add_rmsnorm_cross_entropy_check_alike_on_every_backend(backend):
    # backend="torch" (what "auto" runs on a CPU without the interpreter) used to broadcast and promote in
    # add, broadcast a (rows, n) rmsnorm weight, read (batch, time, vocab) logits with the classes in
    # dim 1 (a silent wrong loss), take float targets as probabilities, and refuse int32 targets.
    x = randn(3, 4, seed=1)
    with pytest.raises(ValueError, match="one shape"):
        kernels.add(x, randn(4, seed=2), backend=backend)
    with pytest.raises(TypeError, match="float32 and float64"):
        kernels.add(x, x.double(), backend=backend)
    with pytest.raises(ValueError, match="weight"):
        kernels.rmsnorm(x, randn(3, 4, seed=3), backend=backend)
    with pytest.raises(TypeError, match="eps"):
        kernels.rmsnorm(x, randn(4, seed=3), eps="1e-6", backend=backend)
    for eps in (0.0, float("inf"), float("nan")):   # inf was accepted and gave all zeros
        with pytest.raises(ValueError, match="eps"):
            kernels.rmsnorm(x, randn(4, seed=3), eps=eps, backend=backend)
    with pytest.raises(ValueError, match="fit in int64"):   # was an OverflowError from inside torch
        kernels.cross_entropy(x, torch.tensor([0, 1, 2], device=DEVICE), ignore_index=10 ** 20, backend=backend)
    logits = randn(2, 3, 3, seed=4)
    with pytest.raises(ValueError, match="rows, vocab"):
        kernels.cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="class indices"):
        kernels.cross_entropy(x, torch.softmax(x, dim=-1)[:, 0], backend=backend)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
        kernels.cross_entropy(x, torch.tensor([0, 4, 1], device=DEVICE), backend=backend)
    targets = torch.tensor([0, -100, 3], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(kernels.cross_entropy(x, targets, backend=backend),
                               torch.nn.functional.cross_entropy(x, targets.long()))


def test_grouped_kernels_stay_inside_their_tensors_when_ends_go_negative(monkeypatch):
    # The kernels themselves do not check ends (the dispatcher does); a negative entry gave negative rows,
    # which the row masks let through: reads before a and c, and writes before the output (on the CPU a
    # heap corruption, "free(): invalid next size"). Sentinel rows in front of each tensor see any such access.
    if GPU:
        pytest.skip("the sentinel trick reads the CPU tensors the interpreter works on")
    guard = 4
    a_buffer, c_buffer = randn(guard + 6, 8, seed=1), randn(guard + 6, 4, seed=2)
    a_buffer[:guard], c_buffer[:guard] = float("nan"), float("nan")
    a, c, b = a_buffer[guard:], c_buffer[guard:], randn(2, 8, 4, seed=3)
    ends = torch.tensor([-3, 6], device=DEVICE)
    g = grouped.grouped_weight_grad(a, c, ends)          # expert 1 started at row -3: nan from the sentinels
    assert not g.isnan().any()
    torch.testing.assert_close(g[1], a.t() @ c, **TOLERANCE[torch.float32])
    outputs = []
    real_empty = torch.empty

    def empty_behind_sentinels(shape, **kwargs):         # the output, with sentinel rows in front of it
        if len(shape) != 2:
            return real_empty(shape, **kwargs)
        buffer = real_empty((guard + shape[0], shape[1]), **kwargs).fill_(7.0)
        outputs.append(buffer)
        return buffer[guard:]
    monkeypatch.setattr(torch, "empty", empty_behind_sentinels)
    out = grouped.grouped_matmul(a, b, ends)
    monkeypatch.undo()
    assert len(outputs) == 1 and torch.equal(outputs[0][:guard], torch.full((guard, 4), 7.0))
    torch.testing.assert_close(out, a @ b[1], **TOLERANCE[torch.float32])
    for falling in ([-40, 6], [6, -40]):                  # no negative tile counts (repeat_interleave refused them)
        assert grouped.grouped_matmul(a, b, torch.tensor(falling, device=DEVICE)).shape == (6, 4)


def test_add_kernel_block_size_must_be_a_power_of_two():
    # A negative block_size launched no program and returned torch.empty's uninitialised memory; 0 divided
    # by zero and 1000 failed inside Triton.
    x = randn(5, 7, seed=1)
    for bad in (-4, 0, 1000, 4.0, True, "16"):
        with pytest.raises(ValueError, match="power of 2"):
            elementwise.add(x, x, block_size=bad)
    for good in (1, 16, 1024):
        assert torch.equal(elementwise.add(x, x, block_size=good), x + x)


def test_rmsnorm_and_cross_entropy_have_second_derivatives_on_the_kernel_path():
    # The Triton backward wrote its gradient with a kernel, which has no history: under create_graph=True a
    # gradient penalty through it came out as if the gradient were constant (silently, e.g. 1s instead of
    # the true second derivative). With create_graph the backward is now torch ops.
    x, weight = randn(3, 4, 7, seed=1), randn(7, seed=2)
    logits, targets = randn(4, 7, scale=3.0, seed=3), torch.tensor([0, -100, 6, 2], device=DEVICE)
    upstream = {"rmsnorm": randn(3, 4, 7, seed=4), "cross_entropy": torch.tensor(1.5, device=DEVICE)}
    calls = {"rmsnorm": (lambda x_, w_, backend: kernels.rmsnorm(x_, w_, backend=backend), (x, weight)),
             "cross_entropy": (lambda l_, backend: kernels.cross_entropy(l_, targets, backend=backend), (logits,))}
    for name, (call, inputs) in calls.items():
        results = {}
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in inputs]
            grads = torch.autograd.grad(call(*leaves, backend=backend), leaves, upstream[name], create_graph=True)
            penalty = sum((g * g).sum() for g in grads) + sum(leaf.sum() for leaf in leaves)
            results[backend] = [g.detach() for g in grads] + list(torch.autograd.grad(penalty, leaves))
        for got, expected in zip(results["triton"], results["torch"]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="0-dimensional"):       # the kernel module's own check said "weight ()"
        normalization.rmsnorm(randn(1, seed=5).reshape(()), randn(1, seed=6).reshape(()))


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_cross_entropy_takes_ignore_index_as_torch_does(backend):
    # torch's F.cross_entropy takes numpy integers and 0-d integer tensors as ignore_index; they were
    # refused. A float is refused everywhere (the kernel module's int(1.5) silently ignored class 1).
    import numpy as np

    logits, targets = randn(3, 5, seed=1), torch.tensor([1, 2, 3], device=DEVICE)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=1)
    for ignore_index in (np.int64(1), np.int32(1), torch.tensor(1)):
        torch.testing.assert_close(kernels.cross_entropy(logits, targets, ignore_index, backend=backend), expected)
    for bad in (1.5, 1.0, True, torch.tensor(1.0), "1"):
        with pytest.raises(TypeError, match="ignore_index"):
            kernels.cross_entropy(logits, targets, bad, backend=backend)
    with pytest.raises(TypeError, match="ignore_index"):
        rowwise.cross_entropy(logits, targets, ignore_index=1.5)
