"""Checks for chapter 03 (pretraining): causal attention, the multi-head reshape, the parameter count, MFU."""
from __future__ import annotations

import contextlib
import copy
import math
import random

import torch
import torch.nn.functional as F

from ..grading import expect_close, expect_unchanged, exercise, snapshot
from ..model import GPT, CausalSelfAttention, GPTConfig, apply_rope


@exercise("ex03.1", "causal attention", points=2)
def check_causal_attention(causal_attention) -> str:
    generator = torch.Generator().manual_seed(3)
    for batch, heads, time, head_dim in [(1, 1, 1, 4), (2, 3, 5, 8), (1, 2, 17, 16)]:
        q, k, v = (torch.randn(batch, heads, time, head_dim, generator=generator) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        saved = snapshot(q=q, k=k, v=v)
        try:
            got = causal_attention(q, k, v)
        except NotImplementedError:   # the unsolved stub (a RuntimeError too): its own message
            raise
        except RuntimeError as error:   # e.g. a mask built for one fixed size
            raise AssertionError(f"causal_attention on shape {(batch, heads, time, head_dim)} raised "
                                 f"RuntimeError: {str(error)[:300].rstrip('.')}. Hint: take T and head_dim from "
                                 "q.shape (the check tries several sizes, T=1 too), and build the mask on q.device"
                                 ) from error
        expect_unchanged(saved, f"causal_attention on shape {(batch, heads, time, head_dim)}",
                         hint="scale the scores (q @ k.transpose(-2, -1) / sqrt(head_dim)), not q in place")
        if isinstance(got, torch.Tensor) and got.isnan().any():
            raise AssertionError(f"causal_attention on shape {(batch, heads, time, head_dim)} returned NaN: a row "
                                 "of scores was all -inf, so softmax divided 0 by 0. Hint: mask only the future "
                                 "(s > t), never the diagonal: position t attends to itself, "
                                 "torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)")
        expect_close(got, expected, f"causal_attention on shape {(batch, heads, time, head_dim)}", rtol=1e-4, atol=1e-5,
                     hint="scores = q @ k.transpose(-2, -1) / sqrt(head_dim); set scores above the diagonal "
                          "(future positions) to -inf before softmax over the last dimension; then weights @ v")
    # Changing the future must not change the past.
    q, k, v = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[..., 4:, :] += 5.0
    v2[..., 4:, :] -= 5.0
    # Clones: the loop above already refuses in-place changes, so these calls see exactly these values.
    past = causal_attention(q.clone(), k.clone(), v.clone())[..., :4, :]
    expect_close(causal_attention(q.clone(), k2, v2)[..., :4, :], past,
                 "outputs at positions 0-3 after changing keys/values at positions 4-5", rtol=1e-4, atol=1e-5,
                 hint="position t may only attend to positions <= t: mask with torch.ones(T, T).triu(1).bool()")
    return "matches scaled_dot_product_attention(is_causal=True) on 3 shapes and never looks ahead"


def _attention_with(split_heads, merge_heads, attention: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = attention.qkv(x).split(attention.n_embd, dim=2)
    q, k, v = (split_heads(t, attention.n_head) for t in (q, k, v))
    time = x.shape[1]
    shape = (x.shape[0], attention.n_head, time, attention.n_embd // attention.n_head)
    if not isinstance(q, torch.Tensor) or q.shape != shape:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise AssertionError(f"split_heads(x of shape {tuple(x.shape)}, n_head={attention.n_head}) gave {got}, "
                             f"expected {shape}. Hint: use the n_head argument and x's own sizes (x.shape), "
                             "not numbers fixed for one example")
    cos, sin = attention.rope_cos[:time], attention.rope_sin[:time]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    merged = merge_heads(y)
    if not isinstance(merged, torch.Tensor) or merged.shape != x.shape:
        got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
        raise AssertionError(f"merge_heads(y of shape {tuple(y.shape)}) gave {got}, expected {tuple(x.shape)}. "
                             "Hint: take B, n_head, T, D from y.shape; do not fix them for one example")
    return attention.proj(merged)


@contextlib.contextmanager
def _view_hint(what: str):
    """torch's 'view size is not compatible' error, turned into a failure that says which .view to fix."""
    try:
        yield
    except RuntimeError as error:
        if "is invalid for input of size" in str(error):   # sizes fixed for the first example, e.g. view(2, 3, 8)
            raise AssertionError(f"{what}: {error}. Hint: take the sizes from the tensor (B, T, C = x.shape; "
                                 "B, H, T, D = y.shape) and the n_head argument, not numbers fixed for one example"
                                 ) from None
        if "view size is not compatible" not in str(error):
            raise
        raise AssertionError(f"{what}: .view() failed on a transposed, non-contiguous tensor. Hint: after "
                             ".transpose(1, 2) call .contiguous() before .view(B, T, C), or use .reshape(B, T, C)"
                             ) from None


@exercise("ex03.2", "multi-head reshape", points=2)
def check_heads(split_heads, merge_heads) -> str:
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    expected_split, saved = x.clone().view(2, 3, 2, 4).transpose(1, 2), snapshot(x=x)
    split = split_heads(x, 2)
    expect_unchanged(saved, "split_heads(x of shape (2, 3, 8), n_head=2)")
    expect_close(split, expected_split, "split_heads(x of shape (2, 3, 8), n_head=2)",
                 hint="view (B, T, C) as (B, T, n_head, C // n_head), then swap the T and head axes: (B, n_head, T, D)")
    split_input = expected_split.contiguous()  # what attention hands merge_heads: a packed (B, n_head, T, D)
    saved = snapshot(y=split_input)
    with _view_hint("merge_heads(y of shape (2, 2, 3, 4))"):
        merged = merge_heads(split_input)
    expect_unchanged(saved, "merge_heads(y of shape (2, 2, 3, 4))")
    expect_close(merged, x.clone(), "merge_heads(split_heads(x, 2))",
                 hint="undo split_heads: transpose back to (B, T, n_head, D), then .contiguous().view(B, T, C)")
    torch.manual_seed(0)
    for config in [GPTConfig(n_embd=32, n_head=4, block_size=16), GPTConfig(n_embd=24, n_head=2, block_size=8)]:
        attention = CausalSelfAttention(config).eval()
        x = torch.randn(2, config.block_size, config.n_embd)
        with torch.no_grad():
            expected = attention(x)
            with _view_hint(f"attention built from your functions (n_embd={config.n_embd})"):
                got = _attention_with(split_heads, merge_heads, attention, x.clone())
            expect_close(got, expected,
                         f"attention built from your functions (n_embd={config.n_embd}, n_head={config.n_head})",
                         rtol=1e-4, atol=1e-5, hint="each head must get a contiguous slice of D channels of every "
                                                     "position; check which axis you split and which you transpose")
    return "rebuilds minillm's CausalSelfAttention exactly"


@exercise("ex03.3", "GPT parameter count", points=2)
def check_parameter_count(gpt_parameter_count) -> str:
    configs = [GPTConfig(), GPTConfig(vocab_size=1000, n_layer=3, n_head=2, n_embd=64, mlp_ratio=2),
               GPTConfig(vocab_size=300, n_layer=1, n_head=1, n_embd=16, tie_weights=False),
               GPTConfig(vocab_size=50, n_layer=6, n_head=6, n_embd=48, block_size=32)]
    fresh = random.Random()  # one config the student cannot foresee: a table of the fixed configs' answers fails
    heads = fresh.randint(1, 4)
    configs.append(GPTConfig(vocab_size=fresh.randint(20, 600), n_layer=fresh.randint(1, 3), n_head=heads,
                             n_embd=heads * 2 * fresh.randint(1, 8), mlp_ratio=fresh.randint(1, 4),
                             tie_weights=fresh.random() < 0.5))
    for config in configs:
        expected, before = GPT(config).num_parameters(), copy.deepcopy(config)
        got = gpt_parameter_count(config)
        if config != before:
            raise AssertionError("gpt_parameter_count: your function changed its input config in place; read "
                                 "its fields (config.n_embd, ...) without assigning to them, or work on a copy "
                                 "(dataclasses.replace(config))")
        expect_close(got, expected, f"gpt_parameter_count(n_layer={config.n_layer}, n_embd={config.n_embd}, "
                                    f"vocab={config.vocab_size}, mlp_ratio={config.mlp_ratio}, "
                                    f"tie_weights={config.tie_weights})", rtol=0, atol=0.5,
                     hint="per block: qkv 3·d², projection d², MLP 2·mlp_ratio·d², two RMSNorm gains of d; "
                          "plus the embedding vocab·d, the final norm d, and a separate LM head vocab·d only "
                          "when tie_weights is False (RoPE has no parameters)")
    return "matches GPT.num_parameters() on 5 configs, one drawn at random"


@exercise("ex03.4", "model FLOPs utilisation", points=1)
def check_mfu(model_flops_utilization) -> str:
    # one case the student cannot foresee (a table of the fixed cases' answers fails), its MFU below 0.1 so that
    # an answer which refuses an MFU above 1 is not failed by chance
    fresh = random.Random()
    for tokens_per_second, flops_per_token, peak in [(1e4, 6e6, 1e12), (2.5e5, 1.2e9, 989e12), (1.0, 1.0, 4.0),
                                                     (fresh.uniform(1e3, 1e5), fresh.uniform(1e6, 1e9), 1e15)]:
        expect_close(model_flops_utilization(tokens_per_second, flops_per_token, peak),
                     tokens_per_second * flops_per_token / peak,
                     f"model_flops_utilization({tokens_per_second:g} tok/s, {flops_per_token:g} FLOP/token, "
                     f"peak {peak:g} FLOP/s)", hint="achieved FLOP/s = tokens/s × FLOPs per token; MFU is that "
                                                    "divided by the peak FLOP/s (a fraction, not a percentage)")
    if not math.isfinite(model_flops_utilization(1.0, 1.0, 1.0)):
        raise AssertionError("model_flops_utilization(1, 1, 1) is not finite. Hint: return a plain number")
    return "matches achieved FLOP/s ÷ peak FLOP/s"
