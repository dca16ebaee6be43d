"""minillm.model.GPT against a peer implementation: transformers' Arcee (AFM) causal LM with the same weights.

Arcee is Llama with a plain (not gated) MLP: RMSNorm (eps inside the square root), half-split rotary embeddings
(dimension i paired with i + head_dim/2, `rotate_half`), causal multi-head attention scaled by 1/sqrt(head_dim),
pre-norm residual blocks, a final RMSNorm, optionally tied embeddings, and no biases anywhere. With
hidden_act="gelu" (exact, erf-based GELU) its MLP is minillm's `fc -> gelu -> proj`, so the whole dense GPT can be
compared end to end: logits, the loss with -100 targets, gradients, FLOPs and greedy generation.

minillm rotates the same half-split pairs as Llama/Arcee, so q/k projection rows are copied as they are (no
permutation); `test_the_comparison_is_sharp_enough_to_catch_a_wrong_convention` shows that the interleaved
convention, another RoPE base or another RMSNorm eps would each be caught.

The peer computes its RMSNorm and its RoPE angles in float32 even in a float64 model, so float64 models agree to
about 1e-7 relative, not to float64 precision; the tolerances below are set for that.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minillm.model import GPT, GPTConfig, RMSNorm, apply_rope, rope_cos_sin

pytest.importorskip("transformers", reason="transformers (the `bench` extra) is the reference here")
try:
    from transformers import ArceeConfig, ArceeForCausalLM
    from transformers.models.arcee.modeling_arcee import ArceeRMSNorm, ArceeRotaryEmbedding, apply_rotary_pos_emb
except ImportError:   # Arcee arrived in transformers 4.53
    pytest.skip("this transformers has no Arcee model", allow_module_level=True)

CLOSE = dict(rtol=1e-5, atol=1e-6)   # float64 against a peer that normalises and rotates in float32
PEER_ATTENTION = {"sdpa": "sdpa", "manual": "eager"}


def make_gpt(seed: int = 0, **overrides) -> GPT:
    """A float64 GPT whose weights are O(1) where it matters: sharp attention, and norm gains that are not all 1."""
    settings = dict(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**settings)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_attn.weight") or name.endswith("norm_mlp.weight") or name == "norm_final.weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 2 and name != "token_embedding.weight":
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        # The embedding keeps its small init (std 0.02): the first norm then sees a small RMS, where eps matters.
    return model


def make_peer(model: GPT, *, eps: float = 1e-6, rope_base: float | None = None, interleave: bool = False):
    """transformers' ArceeForCausalLM holding `model`'s weights (float64, eval mode).

    eps, rope_base and interleave exist to show that the comparison catches a different convention."""
    c = model.config
    config = ArceeConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_ratio * c.n_embd,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                         hidden_act="gelu", max_position_embeddings=c.block_size, rms_norm_eps=eps,
                         rope_theta=c.rope_base if rope_base is None else rope_base,
                         tie_word_embeddings=c.tie_weights, attention_bias=False, mlp_bias=False,
                         attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    peer = ArceeForCausalLM._from_config(config, attn_implementation=PEER_ATTENTION[c.attention])
    peer = peer.double().eval()
    head_dim = c.head_dim
    # Rows of one head in half-split order (i, i + D/2) rearranged to interleaved order (2i, 2i + 1): what a
    # minillm with interleaved RoPE would need. minillm is half-split like the peer, so by default rows stay put.
    order = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1) if interleave else torch.arange(head_dim)
    rows = (order + head_dim * torch.arange(c.n_head)[:, None]).reshape(-1)
    with torch.no_grad():
        peer.model.embed_tokens.weight.copy_(model.token_embedding.weight)
        for block, layer in zip(model.blocks, peer.model.layers, strict=True):
            q, k, v = block.attn.qkv.weight.split(c.n_embd)
            layer.input_layernorm.weight.copy_(block.norm_attn.weight)
            layer.self_attn.q_proj.weight.copy_(q[rows])
            layer.self_attn.k_proj.weight.copy_(k[rows])
            layer.self_attn.v_proj.weight.copy_(v)
            layer.self_attn.o_proj.weight.copy_(block.attn.proj.weight)
            layer.post_attention_layernorm.weight.copy_(block.norm_mlp.weight)
            layer.mlp.up_proj.weight.copy_(block.mlp.fc.weight)
            layer.mlp.down_proj.weight.copy_(block.mlp.proj.weight)
        peer.model.norm.weight.copy_(model.norm_final.weight)
        if not c.tie_weights:
            peer.lm_head.weight.copy_(model.lm_head.weight)
    assert (peer.lm_head.weight is peer.model.embed_tokens.weight) == c.tie_weights
    return peer


def tokens(batch: int, time: int, vocab: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, time), generator=torch.Generator().manual_seed(seed + 10 * time + batch))


def masked_targets(idx: torch.Tensor, vocab: int = 48, seed: int = 2) -> torch.Tensor:
    """Next-token-style targets with about a third of them -100 (at least one kept)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, idx.shape, generator=g)
    targets[torch.rand(idx.shape, generator=g) < 0.35] = -100
    targets.view(-1)[0] = 7
    return targets


# n_head, rope_base, mlp_ratio: head_dim 32, 16 and 8; the usual base and two others, so the base is carried over.
ARCHITECTURES = [(1, 10000.0, 4), (2, 500.0, 3), (4, 1.0e6, 2)]


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("n_head, rope_base, mlp_ratio", ARCHITECTURES)
def test_logits_and_masked_loss_match_the_peer(n_head, rope_base, mlp_ratio, tie_weights, attention):
    model = make_gpt(n_head=n_head, rope_base=rope_base, mlp_ratio=mlp_ratio, tie_weights=tie_weights,
                     attention=attention)
    peer = make_peer(model)
    head_dim = model.config.head_dim
    expected_inverse_frequency = rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(peer.model.rotary_emb.inv_freq.double(), expected_inverse_frequency)   # took the base
    with torch.no_grad():
        for batch in (1, 3):
            for time in (1, 7, model.config.block_size):
                idx = tokens(batch, time)
                targets = masked_targets(idx)
                logits, loss = model(idx, targets)
                peer_logits = peer(idx).logits
                assert logits.dtype == peer_logits.dtype == torch.float64
                assert logits.shape == peer_logits.shape == (batch, time, 48)
                torch.testing.assert_close(logits, peer_logits, **CLOSE)
                reference = F.cross_entropy(peer_logits.view(-1, 48), targets.view(-1), ignore_index=-100)
                torch.testing.assert_close(loss, reference, **CLOSE)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("tie_weights", [True, False])
def test_gradients_match_the_peer(tie_weights, attention):
    model = make_gpt(n_head=2, tie_weights=tie_weights, attention=attention)
    peer = make_peer(model)
    idx = tokens(3, 16)
    targets = masked_targets(idx)
    _, loss = model(idx, targets)
    loss.backward()
    F.cross_entropy(peer(idx).logits.view(-1, 48), targets.view(-1), ignore_index=-100).backward()
    # The embedding's gradient includes the LM head's when the weights are tied (in both models).
    pairs = [(model.token_embedding.weight, peer.model.embed_tokens.weight),
             (model.norm_final.weight, peer.model.norm.weight)]
    if not tie_weights:
        pairs.append((model.lm_head.weight, peer.lm_head.weight))
    for block, layer in zip(model.blocks, peer.model.layers, strict=True):
        attn = layer.self_attn
        pairs += [(block.norm_attn.weight, layer.input_layernorm.weight),
                  (block.attn.proj.weight, attn.o_proj.weight),
                  (block.norm_mlp.weight, layer.post_attention_layernorm.weight),
                  (block.mlp.fc.weight, layer.mlp.up_proj.weight),
                  (block.mlp.proj.weight, layer.mlp.down_proj.weight)]
        peer_qkv_grad = torch.cat([attn.q_proj.weight.grad, attn.k_proj.weight.grad, attn.v_proj.weight.grad])
        torch.testing.assert_close(block.attn.qkv.weight.grad, peer_qkv_grad, **CLOSE)
    for ours, theirs in pairs:
        assert ours.grad is not None and ours.grad.abs().max() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, **CLOSE)


def test_targets_are_already_shifted_unlike_the_peers_labels():
    """A deliberate difference of interface: minillm's targets[t] is the token after idx[t] (the data loader
    shifts), while transformers' labels are the inputs themselves and the loss shifts them by one. With the same
    tokens scored, the two losses agree (the peer's loss is computed in float32)."""
    model = make_gpt(n_head=2)
    peer = make_peer(model)
    idx = tokens(3, 16)
    targets = masked_targets(idx)
    targets[:, -1] = -100                                   # the peer scores no token after the last position
    labels = torch.cat([idx[:, :1], targets[:, :-1]], dim=1)   # labels[t + 1] = targets[t]; labels[0] is never used
    with torch.no_grad():
        _, loss = model(idx, targets)
        peer_loss = peer(idx, labels=labels).loss
    torch.testing.assert_close(loss, peer_loss.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mismatch", ["interleaved_rope", "rope_base", "rms_norm_eps"])
def test_the_comparison_is_sharp_enough_to_catch_a_wrong_convention(mismatch):
    """Negative controls: a peer set up with another convention disagrees well beyond CLOSE."""
    model = make_gpt(n_head=2, attention="manual")
    peer = make_peer(model, **{"interleaved_rope": dict(interleave=True), "rope_base": dict(rope_base=500000.0),
                               "rms_norm_eps": dict(eps=1e-5)}[mismatch])
    idx = tokens(3, 16)
    with torch.no_grad():
        logits, _ = model(idx)
        peer_logits = peer(idx).logits
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logits, peer_logits, **CLOSE)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_float32_logits_match_the_peer(attention):
    """The models as they are usually run: float32 on both sides, agreeing to float32 rounding."""
    model = make_gpt(n_head=4, attention=attention, tie_weights=False)
    peer = make_peer(model).float()
    model = model.float()
    idx = tokens(3, 16)
    with torch.no_grad():
        logits, _ = model(idx)
        peer_logits = peer(idx).logits
    assert logits.dtype == peer_logits.dtype == torch.float32
    torch.testing.assert_close(logits, peer_logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_are_no_further_from_float64_than_the_peers():
    """In bfloat16 neither model matches float64 closely; the peer's error is the yardstick for ours. (Both
    normalise in float32; minillm also applies the norm gain and RoPE in float32, the peer in bfloat16.)"""
    reference_model = make_gpt(n_head=2, tie_weights=False)
    idx = tokens(3, 16)
    with torch.no_grad():
        reference, _ = reference_model(idx)
        ours, _ = make_gpt(n_head=2, tie_weights=False).to(torch.bfloat16)(idx)
        theirs = make_peer(reference_model).to(torch.bfloat16)(idx).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    our_error = (ours.double() - reference).abs().max().item()
    peer_error = (theirs.double() - reference).abs().max().item()
    assert our_error <= 1.5 * peer_error, (our_error, peer_error)


def test_rmsnorm_matches_the_peers_eps_inside_the_square_root():
    torch.manual_seed(3)
    ours, theirs = RMSNorm(24), ArceeRMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(1.0 + 0.3 * torch.randn(24))
        theirs.weight.copy_(ours.weight)
    for scale in (1e-3, 1.0, 1e3):   # a small RMS is where eps shows
        x = scale * torch.randn(2, 5, 24)
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rope_matches_the_peers_rotate_half_convention(base):
    head_dim, length = 16, 64
    config = ArceeConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=length,
                         rope_theta=base, bos_token_id=None, eos_token_id=None)
    x = torch.randn(2, 4, length, head_dim, generator=torch.Generator().manual_seed(4))
    peer_cos, peer_sin = ArceeRotaryEmbedding(config)(x, torch.arange(length)[None])
    cos, sin = rope_cos_sin(head_dim, length, base)
    # The peer's tables repeat the half table (cat(freqs, freqs)); its float32 angles limit the agreement.
    close = dict(rtol=0.0, atol=1e-5)
    torch.testing.assert_close(torch.cat([cos, cos], -1), peer_cos[0], **close)
    torch.testing.assert_close(torch.cat([sin, sin], -1), peer_sin[0], **close)
    # Given the same tables, the rotations agree to float32 rounding: dimension i pairs with i + head_dim/2.
    rotated_q, rotated_k = apply_rotary_pos_emb(x, 2 * x, peer_cos, peer_sin)
    half_cos, half_sin = peer_cos[0, :, :head_dim // 2], peer_sin[0, :, :head_dim // 2]
    torch.testing.assert_close(apply_rope(x, half_cos, half_sin), rotated_q)
    torch.testing.assert_close(apply_rope(2 * x, half_cos, half_sin), rotated_k)


def counted_flops(model, idx: torch.Tensor, peer: bool = False) -> tuple[int, int]:
    """FLOPs FlopCounterMode counts for a forward pass, and for a forward plus backward pass."""
    counts = []
    for backward in (False, True):
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            logits = model(idx).logits if peer else model(idx)[0]
            if backward:
                logits.sum().backward()
        counts.append(counter.get_total_flops())
    return counts[0], counts[1]


@pytest.mark.parametrize("tie_weights", [True, False])
def test_flops_per_token_matches_the_flop_counter_on_both_models(tie_weights):
    # manual/eager attention: FlopCounterMode records nothing for the fused SDPA kernel on CPU (see the docstring).
    model = make_gpt(n_head=4, n_layer=3, mlp_ratio=3, tie_weights=tie_weights, attention="manual")
    peer = make_peer(model)
    idx = tokens(2, 16)
    n_tokens = idx.numel()
    forward, training = (count / n_tokens for count in counted_flops(model, idx))
    peer_forward, peer_training = (count / n_tokens for count in counted_flops(peer, idx, peer=True))
    # The docstring's formula counts the matmuls exactly (attention in full T x T), so the counts are equal,
    # and training is exactly 3 x forward (the embedding needs a gradient, so the first block's input does too).
    assert forward == model.flops_per_token(seq_len=16, training=False)
    assert training == model.flops_per_token(seq_len=16, training=True)
    # The peer does the same matmuls: its counts agree (within 1%, room for how it builds its RoPE tables).
    assert peer_forward == pytest.approx(forward, rel=0.01)
    assert peer_training == pytest.approx(training, rel=0.01)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_greedy_generation_matches_the_peers(attention):
    """temperature=0 (and top_k=1) against the peer's greedy generate, which uses a KV cache where minillm runs
    the whole context again: both stay within block_size (minillm would crop the context beyond it, the peer not)."""
    model = make_gpt(n_head=2, attention=attention, tie_weights=False)
    peer = make_peer(model)
    for prompt in (tokens(1, 1), tokens(3, 4)):
        new = model.config.block_size - prompt.shape[1]
        ours = model.generate(prompt, max_new_tokens=new, temperature=0.0)
        with torch.no_grad():
            theirs = peer.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        assert ours.shape == theirs.shape == (prompt.shape[0], model.config.block_size)
        assert torch.equal(ours, theirs)
        assert len(set(ours[:, prompt.shape[1]:].reshape(-1).tolist())) > 2   # not one token repeated
        top_1 = model.generate(prompt, max_new_tokens=new, temperature=1.0, top_k=1,
                               generator=torch.Generator().manual_seed(0))
        assert torch.equal(top_1, ours)
