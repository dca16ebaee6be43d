"""Probes of the MoE fused dispatch's oneDNN path (minillm.moe.cpu_gemm / using_cpu_gemm): odd shapes, strided
and partly trainable inputs, non-finite values, dtypes, grad modes, threads, a GPT training, and the choice itself.
oneDNN is forced with using_cpu_gemm("onednn") and the padded layout with PAD_LIMIT = inf."""
from __future__ import annotations

import threading

import pytest
import torch

import minillm.moe as moe
from minillm.moe import fused_dispatch, per_expert_mask_loop, reference_moe_loop, using_cpu_gemm

needs_onednn = pytest.mark.skipif(moe._onednn_linear() is None, reason="this torch build has no oneDNN")


@pytest.fixture
def counted(monkeypatch):
    """Padded rows whatever the load; counts oneDNN inner products and torch.bmm calls."""
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    calls = []
    real_linear, real_bmm = moe._onednn_linear(), torch.bmm
    monkeypatch.setattr(moe, "_onednn_linear", lambda: lambda *a: calls.append("onednn") or real_linear(*a))
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append("bmm") or real_bmm(*a, **k))
    return calls


def make(tokens, n, k, d, h, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.long)
    x = torch.randn(tokens, d, generator=g, dtype=dtype)
    gate = torch.rand(tokens, k, generator=g, dtype=dtype)
    w1 = torch.randn(n, d, 2 * h, generator=g, dtype=dtype) * 0.3
    w2 = torch.randn(n, h, d, generator=g, dtype=dtype) * 0.3
    return index, x, gate, w1, w2


def run(gemm, index, x, gate, w1, w2, leaves=None):
    """Output and the gradients of the leaves that require grad (out.square().sum())."""
    with using_cpu_gemm(gemm):
        out = fused_dispatch(x, index, gate, w1, w2)
        leaves = [t for t in (leaves or (x, gate, w1, w2)) if t.requires_grad]
        grads = torch.autograd.grad(out.square().sum(), leaves) if leaves and out.requires_grad else []
    return [out, *grads]


def close(got, want, rtol=1e-4, atol=1e-5):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def close_to_reference(got, index, inputs, leaves):
    """got (output, grads of leaves) against per_expert_mask_loop in float64, relative to each tensor's size."""
    reference = per_expert_mask_loop(*(t.double() for t in inputs[:1]), index, *(t.double() for t in inputs[1:]))
    want = [reference, *torch.autograd.grad(reference.square().sum(), leaves)]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-4 * (1 + float(b.detach().abs().max())))


@needs_onednn
@pytest.mark.parametrize("tokens,n,k,d,h", [(1, 1, 1, 1, 1), (5, 1, 1, 3, 1), (5, 3, 3, 1, 66), (37, 4, 3, 66, 66),
                                            (1, 8, 2, 8, 8), (7, 16, 1, 5, 3), (64, 64, 1, 4, 4), (33, 5, 2, 24, 7),
                                            (0, 4, 2, 8, 8)])
def test_onednn_matches_blas_and_the_mask_loop_on_odd_shapes(counted, tokens, n, k, d, h):
    index, *tensors = make(tokens, n, k, d, h)
    tensors = [t.requires_grad_() for t in tensors]
    counted.clear()
    onednn = run("onednn", index, *tensors)
    assert set(counted) == ({"onednn"} if tokens else set())
    counted.clear()
    blas = run("blas", index, *tensors)
    assert "onednn" not in counted
    close(onednn, blas)
    if tokens:
        close_to_reference(onednn, index, tensors, tensors)
        if tokens == 1:   # the one-token-at-a-time definition as well
            experts = [lambda v, e=e: moe._swiglu(v, tensors[2][e], tensors[3][e]) for e in range(n)]
            torch.testing.assert_close(onednn[0], reference_moe_loop(tensors[0], index, tensors[1], experts))
    else:
        assert onednn[0].shape == (0, d)


@needs_onednn
def test_onednn_takes_strided_views_and_partly_trainable_inputs(counted):
    n, d, h, tokens = 6, 12, 66, 40
    index, x, gate, w1, w2 = make(tokens, n, 2, d, h, seed=3)
    x_strided = torch.randn(d, 2 * tokens).t()[::2]                   # (tokens, d) with strides (1, 2 * tokens)
    gate_strided = torch.rand(2, 3 * tokens)[:, ::3].t()
    w1_param = torch.randn(n, 2 * h, d).mul(0.3)                      # stored (out, in): used transposed
    w2_param = torch.randn(n + 2, h + 1, d + 5).mul(0.3)
    w_shared = torch.randn(1, d, 2 * h).mul(0.3)                      # one expert expanded over all
    cases = [   # (the leaves to differentiate, then x, gate, w_gate_up, w_down built from them)
        ([x_strided, gate_strided, w1_param, w2_param],
         lambda: (x_strided, gate_strided, w1_param.transpose(1, 2), w2_param[1:n + 1, :h, 2:d + 2])),
        ([gate, w_shared], lambda: (x_strided, gate, w_shared.expand(n, d, 2 * h), w2)),
        ([x], lambda: (x, gate, w1, w2)),                                   # only x
        ([w2], lambda: (x, gate, w1, w2)),                                  # only w_down
    ]
    for leaves, build in cases:
        for t in (x_strided, gate_strided, w1_param, w2_param, w_shared, x, gate, w1, w2):
            t.requires_grad_(any(t is leaf for leaf in leaves))
        inputs = build()
        counted.clear()
        onednn = run("onednn", index, *inputs, leaves=leaves)
        assert "bmm" not in counted and "onednn" in counted
        assert len(onednn) == 1 + len(leaves)
        close(onednn, run("blas", index, *inputs, leaves=leaves))
        close_to_reference(onednn, index, inputs, leaves)


@needs_onednn
def test_onednn_keeps_non_finite_values_where_blas_does(counted):
    tokens, n, k, d, h = 63, 8, 2, 16, 66
    index = ((torch.arange(tokens).unsqueeze(1) * k + torch.arange(k)) % n)
    _, x, gate, w1, w2 = make(tokens, n, k, d, h, seed=5)
    idle = index.clone()
    idle[idle == 5] = 6                                    # expert 5 idle: its padded rows only
    w1_bad, w2_bad = w1.clone(), w2.clone()
    w1_bad[5], w2_bad[5] = float("nan"), float("inf")
    tensors = [t.requires_grad_() for t in (x, gate, w1_bad, w2_bad)]
    onednn = run("onednn", idle, *tensors)
    close(onednn, run("blas", idle, *tensors))
    assert all(t.isfinite().all() for t in onednn)
    assert onednn[3][5].eq(0).all() and onednn[4][5].eq(0).all()   # exactly zero, as with blas
    x_bad = x.detach().clone()
    x_bad[0] = float("inf")                                # padded rows copy token 0 and zero it
    tensors = [t.requires_grad_() for t in (x_bad, gate, w1, w2)]
    onednn = run("onednn", index, *tensors)
    close(onednn, run("blas", index, *tensors))
    hit = sorted({e for e in range(n) if not onednn[3][e].isfinite().all()})
    assert hit == sorted(index[0].tolist())                # token 0's experts only, not every padded one


@needs_onednn
@pytest.mark.parametrize("kind", ["float64", "bfloat16", "autocast", "inference_mode", "no_grad", "one_thread"])
def test_onednn_only_for_float32_and_the_same_in_every_grad_mode(counted, kind):
    tokens, n, k, d, h = 48, 4, 2, 8, 10
    index, x, gate, w1, w2 = make(tokens, n, k, d, h, seed=7)
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(kind, torch.float32)
    x, gate, w1, w2 = (t.to(dtype).requires_grad_() for t in (x, gate, w1, w2))
    threads = torch.get_num_threads()

    def go(gemm):
        counted.clear()
        if kind == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run(gemm, index, x, gate, w1, w2)
        if kind in ("inference_mode", "no_grad"):
            with getattr(torch, kind)(), using_cpu_gemm(gemm):
                return [fused_dispatch(x, index, gate, w1, w2)]
        return run(gemm, index, x, gate, w1, w2)

    try:
        if kind == "one_thread":
            torch.set_num_threads(1)
        onednn = go("onednn")
        used = set(counted)
        blas = go("blas")
    finally:
        torch.set_num_threads(threads)
    float32 = dtype == torch.float32 and kind != "autocast"
    assert used == ({"onednn"} if float32 else {"bmm"})    # float64, bf16, autocast: torch.bmm as before
    assert onednn[0].dtype == dtype
    if float32:
        close(onednn, blas)
    else:   # the same torch.bmm both times
        close(onednn, blas, rtol=0, atol=0)


@needs_onednn
def test_a_gpt_with_moe_layers_trains_the_same_with_onednn(counted):
    from minillm.model import GPT, GPTConfig

    def train(gemm):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, n_dense_layers=1,
                              moe=moe.MoEConfig(n_routed=8, n_shared=1, top_k=2, expert_hidden=16,
                                                bias_update_rate=0.01)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
        losses = []
        with using_cpu_gemm(gemm):
            for _ in range(4):
                _, loss = model(data, data)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                model.after_optimizer_step()
                losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    counted.clear()
    (losses, params), (losses_blas, params_blas) = train("onednn"), train("blas")
    assert "onednn" in counted and losses[-1] < losses[0]
    assert losses == pytest.approx(losses_blas, rel=1e-5)
    for a, b in zip(params, params_blas):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the choice of library: each of these failed before its fix ------------------------------------------

@needs_onednn
def test_auto_keeps_small_expert_products_on_bmm(counted, monkeypatch):
    # before: "auto" on an AMD CPU sent every padded product to oneDNN, one call per expert; with many small
    # experts (64 experts of 1 to 16 rows, the course's tiny GPTs) that ran 5 to 50 times slower than one bmm
    monkeypatch.delenv(moe.CPU_GEMM_ENV, raising=False)
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)        # as on this AMD CPU
    monkeypatch.setattr(moe, "cpu_gemm_trial", lambda: {"onednn": 1.0, "blas": 2.0})   # oneDNN timed faster
    index, *tensors = make(64, 64, 1, 16, 16)
    counted.clear()
    with torch.no_grad():
        fused_dispatch(tensors[0], index, *tensors[1:])
    assert counted == ["bmm", "bmm"]
    assert moe.cpu_gemm() == "onednn" and moe.cpu_gemm(1 << 23) == "onednn" and moe.cpu_gemm(1000) == "blas"
    with using_cpu_gemm("onednn"):                          # a chosen oneDNN takes every size
        assert moe.cpu_gemm(1) == "onednn"
    capacity, inner, width = 512, 128, 128                  # 2**23 multiply-adds an expert: oneDNN's kernel pays
    a, b = torch.randn(2 * capacity, inner), torch.randn(2, inner, width)
    with torch.no_grad():
        out = moe._onednn_rows_mm(a, b, capacity)
        assert out is not None and moe._onednn_rows_mm(a[:64], b, 32) is None
        assert moe._onednn_weight_mm(a, a, 2, capacity) is None   # counted at half: copies on top
    torch.testing.assert_close(out, torch.bmm(a.view(2, capacity, inner), b).flatten(0, 1), rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")   # torch's flags() says it on a CPU
def test_auto_leaves_onednn_alone_when_torch_has_it_switched_off(monkeypatch):
    # before: torch.backends.mkldnn.flags(enabled=False) still gave "onednn" under auto
    monkeypatch.delenv(moe.CPU_GEMM_ENV, raising=False)
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)
    monkeypatch.setattr(moe, "cpu_gemm_trial", lambda: {"onednn": 1.0, "blas": 2.0})   # oneDNN timed faster
    assert moe.cpu_gemm() == "onednn"
    with torch.backends.mkldnn.flags(enabled=False):
        assert moe.cpu_gemm() == "blas"
        with using_cpu_gemm("onednn"):
            assert moe.cpu_gemm() == "onednn"              # asked for by name: still taken


@needs_onednn
def test_a_using_cpu_gemm_block_belongs_to_its_thread():
    # before: one list for all threads, and pop() took the last block entered anywhere: after thread A left its
    # "blas" block, thread B inside its own "onednn" block read "blas"
    entered, a_left, seen = threading.Event(), threading.Event(), {}

    def thread_a():
        with using_cpu_gemm("blas"):
            entered.wait(5)
            seen["a"] = moe.cpu_gemm()
        a_left.set()

    def thread_b():
        with using_cpu_gemm("onednn"):
            entered.set()
            a_left.wait(5)
            seen["b"] = moe.cpu_gemm()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": "blas", "b": "onednn"} and not moe._cpu_gemm_chosen()


def test_using_cpu_gemm_nests_unwinds_on_errors_and_reads_the_variable_loosely(monkeypatch):
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "  BLAS\n")
    assert moe.cpu_gemm() == "blas"
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "")               # empty: auto
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: False)
    assert moe.cpu_gemm() == "blas"
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "blas, onednn")
    with pytest.raises(ValueError, match="is not one of"):
        moe.cpu_gemm()
    with pytest.raises(KeyError):
        with using_cpu_gemm(" Blas "):
            with using_cpu_gemm("auto"):
                assert moe.cpu_gemm() == "blas"
                raise KeyError("inside")
    assert not moe._cpu_gemm_chosen()
    for bad in (None, 1, "mkl", ""):
        with pytest.raises(ValueError, match="using_cpu_gemm"):
            with using_cpu_gemm(bad):
                pass
    assert not moe._cpu_gemm_chosen()


def test_the_auto_choice_survives_odd_platforms(monkeypatch):
    # before: a Windows Intel CPU whose platform.processor() fell back to the machine name "AMD64" read as AMD,
    # and a platform.processor() or get_cpu_capability() that raised made every fused dispatch raise
    mkl = "BLAS_INFO=mkl"
    assert not moe._mkl_skips_avx512("AMD64", "AVX512", mkl, "AMD64")
    assert not moe._mkl_skips_avx512("x86_64", "AVX512", mkl, "x86_64")
    assert moe._mkl_skips_avx512("x86_64", "AVX512", mkl, "AuthenticAMD")
    assert moe._mkl_skips_avx512("x86_64", "AVX512", mkl, "HygonGenuine")
    real_open = open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    def broken():
        raise RuntimeError("no such query here")

    monkeypatch.setattr("builtins.open", no_cpuinfo)
    monkeypatch.delenv(moe.CPU_GEMM_ENV, raising=False)
    for processor in (lambda: "", lambda: None, broken):
        monkeypatch.setattr(moe.platform, "processor", processor)
        assert moe._cpu_vendor() == ""
        moe._blas_skips_avx512.cache_clear()
        try:
            assert moe.cpu_gemm() == "blas"
        finally:
            moe._blas_skips_avx512.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", broken)
    try:
        assert moe.cpu_gemm() == "blas"
    finally:
        moe._blas_skips_avx512.cache_clear()


@needs_onednn
def test_a_forward_inside_using_cpu_gemm_keeps_its_choice_for_a_backward_run_outside(monkeypatch):
    # before: the backward read whatever choice held when .backward() was called, so a forward timed "with
    # MKL" could run its backward with oneDNN
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    torch.manual_seed(0)
    x = torch.randn(32, 8, requires_grad=True)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(32)])
    gate = torch.rand(32, 2)
    w1, w2 = torch.randn(4, 8, 12, requires_grad=True), torch.randn(4, 6, 8, requires_grad=True)
    real_linear, calls = moe._onednn_linear(), []
    monkeypatch.setattr(moe, "_onednn_linear", lambda: lambda *a: calls.append(1) or real_linear(*a))
    with using_cpu_gemm("blas"):
        out = fused_dispatch(x, index, gate, w1, w2)
    with using_cpu_gemm("onednn"):
        out.square().sum().backward()
    assert not calls
    with using_cpu_gemm("onednn"):
        out = fused_dispatch(x, index, gate, w1, w2)
    calls.clear()
    out.square().sum().backward()   # outside any block, under auto: still oneDNN, as its forward
    assert len(calls) == 2 * 4      # two rows products per expert in the backward
