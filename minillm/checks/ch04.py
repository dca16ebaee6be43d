"""Checks for chapter 04 (mixture of experts): the sigmoid router, the bias update, the sorted dispatch."""
from __future__ import annotations

import torch

from ..grading import expect_close, expect_unchanged, exercise, snapshot
from ..moe import MoE, MoEConfig, reference_moe_loop, route, update_bias


def _as_pair(answer, what: str):
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2):
        got = f"{type(answer).__name__} of length {len(answer)}" if isinstance(answer, (tuple, list)) \
            else type(answer).__name__
        raise AssertionError(f"{what}: expected a pair (expert_index, gate_weight), got {got}. "
                             "Hint: return expert_index, gate_weight")
    return tuple(answer)


def _routing_answer(route_tokens, logits, bias, top_k, scale, what):
    """The student's (expert_index, gate_weight) for these inputs, refused unless both are (tokens, top_k) tensors
    and the inputs are left as they were."""
    tokens = logits.shape[0]
    saved = snapshot(logits=logits, bias=bias)
    answer = route_tokens(logits, bias, top_k, scale)
    expect_unchanged(saved, what, hint="torch.sigmoid(logits) and affinity + bias make new tensors; "
                                       "logits.sigmoid_() and bias.add_() overwrite the router's")
    index, weight = _as_pair(answer, f"route(..., top_k={top_k})")
    if not isinstance(index, torch.Tensor) or index.shape != (tokens, top_k):
        raise AssertionError(f"{what}: expert_index must be a tensor of shape {(tokens, top_k)}. "
                             "Hint: torch.topk(..., top_k, dim=-1).indices")
    if not isinstance(weight, torch.Tensor) or weight.shape != (tokens, top_k):
        shape = f" of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
        raise AssertionError(f"{what}: gate_weight must be a tensor of shape {(tokens, top_k)}, got "
                             f"{type(weight).__name__}{shape}. Hint: gather the chosen experts' affinities "
                             "with affinity.gather(1, expert_index) and keep them as a tensor (no .tolist())")
    return index.long(), weight


_WEIGHT_HINT = ("weights come from the UNBIASED sigmoid affinities of the chosen experts, divided by their sum "
                "(over the top_k chosen ones only), times route_scale")


def _check_tied_routing(route_tokens) -> None:
    """Scores that tie at the top_k boundary: any top_k of the tied experts is right (torch.topk picks some), but
    exactly top_k, distinct, and weighed among themselves only."""
    bias = torch.tensor([0.25, 0.25, 0.25, -0.5, 0.0, 0.0])
    logits = torch.tensor([[1.0, 1.0, 1.0, 3.0, -1.0, -2.0],    # experts 0, 1, 2 tie for both places
                           [2.0, -1.0, -1.0, 0.0, 0.5, 0.5],    # expert 0, then 4 or 5
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],      # 0, 1, 2 tie (their bias is highest)
                           [-1.0, 2.0, -3.0, 1.0, 0.3, 0.7]])   # no tie
    top_k, scale = 2, 2.5
    what = "route(logits 4x6 with tied scores, top_k=2, route_scale=2.5)"
    index, weight = _routing_answer(route_tokens, logits.clone(), bias.clone(), top_k, scale, what)
    affinity = torch.sigmoid(logits.double())
    score = affinity + bias.double()
    for token in range(logits.shape[0]):
        chosen = index[token].tolist()
        if len(set(chosen)) != top_k or not all(0 <= e < logits.shape[1] for e in chosen):
            raise AssertionError(f"{what}: token {token} got experts {chosen}; expected {top_k} different experts. "
                                 "Hint: torch.topk(scores, top_k, dim=-1).indices picks exactly top_k distinct "
                                 "experts even when scores tie")
        others = [e for e in range(logits.shape[1]) if e not in chosen]
        if score[token, chosen].min() < score[token, others].max():
            raise AssertionError(f"{what}: token {token} got experts {chosen}, but another expert has a higher "
                                 "sigmoid(logits) + bias. Hint: choose the top_k of sigmoid(logits) + bias")
    chosen = affinity.gather(1, index)
    expect_close(weight, (chosen / chosen.sum(dim=-1, keepdim=True) * scale).to(weight.dtype),
                 f"{what}: gate weights", rtol=1e-5, atol=1e-6,
                 hint=_WEIGHT_HINT + "; when scores tie, still exactly the top_k chosen experts (a mask such as "
                                     "score >= k-th score can hold more than top_k)")


def _check_router_gradient(route_tokens) -> None:
    """The router learns only through the gate weights: their gradient must reach the logits."""
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(10, 8, generator=generator) * 2).requires_grad_()
    bias = torch.randn(8, generator=generator)
    upstream = torch.randn(10, 8, generator=generator)   # a loss weight per (token, expert): any slot order works
    what = "route(logits 10x8 that require grad, top_k=3, route_scale=2.5)"
    expected = route(logits, bias, 3, 2.5)
    (expected_grad,) = torch.autograd.grad((expected.gate_weight * upstream.gather(1, expected.expert_index)).sum(),
                                           logits)
    index, weight = _routing_answer(route_tokens, logits, bias.clone(), 3, 2.5, what)
    hint = ("the router is trained only through the gate weights: compute them from torch.sigmoid(logits) "
            "without torch.no_grad() or .detach() (detaching the scores used for the choice is fine)")
    if not weight.requires_grad:
        raise AssertionError(f"{what}: gate_weight does not track gradients. Hint: {hint}")
    (got_grad,) = torch.autograd.grad((weight * upstream.gather(1, index)).sum(), logits, allow_unused=True)
    if got_grad is None:
        raise AssertionError(f"{what}: no gradient reaches the logits from gate_weight. Hint: {hint}")
    expect_close(got_grad, expected_grad, f"{what}: gradient of the gate weights with respect to the logits",
                 rtol=1e-4, atol=1e-6, hint=hint)


@exercise("ex04.1", "sigmoid router", points=2)
def check_router(route_tokens) -> str:
    generator = torch.Generator().manual_seed(4)
    for tokens, experts, top_k, scale in [(5, 4, 1, 1.0), (12, 8, 2, 1.0), (30, 16, 4, 2.5)]:
        logits = torch.randn(tokens, experts, generator=generator) * 2
        bias = torch.randn(experts, generator=generator)
        expected = route(logits, bias, top_k, scale)  # before the student's function can touch the inputs
        what = f"route(logits {tokens}x{experts}, top_k={top_k}, route_scale={scale})"
        index, weight = _routing_answer(route_tokens, logits, bias, top_k, scale, what)
        # Compare as sets per token: any order of the chosen experts is right.
        got_order, expected_order = index.argsort(dim=1), expected.expert_index.argsort(dim=1)
        if not torch.equal(index.gather(1, got_order), expected.expert_index.gather(1, expected_order)):
            raise AssertionError(f"{what}: chose different experts than the reference. Hint: choose the top_k of "
                                 "sigmoid(logits) + bias (the bias only steers the choice)")
        expect_close(weight.gather(1, got_order), expected.gate_weight.gather(1, expected_order),
                     f"{what}: gate weights", rtol=1e-5, atol=1e-6, hint=_WEIGHT_HINT)
    _check_tied_routing(route_tokens)
    _check_router_gradient(route_tokens)
    return "chooses on biased scores and weighs by unbiased ones, on 3 shapes, with ties, and passes gradients"


@exercise("ex04.2", "bias update rule", points=1)
def check_bias_update(update_expert_bias) -> str:
    cases = [(torch.zeros(4), torch.tensor([10, 2, 4, 4]), 0.1),
             (torch.tensor([0.5, -0.2, 0.0]), torch.tensor([3, 3, 3]), 0.01),
             (torch.randn(8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 4, 5, 6, 30]),
              0.001),
             # an idle expert: the mean is over all experts (3 here), not over the busy ones (4)
             (torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 4, 4, 4]), 0.05)]
    for bias, load, rate in cases:
        expected = update_bias(bias.clone(), load, rate)
        # The bias may be updated in place and returned (it is a copy); the load must not change.
        saved = snapshot(tokens_per_expert=load)
        got = update_expert_bias(bias.clone(), load, rate)
        expect_unchanged(saved, f"update_expert_bias(bias, tokens_per_expert={load.tolist()}, gamma={rate})",
                         hint="load = tokens_per_expert.float() makes a new tensor to compute with")
        if got is None:
            raise AssertionError("update_expert_bias returned None. Hint: end with `return` and the new bias "
                                 "tensor (updating bias in place is fine, but return it too)")
        expect_close(got, expected, f"update_expert_bias(bias, tokens_per_expert={load.tolist()}, gamma={rate})",
                     rtol=0, atol=1e-7, hint="above the mean load: bias - gamma; below: bias + gamma; exactly at "
                                             "the mean: unchanged (torch.sign does all three); the mean is over "
                                             "all experts, idle ones (0 tokens) included")
    return "moves overloaded experts down and underloaded ones up by gamma"


@exercise("ex04.3", "sorted dispatch", points=2)
def check_dispatch(dispatch) -> str:
    torch.manual_seed(7)
    layer = MoE(12, MoEConfig(n_routed=6, n_shared=0, top_k=2, expert_hidden=8)).double()
    with torch.no_grad():
        layer.w_gate_up.normal_(0, 0.3)
        layer.w_down.normal_(0, 0.3)
    experts = [layer.expert(e) for e in range(6)]
    # top_k 1 and 3 too (a dispatch fixed to two slots per token fails), and gate weights summing to 2.5
    cases = [(10, 3, 2.5), (9, 1, 2.5), (1, 2, 1.0), (7, 2, 1.0), (40, 2, 1.0)]
    for tokens, top_k, scale in cases:
        x = torch.randn(tokens, 12, dtype=torch.float64, requires_grad=True)
        routing = route(torch.randn(tokens, 6, dtype=torch.float64), None, top_k, scale)
        weight = routing.gate_weight.detach().requires_grad_()
        expected = reference_moe_loop(x, routing.expert_index, weight, experts)
        expected_grads = torch.autograd.grad(expected.square().sum(), (x, weight, layer.w_down))
        saved = snapshot(x=x, expert_index=routing.expert_index, gate_weight=weight,
                         w_gate_up=layer.w_gate_up, w_down=layer.w_down)
        what = f"dispatch on {tokens} tokens, top_k={top_k}"
        try:
            got = dispatch(x, routing.expert_index, weight, experts)
        except IndexError as error:   # mostly a token index computed for another top_k, e.g. pair // 2
            raise AssertionError(f"{what}: your dispatch raised IndexError ({error}). Hint: the token of pair p is "
                                 "p // top_k with top_k = expert_index.shape[1] (not a fixed number); x has "
                                 "expert_index.shape[0] rows") from error
        expect_unchanged(saved, what, hint="expert_index.view(-1) and .reshape(-1) share memory with expert_index: "
                         "sort with argsort (a new tensor) instead of writing into them")
        if isinstance(got, torch.Tensor) and got.dtype != expected.dtype:
            raise AssertionError(f"{what}: returned {str(got.dtype)[6:]} but x is {str(expected.dtype)[6:]}. Hint: "
                                 "keep x's dtype (torch.zeros_like(x) for the output; no .float() or .to(...))")
        expect_close(got, expected, what, rtol=1e-6, atol=1e-9,
                     hint="sort the flattened expert_index, gather x once in that order (token = pair // top_k, "
                          "with top_k = expert_index.shape[1], not a fixed number), run expert e on its contiguous "
                          "slice, multiply by the gate weights in the same order (as given: do not renormalise "
                          "them), then index_add_ the rows back onto their tokens")
        no_grad_hint = ("avoid torch.no_grad, .detach() and in-place writes into tensors that need gradients "
                        "(index_add_ on a fresh torch.zeros_like(x) is fine)")
        if not got.requires_grad:
            raise AssertionError(f"{what}: the output does not track gradients. Hint: {no_grad_hint}")
        got_grads = torch.autograd.grad(got.square().sum(), (x, weight, layer.w_down), allow_unused=True)
        for name, g, e in zip(("x", "gate_weight", "expert weights"), got_grads, expected_grads):
            if g is None:
                raise AssertionError(f"dispatch: no gradient reaches {name}. Hint: {no_grad_hint}")
            expect_close(g, e, f"gradient of {name} through {what}", rtol=1e-6, atol=1e-9,
                         hint="the output matches, so something between x, the gate weights and the experts "
                              "breaks the gradient: multiply by gate_weight (not a detached copy), each row by the "
                              "weight of its own pair (gate_weight.reshape(-1)[order]), and keep x's dtype")
    return "equals the per-token loop, outputs and gradients, on 5 batch sizes and top_k 1 to 3"
