"""Hidden-test probe of the public APIs of moe, lm and sampling: strided and odd-dtype inputs, state, peers."""
import copy

import numpy as np
import pytest
import torch

from minillm import lm, sampling
from minillm.moe import (MoE, MoEConfig, fused_dispatch, per_expert_mask_loop, route, run_experts_grouped,
                         run_experts_on_slices, sequence_balance_loss, sorted_dispatch, update_bias)


def _dispatch_inputs(tokens=9, d=6, hidden=5, experts=4, top_k=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=dtype)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    gate = torch.rand(tokens, top_k, generator=g, dtype=dtype)
    w1 = torch.randn(experts, d, 2 * hidden, generator=g, dtype=dtype)
    w2 = torch.randn(experts, hidden, d, generator=g, dtype=dtype)
    return x, index, gate, w1, w2


# ---- MoE: routing ---------------------------------------------------------------------------------------

def test_route_with_integer_logits_weighs_like_the_same_float_logits():
    logits = torch.tensor([[1, 2, 0, 3], [0, 0, 5, 1]])
    ours = route(logits, None, 2, route_scale=2.5)
    expected = route(logits.float(), None, 2, route_scale=2.5)
    # before: the weights were cast back to the logits' int64, so every gate weight was 0 (no routed output)
    assert ours.gate_weight.is_floating_point()
    assert torch.equal(ours.expert_index, expected.expert_index)
    torch.testing.assert_close(ours.gate_weight, expected.gate_weight)
    torch.testing.assert_close(ours.gate_weight.sum(-1), torch.full((2,), 2.5))


def test_route_keeps_float_logits_dtypes_and_reads_strided_logits():
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert route(logits.to(dtype), None, 2).gate_weight.dtype == dtype
    strided = logits.t().contiguous().t()
    assert not strided.is_contiguous()
    a, b = route(strided, torch.linspace(-0.1, 0.1, 8), 3, 1.5, 4, 2), route(logits, torch.linspace(-0.1, 0.1, 8),
                                                                                3, 1.5, 4, 2)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.gate_weight, b.gate_weight)


# ---- MoE: balancing helpers -------------------------------------------------------------------------------

def test_sequence_balance_loss_takes_a_numpy_count_of_sequences():
    g = torch.Generator().manual_seed(0)
    affinity = torch.rand(8, 4, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(8)])
    # before: "batch=np.int64(2) must be a positive integer", for a positive integer
    torch.testing.assert_close(sequence_balance_loss(affinity, index, np.int64(2), 0.1),
                               sequence_balance_loss(affinity, index, 2, 0.1))
    with pytest.raises(ValueError, match=r"batch=.*3.* must be a positive integer dividing the 8 tokens"):
        sequence_balance_loss(affinity, index, np.int64(3), 0.1)


def test_sequence_balance_loss_passes_gradcheck_and_ignores_strides():
    g = torch.Generator().manual_seed(3)
    affinity = torch.rand(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)])
    assert torch.autograd.gradcheck(lambda a: sequence_balance_loss(a, index, 3, 0.3), (affinity,))
    strided = affinity.detach().t().contiguous().t()
    assert sequence_balance_loss(strided, index.t().contiguous().t(), 3, 0.3) == \
        sequence_balance_loss(affinity.detach(), index, 3, 0.3)


def test_update_bias_refuses_per_expert_rates_not_shaped_like_the_bias():
    bias, load = torch.zeros(4), torch.tensor([1, 2, 3, 4])
    # before: a broadcasting error from torch, or for (1, 4) a new bias of shape (1, 4), silently
    for rate in (torch.tensor([0.1, 0.2]), torch.full((1, 4), 0.1)):
        with pytest.raises(ValueError, match=r"update_bias: rate has shape .* one rate per expert"):
            update_bias(bias, load, rate)
    per_expert = update_bias(bias, load, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(per_expert, torch.tensor([0.1, 0.2, -0.3, -0.4]))
    assert torch.equal(update_bias(bias, load, 0), bias)
    assert torch.equal(update_bias(bias, load, torch.tensor(0.0)), bias)


# ---- MoE: dispatch on strided, expanded and sliced tensors --------------------------------------------------

def test_fused_dispatch_reads_strided_expanded_and_offset_tensors_like_contiguous_ones():
    x, index, gate, w1, w2 = _dispatch_inputs()
    reference = per_expert_mask_loop(x, index, gate, w1, w2)
    wide = torch.randn(w1.shape[0], w1.shape[1] + 3, w1.shape[2] + 2)
    sliced_w1 = wide[:, 1:w1.shape[1] + 1, :w1.shape[2]]
    sliced_x = torch.randn(x.shape[0], x.shape[1] + 1)[:, 1:]   # its data starts 4 bytes in
    cases = [
        (x.t().contiguous().t(), index.t().contiguous().t(), gate.t().contiguous().t(), w1, w2),
        (x, index, gate, w1.transpose(1, 2).contiguous().transpose(1, 2),
         w2.transpose(1, 2).contiguous().transpose(1, 2)),
        (x, index, gate, w1[:1].expand_as(w1), w2[:1].expand_as(w2)),
        (x[:1].expand_as(x), index, gate, w1, w2),
        (sliced_x, index, gate, sliced_w1, w2),
        (x, index.int(), gate, w1, w2),
    ]
    for args in cases:
        expected = per_expert_mask_loop(*(a.contiguous() for a in args))
        torch.testing.assert_close(fused_dispatch(*args), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_dispatch(*cases[0]), reference, rtol=1e-5, atol=1e-5)


def test_every_dispatch_passes_gradcheck_in_float64_at_tiny_sizes():
    g = torch.Generator().manual_seed(5)
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1]])
    inputs = (torch.randn(4, 2, generator=g, dtype=torch.float64).requires_grad_(),
              torch.rand(4, 2, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(3, 2, 6, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(3, 3, 2, generator=g, dtype=torch.float64).requires_grad_())
    runs = [
        lambda x, w, a, b: fused_dispatch(x, index, w, a, b),
        lambda x, w, a, b: sorted_dispatch(x, index, w, lambda s, c: run_experts_grouped(s, c, a, b), 3),
        lambda x, w, a, b: sorted_dispatch(x, index, w, lambda s, c: run_experts_on_slices(s, c, a, b), 3),
        lambda x, w, a, b: per_expert_mask_loop(x, index, w, a, b),
    ]
    for run in runs:
        assert torch.autograd.gradcheck(run, inputs)
    # the transposed (non-contiguous) weights of a tied or re-laid-out model give the same gradients
    a_t = inputs[2].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    fused_dispatch(inputs[0], index, inputs[1], a_t, inputs[3]).square().sum().backward()
    per_expert_mask_loop(inputs[0], index, inputs[1], inputs[2], inputs[3]).square().sum().backward()
    torch.testing.assert_close(a_t.grad, inputs[2].grad)


def test_dispatch_under_no_grad_and_inference_mode_gives_the_same_output():
    x, index, gate, w1, w2 = _dispatch_inputs(seed=2)
    expected = fused_dispatch(x, index, gate, w1.requires_grad_(), w2)
    with torch.no_grad():
        assert torch.equal(fused_dispatch(x, index, gate, w1, w2), expected)
    with torch.inference_mode():
        assert torch.equal(fused_dispatch(x, index, gate, w1, w2), expected)
        grouped = sorted_dispatch(x, index, gate, lambda s, c: run_experts_grouped(s, c, w1, w2), 4)
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)


# ---- MoE: the layer ------------------------------------------------------------------------------------------

def _layer(**overrides):
    torch.manual_seed(0)
    config = MoEConfig(**{"n_routed": 4, "n_shared": 1, "top_k": 2, "expert_hidden": 5,
                          "bias_update_rate": 0.01, **overrides})
    return MoE(6, config)


@pytest.mark.parametrize("field, value", [("n_shared", 0), ("n_shared", 2), ("n_routed", 8), ("expert_hidden", 7)])
def test_layer_refuses_a_config_changed_after_its_weights_were_built(field, value):
    layer = _layer().train()
    x = torch.randn(2, 3, 6)
    setattr(layer.config, field, value)
    # before: n_shared 1 -> 0 dropped the shared experts silently, 0 -> 1 was an AttributeError,
    # n_routed a size mismatch from torch, expert_hidden was ignored
    with pytest.raises(ValueError, match=rf"MoE: config.{field}={value} but the layer's weights were built .*new MoE"):
        layer(x)
    assert not layer.step_load.any()   # refused before any token was counted
    no_shared = _layer(n_shared=0)
    no_shared.config.n_shared = 1
    with pytest.raises(ValueError, match="config.n_shared=1 but the layer's weights were built for n_shared=0"):
        no_shared(x)


def test_layer_config_changes_that_need_no_new_weights_still_work():
    layer = _layer()
    x = torch.randn(2, 3, 6)
    expected = layer(x)
    layer.config.dispatch = "slices"
    torch.testing.assert_close(layer(x), expected)
    layer.config.top_k = 3
    assert layer.last_routing.expert_index.shape[-1] == 2
    layer(x)
    assert layer.last_routing.expert_index.shape[-1] == 3


def test_layer_gives_the_same_output_for_strided_expanded_and_reshaped_inputs():
    layer = _layer()
    x = torch.randn(2, 3, 6)
    expected = layer(x)
    torch.testing.assert_close(layer(x.transpose(0, 1)), layer(x.transpose(0, 1).contiguous()))
    torch.testing.assert_close(layer(x.reshape(1, 2, 3, 6)).reshape(2, 3, 6), expected)
    torch.testing.assert_close(layer(x[:1].expand(3, 3, 6)), layer(x[:1].expand(3, 3, 6).contiguous()))
    torch.testing.assert_close(layer(x[0, 0]), expected[0, 0])   # one token, (d,)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    layer.eval()
    assert torch.equal(layer(x), expected)   # train and eval mode route alike (the bias only changes by steps)


def test_deepcopy_mid_step_then_identical_steps_keep_the_layers_identical():
    layer = _layer(aux_loss_weight=0.01).train()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 5, 6, generator=g) for _ in range(4)]
    layer(batches[0])
    twin = copy.deepcopy(layer)
    for twin_layer in (layer, twin):
        optimizer = torch.optim.SGD(twin_layer.parameters(), lr=0.1)
        for step, x in enumerate(batches[1:]):
            if step:
                twin_layer(x)
            out = twin_layer(x)
            (out.square().mean() + twin_layer.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            twin_layer.after_optimizer_step()
    assert torch.equal(layer.expert_bias, twin.expert_bias) and layer.load_history == twin.load_history
    for (name, a), b in zip(layer.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


# ---- lm ----------------------------------------------------------------------------------------------------

def _three_models():
    torch.manual_seed(0)
    return [lm.CountingBigram.from_tokens([0, 1, 2, 1], 3), lm.NeuralBigram(lm.BigramConfig(3)),
            lm.MLPLanguageModel(lm.MLPConfig(3, context=2, n_embd=4, hidden=8))]


def test_models_check_the_range_of_unsigned_token_ids():
    # the reading of uint16/32/64 ids is in test_lm.py's test_models_read_any_integer_dtype_as_token_ids
    with pytest.raises(ValueError, match=r"token ids range over \[0, 7\] but vocab_size is 3"):
        _three_models()[2](torch.tensor([[0, 7]], dtype=torch.uint16))


def test_a_float64_model_keeps_a_float64_loss_and_passes_gradcheck():
    for model in _three_models():
        model = model.double()
        idx = torch.tensor([[0, 1, 2], [2, 2, 1]])
        logits, loss = model(idx, idx.flip(1))
        # before: the loss was computed in float32 whatever the model's precision (GPT keeps float64)
        assert logits.dtype == loss.dtype == torch.float64
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), idx.flip(1).reshape(-1))
        assert torch.equal(loss, expected)
    mlp = _three_models()[2].double()
    names = [name for name, _ in mlp.named_parameters()]
    weights = tuple(p.detach().clone().requires_grad_() for p in mlp.parameters())
    assert torch.autograd.gradcheck(
        lambda *w: torch.func.functional_call(mlp, dict(zip(names, w)), (idx, idx.flip(1)))[1], weights)
    half = _three_models()[1].to(torch.bfloat16)
    assert half(idx, idx)[1].dtype == torch.float32   # half precisions are still widened


def test_bigram_statistics_match_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (300,), generator=g)
    counts = np.zeros((6, 6))
    np.add.at(counts, (ids[:-1].numpy(), ids[1:].numpy()), 1)
    assert np.array_equal(lm.bigram_counts(ids[::1], 6).numpy(), counts)
    assert torch.equal(lm.bigram_counts(torch.stack([ids, ids], 1)[:, 0], 6), lm.bigram_counts(ids, 6))  # strided
    smoothed = (counts + 0.5) / (counts + 0.5).sum(1, keepdims=True)
    probabilities = lm.bigram_probabilities(lm.bigram_counts(ids, 6), 0.5)
    np.testing.assert_allclose(probabilities.numpy(), smoothed, rtol=1e-12)
    nll = -np.mean(np.log(smoothed[ids[:-1].numpy(), ids[1:].numpy()]))
    assert lm.bigram_nll(probabilities, ids) == pytest.approx(nll, rel=1e-12)
    assert lm.bigram_nll(probabilities.t().contiguous().t(), ids.numpy().astype(np.uint16)) == pytest.approx(nll)
    assert lm.perplexity(torch.tensor(nll, requires_grad=True)) == pytest.approx(np.exp(nll))
    model = lm.CountingBigram(probabilities, block_size=7)
    assert lm.evaluate_nll(model, ids, batch_size=3) == pytest.approx(nll, rel=1e-6)
    assert lm.evaluate_nll(model.double(), ids[::1].numpy()) == pytest.approx(nll, rel=1e-9)   # a float32 table


def test_evaluate_nll_of_strided_tokens_and_under_inference_mode():
    model = _three_models()[2]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 3, (2, 50), generator=g)
    expected = lm.evaluate_nll(model, tokens[0].clone(), block_size=8)
    assert lm.evaluate_nll(model, tokens[0], block_size=np.int64(8)) == pytest.approx(expected)
    assert lm.evaluate_nll(model, tokens.t()[:, 0], block_size=8) == pytest.approx(expected)   # stride 50
    with torch.inference_mode():
        assert lm.evaluate_nll(model, tokens[0], block_size=8) == pytest.approx(expected)
    assert model.training   # restored


# ---- sampling --------------------------------------------------------------------------------------------------

def test_filters_match_transformers_on_rows_of_different_scales_with_masked_tokens():
    warpers = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4, 1, dtype=torch.long)
    for _ in range(60):
        vocab = int(torch.randint(2, 40, (1,), generator=g))
        logits = torch.randn(4, vocab, generator=g) * torch.tensor([[0.1], [1.0], [5.0], [30.0]])
        logits[torch.rand(4, vocab, generator=g) < 0.3] = float("-inf")
        logits[:, 0] = torch.randn(4, generator=g)   # one finite score per row
        temperature = float(torch.rand(1, generator=g)) * 2 + 0.05
        k = int(torch.randint(1, vocab + 3, (1,), generator=g))
        p = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        scores = warpers.TemperatureLogitsWarper(temperature)(ids, logits.clone())
        scores = warpers.TopPLogitsWarper(p)(ids, warpers.TopKLogitsWarper(k)(ids, scores))
        ours = sampling.next_token_probabilities(logits, temperature, top_k=k, top_p=p)
        torch.testing.assert_close(ours, torch.softmax(scores, -1), rtol=1e-5, atol=1e-6)
        # the same rows laid out transposed, as a 3-D batch
        batched = logits.t().contiguous().t().reshape(2, 2, vocab)
        batched_probabilities = sampling.next_token_probabilities(batched, temperature, k, p)
        torch.testing.assert_close(batched_probabilities.reshape(4, vocab), ours)


def test_sampling_of_batches_of_any_rank_and_size_repeats_with_a_generator():
    logits = torch.randn(2, 3, 4, 7, generator=torch.Generator().manual_seed(0))
    a = sampling.sample_next_token(logits, 0.8, 5, 0.9, generator=torch.Generator().manual_seed(1))
    b = sampling.sample_next_token(logits.reshape(-1, 7), 0.8, 5, 0.9, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 4) and torch.equal(a.reshape(-1), b)
    assert sampling.sample_next_token(torch.randn(0, 7)).shape == (0,)
    assert sampling.sample_next_token(torch.randn(7), temperature=0).shape == ()
    with torch.inference_mode():
        c = sampling.sample_next_token(logits, 0.8, 5, 0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, c)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert sampling.next_token_probabilities(logits.to(dtype), top_p=0.9).dtype == torch.float32
        assert sampling.top_k_filter(logits.to(dtype), 2).dtype == dtype
        assert sampling.top_p_filter(logits.to(dtype), 0.5).dtype == dtype


def test_generate_of_an_empty_batch_with_a_stop_token_has_the_full_length():
    model = lm.CountingBigram(torch.full((4, 4), 0.25), block_size=8)
    prompt = torch.zeros(0, 2, dtype=torch.long)
    # before: 0 rows counted as "every row finished" after the first token: (0, 3) here, (0, 6) without stop_token
    assert sampling.generate(model, prompt, 4, stop_token=3).shape == (0, 6)
    assert sampling.generate(model, prompt, 4).shape == (0, 6)


def test_generate_repeats_with_a_generator_and_stops_per_row():
    torch.manual_seed(0)
    model = lm.CountingBigram(torch.softmax(torch.randn(5, 5), -1), block_size=8)
    prompt = torch.tensor([[1, 2], [0, 0], [4, 3]])
    runs = [sampling.generate(model, prompt, 12, generator=torch.Generator().manual_seed(7), stop_token=0)
            for _ in range(2)]
    assert torch.equal(*runs)
    for row in runs[0]:
        drawn = row[2:].tolist()
        if 0 in drawn:   # after the first stop token, only stop tokens
            assert set(drawn[drawn.index(0):]) == {0}
    with torch.inference_mode():
        assert torch.equal(sampling.generate(model, prompt, 12, generator=torch.Generator().manual_seed(7),
                                             stop_token=0), runs[0])
