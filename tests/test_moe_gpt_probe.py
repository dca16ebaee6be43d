"""A GPT with mixture-of-experts layers used the way a class project uses it: config options, train and eval
modes, generation, state dicts, copies, dtypes, the training loop's aux loss and bias update, and peers
(transformers' DeepSeek-V3 and Mixtral MoE blocks) as references."""
from __future__ import annotations

import copy
import dataclasses
import io
import pickle

import pytest
import torch

from minillm.model import GPT, GPTConfig
from minillm.moe import MoE, MoEConfig, fused_dispatch, route, sequence_balance_loss, update_bias
from minillm.train import TrainConfig, train


def moe_gpt(seed: int = 0, n_layer: int = 2, n_dense_layers: int = 1, **moe_overrides) -> GPT:
    moe = dict(n_routed=8, n_shared=1, top_k=2, expert_hidden=16, bias_update_rate=0.01)
    moe.update(moe_overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=n_layer, n_head=2, n_embd=32, moe=MoEConfig(**moe),
                         n_dense_layers=n_dense_layers))


def tokens(batch: int = 2, time: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32, (batch, time), generator=torch.Generator().manual_seed(seed))


def loads(model: GPT) -> list[list[int]]:
    return [layer.step_load.tolist() for layer in model.moe_layers()]


# ---- defects found while probing (each of these failed before its fix) ------------------------------------

@pytest.mark.parametrize("bad", ["shape", "dtype", "all_masked", "outside"])
def test_a_call_refused_for_its_targets_counts_no_tokens_in_the_moe_load(bad):
    model = moe_gpt().train()
    idx = tokens()
    targets = {"shape": idx[:, :4], "dtype": idx.float(), "all_masked": torch.full_like(idx, -100),
               "outside": idx + 100}[bad]
    with pytest.raises((ValueError, TypeError), match="GPT.forward: .*target"):
        model(idx, targets)
    # The refused call must not steer the next bias update (it used to run every block first, counting the tokens).
    assert loads(model) == [[0] * 8]
    model.after_optimizer_step()
    assert model.moe_layers()[0].load_history == [] and not model.moe_layers()[0].expert_bias.any()


def test_a_gpt_config_with_an_unknown_moe_field_names_it():
    with pytest.raises(TypeError, match=r"GPTConfig: moe has unknown field\(s\) 'n_experts'.*n_routed"):
        GPTConfig(moe={"n_experts": 8, "top_k": 2})
    assert GPTConfig(moe={"n_routed": 8, "top_k": 3}).moe == MoEConfig(n_routed=8, top_k=3)


def test_route_refuses_counts_that_are_not_integers_and_a_nonsense_route_scale():
    logits = torch.randn(4, 8)
    for name, args in (("top_k", (True,)), ("top_k", (2.0,)), ("n_groups", (2, 1.0, 2.0, 1)),
                       ("top_groups", (2, 1.0, 2, 1.0))):
        with pytest.raises(TypeError, match=f"route: {name}=.* must be an integer"):
            route(logits, None, *args)
    for scale in (-1.0, 0.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="route_scale=.* must be a finite number > 0"):
            route(logits, None, 2, scale)
    np = pytest.importorskip("numpy")   # numpy numbers (a sweep) are fine
    expected = route(logits, None, 2, 2.5, 2, 1)
    got = route(logits, None, np.int64(2), np.float64(2.5), np.int32(2), np.int64(1))
    assert torch.equal(got.expert_index, expected.expert_index)
    torch.testing.assert_close(got.gate_weight, expected.gate_weight)


def test_bias_update_and_balance_loss_refuse_rates_that_would_unbalance_or_erase():
    bias, load = torch.zeros(4), torch.tensor([10, 2, 4, 4])
    for rate in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="update_bias: rate=.* must be a finite number >= 0"):
            update_bias(bias, load, rate)
    with pytest.raises(ValueError, match="negative or NaN count"):
        update_bias(bias, torch.tensor([10, -2, 4, 4]), 0.1)
    torch.testing.assert_close(update_bias(bias, load, torch.tensor(0.1)), torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(update_bias(bias, load, 0), bias)
    affinity, index = torch.rand(6, 8), torch.randint(0, 8, (6, 2))
    for alpha in (-0.01, float("nan")):
        with pytest.raises(ValueError, match="sequence_balance_loss: alpha=.* must be a finite number >= 0"):
            sequence_balance_loss(affinity, index, 2, alpha)


def test_moe_settings_changed_after_the_check_are_refused_not_silently_ignored_or_flipped():
    model = moe_gpt().train()
    layer = model.moe_layers()[0]
    idx = tokens()
    model(idx, idx)
    counted = layer.step_load.clone()
    layer.config.bias_update_rate = -0.01          # used to be skipped silently (rate > 0 was the test)
    with pytest.raises(ValueError, match="update_bias: rate=-0.01"):
        model.after_optimizer_step()
    assert torch.equal(layer.step_load, counted) and layer.load_history == []   # nothing half-done
    layer.config.bias_update_rate = 0.01
    model.after_optimizer_step()
    assert len(layer.load_history) == 1 and layer.expert_bias.abs().max() == pytest.approx(0.01)
    layer.config.aux_loss_weight = -1.0            # would reward imbalance: used to be skipped silently
    with pytest.raises(ValueError, match="alpha=-1.0"):
        model(idx, idx)
    assert not layer.step_load.any()               # the refused forward counted no tokens
    layer.config.aux_loss_weight = 0.0
    layer.config.route_scale = -2.5                # would flip every routed output
    with pytest.raises(ValueError, match="route_scale=-2.5"):
        model(idx, idx)


def test_load_stats_hands_out_a_copy_of_the_history():
    model = moe_gpt().train()
    model(tokens())
    model.after_optimizer_step()
    layer = model.moe_layers()[0]
    stats = layer.load_stats()
    stats["tokens_per_expert"].sort(reverse=True)
    stats["tokens_per_expert"][0] = 10 ** 6
    assert sum(layer.load_history[0]) == 2 * 8 * 2 and layer.load_stats()["tokens_per_expert"] == layer.load_history[0]


def test_casting_a_model_keeps_the_trained_bias_value_not_only_its_float32_dtype():
    model = moe_gpt()
    layer = model.moe_layers()[0]
    trained = torch.tensor([0.5003, -0.1234567, 0.011, 3.14159, 0.0, -0.5007, 1e-4, 2.001])
    with torch.no_grad():
        layer.expert_bias.copy_(trained)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        # It used to pass through the cast (0.5003 -> 0.5 in bf16) and come back rounded, by up to a few gamma.
        assert torch.equal(copy.deepcopy(model).to(dtype).moe_layers()[0].expert_bias, trained)
    assert torch.equal(model.bfloat16().float().moe_layers()[0].expert_bias, trained)
    meta = moe_gpt().to("meta").to(torch.bfloat16).to_empty(device="cpu")
    assert meta.moe_layers()[0].expert_bias.dtype == torch.float32


# ---- the integration as a student uses it (regression coverage) --------------------------------------------

def test_dense_layers_and_moe_layers_are_where_the_config_says():
    model = moe_gpt(n_layer=3, n_dense_layers=1)
    assert [type(block.mlp).__name__ for block in model.blocks] == ["MLP", "MoE", "MoE"]
    assert len(model.moe_layers()) == 2 and all(layer.config is model.config.moe for layer in model.moe_layers())
    all_dense = moe_gpt(n_layer=2, n_dense_layers=2)   # allowed: an ablation with the MoE config kept
    assert all_dense.moe_layers() == [] and all_dense.num_active_parameters() == all_dense.num_parameters()
    for bad in (-1, 3, 1.0, True):
        with pytest.raises(ValueError, match="n_dense_layers"):
            GPTConfig(n_layer=2, moe=MoEConfig(), n_dense_layers=bad)


def test_batch_of_one_and_sequences_of_one_token_in_every_mode_and_dispatch():
    for dispatch in ("auto", "fused", "grouped", "slices"):
        model = moe_gpt(dispatch=dispatch, aux_loss_weight=0.01, n_groups=4, top_groups=2)
        idx = tokens(1, 1)
        logits, loss = model.train()(idx, idx)
        assert logits.shape == (1, 1, 32) and torch.isfinite(loss)
        loss.backward()
        assert loads(model) == [[1 if e in model.moe_layers()[0].last_routing.expert_index[0].tolist() else 0
                                 for e in range(8)]]
        with torch.no_grad():
            evaluated, eval_loss = model.eval()(idx, idx)
        with torch.inference_mode():
            inferred, _ = model(idx)
        torch.testing.assert_close(evaluated, logits.detach())
        torch.testing.assert_close(inferred, evaluated)
        assert eval_loss < loss   # eval mode: no aux loss on top of the cross-entropy
        assert sum(map(sum, loads(model))) == 2     # eval forwards count nothing
        out = model.generate(torch.tensor([3]), 5, temperature=0)
        assert out.shape == (6,) and not model.training


def test_generate_in_train_mode_counts_nothing_and_restores_the_mode():
    model = moe_gpt().train()
    before = [layer.last_routing for layer in model.moe_layers()]
    out = model.generate(tokens(2, 3), 20, generator=torch.Generator().manual_seed(0))   # past block_size: cropped
    assert out.shape == (2, 23) and model.training and loads(model) == [[0] * 8]
    assert before == [None] and model.moe_layers()[0].last_routing.expert_index.shape == (2 * 16, 2)


def test_after_optimizer_step_without_a_forward_or_twice_does_nothing_more():
    model = moe_gpt().train()
    layer = model.moe_layers()[0]
    model.after_optimizer_step()                   # no forward yet
    assert layer.load_history == [] and not layer.expert_bias.any()
    model(tokens())
    model.after_optimizer_step()
    model.after_optimizer_step()                   # twice: the second finds no tokens
    assert len(layer.load_history) == 1
    bias = layer.expert_bias.clone()
    load = torch.tensor(layer.load_history[0], dtype=torch.float)
    torch.testing.assert_close(bias, 0.01 * torch.sign(load.mean() - load))   # overloaded down, underloaded up
    model(tokens())
    layer.reset_load()                             # forgotten: no step recorded, stats still the last step's
    model.after_optimizer_step()
    assert len(layer.load_history) == 1 and torch.equal(layer.expert_bias, bias)
    assert layer.load_stats()["tokens_per_expert"] == layer.load_history[0]


def test_bias_moves_by_gamma_only_when_enabled_and_never_from_eval_forwards():
    for rate in (0.0, 0.003):
        model = moe_gpt(bias_update_rate=rate)
        layer = model.moe_layers()[0]
        model.eval()(tokens())
        model.after_optimizer_step()
        assert layer.load_history == [] and not layer.expert_bias.any()
        model.train()(tokens())
        model.eval()                               # counted in train mode, stepped in eval mode: still one step
        model.after_optimizer_step()
        load = torch.tensor(layer.load_history[0], dtype=torch.float)
        torch.testing.assert_close(layer.expert_bias, rate * torch.sign(load.mean() - load))
        assert not layer.expert_bias.requires_grad and "expert_bias" not in dict(layer.named_parameters())


def test_router_learns_through_the_gate_weights_and_the_aux_loss_never_through_the_bias():
    model = moe_gpt(aux_loss_weight=0.0).train()
    idx = tokens()
    layer = model.moe_layers()[0]
    with torch.no_grad():
        layer.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.expert_bias.grad is None
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    assert all(p is not layer.expert_bias for group in optimizer.param_groups for p in group["params"])
    # top_k=1: the normalised gate weight is always route_scale, so the loss leaves the router untrained (as in
    # DeepSeek-V3 and transformers); the sequence-wise balance loss is then what reaches it.
    for alpha, trained in ((0.0, False), (0.01, True)):
        single = moe_gpt(top_k=1, route_scale=2.5, aux_loss_weight=alpha).train()
        single(idx, idx)[1].backward()
        assert (single.moe_layers()[0].router.weight.grad.abs().max() > 1e-8) == trained


def test_the_training_loop_adds_the_aux_loss_and_updates_the_bias_once_per_step():
    model = moe_gpt(aux_loss_weight=2.0, bias_update_rate=0.01)
    model.train()(tokens(1, 8))                    # counted before training: train() forgets it
    reference = copy.deepcopy(model)
    text = torch.arange(400) % 7
    config = TrainConfig(steps=2, batch_size=2, grad_accum=2, lr=1e-9, warmup_steps=0, weight_decay=0.0,
                         eval_interval=100, progress=False, device="cpu")
    result = train(model, text, None, config)
    layer = model.moe_layers()[0]
    assert [sum(step) for step in layer.load_history] == [2 * 2 * 16 * 2] * 2   # micro-batches summed, per step
    assert layer.expert_bias.abs().max() <= 0.02 + 1e-7 and layer.expert_bias.any()
    from minillm.train import BatchSampler
    sampler = BatchSampler(text, 16, 2, config.seed, torch.device("cpu"))
    reference.train()
    losses, aux = [], []
    for micro in range(2):
        x, y = sampler.batch(1 * 2 + micro)
        logits, loss = reference(x, y)
        aux.append(reference.moe_layers()[0].aux_loss.item())
        cross_entropy = torch.nn.functional.cross_entropy(logits.view(-1, 32), y.view(-1))
        torch.testing.assert_close(loss, cross_entropy + reference.moe_layers()[0].aux_loss)
        losses.append(loss.item())
    assert min(aux) > 1.0                          # alpha=2: a term the reported loss must hold
    assert result.history[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_state_dict_round_trip_keeps_the_bias_and_not_the_per_step_counts():
    model = moe_gpt().train()
    idx = tokens()
    model(idx)
    model.after_optimizer_step()
    model(idx)                                     # counts of a step in progress
    state = model.state_dict()
    assert "blocks.1.mlp.expert_bias" in state and not any("step_load" in key for key in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = moe_gpt(seed=5)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.moe_layers()[0].expert_bias, model.moe_layers()[0].expert_bias)
    assert loads(other) == [[0] * 8]               # a fresh model's counters: per step, never checkpointed
    torch.testing.assert_close(other.eval()(idx)[0], model.eval()(idx)[0])
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.state_dict()["blocks.1.mlp.expert_bias"].dtype == torch.float32
    other.load_state_dict(half.state_dict())
    assert torch.equal(other.moe_layers()[0].expert_bias, model.moe_layers()[0].expert_bias)


def test_deepcopy_and_pickle_mid_step_keep_weights_bias_and_counters():
    model = moe_gpt(aux_loss_weight=0.01).train()
    idx = tokens()
    _, loss = model(idx, idx)                      # aux losses hold autograd graphs now
    expected, _ = copy.deepcopy(model).eval()(idx)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert loads(clone) == loads(model) and clone.moe_layers()[0].aux_loss is None
        assert torch.equal(clone.eval()(idx)[0], expected)
        clone.after_optimizer_step()               # the copied counts of the step in progress
        assert len(clone.moe_layers()[0].load_history) == 1 and model.moe_layers()[0].load_history == []
        assert clone.moe_layers()[0].expert_bias.any() and not model.moe_layers()[0].expert_bias.any()
    loss.backward()                                # the original's graph is intact


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_dtype_trains_generates_and_keeps_the_bias_in_float32(dtype):
    model = moe_gpt(aux_loss_weight=0.01)
    idx = tokens()
    reference, _ = model.eval()(idx)
    model.to(dtype)
    layer = model.moe_layers()[0]
    assert layer.w_gate_up.dtype == dtype and layer.expert_bias.dtype == torch.float32
    logits, _ = model(idx)
    assert logits.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float64 else dict(rtol=0.1, atol=0.1)
    torch.testing.assert_close(logits.float(), reference, **tolerance)
    _, loss = model.train()(idx, idx)
    loss.backward()
    assert layer.router.weight.grad.dtype == dtype and torch.isfinite(layer.router.weight.grad).all()
    model.after_optimizer_step()
    assert layer.expert_bias.dtype == torch.float32 and layer.expert_bias.abs().max() == pytest.approx(0.01)
    assert model.generate(tokens(1, 2), 3).shape == (1, 5)
    assert model.float().moe_layers()[0].expert_bias.dtype == torch.float32


# ---- peers as references ----------------------------------------------------------------------------------

from test_moe import _deepseek_v3_peer  # noqa: E402  (transformers' DeepseekV3MoE with a layer's weights)


def _layer(**overrides) -> MoE:
    settings = dict(n_routed=8, n_shared=1, top_k=2, expert_hidden=8, bias_update_rate=0.01)
    settings.update(overrides)
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(**settings))
    with torch.no_grad():
        layer.w_gate_up.normal_(0, 0.3)
        layer.w_down.normal_(0, 0.3)
        layer.router.weight.normal_(0, 0.5)
        layer.expert_bias.copy_(torch.linspace(-0.2, 0.3, settings["n_routed"]))
    return layer.double()


@pytest.mark.parametrize("dispatch", ["fused", "grouped", "slices"])
@pytest.mark.parametrize("overrides, shape", [
    (dict(top_k=1), (3, 5)),                                                          # one routed expert
    (dict(top_k=1, n_shared=0, n_groups=4, top_groups=1), (2, 6)),                    # top-1 inside the best group
    (dict(n_routed=16, n_shared=2, top_k=1, n_groups=4, top_groups=2, route_scale=2.5), (1, 1)),   # one token
    (dict(top_k=4, n_groups=2, top_groups=2), (1, 7)),                                # groups, all kept
    (dict(n_routed=12, top_k=3, n_groups=3, top_groups=2), (2, 5)),                   # three groups of four
    (dict(n_routed=4, n_shared=3, top_k=2, n_groups=2, top_groups=1, route_scale=0.5), (1, 9)),
])
def test_layer_and_its_gradients_match_transformers_deepseek_v3_on_top1_and_grouped_routing(dispatch, overrides,
                                                                                          shape):
    layer = _layer(dispatch=dispatch, **overrides)
    peer = _deepseek_v3_peer(layer)
    x = torch.randn(*shape, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = layer(x_ours), peer(x_peer)
    assert torch.equal(layer.last_routing.expert_index.sort(1).values, peer.gate(x.reshape(-1, 16))[2].sort(1).values)
    close = dict(rtol=1e-4, atol=1e-5)             # transformers routes in float32
    torch.testing.assert_close(ours, theirs, **close)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(layer.w_gate_up.grad, peer.experts.gate_up_proj.grad.transpose(1, 2), **close)
    torch.testing.assert_close(layer.w_down.grad, peer.experts.down_proj.grad.transpose(1, 2), **close)
    if layer.config.top_k > 1:
        torch.testing.assert_close(x_ours.grad, x_peer.grad, **close)
        torch.testing.assert_close(layer.router.weight.grad, peer.gate.weight.grad, **close)
    else:   # the gates are constant: exactly no router gradient here, float32 rounding noise (~1e-6) in the peer
        assert layer.router.weight.grad.abs().max() < 1e-9
        torch.testing.assert_close(x_ours.grad, x_peer.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pad_limit", [-1.0, float("inf")], ids=["grouped", "padded"])
@pytest.mark.parametrize("top_k, tokens_", [(1, 1), (2, 11), (4, 6)])
def test_fused_dispatch_matches_transformers_mixtral_experts_on_mixtral_routing(monkeypatch, pad_limit, top_k,
                                                                               tokens_):
    """Mixtral routes by a softmax (not DeepSeek's sigmoid); fed its routing, the experts must agree exactly."""
    pytest.importorskip("transformers", reason="transformers (the `bench` extra) is the reference here")
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        pytest.skip("this transformers has no Mixtral model")
    import minillm.moe as moe

    monkeypatch.setattr(moe, "PAD_LIMIT", pad_limit)
    torch.manual_seed(3)
    config = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=top_k,
                           hidden_act="silu", router_jitter_noise=0.0)
    peer = MixtralSparseMoeBlock(config).double()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, tokens_, 16, dtype=torch.float64)
    x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = peer(x_peer)
    _, weight, index = peer.gate(x_ours.view(-1, 16))
    w_gate_up = peer.experts.gate_up_proj.detach().transpose(1, 2).clone().requires_grad_()
    w_down = peer.experts.down_proj.detach().transpose(1, 2).clone().requires_grad_()
    ours = fused_dispatch(x_ours.view(-1, 16), index, weight.to(x.dtype), w_gate_up, w_down).view_as(theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_peer.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_gate_up.grad, peer.experts.gate_up_proj.grad.transpose(1, 2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_down.grad, peer.experts.down_proj.grad.transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_config_replace_keeps_validation_and_numpy_sweeps_build_models():
    np = pytest.importorskip("numpy")
    base = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=32, moe=MoEConfig(n_routed=4, top_k=1),
                     n_dense_layers=1)
    for top_k in np.arange(1, 5):
        config = dataclasses.replace(base, moe=dataclasses.replace(base.moe, top_k=top_k, expert_hidden=np.int64(8)))
        assert type(config.moe.top_k) is int
        assert GPT(config)(tokens(1, 4))[0].shape == (1, 4, 32)
    with pytest.raises(ValueError, match="top_k=5 exceeds n_routed=4"):
        dataclasses.replace(base.moe, top_k=5)
