"""Checks for chapter 03 (pretraining): causal attention, the multi-head reshape, the parameter count, MFU."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..grading import expect_close, exercise
from ..model import GPT, CausalSelfAttention, GPTConfig, apply_rope


@exercise("ex03.1", "causal attention", points=2)
def check_causal_attention(causal_attention) -> str:
    generator = torch.Generator().manual_seed(3)
    for batch, heads, time, head_dim in [(1, 1, 1, 4), (2, 3, 5, 8), (1, 2, 17, 16)]:
        q, k, v = (torch.randn(batch, heads, time, head_dim, generator=generator) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = causal_attention(q, k, v)
        expect_close(got, expected, f"causal_attention on shape {(batch, heads, time, head_dim)}", rtol=1e-4, atol=1e-5,
                     hint="scores = q @ k.transpose(-2, -1) / sqrt(head_dim); set scores above the diagonal "
                          "(future positions) to -inf before softmax over the last dimension; then weights @ v")
    # Changing the future must not change the past.
    q, k, v = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[..., 4:, :] += 5.0
    v2[..., 4:, :] -= 5.0
    expect_close(causal_attention(q, k2, v2)[..., :4, :], causal_attention(q, k, v)[..., :4, :],
                 "outputs at positions 0-3 after changing keys/values at positions 4-5", rtol=1e-4, atol=1e-5,
                 hint="position t may only attend to positions <= t: mask with torch.ones(T, T).triu(1).bool()")
    return "matches scaled_dot_product_attention(is_causal=True) on 3 shapes and never looks ahead"


def _attention_with(split_heads, merge_heads, attention: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = attention.qkv(x).split(attention.n_embd, dim=2)
    q, k, v = (split_heads(t, attention.n_head) for t in (q, k, v))
    time = x.shape[1]
    cos, sin = attention.rope_cos[:time], attention.rope_sin[:time]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attention.proj(merge_heads(y))


@exercise("ex03.2", "multi-head reshape", points=2)
def check_heads(split_heads, merge_heads) -> str:
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    split = split_heads(x, 2)
    expect_close(split, x.view(2, 3, 2, 4).transpose(1, 2), "split_heads(x of shape (2, 3, 8), n_head=2)",
                 hint="view (B, T, C) as (B, T, n_head, C // n_head), then swap the T and head axes: (B, n_head, T, D)")
    expect_close(merge_heads(split), x, "merge_heads(split_heads(x, 2))",
                 hint="undo split_heads: transpose back to (B, T, n_head, D), then .contiguous().view(B, T, C)")
    torch.manual_seed(0)
    for config in [GPTConfig(n_embd=32, n_head=4, block_size=16), GPTConfig(n_embd=24, n_head=2, block_size=8)]:
        attention = CausalSelfAttention(config).eval()
        x = torch.randn(2, config.block_size, config.n_embd)
        with torch.no_grad():
            expect_close(_attention_with(split_heads, merge_heads, attention, x), attention(x),
                         f"attention built from your functions (n_embd={config.n_embd}, n_head={config.n_head})",
                         rtol=1e-4, atol=1e-5, hint="each head must get a contiguous slice of D channels of every "
                                                     "position; check which axis you split and which you transpose")
    return "rebuilds minillm's CausalSelfAttention exactly"


@exercise("ex03.3", "GPT parameter count", points=2)
def check_parameter_count(gpt_parameter_count) -> str:
    configs = [GPTConfig(), GPTConfig(vocab_size=1000, n_layer=3, n_head=2, n_embd=64, mlp_ratio=2),
               GPTConfig(vocab_size=300, n_layer=1, n_head=1, n_embd=16, tie_weights=False),
               GPTConfig(vocab_size=50, n_layer=6, n_head=6, n_embd=48, block_size=32)]
    for config in configs:
        expected = GPT(config).num_parameters()
        got = gpt_parameter_count(config)
        expect_close(got, expected, f"gpt_parameter_count(n_layer={config.n_layer}, n_embd={config.n_embd}, "
                                    f"vocab={config.vocab_size}, mlp_ratio={config.mlp_ratio}, "
                                    f"tie_weights={config.tie_weights})", rtol=0, atol=0.5,
                     hint="per block: qkv 3·d², projection d², MLP 2·mlp_ratio·d², two RMSNorm gains of d; "
                          "plus the embedding vocab·d, the final norm d, and a separate LM head vocab·d only "
                          "when tie_weights is False (RoPE has no parameters)")
    return "matches GPT.num_parameters() on 4 configs"


@exercise("ex03.4", "model FLOPs utilisation", points=1)
def check_mfu(model_flops_utilization) -> str:
    for tokens_per_second, flops_per_token, peak in [(1e4, 6e6, 1e12), (2.5e5, 1.2e9, 989e12), (1.0, 1.0, 4.0)]:
        expect_close(model_flops_utilization(tokens_per_second, flops_per_token, peak),
                     tokens_per_second * flops_per_token / peak,
                     f"model_flops_utilization({tokens_per_second:g} tok/s, {flops_per_token:g} FLOP/token, "
                     f"peak {peak:g} FLOP/s)", hint="achieved FLOP/s = tokens/s × FLOPs per token; MFU is that "
                                                    "divided by the peak FLOP/s (a fraction, not a percentage)")
    if not math.isfinite(model_flops_utilization(1.0, 1.0, 1.0)):
        raise AssertionError("model_flops_utilization(1, 1, 1) is not finite. Hint: return a plain number")
    return "matches achieved FLOP/s ÷ peak FLOP/s"
