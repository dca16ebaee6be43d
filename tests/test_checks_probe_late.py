"""Chapters 03 and 04 check cells, probed with honest-but-wrong answers (each must fail with a hint) and with
right answers written differently (each must pass)."""
import math

import pytest
import torch

from minillm import grading
from minillm.moe import reference_moe_loop


# --- ex03.1 causal attention ----------------------------------------------------------------------------------------

def _attention(scale=lambda q: math.sqrt(q.shape[-1]), diagonal=1, fill=float("-inf"), dim=-1):
    def causal_attention(q, k, v):
        time = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / scale(q)
        future = torch.ones(time, time, dtype=torch.bool).triu(diagonal)
        return scores.masked_fill(future, fill).softmax(dim) @ v
    return causal_attention


@pytest.mark.parametrize("answer", [
    _attention(scale=lambda q: math.sqrt(q.shape[-2])),   # sqrt of the sequence length
    _attention(scale=lambda q: math.sqrt(q.shape[1])),    # sqrt of the number of heads
    _attention(scale=lambda q: q.shape[-1]),              # d, not sqrt(d)
    _attention(scale=lambda q: 1.0),                      # no scaling
    _attention(diagonal=2),                               # position t sees t + 1
    _attention(diagonal=0),                               # position t does not see itself
    _attention(dim=-2),                                   # softmax over the queries
], ids=["sqrt-time", "sqrt-heads", "no-sqrt", "unscaled", "sees-next", "hides-self", "softmax-dim"])
def test_ex03_1_wrong_attention_fails_with_hint(answer):
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex03.1", answer)


def test_ex03_1_right_attention_in_other_forms_passes():
    grading.check("ex03.1", _attention(fill=-1e9))
    grading.check("ex03.1", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


# --- ex03.2 multi-head reshape --------------------------------------------------------------------------------------

def _split(x, n_head):
    batch, time, channels = x.shape
    return x.view(batch, time, n_head, channels // n_head).transpose(1, 2)


def _merge(y):
    batch, heads, time, head_dim = y.shape
    return y.transpose(1, 2).contiguous().view(batch, time, heads * head_dim)


@pytest.mark.parametrize("split, merge", [
    (lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), lambda y: y.reshape(y.shape[0], y.shape[2], -1)),
    (lambda x, h: x.view(*x.shape[:2], -1, h).permute(0, 3, 1, 2),          # strided heads, merged consistently
     lambda y: y.permute(0, 2, 3, 1).reshape(y.shape[0], y.shape[2], -1)),
    (_split, lambda y: y.reshape(y.shape[0], y.shape[2], -1)),               # merge without the transpose
    (lambda x, h: x.view(*x.shape[:2], 2, -1).transpose(1, 2), _merge),      # two heads, whatever n_head says
], ids=["no-transpose", "strided-heads", "merge-no-transpose", "fixed-heads"])
def test_ex03_2_wrong_reshapes_fail_with_hint(split, merge):
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex03.2", split, merge)


def test_ex03_2_right_reshapes_in_other_forms_pass():
    grading.check("ex03.2", _split, _merge)
    grading.check("ex03.2", lambda x, h: x.unflatten(-1, (h, -1)).permute(0, 2, 1, 3),
                  lambda y: y.permute(0, 2, 1, 3).flatten(2))
    grading.check("ex03.2", lambda x, h: _split(x, h).contiguous(),
                  lambda y: y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1))


# --- ex03.3 parameter count, ex03.4 MFU ----------------------------------------------------------------------------

def _count(final_norm=True, head=None, mlp_ratio=None, positions=False, norms=True):
    def gpt_parameter_count(config):
        d, ratio = config.n_embd, config.mlp_ratio if mlp_ratio is None else mlp_ratio
        per_block = 4 * d * d + 2 * ratio * d * d + (2 * d if norms else 0)
        separate_head = not config.tie_weights if head is None else head
        return (config.vocab_size * d + config.n_layer * per_block + (d if final_norm else 0)
                + (config.vocab_size * d if separate_head else 0) + (config.block_size * d if positions else 0))
    return gpt_parameter_count


@pytest.mark.parametrize("answer", [_count(final_norm=False), _count(head=True), _count(head=False),
                                    _count(mlp_ratio=4), _count(positions=True), _count(norms=False)],
                         ids=["no-final-norm", "always-head", "never-head", "mlp-ratio-4", "positions", "no-norms"])
def test_ex03_3_wrong_counts_fail_with_hint(answer):
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex03.3", answer)


def test_ex03_3_and_ex03_4_right_answers_pass():
    grading.check("ex03.3", _count())
    grading.check("ex03.4", lambda tokens, flops, peak: tokens * flops / peak)
    grading.check("ex03.4", lambda tokens, flops, peak: min(1.0, tokens * flops / peak))   # refusing MFU > 1


@pytest.mark.parametrize("answer", [lambda t, f, p: 100 * t * f / p, lambda t, f, p: 6 * t * f / p,
                                    lambda t, f, p: t / p])
def test_ex03_4_wrong_mfu_fails_with_hint(answer):
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex03.4", answer)


# --- ex04.1 the sigmoid router --------------------------------------------------------------------------------------

def _router(choose="sigmoid+bias", weigh="unbiased", normalise="chosen", scale=True, detach=False):
    def route_tokens(logits, bias, top_k, route_scale):
        affinity = torch.sigmoid(logits.detach() if detach else logits)
        score = {"sigmoid+bias": lambda: affinity + bias, "sigmoid": lambda: affinity,
                 "logits+bias": lambda: logits + bias, "sigmoid(logits+bias)": lambda: torch.sigmoid(logits + bias),
                 "softmax+bias": lambda: logits.softmax(-1) + bias}[choose]()
        index = score.topk(top_k, dim=-1).indices
        base = {"unbiased": affinity, "biased": affinity + bias, "softmax": logits.softmax(-1)}[weigh]
        chosen = base.gather(1, index)
        weight = {"chosen": lambda: chosen / chosen.sum(-1, keepdim=True),
                  "all": lambda: chosen / base.sum(-1, keepdim=True),
                  "none": lambda: chosen, "softmax": lambda: chosen.softmax(-1)}[normalise]()
        return index, weight * (route_scale if scale else 1)
    return route_tokens


def _router_no_grad(*args):
    with torch.no_grad():
        return _router()(*args)


def _router_threshold_mask(logits, bias, top_k, route_scale):
    """Right without ties; with ties the mask score >= k-th score holds more than top_k experts."""
    affinity = torch.sigmoid(logits)
    score = affinity + bias
    index = score.topk(top_k, dim=-1).indices
    kth = score.gather(1, index).min(dim=-1, keepdim=True).values
    dense = affinity * (score >= kth)
    return index, (dense / dense.sum(-1, keepdim=True) * route_scale).gather(1, index)


def _router_weights_of_unbiased_top(logits, bias, top_k, route_scale):
    affinity = torch.sigmoid(logits)
    index = (affinity + bias).topk(top_k, dim=-1).indices
    values = affinity.topk(top_k, dim=-1).values   # the weights of other experts than the chosen ones
    return index, values / values.sum(-1, keepdim=True) * route_scale


@pytest.mark.parametrize("answer, message", [
    (_router(weigh="biased"), "UNBIASED"),
    (_router(choose="sigmoid"), "sigmoid(logits) + bias"),
    (_router(choose="logits+bias"), "sigmoid(logits) + bias"),
    (_router(choose="sigmoid(logits+bias)"), "sigmoid(logits) + bias"),
    (_router(choose="softmax+bias", weigh="softmax"), "sigmoid(logits) + bias"),
    (_router(normalise="all"), "top_k chosen ones only"),
    (_router(normalise="none"), "divided by their sum"),
    (_router(normalise="softmax"), "UNBIASED"),
    (_router(scale=False), "route_scale"),
    (_router(detach=True), "trained only through the gate weights"),
    (_router_no_grad, "does not track gradients"),
    (_router_threshold_mask, "when scores tie"),
    (_router_weights_of_unbiased_top, "UNBIASED"),
], ids=["biased-weights", "ignores-bias", "bias-on-logits", "bias-inside-sigmoid", "softmax", "normalise-all",
        "no-normalise", "softmax-of-chosen", "no-route-scale", "detached", "no-grad", "tie-mask-weights",
        "weights-of-other-experts"])
def test_ex04_1_wrong_router_fails_with_hint(answer, message):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex04.1", answer)
    assert message in str(failure.value)


def _router_float64(logits, bias, top_k, route_scale):
    affinity = torch.sigmoid(logits.double())
    index = (affinity + bias.double()).topk(top_k, dim=-1).indices
    chosen = affinity.gather(1, index)
    return index.int(), chosen / chosen.sum(-1, keepdim=True) * route_scale


def _router_sorted_stable(logits, bias, top_k, route_scale):   # another tie-break: the lowest expert number first
    affinity = torch.sigmoid(logits)
    index = (affinity.detach() + bias).sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    chosen = affinity.gather(1, index)
    return index, torch.nn.functional.normalize(chosen, p=1, dim=-1) * route_scale


def _router_reverse_ties(logits, bias, top_k, route_scale):    # and the highest expert number first
    affinity = torch.sigmoid(logits)
    flipped = (affinity + bias).flip(-1).sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    index = logits.shape[-1] - 1 - flipped
    chosen = affinity.gather(1, index)
    return index, chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * route_scale


def _router_values_minus_bias(logits, bias, top_k, route_scale):
    score = torch.sigmoid(logits) + bias
    top = score.topk(top_k, dim=-1)
    chosen = top.values - bias[top.indices]
    return top.indices, route_scale * chosen / chosen.sum(-1, keepdim=True)


@pytest.mark.parametrize("answer", [_router(), _router_float64, _router_sorted_stable, _router_reverse_ties,
                                    _router_values_minus_bias],
                         ids=["reference", "float64-int32", "stable-sort", "reverse-ties", "values-minus-bias"])
def test_ex04_1_right_router_in_other_forms_passes(answer):
    grading.check("ex04.1", answer)


# --- ex04.2 the bias update -----------------------------------------------------------------------------------------

def _update(compare="mean", use_sign=True, flip=False):
    def update_expert_bias(bias, tokens_per_expert, gamma):
        load = tokens_per_expert.float()
        target = {"mean": lambda: load.mean(), "max": lambda: load.max(), "median": lambda: load.median(),
                  "integer-mean": lambda: (tokens_per_expert.sum() // len(tokens_per_expert)).float(),
                  "busy-mean": lambda: load[load > 0].mean()}[compare]()
        step = (target - load) * (-1 if flip else 1)
        return bias + gamma * (torch.sign(step) if use_sign else step)
    return update_expert_bias


def _update_strict(bias, tokens_per_expert, gamma):   # an expert exactly at the mean still moves up
    load = tokens_per_expert.float()
    return torch.where(load > load.mean(), bias - gamma, bias + gamma)


@pytest.mark.parametrize("answer", [
    _update(compare="max"), _update(compare="median"), _update(compare="integer-mean"), _update(compare="busy-mean"),
    _update(flip=True), _update(use_sign=False), _update_strict,
    lambda bias, load, gamma: bias - gamma * load.float(),
], ids=["max", "median", "integer-mean", "mean-of-busy-experts", "wrong-sign", "no-sign", "strict", "load-times-rate"])
def test_ex04_2_wrong_update_fails_with_hint(answer):
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex04.2", answer)


def test_ex04_2_idle_expert_hint():
    with pytest.raises(AssertionError, match="idle ones"):
        grading.check("ex04.2", _update(compare="busy-mean"))


@pytest.mark.parametrize("answer", [
    _update(),
    lambda bias, load, gamma: bias + gamma * torch.sign(load.double().mean() - load.double()),
    lambda bias, load, gamma: bias - gamma * torch.sign(load / load.float().mean() - 1),
], ids=["reference", "float64", "relative-load"])
def test_ex04_2_right_update_in_other_forms_passes(answer):
    grading.check("ex04.2", answer)


# --- ex04.3 the sorted dispatch -------------------------------------------------------------------------------------

def _dispatch(top_k=None, weigh=1, reorder_weights=True, detach=False, renormalise=False, unique_counts=False):
    def dispatch(x, expert_index, gate_weight, experts):
        slots = top_k or expert_index.shape[1]
        flat = expert_index.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // slots
        if unique_counts:   # counts of the experts that got tokens only: expert numbers shift past an idle one
            counts = torch.unique(flat, return_counts=True)[1].tolist()
        else:
            counts = torch.bincount(flat, minlength=len(experts)).tolist()
        rows = torch.cat([experts[e](part) for e, part in enumerate(x[token].split(counts)) if part.shape[0]])
        weight = gate_weight.detach() if detach else gate_weight
        if renormalise:
            weight = weight / weight.sum(-1, keepdim=True)
        weight = weight.reshape(-1)[order] if reorder_weights else weight.reshape(-1)
        return torch.zeros_like(x).index_add_(0, token, rows * weight.unsqueeze(-1) ** weigh)
    return dispatch


def _dispatch_two_slots(x, expert_index, gate_weight, experts):   # a loop over slots 0 and 1 only
    output = torch.zeros_like(x)
    for slot in range(2):
        for e in range(len(experts)):
            token = torch.where(expert_index[:, slot] == e)[0]
            if token.numel():
                output = output.index_add(0, token, experts[e](x[token]) * gate_weight[token, slot, None])
    return output


def _dispatch_assigning(x, expert_index, gate_weight, experts):   # out[token] += rows drops repeated tokens
    flat = expert_index.reshape(-1)
    order = flat.argsort()
    token = order // expert_index.shape[1]
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    rows = torch.cat([experts[e](part) for e, part in enumerate(x[token].split(counts)) if counts[e]])
    output = torch.zeros_like(x)
    output[token] += rows * gate_weight.reshape(-1)[order, None]
    return output


def _dispatch_sorting_index_in_place(x, expert_index, gate_weight, experts):
    flat = expert_index.view(-1)
    order = flat.argsort(stable=True)
    flat.copy_(flat[order])   # the caller's expert_index is now sorted
    token = order // expert_index.shape[1]
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    rows = torch.cat([experts[e](part) for e, part in enumerate(x[token].split(counts)) if counts[e]])
    return torch.zeros_like(x).index_add_(0, token, rows * gate_weight.reshape(-1)[order, None])


@pytest.mark.parametrize("answer, message", [
    (_dispatch(top_k=2), "not a fixed number"),
    (_dispatch(top_k=1), "not a fixed number"),
    (_dispatch_two_slots, "not a fixed number"),
    (_dispatch(weigh=0), "gate weights"),
    (_dispatch(weigh=2), "gate weights"),
    (_dispatch(reorder_weights=False), "same order"),
    (_dispatch(detach=True), "gradient"),
    (_dispatch(renormalise=True), "do not renormalise"),
    (_dispatch(unique_counts=True), "contiguous slice"),
    (_dispatch_assigning, "index_add_"),
    (_dispatch_sorting_index_in_place, "expert_index in place"),
], ids=["fixed-top-k-2", "fixed-top-k-1", "two-slot-loop", "no-gate-weight", "gate-weight-twice", "unsorted-weights",
        "detached-weights", "renormalised", "unique-counts", "assign-not-add", "sorts-index-in-place"])
def test_ex04_3_wrong_dispatch_fails_with_hint(answer, message):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex04.3", answer)
    assert message in str(failure.value)


def _dispatch_per_expert(x, expert_index, gate_weight, experts):
    output = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(expert_index == e)
        if token.numel():
            output = output.index_add(0, token, expert(x[token]) * gate_weight[token, slot].unsqueeze(-1))
    return output


def _dispatch_scatter(x, expert_index, gate_weight, experts):   # every expert run, empty slices included
    flat = expert_index.flatten()
    order = flat.argsort(descending=True)
    token = torch.div(order, expert_index.size(1), rounding_mode="floor")
    counts = torch.bincount(flat, minlength=len(experts)).flip(0).tolist()
    parts = x.index_select(0, token).split(counts)
    rows = torch.cat([experts[len(experts) - 1 - i](part) for i, part in enumerate(parts)])
    rows = rows * gate_weight.flatten()[order].unsqueeze(1)
    return torch.zeros_like(x).scatter_add(0, token.unsqueeze(1).expand_as(rows), rows)


@pytest.mark.parametrize("answer", [_dispatch(), reference_moe_loop, _dispatch_per_expert, _dispatch_scatter],
                         ids=["reference", "per-token-loop", "per-expert-where", "descending-scatter-add"])
def test_ex04_3_right_dispatch_in_other_forms_passes(answer):
    grading.check("ex04.3", answer)
