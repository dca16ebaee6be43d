"""Tests of minillm.train: learning, schedule, exact resume, Ctrl-C, divergence, bf16, checkpoints."""
from __future__ import annotations

import math
import os
import re
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import minillm.train as train_module
from minillm.cost import Meter
from minillm.model import GPT, GPTConfig
from minillm.moe import MoEConfig
from minillm.train import (CompileFallbackWarning, TrainConfig, TrainingDivergedError, estimate_loss,
                           load_checkpoint, lr_at, save_checkpoint, train)


@pytest.fixture(autouse=True)
def isolated_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def byte_tokens() -> torch.Tensor:
    """Real English text as bytes (vocab 256): the standard library's bundled documentation."""
    try:
        from minillm.data import load_corpus
        text = load_corpus("pydocs")
    except Exception:  # minillm.data may be mid-rewrite; the same text straight from pydoc_data
        from pydoc_data import topics
        text = "".join(topics.topics[key] for key in sorted(topics.topics))
    return torch.tensor(list(text.encode()), dtype=torch.long)


def byte_model(seed: int = 0, **overrides) -> GPT:
    settings = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**settings))


def quick_config(**overrides) -> TrainConfig:
    settings = dict(steps=8, batch_size=4, warmup_steps=2, eval_interval=4, eval_batches=2, progress=False,
                    device="cpu", precision="fp32")
    settings.update(overrides)
    return TrainConfig(**settings)


def parameters_of(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_loss_falls_on_real_text(byte_tokens):
    split = int(0.9 * len(byte_tokens))
    train_tokens, val_tokens = byte_tokens[:split], byte_tokens[split:]
    model = byte_model()
    before = estimate_loss(model, val_tokens, 32, 16, 4)
    config = quick_config(steps=50, batch_size=16, warmup_steps=5, eval_interval=25, eval_batches=4)
    result = train(model, train_tokens, val_tokens, config)
    assert before == pytest.approx(math.log(256), abs=0.3)  # an untrained model guesses uniformly
    assert result.final_val_loss < before - 1.5
    assert [r["step"] for r in result.history] == list(range(1, 51))
    assert [r["step"] for r in result.history if "val_loss" in r] == [25, 50]
    assert result.step == 50 and not result.interrupted
    last = result.history[-1]
    assert last["tokens"] == 50 * 16 * 32 and last["seconds"] > 0
    assert sum(r["loss"] for r in result.history[-5:]) < sum(r["loss"] for r in result.history[:5]) - 5 * 1.5
    assert result.meter.tokens == 50 * 16 * 32
    assert result.meter.flops == pytest.approx(model.flops_per_token(training=True) * 50 * 16 * 32)
    assert result.tokens_per_second > 0


def test_estimate_loss_is_repeatable(byte_tokens):
    model = byte_model()
    first = estimate_loss(model, byte_tokens[:5000], 32, 4, 3)
    assert estimate_loss(model, byte_tokens[:5000], 32, 4, 3) == first
    assert estimate_loss(model, byte_tokens[:5000], 32, 4, 3, seed=99) != first


def test_lr_schedule_warms_up_then_follows_a_cosine():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(step, config) for step in range(0, 101)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-3)
    assert lrs[10] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))          # rising during warmup
    assert all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))     # falling afterwards
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2)              # cosine midpoint
    assert lrs[100] == pytest.approx(1e-4)
    no_warmup = TrainConfig(steps=10, warmup_steps=0, lr=2e-3)
    assert lr_at(0, no_warmup) == pytest.approx(2e-3)


def test_resume_gives_the_same_run_as_training_straight_through(byte_tokens, tmp_path):
    # dropout and grad_accum on: resuming must restore the RNG and the micro-batch order too. A constant
    # lr, so that a 6-step run follows the same schedule as the first half of a 12-step one (the next
    # test stops a run part-way to check resuming within a warmup + cosine schedule).
    overrides = dict(steps=12, grad_accum=2, warmup_steps=0, min_lr_ratio=1.0,
                     checkpoint_path=str(tmp_path / "half.pt"))
    straight = byte_model(dropout=0.1)
    straight_result = train(straight, byte_tokens, byte_tokens[-4000:], quick_config(**overrides))

    first_half = byte_model(dropout=0.1)
    train(first_half, byte_tokens, byte_tokens[-4000:], quick_config(**dict(overrides, steps=6)))
    resumed = byte_model(seed=123, dropout=0.1)  # different init: the checkpoint must overwrite it
    resumed_result = train(resumed, byte_tokens, byte_tokens[-4000:],
                           quick_config(**dict(overrides, checkpoint_path=None)),
                           resume_from=str(tmp_path / "half.pt"))

    assert [r["step"] for r in resumed_result.history] == list(range(7, 13))
    straight_losses = torch.tensor([r["loss"] for r in straight_result.history[6:]])
    resumed_losses = torch.tensor([r["loss"] for r in resumed_result.history])
    torch.testing.assert_close(resumed_losses, straight_losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parameters_of(resumed), parameters_of(straight), rtol=1e-6, atol=1e-7)
    assert resumed_result.final_val_loss == pytest.approx(straight_result.final_val_loss, rel=1e-6)


def test_resume_within_a_warmup_cosine_schedule(byte_tokens, tmp_path):
    path = str(tmp_path / "stop.pt")
    straight = byte_model()
    train(straight, byte_tokens, config=quick_config(steps=10))
    partial = byte_model()
    config = quick_config(steps=10, checkpoint_path=path, checkpoint_interval=5)

    def stop_after_five(step, cfg):
        if step == 6:
            raise KeyboardInterrupt
        return lr_at(step, cfg)

    original = train_module.lr_at
    train_module.lr_at = stop_after_five
    try:
        result = train(partial, byte_tokens, config=config)
    finally:
        train_module.lr_at = original
    assert result.interrupted and result.step == 5
    resumed = byte_model(seed=7)
    train(resumed, byte_tokens, config=config, resume_from=path)
    torch.testing.assert_close(parameters_of(resumed), parameters_of(straight), rtol=1e-6, atol=1e-7)


def test_ctrl_c_saves_closes_and_returns_then_resumes(byte_tokens, monkeypatch, capsys, tmp_path):
    def interrupt_at_step_4(step, config):
        if step == 4:
            raise KeyboardInterrupt
        return lr_at(step, config)

    monkeypatch.setattr(train_module, "lr_at", interrupt_at_step_4)
    model = byte_model()
    result = train(model, byte_tokens, config=quick_config(steps=8))  # no checkpoint_path set
    monkeypatch.undo()
    # a file of this run's own (a fixed runs/interrupted.pt would be overwritten by the next interrupted run)
    [expected_path] = (tmp_path / "runs").glob("interrupted-*.pt")
    assert re.fullmatch(r"interrupted-\d{8}-\d{6}-[0-9a-f]{6}\.pt", expected_path.name)
    assert result.interrupted and result.step == 3 and len(result.history) == 3
    assert result.checkpoint_path == str(expected_path) and expected_path.is_file()
    printed = capsys.readouterr().out
    assert str(expected_path) in printed and "resume_from" in printed
    assert "same model, tokens and TrainConfig" in printed   # not a variable name the caller may not have
    saved = load_checkpoint(expected_path)
    assert saved["step"] == 3
    torch.testing.assert_close(parameters_of(saved["model"]), parameters_of(model))

    straight = byte_model()
    train(straight, byte_tokens, config=quick_config(steps=8))
    resumed = byte_model(seed=5)
    finished = train(resumed, byte_tokens, config=quick_config(steps=8), resume_from=str(expected_path))
    assert finished.step == 8 and not finished.interrupted
    torch.testing.assert_close(parameters_of(resumed), parameters_of(straight), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="SIGINT goes to the main thread")
def test_ctrl_c_during_the_optimizer_update_saves_the_finished_step(byte_tokens, tmp_path):
    # A real SIGINT that arrives while step 2's update is under way (after AdamW has changed the weights):
    # the checkpoint must hold step 2's weights under step 2, not step 2's weights under step 1.
    overrides = dict(steps=4, warmup_steps=0, min_lr_ratio=1.0)  # a constant lr: a 2-step run is a prefix
    path = tmp_path / "ctrl_c.pt"
    model = byte_model()
    original = model.configure_optimizer

    def optimizer_that_is_interrupted_in_step_2(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        steps = []

        def ctrl_c_after_updating(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGINT)

        optimizer.register_step_post_hook(ctrl_c_after_updating)
        return optimizer

    model.configure_optimizer = optimizer_that_is_interrupted_in_step_2
    handler = signal.getsignal(signal.SIGINT)
    result = train(model, byte_tokens, config=quick_config(**overrides, checkpoint_path=str(path)))
    assert signal.getsignal(signal.SIGINT) is handler   # restored
    assert result.interrupted and result.step == 2 and result.checkpoint_path == str(path)
    saved = load_checkpoint(path)
    assert saved["step"] == 2
    reference = byte_model()
    train(reference, byte_tokens, config=quick_config(**dict(overrides, steps=2)))
    assert all(torch.equal(saved_p, p) for saved_p, p in zip(saved["model"].parameters(), reference.parameters()))

    straight = byte_model()
    train(straight, byte_tokens, config=quick_config(**overrides))
    resumed = byte_model(seed=5)
    train(resumed, byte_tokens, config=quick_config(**overrides), resume_from=str(path))
    assert all(torch.equal(r, s) for r, s in zip(resumed.parameters(), straight.parameters()))

    # Outside the main thread no handler can be set: training runs as before.
    results = []
    worker = threading.Thread(target=lambda: results.append(train(byte_model(), byte_tokens,
                                                                  config=quick_config(steps=2))))
    worker.start()
    worker.join()
    assert [r.step for r in results] == [2]


def test_nan_loss_raises_and_saves_the_last_finite_state(byte_tokens, tmp_path):
    model = byte_model()
    real_forward = model.forward
    calls = {"n": 0}

    def forward_with_nan_at_step_6(idx, targets=None):
        calls["n"] += 1
        logits, loss = real_forward(idx, targets)
        return logits, (loss * float("nan") if calls["n"] == 6 else loss)

    model.forward = forward_with_nan_at_step_6
    with pytest.raises(TrainingDivergedError, match="step 6") as error:
        train(model, byte_tokens, config=quick_config(steps=10))  # no val tokens: forward runs once per step
    good_path = Path(error.value.checkpoint_path)   # a file of this run's own in the runs folder
    assert error.value.step == 6 and good_path.parent == tmp_path / "runs"
    assert re.fullmatch(r"last_good-\d{8}-\d{6}-[0-9a-f]{6}\.pt", good_path.name)
    assert str(good_path) in str(error.value)
    saved = load_checkpoint(good_path)
    assert saved["step"] == 5
    assert all(torch.isfinite(p).all() for p in saved["model"].parameters())


def nan_loss_at_forward(model: GPT, call: int) -> GPT:
    real_forward, calls = model.forward, {"n": 0}

    def forward(idx, targets=None):
        calls["n"] += 1
        logits, loss = real_forward(idx, targets)
        return logits, (loss * float("nan") if calls["n"] == call else loss)

    model.forward = forward
    return model


def test_runs_without_a_checkpoint_path_never_overwrite_each_others_last_good_state(byte_tokens, tmp_path):
    # Before, every such run wrote runs/last_good.pt: a second run (or a resumed one) replaced the first's.
    with pytest.raises(TrainingDivergedError) as first:
        train(nan_loss_at_forward(byte_model(), 4), byte_tokens, config=quick_config(steps=10))
    start = tmp_path / "start.pt"
    train(byte_model(seed=1), byte_tokens, config=quick_config(steps=2, checkpoint_path=start))
    with pytest.raises(TrainingDivergedError) as resumed:   # resumed, no checkpoint_path, two steps done since
        train(nan_loss_at_forward(byte_model(seed=1), 3), byte_tokens, config=quick_config(steps=10),
              resume_from=start)
    paths = {first.value.checkpoint_path, resumed.value.checkpoint_path}
    assert len(paths) == 2 and all(Path(path).parent == tmp_path / "runs" for path in paths)
    assert load_checkpoint(first.value.checkpoint_path)["step"] == 3      # still the first run's own state
    assert load_checkpoint(resumed.value.checkpoint_path)["step"] == 4
    assert load_checkpoint(start)["step"] == 2                             # the resumed file is left alone


def test_a_resumed_run_that_diverges_at_once_points_at_the_checkpoint_it_resumed(byte_tokens, tmp_path):
    start = tmp_path / "start.pt"
    train(byte_model(), byte_tokens, config=quick_config(steps=2, checkpoint_path=start))
    with pytest.raises(TrainingDivergedError, match="step 3") as error:
        train(nan_loss_at_forward(byte_model(), 1), byte_tokens, config=quick_config(steps=10), resume_from=start)
    assert error.value.checkpoint_path == str(start) and str(start) in str(error.value)
    assert not list((tmp_path / "runs").glob("last_good*"))   # the same state is not written again


def test_nan_weights_never_overwrite_the_good_checkpoint(byte_tokens, tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    model = byte_model()

    def poison_weights_at_step_7(step, config):
        if step == 7:
            with torch.no_grad():
                model.blocks[0].mlp.fc.weight.fill_(float("nan"))
        return lr_at(step, config)

    monkeypatch.setattr(train_module, "lr_at", poison_weights_at_step_7)
    with pytest.raises(TrainingDivergedError, match="step 7") as error:
        train(model, byte_tokens, config=quick_config(steps=10, checkpoint_path=str(path), checkpoint_interval=4))
    assert error.value.checkpoint_path == str(path) and str(path) in str(error.value)
    saved = load_checkpoint(path)
    assert saved["step"] == 4
    assert all(torch.isfinite(p).all() for p in saved["model"].parameters())


def test_bf16_autocast_on_cpu_gives_a_finite_falling_loss(byte_tokens):
    model = byte_model()
    real_forward = model.forward
    autocast_dtypes = []

    def recording_forward(idx, targets=None):
        if torch.is_autocast_enabled("cpu"):
            autocast_dtypes.append(torch.get_autocast_dtype("cpu"))
        return real_forward(idx, targets)

    model.forward = recording_forward
    result = train(model, byte_tokens, config=quick_config(steps=30, batch_size=8, precision="bf16"))
    losses = [r["loss"] for r in result.history]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert len(autocast_dtypes) == 30 and set(autocast_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_fp16_on_cpu_is_a_clear_error(byte_tokens):
    with pytest.raises(ValueError, match="fp16.*CUDA.*bf16"):
        train(byte_model(), byte_tokens, config=quick_config(precision="fp16"))


def test_checkpoint_write_is_atomic(byte_tokens, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    model = byte_model()
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    save_checkpoint(folder / "model.pt", model, optimizer, step=3, extra={"note": "first"})
    assert os.listdir(folder) == ["model.pt"]  # no temporary file left behind

    def save_half_then_crash(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder / "model.pt", model, optimizer, step=99)
    monkeypatch.undo()
    assert os.listdir(folder) == ["model.pt"]
    loaded = load_checkpoint(folder / "model.pt")  # the previous checkpoint is intact
    assert loaded["step"] == 3 and loaded["extra"] == {"note": "first"}
    idx = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(loaded["model"].eval()(idx)[0], model.eval()(idx)[0])


def test_missing_or_corrupt_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt.*corrupt"):
        load_checkpoint(corrupt)


def test_loading_into_a_different_model_says_which_field_differs(tmp_path):
    save_checkpoint(tmp_path / "small.pt", byte_model())
    with pytest.raises(ValueError, match="n_embd"):
        load_checkpoint(tmp_path / "small.pt", byte_model(n_embd=64))


def test_given_meter_receives_tokens_and_flops(byte_tokens):
    model = byte_model()
    meter = Meter("mine")
    train(model, byte_tokens, config=quick_config(steps=3, batch_size=2, grad_accum=2), meter=meter)
    tokens = 3 * 2 * 2 * 32
    assert meter.tokens == tokens and meter.seconds > 0
    assert meter.flops == pytest.approx(model.flops_per_token(training=True) * tokens)


def test_compile_failure_warns_and_trains_uncompiled(byte_tokens, monkeypatch):
    def broken_compile(model, *args, **kwargs):
        def fails(*a, **k):
            raise RuntimeError("no compiler here")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(byte_model(), byte_tokens, config=quick_config(steps=3, compile=True))
    assert result.step == 3 and result.compiled is False
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 1 and "torch.compile failed" in str(fallbacks[0].message)


def test_a_compile_that_works_is_reported_compiled_even_among_other_warnings(byte_tokens, monkeypatch):
    # torch's own deprecation warnings can mention torch.compile ("... switch to `torch.compile`"); a run that
    # compiled must still say it compiled, and only a real fallback is a CompileFallbackWarning.
    calls = []

    def working_compile(model, *args, **kwargs):
        def compiled(*a, **k):
            calls.append(1)
            warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`",
                          FutureWarning)
            return model(*a, **k)
        return compiled

    monkeypatch.setattr(torch, "compile", working_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(byte_model(), byte_tokens, config=quick_config(steps=3, compile=True))
    assert result.compiled is True and len(calls) == 3
    assert not [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert train(byte_model(), byte_tokens, config=quick_config(steps=1)).compiled is None


def test_compile_unavailable_warns_and_trains_uncompiled(byte_tokens, monkeypatch):
    def no_compile(model, *args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compile)
    with pytest.warns(CompileFallbackWarning, match="torch.compile is unavailable"):
        result = train(byte_model(), byte_tokens, config=quick_config(steps=2, compile=True))
    assert result.step == 2 and result.compiled is False


@pytest.mark.parametrize("overrides, field", [
    (dict(steps=0), "steps"),
    (dict(batch_size=-1), "batch_size"),
    (dict(grad_accum=1.5), "grad_accum"),
    (dict(lr=0), "lr"),
    (dict(min_lr_ratio=2), "min_lr_ratio"),
    (dict(betas=(0.9,)), "betas"),
    (dict(grad_clip=-1), "grad_clip"),
    (dict(precision="int8"), "precision"),
    (dict(device="tpu"), "device"),
    (dict(checkpoint_interval=10), "checkpoint_interval"),
])
def test_train_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"TrainConfig: {field}="):
        TrainConfig(**overrides)


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="vocab_size is 64"):
        train(byte_model(vocab_size=64), torch.arange(200) % 100, config=quick_config(steps=1))


def test_numpy_numbers_in_the_train_config_are_stored_as_python_numbers_and_resume(byte_tokens, tmp_path):
    path = tmp_path / "numpy.pt"
    config = quick_config(steps=np.int64(4), lr=np.float64(1e-3), betas=(np.float64(0.9), 0.95),
                          checkpoint_path=path)
    assert type(config.steps) is int and type(config.lr) is float and type(config.betas[0]) is float
    assert config.lr == 1e-3 and config.steps == 4
    train(byte_model(), byte_tokens, config=config)
    resumed = train(byte_model(), byte_tokens, config=quick_config(steps=6, lr=np.float64(1e-3)), resume_from=path)
    assert [r["step"] for r in resumed.history] == [5, 6]


def test_numpy_scalars_and_paths_in_extra_load_back_as_plain_values(tmp_path):
    extra = {"loss": np.float64(1.5), "n": np.int64(3), "zero_d": np.array(2.5), "folder": tmp_path,
             "nested": [{"x": np.float32(0.5)}, (np.int32(1), "a")], np.int64(7): "numpy key"}
    save_checkpoint(tmp_path / "extra.pt", byte_model(), extra=extra)
    loaded = load_checkpoint(tmp_path / "extra.pt")["extra"]
    assert loaded == {"loss": 1.5, "n": 3, "zero_d": 2.5, "folder": str(tmp_path),
                      "nested": [{"x": 0.5}, (1, "a")], 7: "numpy key"}
    assert type(loaded["loss"]) is float and type(loaded["n"]) is int and type(loaded["folder"]) is str


@pytest.mark.parametrize("bad, where", [
    (object(), r"extra\['bad'\]"),
    ({"deep": [1, slice(2)]}, r"extra\['bad'\]\['deep'\]\[1\].*slice"),
    (np.arange(3), r"extra\['bad'\].*tolist"),
])
def test_extra_a_safe_load_refuses_is_an_error_before_the_good_file_is_touched(tmp_path, bad, where):
    folder = tmp_path / "checkpoints"
    model = byte_model()
    save_checkpoint(folder / "model.pt", model, step=3, extra={"note": "good"})
    with pytest.raises(TypeError, match=where):
        save_checkpoint(folder / "model.pt", model, step=9, extra={"bad": bad})
    assert os.listdir(folder) == ["model.pt"]
    loaded = load_checkpoint(folder / "model.pt")
    assert loaded["step"] == 3 and loaded["extra"] == {"note": "good"}


def test_a_checkpoint_holding_objects_a_safe_load_refuses_is_not_called_corrupt(tmp_path):
    # What an older version wrote: a numpy scalar in the extra data.
    path = tmp_path / "old.pt"
    model = byte_model()
    torch.save({"format": train_module.CHECKPOINT_FORMAT, "model_state": model.state_dict(), "model_config": None,
                "step": 1, "extra": {"loss": np.float64(1.0)}}, path)
    with pytest.raises(ValueError, match="old.pt.*safe.*older or other version") as error:
        load_checkpoint(path, model)
    assert "corrupt" not in str(error.value) and "delete" not in str(error.value)
    assert "weights_only=False" in str(error.value)


def test_a_file_that_is_no_checkpoint_is_not_said_to_be_from_an_older_version(tmp_path):
    # before: a tokenizer's JSON or a plain pickle given by mistake was "written by an older version of minillm",
    # with advice (torch.load(..., weights_only=False)) that fails on it too
    import pickle

    from minillm.tokenizers import BPETokenizer

    tokenizer = tmp_path / "tokenizer.json"
    BPETokenizer().save(tokenizer)
    pickled = tmp_path / "plain.pkl"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    for path in (tokenizer, pickled):
        with pytest.raises(ValueError, match=rf"(?s){path.name} is not a readable checkpoint.*check the path") as error:
            load_checkpoint(path)
        assert "older" not in str(error.value) and "weights_only" not in str(error.value)
        assert "delete" not in str(error.value) and "will likely succeed" not in str(error.value)


def test_a_checkpoint_without_a_model_config_entry_is_a_clear_error(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"format": train_module.CHECKPOINT_FORMAT, "model_state": byte_model().state_dict(), "step": 1}, path)
    with pytest.raises(ValueError, match="partial.pt has no 'model_config'"):
        load_checkpoint(path)


def test_a_saved_model_config_field_this_version_lacks_is_named(tmp_path):
    path = tmp_path / "future.pt"
    save_checkpoint(path, byte_model())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_config"]["sliding_window"] = 8
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"future.pt has model config fields .*\(sliding_window\)"):
        load_checkpoint(path)


def moe_byte_model(seed: int = 0) -> GPT:
    return byte_model(seed, moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=16))


def test_moe_load_counts_only_the_training_steps(byte_tokens, tmp_path):
    model = moe_byte_model()
    model.train()
    model(*[byte_tokens[:64].view(2, 32)] * 2)  # e.g. a look at the initial loss, in train mode
    train(model, byte_tokens, config=quick_config(steps=2))
    per_step = 4 * 32 * 2  # batch_size * block_size * top_k
    for layer in model.moe_layers():
        assert [sum(load) for load in layer.load_history] == [per_step, per_step]
    # Loading a checkpoint forgets counts from forwards made before it.
    save_checkpoint(tmp_path / "moe.pt", model)
    model(*[byte_tokens[:64].view(2, 32)] * 2)
    assert all(int(layer.step_load.sum()) > 0 for layer in model.moe_layers())
    load_checkpoint(tmp_path / "moe.pt", model)
    assert all(int(layer.step_load.sum()) == 0 for layer in model.moe_layers())


def test_resume_with_no_steps_left_is_a_clear_error(byte_tokens, tmp_path):
    path = tmp_path / "five.pt"
    train(byte_model(), byte_tokens, config=quick_config(steps=5, checkpoint_path=path))
    for steps in (3, 5):
        with pytest.raises(ValueError, match=f"five.pt is already at step 5.*steps={steps}.*raise steps"):
            train(byte_model(), byte_tokens, config=quick_config(steps=steps), resume_from=path)


def test_resume_with_other_batches_warns_naming_the_fields(byte_tokens, tmp_path):
    path = tmp_path / "two.pt"
    train(byte_model(), byte_tokens, config=quick_config(steps=2, checkpoint_path=path))
    with pytest.warns(UserWarning, match=r"batch_size=8 \(the checkpoint's run used 4\), seed=1 \(.* used 0\)"):
        result = train(byte_model(), byte_tokens, config=quick_config(steps=3, batch_size=8, seed=1),
                       resume_from=path)
    assert result.step == 3
    with pytest.warns(UserWarning, match=r"grad_accum=2 \(the checkpoint's run used 1\)"):
        train(byte_model(), byte_tokens, config=quick_config(steps=3, grad_accum=2), resume_from=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same batches (only steps differ): no warning
        train(byte_model(), byte_tokens, config=quick_config(steps=3), resume_from=path)


@pytest.mark.parametrize("steps, warmup", [(3, 3), (1, 1), (5, 5)])
def test_lr_reaches_its_peak_at_the_end_of_a_warmup_that_fills_the_run(steps, warmup):
    # With warmup_steps == steps there is no cosine phase: the last step ends the warmup at lr (it used to
    # drop to lr * min_lr_ratio there, after a rising warmup).
    config = TrainConfig(steps=steps, warmup_steps=warmup, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(step, config) for step in range(1, steps + 1)]
    assert lrs == pytest.approx([1e-3 * step / warmup for step in range(1, steps + 1)])
    assert lr_at(warmup, config) == pytest.approx(1e-3)
    assert lr_at(steps + 1, config) == pytest.approx(1e-4)  # past the run: the floor


def test_grad_accumulation_equals_one_bigger_batch():
    # block_size + 1 tokens hold a single window, so every batch is the same whatever the sampler draws.
    tokens = torch.randint(0, 256, (33,), generator=torch.Generator().manual_seed(0))
    big, accumulated = byte_model(), byte_model()
    train(big, tokens, config=quick_config(steps=3, batch_size=4))
    train(accumulated, tokens, config=quick_config(steps=3, batch_size=2, grad_accum=2))
    for name, value in parameters_of(big).items():
        torch.testing.assert_close(parameters_of(accumulated)[name], value, rtol=1e-5, atol=1e-6)


def test_a_config_that_is_not_a_train_config_is_a_clear_error(byte_tokens):
    with pytest.raises(TypeError, match="TrainConfig"):
        train(byte_model(), byte_tokens, config={"steps": 2})


def test_a_folder_or_empty_checkpoint_path_is_refused_before_training(byte_tokens, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="checkpoint_path"):
        TrainConfig(checkpoint_path="")
    steps = []
    monkeypatch.setattr(train_module, "lr_at", lambda step, config: steps.append(step) or 1e-3)
    with pytest.raises(ValueError, match="is a folder"):
        train(byte_model(), byte_tokens, config=quick_config(steps=2, checkpoint_path=tmp_path))
    assert steps == []  # refused up front, not after the run when the checkpoint is written


@pytest.mark.parametrize("batches", [0, -1, 1.5, True])
def test_estimate_loss_refuses_a_bad_number_of_batches(byte_tokens, batches):
    with pytest.raises(ValueError, match="batches"):
        estimate_loss(byte_model(), byte_tokens[:1000], 32, 2, batches)
    assert estimate_loss(byte_model(), byte_tokens[:1000], 32, 2, np.int64(1)) > 0


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_without_warmup_the_first_step_trains_at_the_peak_lr_and_the_last_at_the_floor(steps):
    config = TrainConfig(steps=steps, warmup_steps=0, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(1, config) == pytest.approx(1.0)
    if steps > 1:
        assert lr_at(steps, config) == pytest.approx(0.1)
        lrs = [lr_at(step, config) for step in range(1, steps + 1)]
        assert lrs == sorted(lrs, reverse=True)


def test_resume_trains_with_this_configs_weight_decay_and_betas_and_says_they_changed(byte_tokens, tmp_path):
    path = tmp_path / "two.pt"
    train(byte_model(), byte_tokens, config=quick_config(steps=2, weight_decay=0.1, checkpoint_path=path))
    seen = []
    original_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([(group["weight_decay"], tuple(group["betas"])) for group in self.param_groups])
        return original_step(self, *args, **kwargs)

    with pytest.warns(UserWarning, match=r"weight_decay=0.0 \(the checkpoint's run used 0.1\).*betas=\(0.5, 0.6\)"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.optim.AdamW, "step", spy)
            train(byte_model(), byte_tokens, config=quick_config(steps=3, weight_decay=0.0, betas=(0.5, 0.6)),
                  resume_from=path)
    assert seen == [[(0.0, (0.5, 0.6)), (0.0, (0.5, 0.6))]]


def test_a_refused_resume_leaves_the_models_weights_alone(byte_tokens, tmp_path):
    path = tmp_path / "two.pt"
    train(byte_model(), byte_tokens, config=quick_config(steps=2, checkpoint_path=path))
    model = byte_model(seed=5)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="already at step 2"):
        train(model, byte_tokens, config=quick_config(steps=2), resume_from=path)
    frozen = byte_model(seed=5)
    frozen.token_embedding.weight.requires_grad_(False)   # another set of trained parameters than the saved run
    with pytest.raises(ValueError, match="optimizer state does not fit"):
        train(frozen, byte_tokens, config=quick_config(steps=3), resume_from=path)
    for candidate in (model, frozen):
        assert all(torch.equal(before[name], value) for name, value in candidate.state_dict().items())


def test_checkpoints_get_the_mode_a_plain_open_would_give(byte_tokens, tmp_path):
    path = tmp_path / "ckpt.pt"
    old_umask = os.umask(0o022)
    try:
        save_checkpoint(path, byte_model())
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_boolean_tokens_are_refused_by_train(byte_tokens):
    with pytest.raises(ValueError, match="integer token ids.*torch.bool"):
        train(byte_model(), byte_tokens > 100, config=quick_config(steps=1))


def test_a_checkpoint_whose_weights_do_not_fit_is_refused_before_anything_is_loaded(tmp_path):
    config = GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, GPT(config))
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_state"]["norm_final.weight"]
    checkpoint["model_state"]["token_embedding.weight"] = torch.zeros(13, 16)   # would be copied first
    torch.save(checkpoint, path)
    torch.manual_seed(1)
    model = GPT(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="weights do not fit this model.*missing: norm_final.weight"):
        load_checkpoint(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # untouched
    plain = torch.nn.Linear(16, 13)                                  # a model without a config: the same check
    with pytest.raises(ValueError, match="missing: bias, weight; unexpected: blocks.0"):
        load_checkpoint(path, plain)


def test_a_checkpoint_older_than_a_config_field_loads_into_a_model_built_with_that_fields_default(tmp_path):
    config = GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16)
    path = tmp_path / "old.pt"
    save_checkpoint(path, GPT(config))
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_config"]["n_dense_layers"], checkpoint["model_config"]["moe"]   # as an older version
    torch.save(checkpoint, path)
    load_checkpoint(path, GPT(config))                               # was: "saved None vs model 0"
    with pytest.raises(ValueError, match="different model config"):
        load_checkpoint(path, GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=32)))


def test_seed_beyond_64_bits_and_out_of_vocabulary_evaluation_tokens_are_clear_errors():
    with pytest.raises(ValueError, match="seed"):
        TrainConfig(seed=2 ** 64)
    TrainConfig(seed=2 ** 64 - 1)
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16))
    tokens = torch.randint(0, 13, (40,))
    tokens[-1] = 50                                                  # only the last window's target is bad
    with pytest.raises(ValueError, match="vocab_size is 13"):
        estimate_loss(model, tokens, 8, 1, 1)


@pytest.mark.parametrize("tokens, message", [([], "no tokens"), (["a", "b"], "torch cannot read as one"),
                                             ([[1, 2], [3]], "torch cannot read as one")])
def test_train_explains_token_lists_that_are_empty_or_not_ids(tokens, message):
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=message):
        train(model, tokens, None, TrainConfig(steps=1, progress=False, device="cpu"))
    with pytest.raises(TypeError, match="must be a minillm model"):
        train(torch.nn.Linear(2, 2), list(range(20)), None, TrainConfig(steps=1, progress=False, device="cpu"))


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(byte_tokens, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    path = blocker / "run" / "checkpoint.pt"    # its folder cannot be created: a file is in the way
    steps = []
    monkeypatch.setattr(train_module, "lr_at", lambda step, config: steps.append(step) or 1e-3)
    with pytest.raises(OSError, match=r"train: checkpoint_path: cannot write .*checkpoint\.pt.*a_file"):
        train(byte_model(), byte_tokens, config=quick_config(steps=2, checkpoint_path=path))
    assert steps == []  # refused up front, not after the whole run when the first checkpoint is written
    with pytest.raises(OSError, match=r"save_checkpoint: cannot write .*checkpoint\.pt.*choose a folder"):
        save_checkpoint(path, byte_model())


@pytest.mark.parametrize("step, config, error", [(-1, TrainConfig(), ValueError), (float("nan"), TrainConfig(),
                                                  ValueError), (1, None, TypeError), (1, {"lr": 1e-3}, TypeError)])
def test_lr_at_refuses_negative_steps_and_configs_that_are_not_train_configs(step, config, error):
    # A negative step used to give a negative learning rate (the warmup line extended backwards).
    with pytest.raises(error, match="lr_at"):
        lr_at(step, config)
    assert lr_at(np.int64(3), TrainConfig(steps=10, warmup_steps=0, lr=1e-3)) <= 1e-3


def test_unsigned_ids_beyond_int64_are_named_as_given_not_wrapped_round():
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16))
    tokens = np.full(20, 2 ** 64 - 1, dtype=np.uint64)
    with pytest.raises(ValueError, match=f"train_tokens: the token id {2 ** 64 - 1} is beyond int64"):
        train(model, tokens, None, TrainConfig(steps=1, progress=False, device="cpu"))
    train(model, np.arange(20, dtype=np.uint16) % 13, None, TrainConfig(steps=1, progress=False, device="cpu"))


def test_loading_into_a_model_with_another_moe_config_names_the_nested_field(tmp_path):
    save_checkpoint(tmp_path / "moe.pt", moe_byte_model())
    other = byte_model(moe=MoEConfig(n_routed=4, n_shared=1, top_k=1, expert_hidden=16))
    with pytest.raises(ValueError, match=r"different model config \(moe\.top_k: saved 2 vs model 1\)"):
        load_checkpoint(tmp_path / "moe.pt", other)


def test_load_checkpoint_rebuilds_the_small_models_of_chapter_02_not_a_gpt(byte_tokens, tmp_path):
    from minillm.lm import BigramConfig, CountingBigram, MLPConfig, MLPLanguageModel, NeuralBigram
    for model in (NeuralBigram(BigramConfig(vocab_size=256, block_size=16)),
                  MLPLanguageModel(MLPConfig(vocab_size=256, context=3, n_embd=8, hidden=16, block_size=16))):
        path = tmp_path / f"{type(model).__name__}.pt"
        train(model, byte_tokens, config=quick_config(steps=2, checkpoint_path=path))
        loaded = load_checkpoint(path)["model"]   # used to build a GPT and fail: weights missing, fields unknown
        assert type(loaded) is type(model) and loaded.config == model.config
        idx = byte_tokens[:32].view(2, 16)
        torch.testing.assert_close(loaded.eval()(idx)[0], model.eval()(idx)[0])
        # into a GPT: the class is named, not GPT fields (filled with defaults) the checkpoint never had
        with pytest.raises(ValueError, match=rf"saved from a minillm\.lm\.{type(model).__name__} model, not a "
                                             r"minillm\.model\.GPT"):
            load_checkpoint(path, byte_model(block_size=16))
    save_checkpoint(tmp_path / "counting.pt", CountingBigram.from_tokens(byte_tokens[:1000], 256, block_size=16))
    with pytest.raises(ValueError, match=r"saved from a minillm\.lm\.CountingBigram model.*load_checkpoint\(path, "
                                         r"model\)"):
        load_checkpoint(tmp_path / "counting.pt")


def test_a_map_location_this_machine_lacks_is_not_called_a_corrupt_checkpoint(tmp_path):
    # before: map_location="bogus" (or "cuda" on a CPU machine) said the file was corrupt and to delete it,
    # and "meta" failed deep in load_state_dict
    path = tmp_path / "good.pt"
    model = byte_model()
    save_checkpoint(path, model)
    locations = [("bogus", "is not a device"), ("meta", "to_empty")]
    if not torch.cuda.is_available():
        locations.append(("cuda", "no CUDA GPU"))
    for location, message in locations:
        with pytest.raises(ValueError, match=message) as error:
            load_checkpoint(path, map_location=location)
        assert "corrupt" not in str(error.value) and "delete" not in str(error.value)
        assert path.is_file()
    for location in ("auto", "cpu", torch.device("cpu"), {"cpu": "cpu"}, None):
        loaded = load_checkpoint(path, map_location=location)["model"]
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name].cpu(), tensor)


def test_step_speeds_times_copies_in_alternating_rounds_and_leaves_the_models_alone(monkeypatch):
    from minillm import train as train_module
    from minillm.train import step_speeds

    calls = []

    class Recording(GPT):   # every forward says whose it is (the copies keep the tag)
        def forward(self, idx, targets=None):
            calls.append(self.tag)
            return super().forward(idx, targets)

    timed = {}

    def keep_seconds(fns, **options):   # the real timing, with what it measured kept for the check below
        timed.update(real_interleaved(fns, **options))
        return timed

    real_interleaved = train_module.best_seconds_interleaved
    monkeypatch.setattr(train_module, "best_seconds_interleaved", keep_seconds)
    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    moe = Recording(GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32,
                              moe=MoEConfig(n_routed=4, top_k=2, n_shared=1, expert_hidden=16, bias_update_rate=0.1)))
    dense = Recording(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    moe.tag, dense.tag = "MoE", "dense"
    saved = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("moe", moe), ("dense", dense))}
    moe.eval()                                            # the copies train; the models keep their mode
    rng = torch.get_rng_state()
    speeds = step_speeds({"MoE": moe, "dense": dense}, tokens, TrainConfig(batch_size=4), repeats=2)
    assert calls == ["MoE", "dense"] * 3                  # one warm-up each, then two alternating rounds
    assert speeds == {"MoE": 4 * 32 / timed["MoE"], "dense": 4 * 16 / timed["dense"]}   # each its own block
    for name, model in (("moe", moe), ("dense", dense)):  # weights, bias, load counters: as they were
        assert all(torch.equal(saved[name][k], v) for k, v in model.state_dict().items())
    assert not moe.moe_layers()[0].step_load.any() and not moe.moe_layers()[0].load_history
    assert torch.equal(torch.get_rng_state(), rng)
    assert dense.training and not moe.training


@pytest.mark.parametrize("models, tokens, error, message", [
    ({}, list(range(100)), TypeError, "non-empty dict"),
    ({"x": torch.nn.Linear(2, 2)}, list(range(100)), TypeError, r"models\['x'\] must be a minillm model"),
    ({"gpt": "byte"}, [1, 2, 3], ValueError, "too few for block_size=32"),
    ({"gpt": "byte"}, list(range(100)), ValueError, r"step_speeds: repeats=1.0 must be a whole number >= 1"),
])
def test_step_speeds_refuses_what_it_cannot_time(models, tokens, error, message):
    from minillm.train import step_speeds

    models = {name: byte_model() if model == "byte" else model for name, model in models.items()}
    with pytest.raises(error, match=message):
        step_speeds(models, tokens, repeats=1.0 if "repeats" in message else 1)


def test_train_and_step_speeds_work_inside_no_grad_and_inference_mode():
    # before: autograd's "element 0 of tensors does not require grad" from a cell that evaluated under no_grad
    from minillm.train import step_speeds

    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0))
    for mode in (torch.no_grad, torch.inference_mode):
        model = byte_model()
        before = model.lm_head.weight.detach().clone()
        with mode():
            assert step_speeds({"gpt": model}, tokens, TrainConfig(batch_size=4), repeats=1)["gpt"] > 0
            result = train(model, tokens, tokens, quick_config())
            assert not torch.is_grad_enabled()   # and the caller's mode is back
        assert result.step == quick_config().steps and not torch.equal(model.lm_head.weight.detach(), before)


def test_a_model_with_nothing_to_train_is_a_clear_error():
    # before: autograd's "element 0 of tensors does not require grad and does not have a grad_fn"
    from minillm import lm
    from minillm.train import step_speeds

    counting = lm.CountingBigram(torch.full((5, 5), 0.2))
    frozen = byte_model().requires_grad_(False)
    tokens = torch.randint(0, 5, (200,))
    for model in (counting, frozen):
        with pytest.raises(ValueError, match="no parameter that requires a gradient, so there is nothing to train"):
            train(model, tokens, config=quick_config())
        with pytest.raises(ValueError, match=r"step_speeds: models\['m'\].*nothing to train"):
            step_speeds({"m": model}, tokens)
