"""Tests of minillm.moe (chapter 04): dispatch vs the per-token loop, routing, bias balancing, MoE GPTs."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minillm.model import GPT, GPTConfig
from minillm.moe import (PAD_LIMIT, MoE, MoEConfig, fused_dispatch, load_imbalance, per_expert_mask_loop,
                         reference_moe_loop, route, run_experts_grouped, run_experts_on_slices, sequence_balance_loss,
                         sort_by_expert, sorted_dispatch, update_bias)
from minillm.train import TrainConfig, estimate_loss, load_checkpoint, save_checkpoint, train


def make_layer(seed=0, n_embd=16, **overrides) -> MoE:
    torch.manual_seed(seed)
    settings = dict(n_routed=8, n_shared=1, top_k=2, expert_hidden=12, bias_update_rate=0.0)
    settings.update(overrides)
    layer = MoE(n_embd, MoEConfig(**settings))
    with torch.no_grad():  # larger weights than the 0.02 init, so differences are not hidden by tiny values
        layer.w_gate_up.normal_(0, 0.3)
        layer.w_down.normal_(0, 0.3)
        layer.router.weight.normal_(0, 0.5)
    return layer


def grads(*tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("runner", [run_experts_grouped, run_experts_on_slices])
def test_sorted_dispatch_equals_per_token_loop_with_gradients(runner):
    layer = make_layer(n_shared=0).double()
    x = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)   # ragged: 23 tokens, 8 experts
    routing = route(layer.router(x), None, 2)
    experts = [layer.expert(e) for e in range(8)]

    reference = reference_moe_loop(x, routing.expert_index, routing.gate_weight, experts)
    (reference ** 2).sum().backward()
    expected = grads(x, layer.w_gate_up, layer.w_down, layer.router.weight)
    for t in (x, layer.w_gate_up, layer.w_down, layer.router.weight):
        t.grad = None

    routing = route(layer.router(x), None, 2)
    got = sorted_dispatch(x, routing.expert_index, routing.gate_weight,
                          lambda xs, counts: runner(xs, counts, layer.w_gate_up, layer.w_down), 8)
    (got ** 2).sum().backward()
    torch.testing.assert_close(got, reference)
    for g, e in zip(grads(x, layer.w_gate_up, layer.w_down, layer.router.weight), expected):
        torch.testing.assert_close(g, e)


@pytest.fixture(params=["grouped", "padded"])
def layout(request, monkeypatch):
    """Run a test with the fused dispatch's rows grouped (never padded) and padded (always, whatever the load)."""
    import minillm.moe as moe

    monkeypatch.setattr(moe, "PAD_LIMIT", -1.0 if request.param == "grouped" else float("inf"))
    return request.param


@pytest.mark.parametrize("tokens,n_routed,top_k", [(23, 8, 2), (7, 4, 1), (40, 16, 4), (3, 8, 8)])
def test_fused_dispatch_equals_per_token_loop_with_gradients(tokens, n_routed, top_k, layout):
    layer = make_layer(n_shared=0, n_routed=n_routed, top_k=top_k).double()
    x = torch.randn(tokens, 16, dtype=torch.float64, requires_grad=True)
    experts = [layer.expert(e) for e in range(n_routed)]
    weights = (x, layer.w_gate_up, layer.w_down, layer.router.weight)
    routing = route(layer.router(x), None, top_k)
    reference = reference_moe_loop(x, routing.expert_index, routing.gate_weight, experts)
    expected = torch.autograd.grad((reference ** 2).sum(), weights)
    routing = route(layer.router(x), None, top_k)
    got = fused_dispatch(x, routing.expert_index, routing.gate_weight, layer.w_gate_up, layer.w_down)
    torch.testing.assert_close(got, reference)
    for g, e in zip(torch.autograd.grad((got ** 2).sum(), weights), expected):
        torch.testing.assert_close(g, e)


def test_fused_dispatch_passes_gradcheck_and_handles_idle_experts_and_no_tokens(layout):
    torch.manual_seed(4)
    index = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 2]])     # expert 1 idle, a token twice on expert 2
    inputs = (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),
              torch.rand(4, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, g, w1, w2: fused_dispatch(x, index, g, w1, w2), inputs)
    x, gate, w1, w2 = inputs
    fused_dispatch(x, index, gate, w1, w2).sum().backward()
    assert w1.grad[1].abs().sum() == 0 and w2.grad[1].abs().sum() == 0 and w1.grad[2].abs().sum() > 0
    empty = fused_dispatch(x[:0], index[:0], gate[:0], w1, w2)
    assert empty.shape == (0, 5)
    with pytest.raises(ValueError, match="expert_index and gate_weight"):
        fused_dispatch(x, index, gate[:, :1], w1, w2)
    with pytest.raises(ValueError, match="3 experts"):
        fused_dispatch(x, index + 1, gate, w1, w2)            # id 3 does not exist
    with pytest.raises(ValueError, match="3 experts"):
        fused_dispatch(x, index - 1, gate, w1, w2)            # nor does -1
    with pytest.raises(TypeError, match="integer expert ids"):
        fused_dispatch(x, index.double(), gate, w1, w2)
    with pytest.raises(ValueError, match="w_gate_up"):
        fused_dispatch(x, index, gate, w1[:, :, :5], w2)


@pytest.mark.parametrize("hidden", [8, 66])
def test_fused_dispatch_grouped_matmul_and_loop_agree(monkeypatch, hidden):
    import minillm.moe as moe

    monkeypatch.setattr(moe, "PAD_LIMIT", -1.0)   # the grouped layout (not padded), whatever the load
    torch.manual_seed(6)
    # float32 rows of 16/32 bytes: grouped_mm fits; a hidden width of 66 (264-byte rows) fits too, because the
    # dispatch pads the rows of its (N, hidden) operand to 16 bytes
    tokens, n_routed, top_k, width = 37, 8, 3, 16
    x = torch.randn(tokens, width, requires_grad=True)
    w1 = (torch.randn(n_routed, width, 2 * hidden) * 0.3).requires_grad_()
    w2 = (torch.randn(n_routed, hidden, width) * 0.3).requires_grad_()
    gate = torch.rand(tokens, top_k, requires_grad=True)
    candidates = torch.tensor([0, 1, 2, 3, 4, 6, 7])                  # expert 5 stays idle
    index = torch.stack([candidates[torch.randperm(7)[:top_k]] for _ in range(tokens)])

    def run():
        for t in (x, w1, w2, gate):
            t.grad = None
        out = fused_dispatch(x, index, gate, w1, w2)
        out.square().sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (x, w1, w2, gate)]

    calls = []
    if moe._GROUPED_MM is not None:
        real = moe._GROUPED_MM
        monkeypatch.setattr(moe, "_GROUPED_MM", lambda *a, **k: calls.append(1) or real(*a, **k))
    grouped = run()
    assert moe._GROUPED_MM is None or len(calls) == 6   # 2 forward + 4 backward grouped matmuls
    monkeypatch.setattr(moe, "_GROUPED_MM", None)
    looped = run()
    for refusal in (RuntimeError, TypeError, ValueError):   # a grouped_mm that refuses (an old GPU, a dtype)
        def refuses(*args, refusal=refusal, **kwargs):
            raise refusal("grouped_mm: not for these inputs here")
        monkeypatch.setattr(moe, "_GROUPED_MM", refuses)
        for a, b in zip(run(), looped):
            torch.testing.assert_close(a, b)
    expected = per_expert_mask_loop(x.detach(), index, gate.detach(), w1.detach(), w2.detach())
    torch.testing.assert_close(grouped[0], expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(grouped, looped):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert looped[2][5].abs().sum() == 0 and grouped[2][5].abs().sum() == 0   # the idle expert's gradient


@pytest.mark.parametrize("gemm", ["blas", "onednn"])
@pytest.mark.parametrize("hidden", [6, 66])
def test_fused_dispatch_pads_only_an_even_load_and_padding_changes_nothing(monkeypatch, hidden, gemm):
    import minillm.moe as moe

    linear_calls = []
    if gemm == "onednn":   # the padded rows products go to oneDNN, one inner product per expert
        real_linear = moe._onednn_linear()
        if real_linear is None:
            pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn)")
        monkeypatch.setattr(moe, "_onednn_linear", lambda: lambda *a: linear_calls.append(1) or real_linear(*a))

    torch.manual_seed(9)
    tokens, n_routed, top_k, width = 64, 8, 2, 16
    even = (torch.arange(tokens).unsqueeze(1) * top_k + torch.arange(top_k)) % n_routed   # 16 pairs per expert
    uneven = even.clone()
    uneven[:8, 0] = 7                                       # expert 7 gets 24 pairs of 128: 64 padded rows
    assert moe._pair_layout(even, n_routed, pad=True).capacity == 16
    assert moe._pair_layout(even, n_routed, pad=False).capacity is None    # a Triton backend: never padded
    assert moe._pair_layout(uneven, n_routed, pad=True).capacity is None   # 50% padding: grouped instead
    layout = moe._pair_layout(even[:63], n_routed, pad=True)       # token 63 gone: experts 6 and 7 one row short
    assert layout.capacity == 16 and layout.pad_rows.tolist() == [6 * 16 + 15, 7 * 16 + 15]
    assert layout.padding == pytest.approx(2 / 126) and moe._pair_layout(uneven, n_routed, pad=True).padding == 0.5

    x = torch.randn(tokens, width, requires_grad=True)
    x_bad = x.detach().clone()
    x_bad[0] = float("inf")                                 # token 0's input: padded rows copy token 0
    w1 = (torch.randn(n_routed, width, 2 * hidden) * 0.3).requires_grad_()
    w2 = (torch.randn(n_routed, hidden, width) * 0.3).requires_grad_()
    gate = torch.rand(tokens, top_k, requires_grad=True)

    def run(index, inputs):
        out = fused_dispatch(inputs, index, gate[:index.shape[0]], w1, w2)
        return [out] + list(torch.autograd.grad(out.square().sum(), (w1, w2, gate)))

    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: bmm_calls.append(1) or real_bmm(*a, **k))
    monkeypatch.setenv(moe.CPU_GEMM_ENV, gemm)
    for index in (even, even[:63].contiguous()):
        rows = index.shape[0]
        padded = run(index, x[:rows])
        if gemm == "blas":
            assert len(bmm_calls) == 6 and not linear_calls     # 2 forward + 4 backward batched matmuls
        else:   # 4 rows products and 2 weight gradients, once per expert; no batched matmul
            assert not bmm_calls and len(linear_calls) == 4 * n_routed
        bmm_calls.clear()
        linear_calls.clear()
        monkeypatch.setattr(moe, "PAD_LIMIT", -1.0)
        grouped = run(index, x[:rows])
        assert not bmm_calls and not linear_calls
        monkeypatch.setattr(moe, "PAD_LIMIT", 1 / 8)
        for a, b in zip(padded, grouped):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert a.is_contiguous()                        # torch.autograd.grad's results, .view-able
    # An expert without tokens gets a zero gradient, as without padding, even when its weights hold a NaN.
    index = even.clone()
    index[index == 5] = 6                                   # expert 5 idle: padded, its rows are all padding
    for t in (w1, w2):
        t.data[5] = float("nan")
    for limit in (float("inf"), -1.0):
        monkeypatch.setattr(moe, "PAD_LIMIT", limit)
        _, grad_w1, grad_w2, _ = run(index, x)
        assert grad_w1[5].eq(0).all() and grad_w2[5].eq(0).all(), limit
    monkeypatch.setattr(moe, "PAD_LIMIT", 1 / 8)
    for t in (w1, w2):
        t.data[5] = torch.randn_like(t.data[5]) * 0.3
    # An inf in token 0 reaches token 0's two experts, as without padding, not every expert via the padded rows.
    index = even[:63].contiguous()
    _, grad_w1, _, _ = run(index, x_bad[:63])
    touched = set(index[0].tolist())
    for e in range(n_routed):
        assert grad_w1[e].isfinite().all() == (e not in touched), e


def test_fused_dispatch_without_embedding_bag_falls_back_to_a_gather_sum(monkeypatch):
    import minillm.moe as moe

    torch.manual_seed(8)
    x = torch.randn(9, 16, requires_grad=True)
    w1, w2 = torch.randn(4, 16, 24, requires_grad=True), torch.randn(4, 12, 16, requires_grad=True)
    routing = route(torch.randn(9, 4), None, 2)
    expected = per_expert_mask_loop(x, routing.expert_index, routing.gate_weight, w1, w2)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)

    def missing(*args, **kwargs):
        raise NotImplementedError("embedding_bag is not implemented for this device")

    monkeypatch.setattr(moe.F, "embedding_bag", missing)
    got = fused_dispatch(x, routing.expert_index, routing.gate_weight, w1, w2)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_fused_dispatch_under_bf16_autocast_matches_the_autograd_slices(layout):
    layer = make_layer(n_shared=0)
    x = torch.randn(2, 9, 16, requires_grad=True)
    results = []
    for kind in ("fused", "slices"):
        layer.config.dispatch = kind
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        (grad_x,) = torch.autograd.grad(out.float().square().sum(), x)
        assert out.dtype == torch.bfloat16 or out.dtype == torch.float32
        results.append((out.float(), grad_x))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=5e-2, atol=5e-2)


def test_mask_loop_and_layer_dispatch_kinds_agree():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 16)
    outputs = []
    for kind in ("grouped", "slices", "auto", "fused"):
        layer = make_layer(dispatch=kind)
        outputs.append(layer(x))
    for other in outputs[1:]:
        torch.testing.assert_close(outputs[0], other)
    routing = layer.last_routing
    shared_free = make_layer(n_shared=0)
    tokens = x.reshape(-1, 16)
    torch.testing.assert_close(
        per_expert_mask_loop(tokens, routing.expert_index, routing.gate_weight, shared_free.w_gate_up,
                             shared_free.w_down),
        sorted_dispatch(tokens, routing.expert_index, routing.gate_weight,
                        lambda xs, c: run_experts_on_slices(xs, c, shared_free.w_gate_up, shared_free.w_down), 8))


def test_an_expert_nobody_chose_and_an_empty_batch_are_fine():
    layer = make_layer(n_routed=4, top_k=1, n_shared=0)
    x = torch.randn(5, 16)
    index = torch.zeros(5, 1, dtype=torch.long)          # everyone to expert 0, experts 1-3 idle
    weight = torch.ones(5, 1)
    for runner in (run_experts_grouped, run_experts_on_slices):
        got = sorted_dispatch(x, index, weight, lambda xs, c: runner(xs, c, layer.w_gate_up, layer.w_down), 4)
        torch.testing.assert_close(got, layer.expert(0)(x))
        empty = sorted_dispatch(x[:0], index[:0], weight[:0],
                                lambda xs, c: runner(xs, c, layer.w_gate_up, layer.w_down), 4)
        assert empty.shape == (0, 16)


def test_route_picks_top_k_of_biased_scores_and_weighs_by_unbiased_ones():
    torch.manual_seed(2)
    logits = torch.randn(50, 8)
    bias = torch.zeros(8)
    bias[3] = 10.0                                        # expert 3 always chosen ...
    routing = route(logits, bias, top_k=3, route_scale=2.5)
    affinity = torch.sigmoid(logits)
    assert (routing.expert_index == 3).any(dim=1).all()
    expected_choice = (affinity + bias).topk(3, dim=-1).indices
    assert torch.equal(routing.expert_index.sort(dim=1).values, expected_choice.sort(dim=1).values)
    chosen = affinity.gather(1, routing.expert_index)     # ... but weighed by its own unbiased affinity
    torch.testing.assert_close(routing.gate_weight, chosen / chosen.sum(1, keepdim=True) * 2.5)
    torch.testing.assert_close(routing.gate_weight.sum(1), torch.full((50,), 2.5))
    assert (routing.gate_weight > 0).all()


def test_router_logits_so_low_that_sigmoid_underflows_give_zero_weights_not_nan():
    logits = torch.randn(6, 8)
    logits[2] = -200.0                                    # sigmoid(-200) is 0 in float32: 0 / 0 without care
    routing = route(logits, None, top_k=2)
    assert torch.isfinite(routing.gate_weight).all()
    assert torch.equal(routing.gate_weight[2], torch.zeros(2))
    torch.testing.assert_close(routing.gate_weight.sum(1)[[0, 1, 3, 4, 5]], torch.ones(5))
    layer = MoE(8, MoEConfig(n_routed=8, n_shared=1, top_k=2, expert_hidden=4, aux_loss_weight=0.01))
    with torch.no_grad():
        layer.router.weight.fill_(-1.0)
    x = torch.full((1, 3, 8), 50.0, requires_grad=True)   # every router logit -400
    out = layer(x)
    (out.square().sum() + layer.aux_loss).backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.aux_loss)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_sequence_balance_loss_of_empty_sequences_is_zero_not_nan():
    layer = MoE(8, MoEConfig(n_routed=4, n_shared=0, top_k=2, expert_hidden=4, aux_loss_weight=0.01))
    out = layer(torch.randn(2, 0, 8))
    assert out.shape == (2, 0, 8) and layer.aux_loss.detach().item() == 0.0


def test_a_bf16_layer_keeps_its_balancing_bias_in_float32():
    layer = MoE(8, MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=4, bias_update_rate=0.001))
    with torch.no_grad():
        layer.expert_bias.fill_(0.5)
    layer = layer.to(torch.bfloat16)
    assert layer.w_gate_up.dtype == torch.bfloat16 and layer.expert_bias.dtype == torch.float32
    layer(torch.randn(2, 16, 8, dtype=torch.bfloat16))
    layer.after_optimizer_step()
    assert (layer.expert_bias - 0.5).abs().max() == pytest.approx(0.001, rel=1e-3)   # bf16 would round it away
    assert layer.half().expert_bias.dtype == torch.float32 and layer.w_down.dtype == torch.float16


def test_group_limited_routing_stays_within_the_best_groups():
    torch.manual_seed(3)
    logits = torch.randn(200, 16)
    routing = route(logits, None, top_k=4, n_groups=4, top_groups=2)
    groups = routing.expert_index // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    ungrouped = route(logits, None, top_k=4)
    assert any(len(set(row.tolist())) > 2 for row in ungrouped.expert_index // 4)


def test_route_rejects_impossible_choices_with_a_clear_error():
    logits = torch.randn(6, 8)
    with pytest.raises(ValueError, match="top_k=9"):
        route(logits, None, top_k=9)
    with pytest.raises(ValueError, match="top_k=0"):
        route(logits, None, top_k=0)
    with pytest.raises(ValueError, match="n_groups=3"):
        route(logits, None, top_k=2, n_groups=3)
    with pytest.raises(ValueError, match="top_groups=3"):
        route(logits, None, top_k=2, n_groups=2, top_groups=3)
    with pytest.raises(ValueError, match="top_k=5"):     # only 1 group of 4 experts may be used
        route(logits, None, top_k=5, n_groups=2, top_groups=1)
    chosen = logits.topk(2, dim=-1).indices
    with pytest.raises(ValueError, match="batch=4"):      # 6 tokens are not 4 sequences of equal length
        sequence_balance_loss(torch.sigmoid(logits), chosen, 4, 0.01)


def test_layer_refuses_inputs_it_cannot_take_with_a_clear_error():
    layer = make_layer()
    with pytest.raises(ValueError, match="15 channels"):
        layer(torch.randn(2, 3, 15))
    with pytest.raises(TypeError, match="input is bfloat16 but the layer's weights are float32"):
        layer(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="input is int64"):
        layer(torch.ones(2, 3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="input is on meta"):
        layer(torch.randn(2, 3, 16, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):   # mixed precision: float32 weights take bf16 inputs
        assert layer(torch.randn(2, 3, 16, dtype=torch.bfloat16)).shape == (2, 3, 16)
    assert layer.double()(torch.randn(2, 3, 16, dtype=torch.float64)).dtype == torch.float64


def test_triton_dispatch_without_a_gpu_or_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = MoE(16, MoEConfig(n_routed=4, top_k=2, expert_hidden=8, dispatch="triton"))
    with pytest.raises(RuntimeError, match="backend='triton'"):
        layer(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="kernels_backend='gpu'"):
        fused_dispatch(torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2),
                       layer.w_gate_up, layer.w_down, kernels_backend="gpu")


def test_update_bias_rule():
    bias = torch.zeros(4)
    new = update_bias(bias, torch.tensor([10, 2, 4, 4]), 0.1)   # mean 5: overloaded, underloaded x3
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(update_bias(bias, torch.tensor([3, 3, 3, 3]), 0.1), bias)
    with pytest.raises(ValueError, match="one count per expert"):
        update_bias(bias, torch.tensor([3, 3]), 0.1)
    assert load_imbalance(torch.tensor([10, 2, 4, 4])) == pytest.approx(2.0)


def test_bias_balancing_lowers_imbalance_and_keeps_gates_unbiased():
    layer = make_layer(n_routed=8, top_k=2, bias_update_rate=0.02).train()
    torch.manual_seed(4)
    direction = layer.router.weight[0].detach() + layer.router.weight[1].detach()
    imbalance = []
    for step in range(60):   # skewed inputs: every token leans towards experts 0 and 1
        x = torch.randn(4, 16, 16) * 0.3 + direction
        layer(x)
        layer.after_optimizer_step()
        imbalance.append(layer.load_stats()["max_over_mean"])
    assert len(layer.load_history) == 60
    assert imbalance[0] > 2.5
    assert max(imbalance[-10:]) < 0.6 * imbalance[0]
    assert layer.expert_bias[0] < 0 and layer.expert_bias[1] < 0
    routing = layer.last_routing     # gate weights still come from the unbiased affinities
    chosen = routing.affinity.gather(1, routing.expert_index)
    torch.testing.assert_close(routing.gate_weight, chosen / chosen.sum(1, keepdim=True))


def test_balancing_off_leaves_bias_and_eval_mode_does_not_count():
    layer = make_layer(bias_update_rate=0.0).train()
    layer(torch.randn(2, 5, 16))
    layer.after_optimizer_step()
    assert torch.equal(layer.expert_bias, torch.zeros(8)) and sum(layer.load_history[0]) == 2 * 5 * 2
    layer.eval()
    layer(torch.randn(2, 5, 16))
    layer.after_optimizer_step()
    assert len(layer.load_history) == 1


def test_sequence_balance_loss_is_lowest_when_balanced_and_has_router_gradient():
    balanced_index = torch.arange(8).repeat(4).view(16, 2)          # every expert 4 times
    uniform = torch.full((16, 8), 0.5)
    assert sequence_balance_loss(uniform, balanced_index, 1, 0.01).item() == pytest.approx(0.01)
    skewed_index = torch.tensor([[0, 1]] * 16)
    skewed = uniform.clone()
    skewed[:, :2] = 0.9
    assert sequence_balance_loss(skewed, skewed_index, 1, 0.01).item() == pytest.approx(0.015)  # 2 * 4 * 0.9/4.8
    layer = make_layer(aux_loss_weight=0.01).train()
    layer(torch.randn(2, 6, 16))
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def tiny_moe_config(**moe_overrides) -> GPTConfig:
    moe = dict(n_routed=8, n_shared=1, top_k=2, expert_hidden=16, bias_update_rate=0.01)
    moe.update(moe_overrides)
    return GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, moe=MoEConfig(**moe),
                     n_dense_layers=1)


def test_flops_per_token_counts_active_experts_only():
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_moe_config(dispatch="slices"), attention="manual")
    model = GPT(config)
    idx = torch.randint(0, 32, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() == pytest.approx(model.flops_per_token(training=False) * idx.numel())
    dense = GPT(dataclasses.replace(config, moe=None, n_dense_layers=0))
    assert model.num_active_parameters() < model.num_parameters()
    assert dense.num_active_parameters() == dense.num_parameters()
    moe_layer = model.moe_layers()[0]
    unused = 6 * 3 * 32 * 16                                  # 6 idle routed experts of 3 * n_embd * hidden
    assert model.num_parameters() - model.num_active_parameters() == unused
    assert sum(p.numel() for p in moe_layer.parameters()) - moe_layer.num_active_parameters() == unused


def test_moe_gpt_trains_and_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    pattern = torch.arange(4000) % 7 + (torch.arange(4000) // 7) % 3   # learnable periodic text
    model = GPT(tiny_moe_config())
    before = estimate_loss(model, pattern, 16, 8, 4)
    path = tmp_path / "moe.pt"
    config = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=2, eval_interval=40, eval_batches=4,
                         progress=False, device="cpu", checkpoint_path=str(path))
    result = train(model, pattern, pattern, config)
    assert result.final_val_loss < 0.6 * before
    layer = model.moe_layers()[0]
    assert len(layer.load_history) == 40                  # train() called after_optimizer_step every step
    assert layer.expert_bias.abs().sum() > 0
    loaded = load_checkpoint(path)["model"].eval()
    assert loaded.config == model.config and isinstance(loaded.config.moe, MoEConfig)
    torch.testing.assert_close(loaded.moe_layers()[0].expert_bias, layer.expert_bias)
    idx = pattern[:16].unsqueeze(0)
    model.eval()
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    load_checkpoint(path, GPT(tiny_moe_config()))         # same config: loads into a fresh model
    with pytest.raises(ValueError, match="different model config"):
        load_checkpoint(path, GPT(tiny_moe_config(top_k=3)))


def test_moe_load_history_survives_a_checkpoint_and_a_resume(tmp_path):
    # Before, checkpoints left load_history out: a resumed run's history held only the steps since the resume.
    pattern = torch.arange(2000) % 7 + (torch.arange(2000) // 7) % 3
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, eval_interval=100, progress=False,
                         device="cpu")
    path = tmp_path / "three.pt"
    torch.manual_seed(0)
    first = GPT(tiny_moe_config())
    train(first, pattern, None, dataclasses.replace(config, steps=3, checkpoint_path=str(path)))
    saved = torch.load(path, weights_only=True)["moe_load_history"]
    assert list(saved) == ["blocks.1.mlp"] and saved["blocks.1.mlp"].shape == (3, 8)   # one row per step
    assert saved["blocks.1.mlp"].dtype == torch.int32                                   # compact
    assert load_checkpoint(path)["model"].moe_layers()[0].load_history == first.moe_layers()[0].load_history

    resumed = GPT(tiny_moe_config())                      # other initial weights: the checkpoint replaces them
    train(resumed, pattern, None, config, resume_from=str(path))
    history = resumed.moe_layers()[0].load_history
    assert len(history) == 6 and history[:3] == first.moe_layers()[0].load_history
    assert all(sum(step) == 4 * 16 * 2 for step in history)   # batch_size * block_size * top_k tokens each step
    assert resumed.moe_layers()[0].load_stats()["tokens_per_expert"] == history[-1]


def test_checkpoints_without_a_load_history_still_load(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_moe_config())
    path = tmp_path / "old.pt"
    save_checkpoint(path, model)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["moe_load_history"]                    # as written before the history was saved
    torch.save(checkpoint, path)
    layer = model.moe_layers()[0]
    layer.load_history = [[1] * 8]
    load_checkpoint(path, model)                          # loads; the layer's own history is left as it was
    assert layer.load_history == [[1] * 8]
    assert load_checkpoint(path)["model"].moe_layers()[0].load_history == []
    fresh = GPT(tiny_moe_config())
    fresh.load_state_dict(checkpoint["model_state"], strict=True)   # the state dict itself is unchanged
    assert not any("history" in key or "extra_state" in key for key in model.state_dict())
    dense = tmp_path / "dense.pt"
    save_checkpoint(dense, GPT(dataclasses.replace(tiny_moe_config(), moe=None, n_dense_layers=0)))
    assert torch.load(dense, weights_only=True)["moe_load_history"] is None


@pytest.mark.parametrize("overrides, message", [
    (dict(top_k=9), "top_k=9 exceeds"),
    (dict(n_routed=8, n_groups=3), "not divisible"),
    (dict(n_groups=4, top_groups=1, top_k=3), "do not fit"),
    (dict(n_shared=-1), "n_shared"),
    (dict(route_scale=0), "route_scale"),
    (dict(bias_update_rate=-1), "bias_update_rate"),
    (dict(dispatch="fast"), "dispatch"),
])
def test_config_errors_say_what_to_do(overrides, message):
    settings = dict(n_routed=8, top_k=2)
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        MoEConfig(**settings)


def test_gpt_config_validates_moe_fields():
    with pytest.raises(ValueError, match="n_dense_layers"):
        GPTConfig(n_layer=2, moe=MoEConfig(), n_dense_layers=3)
    with pytest.raises(ValueError, match="MoEConfig"):
        GPTConfig(moe="deepseek")
    assert GPTConfig(moe=dataclasses.asdict(MoEConfig(top_k=3))).moe == MoEConfig(top_k=3)


def test_bench_moe_reports_ratios_against_the_naive_loop(tmp_path):
    import json

    import datetime as dt

    from minillm.bench import main
    from minillm.cost import hardware_id

    # Today's file from another machine with the same hardware_id (another VM generation) must be kept.
    other = tmp_path / f"moe-{hardware_id()}-top2-h16-{dt.date.today().isoformat()}.json"
    other.write_text(json.dumps({"hardware": "CPU: another machine", "rows": []}))
    result = main(["moe", "--experts", "4,16", "--tokens", "64", "--d-model", "32", "--expert-hidden", "16",
                   "--top-k", "2", "--repeats", "1", "--out-dir", str(tmp_path), "--default-malloc"])
    assert result["freed_memory_kept"] is False          # --default-malloc leaves this process's allocator alone
    assert [row["experts"] for row in result["rows"]] == [4, 16]
    assert json.loads(open(result["path"]).read())["rows"] == result["rows"]
    assert result["path"] == str(other.with_name(other.stem + "-2.json"))
    assert json.loads(other.read_text())["hardware"] == "CPU: another machine"
    # The 2x target is judged at 16+ experts only, from the measured ratios.
    assert result["targets"]["sorted >= 2x the naive loop at 16+ experts"] == {
        "16": result["rows"][1]["vs_naive_loop"] >= 2.0}
    for row in result["rows"]:
        assert row["sorted_tokens_per_second"] > 0 and row["naive_loop_tokens_per_second"] > 0
        assert row["autograd_slices_tokens_per_second"] > 0 and row["matmul_floor_tokens_per_second"] > 0
        assert row["floor_vs_naive_loop"] == pytest.approx(row["matmul_floor_tokens_per_second"]
                                                           / row["naive_loop_tokens_per_second"])
        assert row["vs_naive_loop"] == pytest.approx(row["sorted_tokens_per_second"]
                                                     / row["naive_loop_tokens_per_second"])
        assert row["vs_matmul_floor"] == pytest.approx(row["sorted_tokens_per_second"]
                                                       / row["matmul_floor_tokens_per_second"])
        # the layout the fused dispatch used: padded exactly when padding adds at most PAD_LIMIT of the rows
        assert row["padding_fraction"] >= 0
        assert (row["layout"] == "padded") == (row["padding_fraction"] <= PAD_LIMIT)


@pytest.mark.parametrize("gemm", ["blas", "onednn"])
def test_bench_moe_shows_what_the_matrix_library_gives_where_it_multiplies_with_onednn(gemm, monkeypatch):
    import minillm.moe as moe
    from minillm.bench_moe import bench_moe

    if gemm == "onednn" and moe._onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn)")
    monkeypatch.setenv(moe.CPU_GEMM_ENV, gemm)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))      # padded rows whatever the routing: oneDNN's path
    result = bench_moe(experts="4", tokens=64, d_model=32, expert_hidden=16, top_k=2, repeats=1,
                       device="cpu", default_malloc=True)
    row = result["rows"][0]
    assert result["cpu_gemm"] == gemm and row["cpu_gemm"] == gemm and row["layout"] == "padded"
    blas_columns = {"sorted_blas_tokens_per_second", "matmul_floor_blas_tokens_per_second", "blas_vs_naive_loop",
                    "blas_floor_vs_naive_loop"}
    if gemm == "blas":
        assert not blas_columns & set(row) and "fresh_routing_ms_per_step" not in row
    else:   # the same dispatch and floor with torch.bmm beside them, and steps with fresh routing
        assert blas_columns <= set(row)
        fresh = row["fresh_routing_ms_per_step"]
        assert set(fresh) == {"onednn_rounded", "onednn_exact", "blas"} and min(fresh.values()) > 0
        assert moe.ONEDNN_ROWS_PER_GRANULE == 64   # put back after the exact-count steps
        assert row["blas_vs_naive_loop"] == pytest.approx(row["sorted_blas_tokens_per_second"]
                                                          / row["naive_loop_tokens_per_second"])


def test_bench_moe_times_onednn_beside_where_auto_timed_it_slower_and_kept_bmm(monkeypatch, capsys):
    import minillm.bench_moe as bench
    import minillm.moe as moe

    if moe._onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn)")
    slower = {"onednn": 3.25, "blas": 2.5}
    monkeypatch.delenv(moe.CPU_GEMM_ENV, raising=False)
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)       # as on an AMD CPU with AVX-512
    monkeypatch.setattr(moe, "cpu_gemm_trial", lambda: slower)
    monkeypatch.setattr(bench, "cpu_gemm_trial", lambda: slower)
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))
    monkeypatch.setattr(bench, "ONEDNN_MIN_WORK", 1)                   # the bench's tiny sizes count as big ones
    result = bench.bench_moe(experts="4", tokens=64, d_model=32, expert_hidden=16, top_k=2, repeats=1,
                             device="cpu", default_malloc=True)
    row = result["rows"][0]
    assert result["cpu_gemm"] == "blas" and row["cpu_gemm"] == "blas" and result["cpu_gemm_trial_ms"] == slower
    assert {"sorted_onednn_tokens_per_second", "matmul_floor_onednn_tokens_per_second", "onednn_vs_naive_loop",
            "onednn_floor_vs_naive_loop"} <= set(row) and "sorted_blas_tokens_per_second" not in row
    assert row["onednn_vs_naive_loop"] == pytest.approx(row["sorted_onednn_tokens_per_second"]
                                                        / row["naive_loop_tokens_per_second"])
    assert set(row["fresh_routing_ms_per_step"]) == {"onednn_rounded", "onednn_exact", "blas"}
    printed = capsys.readouterr().out
    assert "oneDNN 3.2 ms, torch.bmm 2.5 ms" in printed and "with oneDNN instead of torch.bmm: sorted" in printed


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts="a,b"), "--experts='a,b' must be comma-separated whole numbers"),
    (dict(top_k=0), "--top-k=0 must be a whole number >= 1"),
    (dict(tokens=2.5), "--tokens=2.5 must be a whole number >= 1"),
    (dict(experts="4", top_k=8), "must list expert counts >= top_k=8")])
def test_bench_moe_called_directly_refuses_bad_sizes_before_printing(kwargs, message, capsys):
    from minillm.bench_moe import bench_moe
    with pytest.raises(ValueError, match=re.escape(message)):
        bench_moe(**kwargs)
    assert capsys.readouterr().out == ""   # refused before the run's header line


@pytest.mark.parametrize("dispatch", ["fused", "grouped", "slices"])
def test_layer_matches_transformers_deepseek_v3_moe_block(dispatch, layout):
    """A peer implementation as reference: transformers' DeepseekV3MoE with the same weights and bias."""
    pytest.importorskip("transformers", reason="transformers (the `bench` extra) is the reference here")
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        pytest.skip("this transformers has no DeepSeek-V3 model")
    layer = make_layer(n_routed=8, n_shared=1, top_k=3, expert_hidden=12, route_scale=2.5, n_groups=4, top_groups=2,
                       bias_update_rate=0.01, dispatch=dispatch).double()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.linspace(-0.2, 0.3, 8))      # the bias must steer both the same way
    config = DeepseekV3Config(hidden_size=16, moe_intermediate_size=12, n_routed_experts=8, n_shared_experts=1,
                              num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              norm_topk_prob=True, hidden_act="silu")
    peer = DeepseekV3MoE(config).double()
    shared = 12
    with torch.no_grad():
        peer.gate.weight.copy_(layer.router.weight)
        peer.gate.e_score_correction_bias.copy_(layer.expert_bias)
        peer.experts.gate_up_proj.copy_(layer.w_gate_up.transpose(1, 2))
        peer.experts.down_proj.copy_(layer.w_down.transpose(1, 2))
        peer.shared_experts.gate_proj.weight.copy_(layer.shared_gate_up.weight[:shared])
        peer.shared_experts.up_proj.weight.copy_(layer.shared_gate_up.weight[shared:])
        peer.shared_experts.down_proj.weight.copy_(layer.shared_down.weight)
    torch.manual_seed(5)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = layer(x_ours), peer(x_peer)
    # Both compute the router's sigmoid in float32 (as DeepSeek does), so agreement is to float32 precision.
    close = dict(rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.last_routing.expert_index.sort(1).values, peer.gate(x)[2].sort(1).values)
    torch.testing.assert_close(ours, theirs, **close)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_peer.grad, **close)
    torch.testing.assert_close(layer.w_gate_up.grad, peer.experts.gate_up_proj.grad.transpose(1, 2), **close)
    torch.testing.assert_close(layer.w_down.grad, peer.experts.down_proj.grad.transpose(1, 2), **close)
    torch.testing.assert_close(layer.router.weight.grad, peer.gate.weight.grad, **close)


def _deepseek_v3_peer(layer: MoE):
    """transformers' DeepseekV3MoE holding `layer`'s weights and bias (shared experts zeroed when n_shared=0)."""
    pytest.importorskip("transformers", reason="transformers (the `bench` extra) is the reference here")
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        pytest.skip("this transformers has no DeepSeek-V3 model")
    c = layer.config
    config = DeepseekV3Config(hidden_size=layer.n_embd, moe_intermediate_size=c.expert_hidden,
                              n_routed_experts=c.n_routed, n_shared_experts=max(c.n_shared, 1),
                              num_experts_per_tok=c.top_k, n_group=c.n_groups, topk_group=c.top_groups,
                              routed_scaling_factor=c.route_scale, norm_topk_prob=True, hidden_act="silu")
    peer = DeepseekV3MoE(config).to(layer.w_down.dtype)
    shared = c.n_shared * c.expert_hidden
    with torch.no_grad():
        peer.gate.weight.copy_(layer.router.weight)
        peer.gate.e_score_correction_bias.copy_(layer.expert_bias)
        peer.experts.gate_up_proj.copy_(layer.w_gate_up.transpose(1, 2))
        peer.experts.down_proj.copy_(layer.w_down.transpose(1, 2))
        if c.n_shared:
            peer.shared_experts.gate_proj.weight.copy_(layer.shared_gate_up.weight[:shared])
            peer.shared_experts.up_proj.weight.copy_(layer.shared_gate_up.weight[shared:])
            peer.shared_experts.down_proj.weight.copy_(layer.shared_down.weight)
        else:
            for p in peer.shared_experts.parameters():
                p.zero_()
    return peer


@pytest.mark.parametrize("overrides, shape", [
    (dict(n_routed=16, n_shared=2, top_k=4), (2, 7)),                                   # no groups
    (dict(n_routed=16, n_shared=0, top_k=6, n_groups=8, top_groups=3), (2, 7)),         # no shared expert
    (dict(n_routed=8, n_shared=1, top_k=8), (1, 5)),                                    # every expert chosen
    (dict(n_routed=8, n_shared=1, top_k=2, n_groups=2, top_groups=1, route_scale=2.5), (13,)),  # (time, d) input
    (dict(n_routed=8, n_shared=1, top_k=3, n_groups=4, top_groups=2, bias_update_rate=0.0), (2, 6)),  # bias, no update
])
def test_layer_matches_transformers_deepseek_v3_on_more_configs(overrides, shape):
    layer = make_layer(**{"expert_hidden": 8, "bias_update_rate": 0.01, **overrides}).double()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.linspace(-0.2, 0.3, layer.config.n_routed))
    peer = _deepseek_v3_peer(layer)
    torch.manual_seed(9)
    x = torch.randn(*shape, 16, dtype=torch.float64)
    ours = layer(x)
    theirs = peer(x.reshape(-1, *x.shape[-2:])).reshape(ours.shape)
    assert torch.equal(layer.last_routing.expert_index.sort(1).values, peer.gate(x.reshape(-1, 16))[2].sort(1).values)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)   # transformers routes in float32


def test_a_float64_router_stays_float64_so_the_layer_passes_gradcheck():
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert route(logits, None, 3).affinity.dtype == torch.float64
    assert route(logits.float(), None, 3).affinity.dtype == torch.float32
    assert route(logits.bfloat16(), None, 3).affinity.dtype == torch.float32   # at least float32, as DeepSeek
    assert torch.autograd.gradcheck(lambda t: route(t, torch.zeros(8), 3, 2.5, 4, 2).gate_weight, (logits,))
    layer = make_layer(n_embd=6, n_routed=4, top_k=2, expert_hidden=3, n_groups=2, top_groups=1,
                       aux_loss_weight=0.1).double().train()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    names = ("router.weight", "w_gate_up", "w_down")
    params = tuple(dict(layer.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def forward(*weights):
        out = torch.func.functional_call(layer, dict(zip(names, weights)), (x,))
        return out, layer.aux_loss
    assert torch.autograd.gradcheck(forward, params)


def test_fused_dispatch_of_float64_under_autocast_stays_float64_like_the_other_dispatches(layout):
    layer = make_layer().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = layer(x)
    for kind in ("fused", "grouped", "slices"):   # autocast leaves float64 matmuls alone: so must the fused one
        layer.config.dispatch = kind
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_expert_bias_steers_the_choice_even_with_bias_updates_switched_off():
    layer = make_layer(n_routed=4, top_k=1, bias_update_rate=0.0)     # e.g. a loaded, trained bias, frozen
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    layer(torch.randn(2, 6, 16))
    assert (layer.last_routing.expert_index == 2).all()
    layer.train()
    layer(torch.randn(2, 6, 16))
    layer.after_optimizer_step()                                      # ... and it does not move
    assert torch.equal(layer.expert_bias, torch.tensor([0.0, 0.0, 10.0, 0.0]))


def test_balance_loss_counts_sequences_of_empty_batches_and_of_4d_inputs():
    layer = make_layer(aux_loss_weight=0.01).train()
    assert layer(torch.randn(0, 5, 16)).shape == (0, 5, 16)           # no sequences at all: zero loss, no error
    assert layer.aux_loss.item() == 0.0
    x = torch.randn(2, 3, 4, 16)                                      # 6 sequences of 4 tokens
    layer(x)
    four_d = layer.aux_loss
    layer(x.reshape(6, 4, 16))
    torch.testing.assert_close(four_d, layer.aux_loss)


def test_a_layer_with_an_aux_loss_can_be_deep_copied_and_pickled_after_a_training_forward():
    import copy
    import pickle

    layer = make_layer(aux_loss_weight=0.01).train()
    layer(torch.randn(2, 5, 16))
    assert layer.aux_loss.grad_fn is not None
    clone = copy.deepcopy(layer)
    assert clone.aux_loss is None and layer.aux_loss is not None     # the original keeps its loss to backward
    restored = pickle.loads(pickle.dumps(layer))
    x = torch.randn(1, 4, 16)
    for other in (clone, restored):
        torch.testing.assert_close(other.eval()(x), layer.eval()(x))
        assert torch.equal(other.expert_bias, layer.expert_bias)


def test_dispatch_refuses_expert_ids_and_shapes_it_cannot_take_instead_of_misrouting():
    layer = make_layer(n_shared=0, n_routed=4)
    x, gate = torch.randn(5, 16), torch.rand(5, 1)
    for runner in (run_experts_on_slices, run_experts_grouped):
        def run(xs, counts, runner=runner):
            return runner(xs, counts, layer.w_gate_up, layer.w_down)
        index = torch.tensor([[0], [3], [1], [3], [2]])
        with pytest.raises(ValueError, match=r"gate_weight \(tokens, top_k\)"):   # (tokens,): all onto token 0
            sorted_dispatch(x, index[:, 0], gate[:, 0], run, 4)
        with pytest.raises(ValueError, match="ids up to 5, but there are 4 experts"):
            sorted_dispatch(x, index + 2, gate, run, 4)
        with pytest.raises(ValueError, match="ids 0 to 3"):
            sorted_dispatch(x, index - 1, gate, run, 4)
        with pytest.raises(ValueError, match="expert_index and gate_weight"):
            sorted_dispatch(x, index, gate[:3], run, 4)
        torch.testing.assert_close(sorted_dispatch(x, index.int(), gate, run, 4),
                                   per_expert_mask_loop(x, index, gate, layer.w_gate_up, layer.w_down))
    with pytest.raises(ValueError, match=r"shape \(tokens, top_k\).*unsqueeze\(1\)"):
        sort_by_expert(torch.tensor([0, 1, 1]), 4)


def test_layer_and_route_refuse_bad_arguments_with_errors_that_say_what_to_do():
    with pytest.raises(ValueError, match="one bias per expert"):
        route(torch.randn(5, 8), torch.zeros(7), 2)
    for n_embd in (0, -1, 16.0, True):
        with pytest.raises(ValueError, match="n_embd"):
            MoE(n_embd, MoEConfig(n_routed=4, top_k=2))
    np = pytest.importorskip("numpy")
    assert MoE(np.int64(8), MoEConfig(n_routed=4, top_k=2)).n_embd == 8
    layer = make_layer()
    with pytest.raises(ValueError, match="0-d"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="expected a tensor"):
        layer([[0.0] * 16])
    layer.config = dataclasses.replace(layer.config)
    layer.config.dispatch = "sorted"                                  # set after the config checked it
    with pytest.raises(ValueError, match="dispatch='sorted' is unknown"):
        layer(torch.randn(1, 3, 16))
    meta = make_layer().to("meta")
    with pytest.raises(ValueError, match="meta device"):
        meta(torch.randn(1, 3, 16, device="meta"))


def test_balancing_helpers_take_lists_and_small_integer_indices():
    assert load_imbalance([10, 2, 4, 4]) == pytest.approx(2.0)
    torch.testing.assert_close(update_bias(torch.zeros(4), [10, 2, 4, 4], 0.1), torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    affinity, index = torch.rand(6, 8), torch.randint(0, 8, (6, 2))
    expected = sequence_balance_loss(affinity, index, 2, 0.1)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(sequence_balance_loss(affinity, index.to(dtype), 2, 0.1), expected)
    with pytest.raises(ValueError, match=r"affinity must be \(tokens, n_routed\)"):
        sequence_balance_loss(affinity[0], index[:1], 1, 0.1)


# --- GPU only (run by benchmarks/gpu_check.sh on a lent GPU; skipped on CPU-only machines such as CI) ------

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_every_dispatch_agrees_with_the_autograd_slices_on_a_gpu(autocast):
    # On CUDA "auto" picks the padded batched GEMM or the fused dispatch (torch's grouped_mm where it takes
    # the inputs), and "triton" runs minillm's grouped-GEMM kernels compiled: all against "slices" on the
    # same layer, uneven loads and idle experts included (200 tokens over 32 experts).
    layer = make_layer(n_routed=32, top_k=4, n_shared=1).cuda()
    x = torch.randn(2, 100, 16, device="cuda", requires_grad=True)
    tolerance = dict(rtol=1e-3, atol=1e-3)   # float32 (TF32 only if torch allows it)
    results = {}
    for kind in ("slices", "auto", "fused", "grouped", "triton"):
        layer.config.dispatch = kind
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.float().square().sum().backward()
        results[kind] = [out.float(), x.grad, layer.router.weight.grad, layer.w_gate_up.grad, layer.w_down.grad]
    for kind, got in results.items():
        for name, value, expected in zip(("out", "x", "router", "w_gate_up", "w_down"), got, results["slices"]):
            if autocast:   # bf16 rounds in a different order per dispatch: compare whole tensors
                error = ((value.float() - expected.float()).norm() / expected.float().norm()).item()
                assert error < 2e-2, f"dispatch={kind}, {name}: relative error {error:.3g} under bf16 autocast"
            else:
                torch.testing.assert_close(value, expected, **tolerance,
                                           msg=lambda m, kind=kind, name=name: f"dispatch={kind}, {name}: {m}")


@gpu_only
@pytest.mark.gpu
def test_fused_dispatch_in_both_layouts_matches_the_mask_loop_on_a_gpu(monkeypatch):
    import minillm.moe as moe

    torch.manual_seed(3)
    tokens, n_routed, top_k, width, hidden = 96, 16, 4, 32, 24
    even = ((torch.arange(tokens).unsqueeze(1) * top_k + torch.arange(top_k)) % n_routed).cuda()
    x = torch.randn(tokens, width, device="cuda", requires_grad=True)
    gate = torch.rand(tokens, top_k, device="cuda", requires_grad=True)
    w1 = (torch.randn(n_routed, width, 2 * hidden, device="cuda") * 0.3).requires_grad_()
    w2 = (torch.randn(n_routed, hidden, width, device="cuda") * 0.3).requires_grad_()
    inputs = (x, gate, w1, w2)
    expected = per_expert_mask_loop(x, even, gate, w1, w2)
    expected = [expected] + list(torch.autograd.grad(expected.square().sum(), inputs))
    assert moe._pair_layout(even, n_routed, pad=True).capacity == tokens * top_k // n_routed
    for limit in (1 / 8, -1.0):   # the even load padded (batched matmuls), then grouped
        monkeypatch.setattr(moe, "PAD_LIMIT", limit)
        out = fused_dispatch(x, even, gate, w1, w2)
        got = [out] + list(torch.autograd.grad(out.square().sum(), inputs))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@gpu_only
@pytest.mark.gpu
def test_moe_gpt_trains_on_a_gpu():
    torch.manual_seed(0)
    pattern = torch.arange(4000) % 7 + (torch.arange(4000) // 7) % 3
    model = GPT(tiny_moe_config()).cuda()
    before = estimate_loss(model, pattern, 16, 8, 4)
    config = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=2, eval_interval=40, eval_batches=4,
                         progress=False, device="cuda")
    result = train(model, pattern, pattern, config)
    assert result.final_val_loss < 0.6 * before
    assert len(model.moe_layers()[0].load_history) == 40


def test_config_takes_numpy_numbers_as_python_ones():
    np = pytest.importorskip("numpy")
    config = MoEConfig(n_routed=np.int64(8), top_k=np.int32(2), expert_hidden=np.int16(4), n_shared=np.uint8(0),
                       route_scale=np.float32(2.5), bias_update_rate=np.float64(0.001))
    assert config == MoEConfig(n_routed=8, top_k=2, expert_hidden=4, n_shared=0, route_scale=2.5,
                               bias_update_rate=0.001)
    assert all(type(v) in (int, float, str) for v in dataclasses.asdict(config).values())
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_routed=8, top_k=np.float64(2.5))


def test_cpu_gemm_takes_onednn_only_where_mkl_would_skip_avx512_and_says_what_is_wrong(monkeypatch):
    import minillm.moe as moe

    mkl = "  - Build settings: BLAS_INFO=mkl, BUILD_TYPE=Release"
    assert moe._mkl_skips_avx512("x86_64", "AVX512", mkl, "AuthenticAMD")
    assert moe._mkl_skips_avx512("AMD64", "avx512", mkl, "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD")
    assert not moe._mkl_skips_avx512("x86_64", "AVX512", mkl, "GenuineIntel")    # MKL's own AVX-512 code
    assert not moe._mkl_skips_avx512("x86_64", "AVX2", mkl, "AuthenticAMD")      # no AVX-512 to skip
    assert not moe._mkl_skips_avx512("x86_64", "AVX512", "BLAS_INFO=open", "AuthenticAMD")   # OpenBLAS
    assert not moe._mkl_skips_avx512("aarch64", "DEFAULT", mkl, "")
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "blas")
    assert moe.cpu_gemm() == "blas"
    monkeypatch.setenv(moe.CPU_GEMM_ENV, " oneDNN ")
    if moe._onednn_linear() is not None:
        assert moe.cpu_gemm() == "onednn"
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "mkl")
    with pytest.raises(ValueError, match="MINILLM_CPU_GEMM='mkl' is not one of auto, onednn, blas"):
        moe.cpu_gemm()
    monkeypatch.setattr(moe, "_onednn_linear", lambda: None)
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "onednn")
    with pytest.raises(ValueError, match="no oneDNN"):
        moe.cpu_gemm()
    monkeypatch.delenv(moe.CPU_GEMM_ENV)
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)
    monkeypatch.setattr(moe, "cpu_gemm_trial", lambda: {"onednn": 1.0, "blas": 2.0})   # oneDNN timed faster
    assert moe.cpu_gemm() == "onednn"
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: False)
    assert moe.cpu_gemm() == "blas"
    monkeypatch.setenv(moe.CPU_GEMM_ENV, "nonsense")          # a block's choice comes before the variable
    with moe.using_cpu_gemm("BLAS"):
        assert moe.cpu_gemm() == "blas"
        with moe.using_cpu_gemm("auto"):
            assert moe.cpu_gemm() == "blas"
        assert moe.cpu_gemm() == "blas"
    with pytest.raises(ValueError, match="nonsense"):
        moe.cpu_gemm()                                           # and ends with the block
    with pytest.raises(ValueError, match="using_cpu_gemm: 'mkl' is not one of auto, onednn, blas"):
        with moe.using_cpu_gemm("mkl"):
            pass
    with pytest.raises(ValueError, match="no oneDNN"):            # _onednn_linear is None here
        with moe.using_cpu_gemm("onednn"):
            pass
    assert not moe._cpu_gemm_chosen()


def test_auto_takes_onednn_only_where_its_trial_timed_it_faster_and_times_nothing_elsewhere(monkeypatch):
    import minillm.moe as moe

    real_trial = moe.cpu_gemm_trial
    monkeypatch.delenv(moe.CPU_GEMM_ENV, raising=False)
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)
    gain = moe.ONEDNN_MIN_GAIN
    for trial, expected in [({"onednn": 1.0, "blas": 2.0}, "onednn"), ({"onednn": 1.0, "blas": gain}, "onednn"),
                            ({"onednn": 1.0, "blas": (1 + gain) / 2}, "blas"),   # faster, but within the wobble
                            ({"onednn": 2.0, "blas": 1.0}, "blas"), (None, "blas")]:
        monkeypatch.setattr(moe, "cpu_gemm_trial", lambda trial=trial: trial)
        assert moe.cpu_gemm() == expected and moe.cpu_gemm(1 << 30) == expected, trial
        assert moe.cpu_gemm(moe.ONEDNN_MIN_WORK - 1) == "blas"      # small products never need the trial
    monkeypatch.setattr(moe, "cpu_gemm_trial", real_trial)
    monkeypatch.setattr(moe, "_timed_trial", lambda threads: pytest.fail("timed a trial nobody needs"))
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: False)   # Intel, ARM, or no oneDNN: no trial at all
    assert moe.cpu_gemm_trial() is None and moe.cpu_gemm() == "blas" and moe.cpu_gemm(1 << 30) == "blas"
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)
    with moe.using_cpu_gemm("blas"):                                 # a chosen library needs no trial either
        assert moe.cpu_gemm(1 << 30) == "blas"
    with moe.using_cpu_gemm("auto"):                                 # nor entering a block: only a big product
        assert moe.cpu_gemm(moe.ONEDNN_MIN_WORK - 1) == "blas"


def test_the_trial_times_both_libraries_once_per_thread_count_and_gives_up_quietly(monkeypatch):
    import minillm.moe as moe

    if moe._onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn)")
    real, seen = moe._six_products, []

    def products(*args):
        seen.append(moe.cpu_gemm(1))    # inside the trial's using_cpu_gemm block: the library being timed
        return real(*args)

    monkeypatch.setattr(moe, "_six_products", products)
    monkeypatch.setattr(moe, "ONEDNN_TRIAL_SHAPE", (2, 64, 32, 16))   # small: a test, not a measurement
    monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)
    moe._timed_trial.cache_clear()
    try:
        with FlopCounterMode(display=False) as flops:   # a FLOP count around a first forward counts no trial
            trial = moe.cpu_gemm_trial()
        assert set(trial) == {"onednn", "blas"} and min(trial.values()) > 0 and flops.get_total_flops() == 0
        assert sorted(set(seen)) == ["blas", "onednn"] and len(seen) == 2 * (1 + moe.ONEDNN_TRIAL_ROUNDS)
        trial["onednn"] = -1.0                                   # a caller's change does not reach the kept one
        assert moe.cpu_gemm_trial()["onednn"] > 0 and len(seen) == 2 * (1 + moe.ONEDNN_TRIAL_ROUNDS)   # kept
        assert not moe._cpu_gemm_chosen() and torch.is_grad_enabled()
        assert moe._timed_trial(torch.get_num_threads()) == moe.cpu_gemm_trial()
        moe._timed_trial.cache_clear()

        def refused(*args):
            if moe.cpu_gemm(1) == "onednn":
                raise RuntimeError("onednn: could not create a primitive")
            return real(*args)

        monkeypatch.setattr(moe, "_six_products", refused)
        monkeypatch.delenv(moe.CPU_GEMM_ENV, raising=False)
        assert moe.cpu_gemm_trial() is None and moe.cpu_gemm(1 << 30) == "blas"
        assert not moe._cpu_gemm_chosen()
    finally:
        moe._timed_trial.cache_clear()


@pytest.mark.parametrize("tokens,n_routed,top_k,hidden", [(64, 8, 2, 16), (90, 16, 8, 6), (37, 4, 3, 66)])
def test_fused_dispatch_with_onednn_matches_the_batched_matmuls_and_the_mask_loop(monkeypatch, tokens, n_routed,
                                                                                   top_k, hidden):
    import minillm.moe as moe

    if moe._onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn)")
    monkeypatch.setattr(moe, "PAD_LIMIT", float("inf"))    # padded rows whatever the load: the oneDNN path
    torch.manual_seed(tokens)
    width = 24
    index = torch.stack([torch.randperm(n_routed)[:top_k] for _ in range(tokens)])
    index[: tokens // 3, 0] = 0                             # uneven: expert 0 the busiest, others padded
    x = torch.randn(tokens, width, requires_grad=True)
    gate = torch.rand(tokens, top_k, requires_grad=True)
    w1 = (torch.randn(n_routed, width, 2 * hidden) * 0.3).requires_grad_()
    w2 = (torch.randn(n_routed, hidden, width) * 0.3).requires_grad_()
    inputs = (x, gate, w1, w2)

    real_linear, real_bmm, calls = moe._onednn_linear(), torch.bmm, []
    monkeypatch.setattr(moe, "_onednn_linear", lambda: lambda *a: calls.append("onednn") or real_linear(*a))
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append("bmm") or real_bmm(*a, **k))

    def run(gemm):
        calls.clear()
        with moe.using_cpu_gemm(gemm):
            out = fused_dispatch(x, index, gate, w1, w2)
            result = [out, *torch.autograd.grad(out.square().sum(), inputs)]
        return result, set(calls)

    (onednn, used), (blas, used_blas) = run("onednn"), run("blas")
    assert used == {"onednn"} and used_blas == {"bmm"}
    reference = per_expert_mask_loop(x, index, gate, w1, w2)
    expected = [reference, *torch.autograd.grad(reference.square().sum(), inputs)]
    for got, same, want in zip(onednn, blas, expected):
        torch.testing.assert_close(got, same, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
        assert got.is_contiguous()


def test_padded_rows_round_up_to_a_granule_so_that_onednn_meets_few_shapes_as_the_routing_changes():
    # before: the padded layout took the busiest expert's exact count, which changes with every step's routing,
    # and oneDNN built a new primitive for each new shape (as costly as the product at these sizes)
    import minillm.moe as moe

    torch.manual_seed(0)
    tokens, n_routed, top_k, granule = 2048, 16, 8, 32
    exact_capacities, rounded_capacities = set(), set()
    for _ in range(20):
        index = torch.rand(tokens, n_routed).topk(top_k, dim=-1).indices   # a fresh routing, as in training
        exact = moe._pair_layout(index, n_routed, pad=True)
        rounded = moe._pair_layout(index, n_routed, pad=True, granule=granule)
        assert rounded.capacity % granule == 0 and exact.capacity <= rounded.capacity < exact.capacity + granule
        assert rounded.padding == pytest.approx((n_routed * rounded.capacity - tokens * top_k) / (tokens * top_k))
        assert rounded.token_of_row.numel() == n_routed * rounded.capacity
        assert rounded.pad_rows.numel() == n_routed * rounded.capacity - tokens * top_k
        exact_capacities.add(exact.capacity)
        rounded_capacities.add(rounded.capacity)
    assert len(rounded_capacities) <= 3 < len(exact_capacities)
    # where rounding would pad more than PAD_LIMIT of the rows, the exact count stays (16 rows, not 32)
    even = (torch.arange(64).unsqueeze(1) * 2 + torch.arange(2)) % 8
    assert moe._pair_layout(even, 8, pad=True, granule=granule).capacity == 16


def test_rows_round_up_only_where_onednn_multiplies_them(monkeypatch):
    import minillm.moe as moe

    if moe._onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn)")
    cpu, f32 = torch.device("cpu"), torch.float32
    with moe.using_cpu_gemm("onednn"):
        assert moe._row_granule(f32, cpu, 256, 128, 16, 16384) == 16      # 1024 rows an expert: 1024 / 64
        assert moe._row_granule(f32, cpu, 256, 128, 16, 16384 * 2 - 16) == 16   # 2047 rows: not yet 32
        assert moe._row_granule(f32, cpu, 256, 128, 16, 16384 * 4) == 64
        assert moe._row_granule(f32, cpu, 256, 128, 16, 16 * 40) == 1        # 40 rows: no rounding
        assert moe._row_granule(torch.bfloat16, cpu, 256, 128, 16, 16384) == 1   # oneDNN takes float32 only
        assert moe._row_granule(f32, torch.device("meta"), 256, 128, 16, 16384) == 1
        assert moe._row_granule(f32, cpu, 256, 128, 16, 0) == 1
    with moe.using_cpu_gemm("blas"):
        assert moe._row_granule(f32, cpu, 256, 128, 16, 16384) == 1
    with moe.using_cpu_gemm("auto"):   # auto: from ONEDNN_MIN_WORK up, on a CPU where MKL skips AVX-512
        monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: True)
        monkeypatch.setattr(moe, "cpu_gemm_trial", lambda: {"onednn": 1.0, "blas": 2.0})   # oneDNN timed faster
        assert moe._row_granule(f32, cpu, 256, 128, 16, 16384) == 16
        assert moe._row_granule(f32, cpu, 16, 8, 16, 16384) == 1                # too small for oneDNN
        monkeypatch.setattr(moe, "_blas_skips_avx512", lambda: False)
        assert moe._row_granule(f32, cpu, 256, 128, 16, 16384) == 1

    # the dispatch lays its rows out with the granule, and the result is the batched matmuls' result
    torch.manual_seed(1)
    tokens, n_routed, top_k, width, hidden = 1001, 4, 2, 8, 6
    index = (torch.arange(tokens).unsqueeze(1) * top_k + torch.arange(top_k)) % n_routed   # 501 or 500 rows each
    x, gate = torch.randn(tokens, width), torch.rand(tokens, top_k)
    w1, w2 = torch.randn(n_routed, width, 2 * hidden) * 0.3, torch.randn(n_routed, hidden, width) * 0.3
    capacities, real_layout = [], moe._pair_layout
    monkeypatch.setattr(moe, "_pair_layout", lambda *a, **k: capacities.append(real_layout(*a, **k).capacity)
                        or real_layout(*a, **k))
    results = {}
    for gemm in ("onednn", "blas"):
        with moe.using_cpu_gemm(gemm):
            results[gemm] = fused_dispatch(x, index, gate, w1, w2)
    exact = real_layout(index, n_routed, pad=True).capacity
    assert exact == 501 and capacities == [504, 501]   # 501 rows on average: a granule of 4
    torch.testing.assert_close(results["onednn"], results["blas"], rtol=1e-4, atol=1e-5)


def test_only_forwards_that_can_be_trained_on_count_toward_the_bias_update():
    # before: a forward under torch.no_grad() in training mode (a quick look without model.eval()) added its
    # tokens to the load that sets the next bias update
    layer = make_layer(n_routed=4, top_k=2, bias_update_rate=0.1)
    layer.train()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        layer(x)
    assert int(layer.step_load.sum()) == 0
    layer(x).sum().backward()
    assert int(layer.step_load.sum()) == 2 * 5 * 2
    layer.after_optimizer_step()
    assert layer.load_history[-1] == layer.last_routing.expert_index.reshape(-1).bincount(minlength=4).tolist()


@pytest.mark.parametrize("dispatch", ["fused", "grouped", "slices"])
def test_compiled_layer_matches_eager_and_compiles_once(dispatch):
    """torch.compile of a MoE layer: same output, gradients and load counts as eager, and no recompilation when
    the next batch routes its tokens differently (the experts' token counts change every step)."""
    dynamo = pytest.importorskip("torch._dynamo")
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(n_routed=8, top_k=2, n_shared=1, expert_hidden=8, dispatch=dispatch))
    compiled = torch.compile(layer)
    dynamo.reset()
    for seed in range(3):   # a new routing each time; after the first call every recompile is an error
        x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        layer.reset_load()
        expected = layer(x)
        grads = torch.autograd.grad(expected.square().sum(), [x, layer.w_gate_up, layer.router.weight])
        load = layer.step_load.clone()
        layer.reset_load()
        with dynamo.config.patch(error_on_recompile=seed > 0):
            got = compiled(x)
        got_grads = torch.autograd.grad(got.square().sum(), [x, layer.w_gate_up, layer.router.weight])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for g, e in zip(got_grads, grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.step_load, load)


@pytest.mark.parametrize("dispatch", ["fused", "grouped", "slices"])
def test_an_empty_batch_gives_every_dispatch_zero_weight_gradients_not_none(dispatch):
    # before: dispatch="slices" left the experts' .grad at None on an empty batch, where the others gave zeros
    layer = make_layer(n_routed=4, top_k=2, n_shared=0, dispatch=dispatch)
    x = torch.randn(2, 0, 16, requires_grad=True)
    layer(x).sum().backward()
    for weight in (layer.w_gate_up, layer.w_down):
        assert weight.grad is not None and weight.grad.shape == weight.shape and not weight.grad.any()
