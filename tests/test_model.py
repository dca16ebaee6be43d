"""Tests of minillm.model: config validation, causality, attention variants, RoPE, counts, generation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minillm import sampling
from minillm.model import GPT, GPTConfig, apply_rope, rope_cos_sin
from minillm.moe import MoEConfig


def tiny_config(**overrides) -> GPTConfig:
    settings = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    settings.update(overrides)
    return GPTConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("overrides, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=-4), "block_size"),
    (dict(n_layer=1.5), "n_layer"),
    (dict(n_head=0), "n_head"),
    (dict(n_embd=100, n_head=3), "n_embd=100"),
    (dict(n_embd=12, n_head=4), "n_embd/n_head"),   # head_dim 3 is odd, RoPE needs pairs
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(rope_base=0.5), "rope_base"),
    (dict(rope_base=math.inf), "rope_base"),
    (dict(rope_base=math.nan), "rope_base"),
    (dict(n_layer="4"), "n_layer"),          # checked before n_dense_layers is compared with it
    (dict(n_dense_layers=3), "n_dense_layers"),
    (dict(attention="flash"), "attention"),
    (dict(tie_weights="yes"), "tie_weights"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match="GPTConfig") as error:
        tiny_config(**overrides)
    assert field in str(error.value)


def test_divisibility_message_says_what_to_do():
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3; pick n_embd as a multiple"):
        GPTConfig(n_embd=100, n_head=3)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_causality_future_tokens_do_not_change_past_logits(attention):
    model = tiny_model(attention=attention)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 64
        logits, _ = model(idx)
        logits_changed, _ = model(changed)
        torch.testing.assert_close(logits[:, : t + 1], logits_changed[:, : t + 1])
        # ...and the change does reach position t+1, so the comparison above could have failed
        assert not torch.allclose(logits[:, t + 1], logits_changed[:, t + 1])


def test_sdpa_and_manual_attention_agree():
    sdpa = tiny_model(seed=3, attention="sdpa")
    manual = GPT(tiny_config(attention="manual")).eval()
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    for length in (16, 7):  # any T <= block_size
        torch.testing.assert_close(sdpa(idx[:, :length])[0], manual(idx[:, :length])[0], atol=1e-5, rtol=1e-5)


def test_forward_rejects_sequences_longer_than_block_size():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size=16.*crop"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_rope_makes_the_model_position_aware():
    # Attention without positions sees its context as a set: "a b x" and "b a x" give x the same
    # hidden state. RoPE must tell the two orders apart. One layer, because with two the causal mask
    # alone leaks order (position 1 sees a different prefix in each).
    model = tiny_model(n_layer=1)
    orders = torch.tensor([[3, 9, 5], [9, 3, 5]])
    hidden_last = model(orders)[0][:, -1]
    assert not torch.allclose(hidden_last[0], hidden_last[1], atol=1e-5)
    for block in model.blocks:  # control: switch RoPE off (rotation by angle 0) and the orders collapse
        block.attn.rope_cos.fill_(1.0)
        block.attn.rope_sin.zero_()
    hidden_last = model(orders)[0][:, -1]
    torch.testing.assert_close(hidden_last[0], hidden_last[1])


def test_rope_dot_product_depends_only_on_the_offset():
    head_dim, length = 8, 40
    cos, sin = rope_cos_sin(head_dim, length)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)
    rotated_q = apply_rope(q.expand(length, head_dim), cos, sin)  # q placed at every position
    rotated_k = apply_rope(k.expand(length, head_dim), cos, sin)

    def score(query_position: int, key_position: int) -> torch.Tensor:
        return rotated_q[query_position] @ rotated_k[key_position]

    for offset in (0, 3, 11):
        reference = score(offset, 0)
        for shift in (1, 7, 25):
            torch.testing.assert_close(score(offset + shift, shift), reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 0), score(4, 0))  # a different offset gives a different score
    torch.testing.assert_close(rotated_q[0], q)  # position 0 is not rotated
    torch.testing.assert_close(rotated_q.norm(dim=-1), q.norm().expand(length))  # rotations keep length


@pytest.mark.parametrize("overrides", [dict(), dict(tie_weights=False, mlp_ratio=3, n_layer=3)])
def test_num_parameters_matches_hand_count(overrides):
    config = tiny_config(**overrides)
    model = GPT(config)
    V, C, L, r = config.vocab_size, config.n_embd, config.n_layer, config.mlp_ratio
    embedding = V * C
    per_layer = 2 * C + 3 * C * C + C * C + 2 * r * C * C  # two norms, qkv, out proj, MLP in and out
    head = 0 if config.tie_weights else V * C
    expected = embedding + L * per_layer + C + head
    assert model.num_parameters() == expected
    assert model.num_parameters(non_embedding=True) == expected - embedding


def counted_flops(model: GPT, idx: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(idx)
        if backward:
            logits.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [
    dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32),
    dict(vocab_size=100, block_size=64, n_layer=3, n_head=4, n_embd=64, mlp_ratio=3, tie_weights=False),
])
def test_flops_per_token_matches_flop_counter(overrides):
    # FlopCounterMode counts nothing for the fused CPU SDPA kernel, so count the same math done by hand.
    model = GPT(GPTConfig(attention="manual", **overrides))
    batch, time = 2, model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (batch, time))
    tokens = batch * time
    forward = counted_flops(model, idx, backward=False) / tokens
    training = counted_flops(model, idx, backward=True) / tokens
    assert forward == pytest.approx(model.flops_per_token(seq_len=time, training=False), rel=0.10)
    assert training == pytest.approx(model.flops_per_token(seq_len=time, training=True), rel=0.10)
    assert model.flops_per_token() == model.flops_per_token(seq_len=model.config.block_size)


def test_generate_crops_a_prompt_longer_than_block_size():
    model = tiny_model()
    prompt = torch.randint(0, 64, (40,))  # block_size is 16
    out = model.generate(prompt, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (45,)
    assert torch.equal(out[:40], prompt)
    batched = model.generate(prompt.repeat(2, 1), max_new_tokens=3, top_k=5)
    assert batched.shape == (2, 43)
    assert int(out.max()) < 64 and int(out.min()) >= 0


def test_temperature_zero_is_greedy_argmax_step_by_step():
    model = tiny_model(seed=4)
    prompt = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)  # runs past block_size=16
    sequence = prompt
    for _ in range(12):
        logits, _ = model(sequence[:, -16:])
        sequence = torch.cat((sequence, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    assert torch.equal(out, sequence)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, temperature=0), out)


def test_top_k_one_equals_greedy():
    model = tiny_model(seed=5)
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(prompt, max_new_tokens=8, temperature=0)
    sampled = model.generate(prompt, max_new_tokens=8, temperature=1.5, top_k=1,
                             generator=torch.Generator().manual_seed(9))
    assert torch.equal(sampled, greedy)
    huge_k = model.generate(prompt, max_new_tokens=2, top_k=10_000)  # clipped to vocab_size
    assert huge_k.shape == (3, 6)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model(seed=6)
    prompt = torch.tensor([1, 2, 3])
    first = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7))
    second = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    model = tiny_model()
    arguments = dict(max_new_tokens=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([1, 2]), **arguments)


def test_targets_of_minus_100_are_ignored():
    model = tiny_model(seed=7)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(6))
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[0, 4:9] = True
    keep[1, 10:] = True
    masked = targets.masked_fill(~keep, -100)
    logits, loss = model(idx, masked)
    reference = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, reference)
    _, full_loss = model(idx, targets)
    assert not math.isclose(loss.item(), full_loss.item(), rel_tol=1e-4)


def test_residual_projections_start_smaller():
    model = GPT(tiny_config(n_layer=8, n_embd=64))
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.15)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.lm_head.weight is model.token_embedding.weight


def test_optimizer_decays_only_matrices():
    model = tiny_model()
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for parameter in model.parameters():
        assert (id(parameter) in decayed) == (parameter.dim() >= 2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_token_ids_outside_the_vocabulary_are_a_clear_error():
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary"):
        model(torch.tensor([[1, 12, 3]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    config = tiny_config(n_layer=np.int64(3), n_embd=np.int32(32), dropout=np.float64(0.1),
                         rope_base=np.float64(500.0), n_dense_layers=np.int64(1))
    assert (config.n_layer, config.n_embd, config.dropout, config.rope_base, config.n_dense_layers) == \
        (3, 32, 0.1, 500.0, 1)
    assert [type(getattr(config, name)) for name in ("n_layer", "n_embd", "dropout", "rope_base", "n_dense_layers")] \
        == [int, int, float, float, int]
    assert GPT(config).config.n_layer == 3


def test_an_empty_sequence_is_a_clear_error_not_a_nan_loss():
    model = tiny_model()
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="holds no tokens"):
            model(empty, empty)


def test_generate_passes_top_p_through():
    model = tiny_model(seed=8)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    for top_p in (0.5, 0.9):
        ours = model.generate(prompt, 10, temperature=1.2, top_p=top_p, generator=torch.Generator().manual_seed(2))
        reference = sampling.generate(model, prompt, 10, temperature=1.2, top_p=top_p,
                                      generator=torch.Generator().manual_seed(2))
        assert torch.equal(ours, reference)
    tiny_p = model.generate(prompt, 10, temperature=1.5, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiny_p, model.generate(prompt, 10, temperature=0))  # only the best token is left
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=1.5)


def test_a_bf16_model_keeps_rope_tables_in_float32_and_stays_close_to_float32():
    model = tiny_model(block_size=64)
    idx = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    reference, _ = model(idx)
    half = tiny_model(block_size=64).to(torch.bfloat16)
    attention = [m for m in half.modules() if hasattr(m, "rope_cos")]
    assert attention and all(m.rope_cos.dtype == m.rope_sin.dtype == torch.float32 for m in attention)
    assert half.lm_head.weight.dtype == torch.bfloat16
    logits, _ = half(idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1


def test_moe_layers_apply_the_same_residual_dropout_as_the_dense_mlp():
    moe = MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=16)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model = tiny_model(dropout=0.5, moe=moe).train()
    # Only the MoE branches drop: the embedding and attention dropout are switched off.
    model.dropout.eval()
    for block in model.blocks:
        block.attn.eval()
    torch.manual_seed(1)
    first, _ = model(idx)
    torch.manual_seed(2)
    second, _ = model(idx)
    assert not torch.equal(first, second)
    block = model.blocks[0]
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    dropped = block(x)
    block.eval()
    with torch.no_grad():
        residual = x + block.attn(block.norm_attn(x))
        kept = residual + block.mlp(block.norm_mlp(residual))
        torch.testing.assert_close(block(x), kept)   # eval mode: no dropout
    assert not torch.allclose(dropped, kept)

    # dropout=0.0 (the default) changes nothing: train mode gives eval mode's logits exactly.
    plain = tiny_model(moe=moe)
    evaluated, _ = plain(idx)
    trained, _ = plain.train()(idx)
    assert torch.equal(trained, evaluated)


def test_int32_targets_give_the_same_loss_and_bad_or_fully_masked_targets_are_clear_errors():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    logits, loss = model(idx, targets)
    assert model(idx.int(), targets.int())[1].item() == pytest.approx(loss.item())
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 64), targets.view(-1)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="every target is -100"):
        model(idx, torch.full_like(idx, -100))
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        model(idx, targets.float())
    partly = targets.clone()
    partly[:, :4] = -100   # masked prompts: the loss is the mean over the rest
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 64), targets[:, 4:].reshape(-1))
    assert model(idx, partly)[1].item() == pytest.approx(expected.item(), rel=1e-6)


def test_numpy_scalars_are_accepted_for_flops_seq_len_and_bool_fields():
    config = tiny_config(tie_weights=np.True_)
    assert config.tie_weights is True
    model = GPT(config)
    assert model.flops_per_token(seq_len=np.int64(8)) == model.flops_per_token(seq_len=8)


def test_a_forward_with_targets_compiles_to_one_graph():
    # The value checks (ids in the vocabulary, not every target masked) read tensors' values; under
    # torch.compile each would split the graph (and warn at every step), so they are left out there.
    model = tiny_model().train()
    idx, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_a_float64_gpt_computes_in_float64_and_16_bit_ones_in_float32(attention):
    # RMSNorm, RoPE, the manual softmax and the loss used to narrow float64 to float32 (gradcheck failed)
    from minillm.model import RMSNorm
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(RMSNorm(6).double(), (x,))
    cos, sin = rope_cos_sin(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))
    model = tiny_model(attention=attention, vocab_size=11, n_embd=8).double()
    idx = torch.randint(0, 11, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.dtype == loss.dtype == model.blocks[0].attn.rope_cos.dtype == torch.float64
    head = model.lm_head.weight
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(model, {"lm_head.weight": w}, (idx, idx))[1],
                                    (head.detach().clone().requires_grad_(),))
    for dtype in (torch.float32, torch.bfloat16):   # back down: tables and the loss in float32
        model = model.to(dtype)
        assert model.blocks[0].attn.rope_cos.dtype == model(idx, idx)[1].dtype == torch.float32


def test_forward_explains_targets_outside_the_vocabulary_and_inputs_that_are_not_tensors():
    model = tiny_model(vocab_size=11)
    idx = torch.randint(0, 11, (2, 5))
    for bad in (11, -1):
        with pytest.raises(ValueError, match=f"target {bad} is outside the vocabulary"):
            model(idx, torch.full((2, 5), bad))
    masked = torch.full((2, 5), -100)
    masked[0, 0] = 3
    model(idx, masked)                                       # -100 masks a position: no complaint
    with pytest.raises(TypeError, match="idx must be a torch tensor"):
        model(np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(TypeError, match="targets must be a torch tensor"):
        model(idx, idx.numpy())
