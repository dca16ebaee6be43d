"""Probes of the MoE's padded rows rounded up to a granule where oneDNN multiplies them on a CPU
(minillm.moe._row_granule, _pair_layout(granule=...), _FusedExperts.forward, bench_moe's fresh-routing steps).
Rounding is made to happen at small sizes by setting ONEDNN_ROWS_PER_GRANULE = 1 (a granule of the largest power
of two up to an expert's average rows) and, where asked, PAD_LIMIT = inf."""
from __future__ import annotations

import sys

import pytest
import torch

import minillm.moe as moe
from minillm.moe import fused_dispatch, per_expert_mask_loop, using_cpu_gemm

needs_onednn = pytest.mark.skipif(moe._onednn_linear() is None, reason="this torch build has no oneDNN")


@pytest.fixture
def layouts(monkeypatch):
    """Every layout the dispatch builds, with the granule it was asked for: [(granule, layout)]."""
    seen, real = [], moe._pair_layout

    def spy(expert_index, n_experts, pad, granule=1):
        layout = real(expert_index, n_experts, pad, granule)
        seen.append((granule, layout))
        return layout

    monkeypatch.setattr(moe, "_pair_layout", spy)
    return seen


def make(index, n, d, h, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens, k = index.shape
    x = torch.randn(tokens, d, generator=g, dtype=dtype)
    gate = torch.rand(tokens, k, generator=g, dtype=dtype)
    w1 = torch.randn(n, d, 2 * h, generator=g, dtype=dtype) * 0.3
    w2 = torch.randn(n, h, d, generator=g, dtype=dtype) * 0.3
    return [t.requires_grad_() for t in (x, gate, w1, w2)]


def random_index(tokens, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not tokens:
        return torch.zeros(0, k, dtype=torch.long)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)])


def run(gemm, index, tensors, grad_out=None):
    """Output and the gradients of x, gate, w_gate_up, w_down, under `gemm`."""
    with using_cpu_gemm(gemm):
        out = fused_dispatch(tensors[0], index, *tensors[1:])
        if grad_out is None:
            grad_out = torch.ones_like(out) if not out.numel() else out.detach() * 2   # d(out^2)/d(out)
        grads = torch.autograd.grad(out, tensors, grad_out, allow_unused=True) if out.numel() else \
            [torch.zeros_like(t) for t in tensors]
    return [out.detach(), *[torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]]


def reference(index, tensors):
    """per_expert_mask_loop in float64: output and the four gradients of sum(out^2)."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = per_expert_mask_loop(leaves[0], index, *leaves[1:])
    grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True) if out.numel() else \
        [torch.zeros_like(t) for t in leaves]
    return [out.detach(), *[torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]]


def close(got, want, rtol=1e-4, atol=1e-5):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        finite = b[b.isfinite()]
        scale = 1 + float(finite.abs().max()) if finite.numel() else 1
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale, equal_nan=True)


def check_layout(layout, index, n, granule):
    """The invariants of a _Layout for `index` over n experts."""
    pairs = index.numel()
    flat = index.reshape(-1)
    counts = torch.bincount(flat, minlength=n)
    assert layout.sizes == counts.tolist()
    assert layout.offs.tolist() == torch.cumsum(counts, 0).tolist() and layout.offs.dtype == torch.int32
    rows = layout.token_of_row.numel()
    # row_of_pair: pairs distinct rows in range, holding the pair's token
    assert layout.row_of_pair.numel() == pairs
    assert layout.row_of_pair.unique().numel() == pairs
    if pairs:
        assert 0 <= int(layout.row_of_pair.min()) and int(layout.row_of_pair.max()) < rows
        assert torch.equal(layout.token_of_row[layout.row_of_pair], torch.arange(pairs) // index.shape[1])
    busiest = int(counts.max()) if n else 0
    if layout.capacity is None:
        assert rows == pairs and layout.pad_rows is None
        # grouped rows: sorted by expert, stable in (token, slot) order within an expert
        assert torch.equal(flat[layout.row_of_pair.argsort()], flat.sort(stable=True).values)
        return
    capacity = layout.capacity
    assert rows == n * capacity and capacity >= busiest
    rounded = -(-busiest // granule) * granule
    assert capacity in (busiest, rounded)
    # rounded exactly when the rounding keeps the padding within PAD_LIMIT
    assert (capacity == rounded) == ((n * rounded - pairs) / pairs <= moe.PAD_LIMIT) or rounded == busiest
    assert layout.padding == pytest.approx((rows - pairs) / pairs)
    # each pair in its expert's block of `capacity` rows, in (token, slot) order inside the block
    assert torch.equal(layout.row_of_pair // capacity, flat)
    for e in range(n):
        mine = layout.row_of_pair[flat == e]
        assert torch.equal(mine, torch.arange(e * capacity, e * capacity + counts[e]))
    used = torch.zeros(rows, dtype=torch.bool)
    used[layout.row_of_pair] = True
    unused = (~used).nonzero().squeeze(1)
    if unused.numel():
        assert layout.pad_rows is not None and torch.equal(layout.pad_rows, unused)
        assert layout.token_of_row[unused].eq(0).all()
    else:
        assert layout.pad_rows is None


# ---- _pair_layout ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("granule", [1, 2, 3, 4, 5, 8, 64, 1000])
@pytest.mark.parametrize("tokens,n,k", [(0, 4, 2), (1, 1, 1), (1, 8, 2), (37, 4, 3), (50, 3, 3), (200, 6, 2),
                                        (129, 2, 1), (64, 64, 1), (7, 16, 1)])
@pytest.mark.parametrize("limit", [moe.PAD_LIMIT, float("inf"), 0.0])
def test_pair_layout_invariants_with_any_granule(monkeypatch, granule, tokens, n, k, limit):
    monkeypatch.setattr(moe, "PAD_LIMIT", limit)
    index = random_index(tokens, n, k, seed=tokens + n)
    for pad in (True, False):
        layout = moe._pair_layout(index, n, pad=pad, granule=granule)
        if not pad:
            assert layout.capacity is None
        check_layout(layout, index, n, granule)
        if not tokens:
            assert layout.padding == 0.0 and layout.capacity is None
        # the padded layout exactly where its padding (rounded or not) stays within PAD_LIMIT
        if pad and tokens:
            assert (layout.capacity is not None) == (layout.padding <= limit)
    exact = moe._pair_layout(index, n, pad=True)
    rounded = moe._pair_layout(index, n, pad=True, granule=granule)
    # rounding never turns a padded layout into a grouped one, nor adds a granule or more per expert
    assert (exact.capacity is None) == (rounded.capacity is None)
    if exact.capacity is not None:
        assert exact.capacity <= rounded.capacity < exact.capacity + granule
        assert rounded.padding <= limit


def test_pair_layout_uneven_load_stays_grouped_and_rounding_is_dropped_not_the_padding():
    index = torch.zeros(100, 1, dtype=torch.long)
    index[:4] = torch.arange(1, 5).unsqueeze(1)            # expert 0: 96 rows, four others 1 each
    layout = moe._pair_layout(index, 5, pad=True, granule=64)
    assert layout.capacity is None and layout.pad_rows is None
    check_layout(layout, index, 5, 64)
    # 8 experts x 100 rows, 800 pairs: exact padding 0; a granule of 64 (128 rows each) would add 28%: dropped
    even = (torch.arange(400).unsqueeze(1) * 2 + torch.arange(2)) % 8
    layout = moe._pair_layout(even, 8, pad=True, granule=64)
    assert layout.capacity == 100 and layout.pad_rows is None and layout.padding == 0.0
    # a granule of 4: 100 rows already a multiple
    assert moe._pair_layout(even, 8, pad=True, granule=4).capacity == 100
    # one more token on experts 0 and 1: 101 rows -> 104 with a granule of 8 (832 rows for 802 pairs: 3.7%)
    more = torch.cat([even, torch.zeros(1, 2, dtype=torch.long) + torch.tensor([0, 1])])
    layout = moe._pair_layout(more, 8, pad=True, granule=8)
    assert layout.capacity == 104 and layout.padding == pytest.approx((8 * 104 - 802) / 802)
    check_layout(layout, more, 8, 8)


# ---- _row_granule ------------------------------------------------------------------------------------------

@needs_onednn
def test_row_granule_is_a_power_of_two_within_the_average_over_the_rows_per_granule():
    cpu, f32 = torch.device("cpu"), torch.float32
    with using_cpu_gemm("onednn"):
        for n in (1, 2, 3, 7, 16, 64, 1000):
            for pairs in (1, 2, n - 1, n, n + 1, 63 * n, 64 * n, 64 * n + 1, 128 * n - 1, 128 * n, 1000 * n + 17):
                if pairs < 1:
                    continue
                granule = moe._row_granule(f32, cpu, 256, 128, n, pairs)
                average = -(-pairs // n)
                assert granule >= 1 and granule & (granule - 1) == 0
                if average >= 64:
                    assert granule * 64 <= average < granule * 128
                else:
                    assert granule == 1
        assert moe._row_granule(f32, cpu, 256, 128, 0, 100) == 1   # no experts
        assert moe._row_granule(f32, cpu, 256, 128, 16, 3) == 1    # fewer pairs than experts
        for dtype in (torch.float64, torch.bfloat16, torch.float16):
            assert moe._row_granule(dtype, cpu, 256, 128, 16, 16384) == 1
        for rows_per_granule, want in ((1, 1024), (3, 256), (1024, 1), (sys.maxsize, 1)):
            old = moe.ONEDNN_ROWS_PER_GRANULE
            moe.ONEDNN_ROWS_PER_GRANULE = rows_per_granule
            try:
                assert moe._row_granule(f32, cpu, 256, 128, 16, 16384) == want
            finally:
                moe.ONEDNN_ROWS_PER_GRANULE = old
    with using_cpu_gemm("blas"):
        assert moe._row_granule(f32, cpu, 256, 128, 16, 1 << 20) == 1


# ---- the dispatch: rounded rows give the same output and gradients -------------------------------------------

CASES = [   # (tokens, n_experts, top_k, d, hidden)
    (40, 4, 2, 8, 6), (37, 3, 3, 5, 66), (64, 1, 1, 4, 3), (90, 5, 5, 6, 4), (33, 7, 2, 24, 7),
    (200, 2, 1, 3, 1), (1, 1, 1, 1, 1), (0, 4, 2, 8, 8), (17, 8, 1, 4, 4)]


@needs_onednn
@pytest.mark.parametrize("limit", [float("inf"), moe.PAD_LIMIT])
@pytest.mark.parametrize("tokens,n,k,d,h", CASES)
def test_rounded_rows_match_blas_and_the_mask_loop(monkeypatch, layouts, limit, tokens, n, k, d, h):
    monkeypatch.setattr(moe, "PAD_LIMIT", limit)
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 1)   # a large granule even at these sizes
    index = random_index(tokens, n, k, seed=tokens * 7 + n)
    tensors = make(index, n, d, h, seed=tokens)
    onednn = run("onednn", index, tensors)
    (granule, layout), = layouts
    average = -(-tokens * k // n) if tokens else 0
    assert granule == (1 << (average.bit_length() - 1) if average else 1)
    check_layout(layout, index, n, granule)
    layouts.clear()
    blas = run("blas", index, tensors)
    assert [g for g, _ in layouts] == [1]
    close(onednn, blas)
    if tokens:
        close(onednn, reference(index, tensors), rtol=1e-3, atol=1e-4)
    else:
        assert onednn[0].shape == (0, d)


@needs_onednn
def test_a_natural_size_rounds_and_matches(layouts):
    # 300 pairs on 2 experts, 151 and 149: 150 rows on average, a granule of 2: 152 rows each
    index = torch.tensor([0] * 151 + [1] * 149).unsqueeze(1)
    tensors = make(index, 2, 16, 8, seed=3)
    onednn = run("onednn", index, tensors)
    (granule, layout), = layouts
    assert granule == 2 and layout.capacity == 152 and layout.pad_rows.numel() == 4
    blas = run("blas", index, tensors)
    assert layouts[1][1].capacity == 151
    close(onednn, blas)
    close(onednn, reference(index, tensors), rtol=1e-3, atol=1e-4)


@needs_onednn
def test_auto_rounds_where_it_picks_onednn_and_matches(monkeypatch, layouts):
    monkeypatch.delenv(moe.CPU_GEMM_ENV, raising=False)
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)
    monkeypatch.setattr(moe, "cpu_gemm_trial", lambda: {"onednn": 1.0, "blas": 2.0})   # oneDNN timed faster
    index = torch.tensor([0] * 151 + [1] * 149).unsqueeze(1)   # 150 rows x 256 x 256: over ONEDNN_MIN_WORK
    tensors = make(index, 2, 256, 128, seed=4)
    auto = run("auto", index, tensors)
    assert layouts[0][0] == 2 and layouts[0][1].capacity == 152
    close(auto, run("blas", index, tensors), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_the_environment_variable_rounds_like_the_block(monkeypatch, layouts):
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "onednn")
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 1)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    index = random_index(30, 4, 2, seed=9)
    tensors = make(index, 4, 8, 6, seed=9)
    out = fused_dispatch(tensors[0], index, *tensors[1:])
    grads = torch.autograd.grad(out.square().sum(), tensors)
    assert layouts[0][0] == 8 and layouts[0][1].capacity % 8 == 0
    close([out.detach(), *grads], run("blas", index, tensors))


@needs_onednn
@pytest.mark.parametrize("kind", ["float64", "bfloat16", "autocast", "float32_x_float64_weights", "kernels"])
def test_no_rounding_where_onednn_does_not_multiply(monkeypatch, layouts, kind):
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 1)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    index = random_index(40, 4, 2, seed=2)
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(kind, torch.float32)
    tensors = make(index, 4, 8, 6, seed=2, dtype=dtype)
    if kind == "float32_x_float64_weights":
        tensors[2] = tensors[2].detach().double().requires_grad_()
        tensors[3] = tensors[3].detach().double().requires_grad_()
    with using_cpu_gemm("onednn"):
        if kind == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused_dispatch(tensors[0], index, *tensors[1:]).float().sum().backward()
        elif kind == "kernels":
            fused_dispatch(tensors[0], index, *tensors[1:], kernels_backend="torch").sum().backward()
        else:
            fused_dispatch(tensors[0], index, *tensors[1:]).float().sum().backward()
    assert [g for g, _ in layouts] == [1]


# ---- pad rows, idle experts, non-finite values ----------------------------------------------------------------

@needs_onednn
def test_pad_rows_stay_zero_when_token_0_is_not_finite(monkeypatch, layouts):
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 1)
    n, k, d, h = 6, 2, 8, 5
    index = random_index(80, n, k, seed=11)
    index[index == 3] = 4                                   # expert 3 idle: pad rows only
    index[0] = torch.tensor([0, 1])
    tensors = make(index, n, d, h, seed=11)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    for bad in (float("inf"), float("nan")):
        x = tensors[0].detach().clone()
        x[0] = bad
        inputs = [x.requires_grad_(), *tensors[1:]]
        grad_out = torch.randn(80, d)
        grad_out[0] = bad                                   # and token 0's output gradient
        layouts.clear()
        onednn = run("onednn", index, inputs, grad_out)
        granule, layout = layouts[0]
        assert granule == 16 and layout.capacity % 16 == 0 and layout.pad_rows is not None
        blas = run("blas", index, inputs, grad_out)
        close(onednn, blas)
        out, gx, ggate, gw1, gw2 = onednn
        assert out[1:].isfinite().all() and gx[1:].isfinite().all() and ggate[1:].isfinite().all()
        hit = {e for e in range(n) if not (gw1[e].isfinite().all() and gw2[e].isfinite().all())}
        assert hit <= {0, 1}                                # token 0's experts only
        assert gw1[3].eq(0).all() and gw2[3].eq(0).all()    # the idle expert: exactly zero
        for e in (2, 4, 5):
            assert gw1[e].isfinite().all() and gw2[e].isfinite().all()


@needs_onednn
def test_idle_experts_get_exactly_zero_weight_gradients_even_with_non_finite_weights(monkeypatch, layouts):
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 1)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    n, d, h = 5, 8, 6
    index = torch.tensor([[0, 2]] * 30 + [[2, 4]] * 20)    # experts 1 and 3 idle
    tensors = make(index, n, d, h, seed=12)
    w1, w2 = tensors[2].detach().clone(), tensors[3].detach().clone()
    w1[1], w2[3] = float("nan"), float("inf")
    inputs = [tensors[0], tensors[1], w1.requires_grad_(), w2.requires_grad_()]
    onednn = run("onednn", index, inputs)
    assert layouts[0][0] > 1 and layouts[0][1].capacity > 50
    for e in (1, 3):
        assert onednn[3][e].eq(0).all() and onednn[4][e].eq(0).all()
    assert all(t.isfinite().all() for t in onednn)
    close(onednn, run("blas", index, inputs))


# ---- the MoE layer -----------------------------------------------------------------------------------------

@needs_onednn
def test_a_moe_layer_trains_the_same_with_rounded_rows(monkeypatch, layouts):
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 2)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))

    def grads(gemm):
        torch.manual_seed(0)
        layer = moe.MoE(12, moe.MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=10, bias_update_rate=0.0))
        x = torch.randn(3, 50, 12, requires_grad=True)
        with using_cpu_gemm(gemm):
            layer(x).square().mean().backward()
        return [x.grad, *(p.grad for p in layer.parameters())]

    onednn = grads("onednn")
    assert any(g > 1 and lay.capacity is not None for g, lay in layouts)
    close(onednn, grads("blas"))


# ---- bench_moe's fresh-routing steps --------------------------------------------------------------------------

@needs_onednn
def test_fresh_routing_puts_the_granule_back_even_when_a_step_raises(monkeypatch):
    from minillm import bench_moe as bench

    layer = moe.MoE(8, moe.MoEConfig(n_routed=4, n_shared=0, top_k=2, expert_hidden=4, bias_update_rate=0.0))
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 3)
    seen, real = [], moe._pair_layout

    def spy(expert_index, n_experts, pad, granule=1):
        seen.append((moe.cpu_gemm(), moe.ONEDNN_ROWS_PER_GRANULE, granule))
        return real(expert_index, n_experts, pad, granule)

    monkeypatch.setattr(moe, "_pair_layout", spy)
    result = bench._fresh_routing_ms(layer, 600, "cpu", blocks=3, steps=1)
    assert set(result) == {"onednn_rounded", "onednn_exact", "blas"} and min(result.values()) > 0
    assert moe.ONEDNN_ROWS_PER_GRANULE == 3
    # 1200 pairs on 4 experts: 300 rows on average, 300 // 3 = 100: a granule of 64 when rounded
    assert sorted(set(seen)) == sorted({("onednn", 3, 64), ("onednn", sys.maxsize, 1), ("blas", 3, 1)})

    monkeypatch.setattr(moe, "_pair_layout", _failing_without_rounding(real, "a step failed"))
    with pytest.raises(RuntimeError, match="a step failed"):
        bench._fresh_routing_ms(layer, 64, "cpu", blocks=2, steps=2)
    assert moe.ONEDNN_ROWS_PER_GRANULE == 3 and not moe._cpu_gemm_chosen()


def _failing_without_rounding(real, message):
    """`_pair_layout` that raises `message` in the bench's exact-count steps (no rounding) and works otherwise."""
    def layout(*args, **kwargs):
        if moe.ONEDNN_ROWS_PER_GRANULE == sys.maxsize:
            raise RuntimeError(message)
        return real(*args, **kwargs)
    return layout


@needs_onednn
def test_bench_moe_under_forced_onednn_leaves_the_granule_as_it_was(monkeypatch):
    from minillm.bench_moe import bench_moe

    monkeypatch.setenv(moe.CPU_GEMM_ENV, "onednn")
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 5)
    result = bench_moe(experts="4", tokens=48, d_model=16, expert_hidden=8, top_k=2, repeats=1, device="cpu",
                       default_malloc=True)
    row = result["rows"][0]
    assert row["cpu_gemm"] == "onednn" and set(row["fresh_routing_ms_per_step"]) == {
        "onednn_rounded", "onednn_exact", "blas"}
    assert moe.ONEDNN_ROWS_PER_GRANULE == 5
    monkeypatch.setattr(moe, "_pair_layout", _failing_without_rounding(moe._pair_layout, "a fresh step failed"))
    with pytest.raises(RuntimeError, match="a fresh step failed"):
        bench_moe(experts="4", tokens=48, d_model=16, expert_hidden=8, top_k=2, repeats=1, device="cpu",
                  default_malloc=True)
    assert moe.ONEDNN_ROWS_PER_GRANULE == 5 and not moe._cpu_gemm_chosen()


@needs_onednn
def test_bench_routing_layout_is_the_layout_the_layer_uses(monkeypatch, layouts):
    from minillm.bench_moe import _routing_layout

    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 1)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    torch.manual_seed(5)
    layer = moe.MoE(16, moe.MoEConfig(n_routed=4, n_shared=0, top_k=2, expert_hidden=8, bias_update_rate=0.0))
    x = torch.randn(1, 70, 16)
    for gemm in ("onednn", "blas"):
        layouts.clear()
        with using_cpu_gemm(gemm), torch.no_grad():
            bench_layout = _routing_layout(layer, x)
            layer(x)
        (granule, layout), = layouts                      # the layer's (the bench holds its own _pair_layout)
        assert granule == (32 if gemm == "onednn" else 1)
        assert bench_layout.capacity == layout.capacity and bench_layout.capacity % granule == 0
        assert torch.equal(bench_layout.row_of_pair, layout.row_of_pair)


@needs_onednn
def test_a_very_uneven_load_stays_grouped_under_onednn_and_matches(monkeypatch, layouts):
    monkeypatch.setattr(moe, "ONEDNN_ROWS_PER_GRANULE", 1)
    index = torch.zeros(120, 2, dtype=torch.long)
    index[:, 1] = 1 + torch.arange(120) % 3                  # expert 0: 120 rows, 1-3: 40 each, 4-5: idle
    tensors = make(index, 6, 8, 6, seed=13)
    onednn = run("onednn", index, tensors)
    granule, layout = layouts[0]
    assert granule == 32 and layout.capacity is None and layout.pad_rows is None
    check_layout(layout, index, 6, granule)
    close(onednn, run("blas", index, tensors))
    close(onednn, reference(index, tensors), rtol=1e-3, atol=1e-4)
    assert onednn[3][4:].eq(0).all() and onednn[4][4:].eq(0).all()
