"""The course's one training loop: AdamW, warmup + cosine schedule, clipping, mixed precision, checkpoints.

Taught in chapter 03 (pretraining); every later chapter trains through `train`. A run can be stopped
with Ctrl-C (it saves a checkpoint and returns) and resumed exactly with `resume_from=`.

Precision: "bf16" on CPU runs under torch.autocast("cpu", bfloat16). "fp16" on CPU is refused with an
error rather than silently changed: fp16 autocast with loss scaling is a GPU technique, and a silent
fallback would make the speed ladder report a rung that never ran.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import pickle
import re
import secrets
import signal
import threading
import time
import warnings
from collections import OrderedDict
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from minillm.cost import Meter, best_seconds_interleaved, resolve_device
from minillm.data import BatchSampler
from minillm.model import plain_number
from minillm.paths import atomic_write_with, ensure_writable_folder, runs_dir

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_FORMAT = "minillm-checkpoint-v1"
# Resuming with a different value of these gives other batches or other gradients than the saved run had.
RESUME_FIELDS = ("batch_size", "grad_accum", "seed", "weight_decay", "betas")


class TrainingDivergedError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""

    def __init__(self, message: str, step: int, checkpoint_path: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint_path = checkpoint_path


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0       # 0 turns clipping off
    eval_interval: int = 50      # also evaluates at the last step
    eval_batches: int = 10
    precision: str = "auto"      # auto = bf16 on CUDA with bf16, fp16 + GradScaler on older CUDA, fp32 on CPU/MPS
    compile: bool = False        # torch.compile the model; on failure warn and continue uncompiled
    seed: int = 0
    device: str = "auto"         # auto = cuda > mps > cpu
    checkpoint_path: str | None = None
    checkpoint_interval: int | None = None
    progress: bool = True        # tqdm bar: loss, lr, tokens/s

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"TrainConfig: {name}={getattr(self, name)!r} {rule}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        # numpy scalars (np.int64, np.float64) are accepted but stored as Python numbers: the config goes into
        # checkpoints, and a safe (weights-only) torch.load refuses numpy objects.
        for field_ in dataclasses.fields(self):   # plain_number leaves strings, bools, paths and tuples alone
            setattr(self, field_.name, plain_number(getattr(self, field_.name)))
        if isinstance(self.betas, (tuple, list)):
            self.betas = type(self.betas)(plain_number(b) for b in self.betas)
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        for name in ("warmup_steps", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be an integer >= 0")
        if self.seed >= 2 ** 64:   # torch.manual_seed takes at most 64 bits
            fail("seed", "must be below 2**64")
        if not is_number(self.lr) or self.lr <= 0:
            fail("lr", "must be a positive number, e.g. 3e-3")
        if not is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "must be between 0 and 1 (the final lr is lr * min_lr_ratio)")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "must be a number >= 0")
        if self.grad_clip is None:
            self.grad_clip = 0.0
        if not is_number(self.grad_clip) or self.grad_clip < 0:
            fail("grad_clip", "must be a number >= 0 (0 turns clipping off)")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in self.betas)):
            fail("betas", "must be two numbers in [0, 1), e.g. (0.9, 0.95)")
        self.betas = tuple(self.betas)
        if self.precision not in PRECISIONS:
            fail("precision", f"is unknown; choose one of {', '.join(map(repr, PRECISIONS))}")
        if not isinstance(self.compile, bool):
            fail("compile", "must be True or False")
        if not isinstance(self.progress, bool):
            fail("progress", "must be True or False")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            fail("device", "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.checkpoint_path is not None:
            if not isinstance(self.checkpoint_path, (str, os.PathLike)) or not os.fspath(self.checkpoint_path):
                fail("checkpoint_path", "must be a file path or None")
            self.checkpoint_path = os.fspath(self.checkpoint_path)
        if self.checkpoint_interval is not None:
            if not is_int(self.checkpoint_interval) or self.checkpoint_interval < 1:
                fail("checkpoint_interval", "must be a positive integer or None")
            if self.checkpoint_path is None:
                fail("checkpoint_interval", "needs a checkpoint_path to save to; set checkpoint_path too")


@dataclass
class TrainResult:
    history: list[dict]          # per step: step, loss, lr, tokens, seconds (+ val_loss at eval steps)
    meter: Meter                 # the whole run: time, tokens, FLOPs
    final_val_loss: float | None
    step: int                    # last completed step (steps are numbered from 1)
    interrupted: bool
    checkpoint_path: str | None = field(default=None)  # where the interrupted run was saved
    # With TrainConfig(compile=True): True if every step ran compiled, False if torch.compile failed and
    # training went on uncompiled (a CompileFallbackWarning says why). None when compile was not asked for.
    compiled: bool | None = field(default=None)

    @property
    def tokens_per_second(self) -> float:
        return self.meter.tokens_per_second


class CompileFallbackWarning(UserWarning):
    """torch.compile failed or is unavailable, so training went on with the uncompiled model."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (1..steps): linear warmup to lr, then cosine to lr*min_lr_ratio."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"lr_at: config must be a TrainConfig, got {type(config).__name__}; "
                        "e.g. lr_at(step, TrainConfig(steps=..., warmup_steps=...))")
    step = plain_number(step)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
        raise ValueError(f"lr_at: step={step!r} must be a number >= 0 (steps are numbered from 1; past "
                         "config.steps the lr stays at lr * min_lr_ratio)")
    if step < config.warmup_steps:
        return config.lr * step / config.warmup_steps
    min_lr = config.lr * config.min_lr_ratio
    # The cosine starts at the last warmup step, at lr. Without a warmup that is step 1 (the first step
    # trained), so that the peak lr is used at all: (step - 1) / (steps - 1) then runs from 0 to 1.
    start = config.warmup_steps if config.warmup_steps > 0 else 1
    decay_steps = config.steps - start
    if decay_steps <= 0:  # no cosine phase: the warmup ends at lr (at step == warmup_steps), later steps get min_lr
        progress = 0.0 if step <= start else 1.0
    else:
        progress = min(1.0, max(0.0, (step - start) / decay_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, tokens, block_size: int, batch_size: int, batches: int,
                  seed: int = 1234, device: str | torch.device | None = None) -> float:
    """Mean loss over `batches` fixed batches: the same windows every call, so calls compare fairly.

    device defaults to the model's device. Runs in eval mode (no dropout) and restores the mode after.
    """
    batches = plain_number(batches)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"estimate_loss: batches={batches!r} must be a positive integer")
    device = next(model.parameters()).device if device is None else torch.device(device)
    vocab_size = getattr(getattr(getattr(model, "_orig_mod", model), "config", None), "vocab_size", None)
    sampler = BatchSampler(_as_token_tensor(tokens, "estimate_loss", vocab_size), block_size, batch_size, seed,
                           device)
    was_training = model.training
    model.eval()
    try:
        losses = [model(*sampler.batch(i))[1] for i in range(batches)]
    finally:
        model.train(was_training)
    return torch.stack(losses).mean().item()


def train(model: torch.nn.Module, train_tokens, val_tokens=None, config: TrainConfig | None = None, *,
          resume_from: str | None = None, meter: Meter | None = None) -> TrainResult:
    """Train `model` on random windows of `train_tokens`; returns the history and the measured cost.

    resume_from= continues a checkpoint's run up to config.steps: a ValueError when the checkpoint is already
    there, a warning when batch_size, grad_accum or seed differ from the saved run's (other batches follow).

    A loss (or gradient norm) that is not finite raises TrainingDivergedError, whose .checkpoint_path is the
    state to resume from: config.checkpoint_path, or without one a new file of this run's own,
    runs/last_good-<date>-<time>-<random>.pt, that no other run overwrites (see _diverged). Ctrl-C likewise
    saves to config.checkpoint_path or runs/interrupted-<date>-<time>-<random>.pt and returns (.interrupted).
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}; "
                        "build one with TrainConfig(steps=..., ...)")
    if config.checkpoint_path is not None and os.path.isdir(config.checkpoint_path):
        # Found now, not when the first checkpoint is written (possibly after the whole run).
        raise ValueError(f"train: checkpoint_path={config.checkpoint_path!r} is a folder; give a file path "
                         f"inside it, e.g. {os.path.join(config.checkpoint_path, 'checkpoint.pt')!r}")
    if config.checkpoint_path is not None:   # an unwritable folder too: found now, not after the whole run
        ensure_writable_folder(config.checkpoint_path, "train: checkpoint_path")
    _check_trainable(model, "train: model")
    device = _resolve_device(config.device)
    precision = _resolve_precision(config.precision, device)
    model.to(device)
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    train_tokens = _as_token_tensor(train_tokens, "train_tokens", vocab_size, block_size)
    if val_tokens is not None:
        val_tokens = _as_token_tensor(val_tokens, "val_tokens", vocab_size, block_size)
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, config.betas, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = _autocast(precision, device)
    completed = 0
    if resume_from is not None:
        # This config's optimizer settings, not the saved run's: load_state_dict brings back the saved ones.
        settings = [{key: group[key] for key in ("weight_decay", "betas", "eps") if key in group}
                    for group in optimizer.param_groups]
        checkpoint = load_checkpoint(resume_from, model, optimizer, _before_loading=lambda saved: _check_resume(
            config, saved.get("train_config"), saved["step"], resume_from))
        completed = checkpoint["step"]
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint.get("rng"))
    else:
        torch.manual_seed(config.seed)  # dropout masks
    # Tokens an MoE layer counted in train-mode forwards before this run (say, a look at the initial loss)
    # must not count towards the first step's load and bias update.
    _reset_moe_load(model)
    # The newest checkpoint of this run's finite state, and its step: a divergence points there.
    last_good_path = os.fspath(resume_from) if resume_from is not None else None
    last_good_step = completed if resume_from is not None else None
    rng_after_step = _rng_state()
    forward_model = _maybe_compile(model) if config.compile else model

    def micro_batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal forward_model
        with autocast:
            try:
                return forward_model(x, y)[1]
            except Exception as error:  # torch.compile fails lazily, at the first call
                if forward_model is model:
                    raise
                warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); continuing uncompiled",
                              CompileFallbackWarning)
                forward_model = model
                return model(x, y)[1]

    sampler = BatchSampler(train_tokens, block_size, config.batch_size, config.seed, device)
    tokens_per_step = config.batch_size * config.grad_accum * block_size
    flops_per_step = model.flops_per_token(training=True) * tokens_per_step
    meter = Meter("train", device=device) if meter is None else meter
    # A meter the caller already started times itself; we only add tokens and FLOPs to it.
    timing = contextlib.nullcontext() if meter._start is not None else meter
    history: list[dict] = []
    final_val_loss = None
    interrupted, interrupt_path, saved_step = False, None, None
    bar = tqdm(total=config.steps, initial=completed, disable=not config.progress, desc="train")
    run_start = last_time = time.perf_counter()
    model.train()
    try:
        # Training needs autograd: a call from inside torch.no_grad() or torch.inference_mode() (a notebook cell
        # that had just evaluated) still trains, rather than failing on "element 0 of tensors does not require grad".
        with timing, torch.inference_mode(False), torch.enable_grad():
            for step in range(completed + 1, config.steps + 1):
                lr = lr_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=device)
                for micro in range(config.grad_accum):
                    x, y = sampler.batch(step * config.grad_accum + micro)
                    loss = micro_batch_loss(x, y)
                    # Dividing by grad_accum makes the summed gradients the mean over the full batch.
                    scaler.scale(loss / config.grad_accum).backward()
                    loss_sum += loss.detach()
                step_loss = loss_sum.item() / config.grad_accum
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
                # With fp16 an infinite gradient is normal: the scaler skips the step and lowers its scale.
                if not math.isfinite(step_loss) or (not scaler.is_enabled() and not torch.isfinite(grad_norm)):
                    raise _diverged(step, step_loss, model, optimizer, scaler, config, completed,
                                    rng_after_step, last_good_path, last_good_step)
                # A Ctrl-C here waits until the update is done and counted: see _sigint_deferred.
                with _sigint_deferred():
                    scaler.step(optimizer)
                    scaler.update()
                    if hasattr(model, "after_optimizer_step"):  # e.g. MoE load-balancing biases (chapter 04)
                        model.after_optimizer_step()
                    completed, rng_after_step = step, _rng_state()
                meter.add(tokens=tokens_per_step, flops=flops_per_step)
                now = time.perf_counter()
                record = {"step": step, "loss": step_loss, "lr": lr, "tokens": step * tokens_per_step,
                          "seconds": now - run_start}
                if val_tokens is not None and (step % config.eval_interval == 0 or step == config.steps):
                    with autocast:
                        final_val_loss = estimate_loss(model, val_tokens, block_size, config.batch_size,
                                                       config.eval_batches, device=device)
                    record["val_loss"] = final_val_loss
                history.append(record)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}",
                                tokens_per_s=f"{tokens_per_step / max(now - last_time, 1e-9):,.0f}")
                bar.update(1)
                last_time = now
                if config.checkpoint_interval and step % config.checkpoint_interval == 0:
                    save_checkpoint(config.checkpoint_path, model, optimizer, step, config,
                                    scaler=scaler, rng_state=rng_after_step)
                    last_good_path, last_good_step, saved_step = config.checkpoint_path, step, step
        if config.checkpoint_path and history and saved_step != completed:
            save_checkpoint(config.checkpoint_path, model, optimizer, completed, config,
                            scaler=scaler, rng_state=rng_after_step)
    except KeyboardInterrupt:
        interrupted = True
        interrupt_path = config.checkpoint_path or _new_run_file("interrupted")   # a name no other run takes
        save_checkpoint(interrupt_path, model, optimizer, completed, config, scaler=scaler, rng_state=rng_after_step)
        bar.close()
        print(f"Interrupted after step {completed}/{config.steps}; saved a checkpoint to {interrupt_path}.\n"
              f"To resume, call train again with the same model, tokens and TrainConfig, adding "
              f"resume_from={interrupt_path!r}")
    finally:
        bar.close()
    compiled = (forward_model is not model) if config.compile else None
    return TrainResult(history, meter, final_val_loss, completed, interrupted, interrupt_path, compiled)


@torch.inference_mode(False)
@torch.enable_grad()
def step_speeds(models: dict, tokens, config: TrainConfig | None = None, *, repeats: int = 5) -> dict[str, float]:
    """Training tokens/s of each model, from single training steps timed in alternating rounds.

    `train`'s meter times a whole run, and two runs one after the other can meet different loads on a shared
    machine (another program, a laptop throttling): their tokens/s are then no fair comparison. This times one
    step as `train` takes it (forward, backward, gradient clipping, the optimizer's update, an MoE's bias update;
    config's precision, batch_size and device; one micro-batch) of each model in turn, a, b, a, b, ..., and keeps
    each one's fastest. It works on copies: the models, their MoE load counters and the RNG are left as they were.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"step_speeds: config must be a TrainConfig, got {type(config).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"step_speeds: repeats={repeats!r} must be a whole number >= 1 (timed rounds per model)")
    if not isinstance(models, dict) or not models:
        raise TypeError("step_speeds: models must be a non-empty dict of name -> minillm model, e.g. "
                        "{'dense': dense_model, 'MoE': moe_model}")
    for name, model in models.items():
        _check_trainable(model, f"step_speeds: models[{name!r}]")
    device = _resolve_device(config.device)
    precision = _resolve_precision(config.precision, device)
    autocast = _autocast(precision, device)
    rng = _rng_state()
    steps, tokens_per_step = {}, {}
    try:
        for name, model in models.items():
            copy = deepcopy(model).to(device).train()
            block_size = copy.config.block_size
            data = _as_token_tensor(tokens, "step_speeds: tokens", copy.config.vocab_size, block_size)
            x, y = BatchSampler(data, block_size, config.batch_size, config.seed, device).batch(1)
            optimizer = copy.configure_optimizer(config.lr, config.weight_decay, config.betas, device.type)
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

            def step(copy=copy, x=x, y=y, optimizer=optimizer, scaler=scaler):
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = copy(x, y)[1]
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(copy.parameters(), config.grad_clip or math.inf)
                scaler.step(optimizer)
                scaler.update()
                if hasattr(copy, "after_optimizer_step"):
                    copy.after_optimizer_step()
            steps[name], tokens_per_step[name] = step, config.batch_size * block_size
        seconds = best_seconds_interleaved(steps, device=device, repeats=repeats, warmup=1)
    finally:
        _set_rng_state(rng)
    return {name: tokens_per_step[name] / seconds[name] for name in models}


def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, step: int = 0,
                    train_config: TrainConfig | None = None, extra: dict | None = None, *,
                    scaler: torch.amp.GradScaler | None = None, rng_state: dict | None = None) -> None:
    """Save everything needed to rebuild the model and resume training, atomically.

    torch.save goes to a temporary file in the same folder, which os.replace then renames over `path`:
    a crash or Ctrl-C mid-write leaves the previous checkpoint intact, never a half-written one.

    `extra` may hold plain Python values (numbers, strings, None, lists, tuples, dicts), tensors, numpy
    scalars (stored as Python numbers) and paths (stored as strings); anything else is refused with a
    TypeError before a file is touched, since load_checkpoint's safe load could not read it back.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes every key
    config = getattr(model, "config", None)
    # Checked (and converted) first, so that a value a safe load refuses never replaces a good checkpoint.
    model_config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None
    train_config = dataclasses.asdict(train_config) if train_config is not None else None
    model_config = checkpoint_safe(model_config, "save_checkpoint: model config")
    train_config = checkpoint_safe(train_config, "save_checkpoint: train_config")
    extra = checkpoint_safe(extra, "save_checkpoint: extra")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model_state": model.state_dict(),
        "model_config": model_config,
        # Which class to rebuild with load_checkpoint(path): not every minillm model is a GPT (chapter 02's
        # NeuralBigram and MLPLanguageModel train through train() too).
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "step": int(step),
        "train_config": train_config,
        "rng": rng_state if rng_state is not None else _rng_state(),
        "extra": extra,
        # Tokens per expert per step of each MoE layer (chapter 04), so that a resumed run's history is whole.
        "moe_load_history": _moe_load_history(model),
    }
    # One temp file of its own, then a rename over `path`; the file gets the umask's mode (as a plain open
    # would), not mkstemp's owner-only 0o600. A folder that cannot be written raises an OSError naming both.
    atomic_write_with(path, lambda file: torch.save(checkpoint, file), where="save_checkpoint")


def load_checkpoint(path, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    map_location="cpu", *, _before_loading: Callable[[dict], None] | None = None) -> dict:
    """Load a checkpoint written by save_checkpoint into `model` (and `optimizer`).

    With model=None a GPT is rebuilt from the saved config. Returns the checkpoint dict, with "model"
    set to the loaded model and "model_state", "model_config", "train_config", "step", "extra", ...
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_checkpoint: path must be a file path (str or Path), got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path}; check the path, "
                                "or train with TrainConfig(checkpoint_path=...) to write one")
    if isinstance(map_location, (str, torch.device)):   # a dict or a function is torch.load's business
        # Before reading: a device this machine lacks would otherwise look like a corrupt file.
        device = resolve_device(map_location, "load_checkpoint: map_location")
        if device.type == "meta":
            raise ValueError("load_checkpoint: map_location='meta' would load sizes without values; for a model "
                             "built on the meta device, call model.to_empty(device='cpu') and then "
                             "load_checkpoint(path, model) fills it")
        map_location = device   # "auto" is this machine's default device
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # The file reads fine but holds an object (a numpy scalar, a Path, a class instance) that a safe load does
        # not rebuild: not corruption, so deleting it would be the wrong advice. Only torch's "Unsupported global"
        # says so: a file that is no pickle at all (a tokenizer's JSON given by mistake) fails the safe load too.
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and refused:
            raise ValueError(f"load_checkpoint: {path} holds objects a safe (weights-only) load refuses "
                             f"(e.g. {refused.group(1)}); "
                             "it was written by an older or other version of minillm, or by code that stored "
                             "such objects. If you trust the file, torch.load(path, weights_only=False) reads it; "
                             "save it again with this version's save_checkpoint, which stores plain values"
                             ) from error
        # torch's text for a safe load that failed says that an unsafe one "will likely succeed": not on a file
        # that is no pickle. Only its reason is kept (e.g. "Unsupported operand 123").
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        detail = f"torch.load's safe reader stopped at: {reason.group(1).strip()}" if reason else \
            f"{type(error).__name__}: {error}"
        raise ValueError(f"load_checkpoint: {path} is not a readable checkpoint ({detail}); either it is not a file "
                         "torch.save wrote (check the path: save_checkpoint writes .pt files) or it is truncated or "
                         "corrupt; use another checkpoint") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_checkpoint: {path} was not written by minillm.train.save_checkpoint")
    missing = [key for key in ("model_state", "model_config", "step") if key not in checkpoint]
    if missing:
        raise ValueError(f"load_checkpoint: {path} has no {', '.join(map(repr, missing))} entry; it was not "
                         "written whole by save_checkpoint, so use another checkpoint")
    if model is None:
        if checkpoint["model_config"] is None:
            raise ValueError(f"load_checkpoint: {path} holds no model config; pass the model to load into")
        model = _model_from_config(checkpoint["model_config"], path, checkpoint.get("model_class"))
        _to_saved_dtype(model, checkpoint["model_state"])
    else:
        model = getattr(model, "_orig_mod", model)
        config = getattr(model, "config", None)
        saved = checkpoint["model_config"]
        saved_class, this_class = checkpoint.get("model_class"), f"{type(model).__module__}.{type(model).__qualname__}"
        if (isinstance(saved_class, str) and saved_class != this_class and isinstance(saved, dict)
                and dataclasses.is_dataclass(config) and set(saved) != {f.name for f in dataclasses.fields(config)}):
            # Another kind of model (a NeuralBigram's checkpoint into a GPT): comparing the configs field by
            # field, with defaults for the missing ones, would name differences that are not the problem.
            raise ValueError(f"load_checkpoint: {path} was saved from a {saved_class} model, not a {this_class}; "
                             "build a model of that class, or call load_checkpoint(path) to rebuild it")
        if saved is not None and dataclasses.is_dataclass(config) and not isinstance(config, type):
            try:   # fields newer than the checkpoint compare as their defaults, as load_checkpoint(path) builds them
                saved = dataclasses.asdict(type(config)(**saved))
            except (TypeError, ValueError):
                pass
        if saved is not None and dataclasses.is_dataclass(config) and dataclasses.asdict(config) != saved:
            differences = ", ".join(_config_differences(saved, dataclasses.asdict(config)))
            raise ValueError(f"load_checkpoint: {path} was saved from a different model config ({differences}); "
                             "build the model from checkpoint['model_config'] or call load_checkpoint(path)")
    _check_state_fits(checkpoint["model_state"], model, path)   # before anything is loaded: a refusal changes nothing
    if optimizer is not None and checkpoint.get("optimizer") is None:
        raise ValueError(f"load_checkpoint: {path} holds no optimizer state, so training cannot resume from it")
    if _before_loading is not None:   # train()'s checks: a refused resume must leave the model as it was
        _before_loading(checkpoint)
    if optimizer is not None:   # before the model: an optimizer that does not fit leaves the model untouched
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as error:
            raise ValueError(f"load_checkpoint: {path}'s optimizer state does not fit this optimizer ({error}); the "
                             "saved run trained other parameters (e.g. some were frozen, requires_grad=False), so "
                             "build the optimizer over the same parameters, or load the weights alone with "
                             "load_checkpoint(path, model)") from error
    model.load_state_dict(checkpoint["model_state"])
    _reset_moe_load(model)  # counts from forwards before the load belong to no step of the loaded run
    _restore_moe_load_history(model, checkpoint.get("moe_load_history"))
    checkpoint["model"] = model
    return checkpoint


def checkpoint_safe(value, where: str = "checkpoint"):
    """`value` with numpy scalars (and 0-d arrays) as Python numbers and paths as strings, checked to hold
    only what a safe (weights-only) torch.load reads back; raises TypeError naming anything else.

    `where` names the value in the error, e.g. "save_checkpoint: extra".
    """
    if isinstance(value, torch.Tensor) or type(value) in _SAFE_LEAVES:
        return value
    if isinstance(value, (np.generic, np.ndarray)) and value.ndim == 0:
        return checkpoint_safe(value.item(), where)  # .item() of a datetime64 is no number: checked again
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        # Other dict subclasses (defaultdict, Counter) are stored as plain dicts; a safe load refuses them.
        kind = type(value) if type(value) in (dict, OrderedDict) else dict
        return kind((checkpoint_safe(k, f"{where} key {k!r}"), checkpoint_safe(v, f"{where}[{k!r}]"))
                    for k, v in value.items())
    if type(value) in (list, tuple, set):
        return type(value)(checkpoint_safe(item, f"{where}[{i}]") for i, item in enumerate(value))
    hint = ("convert it with .tolist() or torch.as_tensor(...)" if isinstance(value, np.ndarray)
            else "convert it to one of those (e.g. str(...), float(...), a plain tuple or dict)")
    raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80}), which "
                    "a safe (weights-only) load could not read back; store numbers, strings, None, lists, tuples, "
                    f"dicts or tensors instead: {hint}")


# ---- helpers -------------------------------------------------------------------------------------------

# Types a weights-only torch.load rebuilds as they are (containers are checked item by item).
_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)


def _check_state_fits(state, model: torch.nn.Module, path: Path) -> None:
    """Raise a ValueError, naming the differences, unless `state` has exactly the model's weights and shapes."""
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {path}'s model_state is a {type(state).__name__}, not a state dict; "
                         "use another checkpoint")
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    reshaped = [f"{key} {tuple(state[key].shape)} vs {tuple(current[key].shape)}"
                for key in sorted(set(state) & set(current))
                if isinstance(state[key], torch.Tensor) and state[key].shape != current[key].shape]
    if missing or unexpected or reshaped:
        problems = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("other shapes (saved vs model)", reshaped)) if items]
        raise ValueError(f"load_checkpoint: {path}'s weights do not fit this model ({'; '.join(problems)}); build "
                         "the model the checkpoint was saved from (load_checkpoint(path) rebuilds it from its "
                         "saved config) or use another checkpoint")


def _config_differences(saved, current, prefix: str = "") -> list[str]:
    """'field: saved X vs model Y' for each field that differs; nested configs (moe) field by field."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [difference for key in sorted(set(saved) | set(current), key=str)
                for difference in _config_differences(saved.get(key), current.get(key), f"{prefix}{key}.")]
    if saved == current:
        return []
    return [f"{prefix.rstrip('.')}: saved {saved!r} vs model {current!r}"]


# Models load_checkpoint(path) can rebuild from a saved config: class path -> (module, class, config class).
_REBUILDABLE = {"minillm.model.GPT": ("minillm.model", "GPT", "GPTConfig"),
                "minillm.lm.NeuralBigram": ("minillm.lm", "NeuralBigram", "BigramConfig"),
                "minillm.lm.MLPLanguageModel": ("minillm.lm", "MLPLanguageModel", "MLPConfig")}


def _model_from_config(saved: dict, path: Path, model_class: str | None = None) -> torch.nn.Module:
    """The model a checkpoint was saved from (a GPT for checkpoints that name no class), built from its
    model_config, saying which saved fields this version does not know."""
    from minillm.model import GPT, GPTConfig
    from minillm.moe import MoEConfig
    if isinstance(model_class, str) and model_class.startswith("minillm.") and model_class != "minillm.model.GPT":
        # (a class of the user's own, e.g. a GPT subclass, is rebuilt as a GPT, as before classes were saved)
        if model_class not in _REBUILDABLE:
            raise ValueError(f"load_checkpoint: {path} was saved from a {model_class} model, which "
                             "load_checkpoint(path) cannot rebuild on its own; build that model and pass it: "
                             "load_checkpoint(path, model)")
        import importlib
        module_name, class_name, config_name = _REBUILDABLE[model_class]
        module = importlib.import_module(module_name)
        try:
            return getattr(module, class_name)(getattr(module, config_name)(**saved))
        except TypeError as error:
            raise ValueError(f"load_checkpoint: {path}'s model config {saved!r} does not build a {class_name} "
                             f"with this version of minillm ({error}); load it with the minillm version that "
                             "wrote it") from error
    try:
        return GPT(GPTConfig(**saved))
    except TypeError as error:
        def unknown_fields(saved_fields: dict, kind: type, prefix: str = "") -> list[str]:
            return [prefix + name for name in sorted(set(saved_fields) - {f.name for f in dataclasses.fields(kind)})]

        unknown = unknown_fields(saved, GPTConfig)
        if isinstance(saved.get("moe"), dict):
            unknown += unknown_fields(saved["moe"], MoEConfig, "moe.")
        if not unknown:
            raise
        raise ValueError(f"load_checkpoint: {path} has model config fields this version of minillm does not know "
                         f"({', '.join(unknown)}); load it with the minillm version that wrote it") from error


def _to_saved_dtype(model: torch.nn.Module, state) -> None:
    """Cast a model rebuilt from its config (float32) to the dtype its weights were saved in: a float64 (or bf16)
    model comes back as it was saved, not silently as float32 (load_state_dict would cast the weights)."""
    first = next(model.named_parameters(), None)
    saved = state.get(first[0]) if first is not None and isinstance(state, dict) else None
    if isinstance(saved, torch.Tensor) and saved.is_floating_point() and saved.dtype != first[1].dtype:
        model.to(saved.dtype)


def _reset_moe_load(model: torch.nn.Module) -> None:
    """Zero the per-step token counts of the model's MoE layers (chapter 04), if it has any."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "moe_layers"):
        for layer in model.moe_layers():
            layer.reset_load()


def _moe_load_history(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Each MoE layer's load_history as a (steps, n_routed) integer tensor, by module name; None without MoE.

    A tensor, not lists: a long run's history (one row per step) stays a few bytes per expert and step.
    """
    from minillm.moe import MoE
    histories = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, MoE):
            continue
        try:
            history = torch.tensor(layer.load_history, dtype=torch.long).reshape(-1, layer.config.n_routed)
        except (TypeError, ValueError, RuntimeError) as error:
            warnings.warn(f"save_checkpoint: the load_history of MoE layer {name!r} is not one list of "
                          f"{layer.config.n_routed} token counts per step ({error}); it is not saved",
                          stacklevel=3)
            continue
        if history.numel() == 0 or int(history.abs().max()) < 2 ** 31:
            history = history.to(torch.int32)   # half the bytes; counts of a step fit unless beyond 2**31
        histories[name] = history
    return histories or None


def _restore_moe_load_history(model: torch.nn.Module, saved) -> None:
    """Give the model's MoE layers the load_history a checkpoint saved; checkpoints written before it was
    saved (or without MoE layers) leave the layers' history as it is."""
    if not isinstance(saved, dict):
        return
    from minillm.moe import MoE
    for name, layer in model.named_modules():
        history = saved.get(name)
        if not isinstance(layer, MoE) or not isinstance(history, torch.Tensor):
            continue
        if history.dim() == 2 and history.shape[1] == layer.config.n_routed:   # else another model's: not ours
            layer.load_history = history.long().tolist()


def _check_resume(config: TrainConfig, saved: dict | None, completed: int, path) -> None:
    """Refuse a resume with nothing left to train; warn when the new config changes the batches or gradients."""
    if completed >= config.steps:
        raise ValueError(f"train: the checkpoint {path} is already at step {completed}, but TrainConfig(steps="
                         f"{config.steps}) asks for no further steps; raise steps above {completed} to train on, "
                         "or use load_checkpoint(path) to get the trained model")
    if not saved:
        return
    def plain(value):   # a tuple saved by one run and a list given to the next are the same betas
        return tuple(value) if isinstance(value, (list, tuple)) else value

    changed = [f"{name}={getattr(config, name)!r} (the checkpoint's run used {saved[name]!r})"
               for name in RESUME_FIELDS if name in saved and plain(saved[name]) != plain(getattr(config, name))]
    if changed:
        warnings.warn(f"train: resuming {path} with {', '.join(changed)}; training goes on with these, but with "
                      "other batches, gradients or updates than the saved run, so it will not match a run "
                      "straight through", stacklevel=5)

def _resolve_device(name: str) -> torch.device:
    return resolve_device(name, "TrainConfig")


def _autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context for a resolved precision ("bf16", "fp16" or "fp32": off)."""
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                          enabled=precision in ("bf16", "fp16"))


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"TrainConfig: precision='fp16' needs a CUDA GPU (fp16 autocast with loss scaling is a "
                         f"GPU technique), but the device is {device.type}; use precision='bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"TrainConfig: precision='bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                         "use precision='fp16' (with loss scaling) or 'fp32'")
    return precision


def _as_token_tensor(tokens, name: str, vocab_size: int | None = None, block_size: int | None = None) -> torch.Tensor:
    try:
        tokens = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:   # ["a", "b"], ragged lists
        raise ValueError(f"{name}: expected a 1-D sequence of integer token ids, got {type(tokens).__name__} "
                         f"that torch cannot read as one ({error})") from error
    if tokens.dim() == 1 and tokens.numel() == 0:   # [] reads as float32: say what is wrong, not the dtype
        raise ValueError(f"{name}: no tokens; give at least block_size+1 token ids")
    if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D sequence of integer token ids, got a {tokens.dtype} tensor "
                         f"of shape {tuple(tokens.shape)}")
    wide_unsigned = tokens.dtype == torch.uint64
    tokens = tokens.long()
    if wide_unsigned and len(tokens) and bool((tokens < 0).any()):
        # .long() wrapped ids beyond int64 round to negative numbers: name the id as it was given
        raise ValueError(f"{name}: the token id {int(tokens[tokens < 0][0]) + 2 ** 64} is beyond int64 (and any "
                         "vocabulary); encode with the model's tokenizer")
    if block_size is not None and len(tokens) < block_size + 1:
        raise ValueError(f"{name}: {len(tokens)} tokens is too few for block_size={block_size}; "
                         "give at least block_size+1 tokens or use a smaller block_size")
    if vocab_size is not None and len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{name}: token ids range over [{int(tokens.min())}, {int(tokens.max())}] but the model's "
                         f"vocab_size is {vocab_size}; encode with the model's tokenizer or raise vocab_size")
    return tokens


def _maybe_compile(model: torch.nn.Module) -> torch.nn.Module:
    try:
        return torch.compile(model)
    except Exception as error:
        warnings.warn(f"torch.compile is unavailable ({type(error).__name__}: {error}); continuing uncompiled",
                      CompileFallbackWarning)
        return model


@contextlib.contextmanager
def _sigint_deferred():
    """Hold back Ctrl-C (SIGINT) until the block has run, then hand it to the handler that was there.

    Why: AdamW updates the parameters one after another, and the step counts as completed only after the
    update (and the MoE bias update). A KeyboardInterrupt in between would save weights and optimizer state
    that are partly or fully updated for step N under step N-1: resuming would repeat step N or go on from
    half-updated weights. Held back, it arrives after the bookkeeping and the checkpoint is consistent.
    Only in the main thread (the only one where handlers can be set and Ctrl-C is raised) and only over a
    Python handler (the default raises KeyboardInterrupt); otherwise the block runs as before.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main_thread else None
    if not callable(previous):  # SIG_DFL, SIG_IGN, or a handler not set from Python (None): leave it alone
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        previous(*received[0])  # the default handler raises KeyboardInterrupt here


def _check_trainable(model: torch.nn.Module, who: str) -> None:
    """`model` is a minillm model with something to train: with no parameter that requires a gradient, autograd
    would only say that the loss "does not require grad"."""
    if not all(hasattr(model, name) for name in ("config", "configure_optimizer")):
        raise TypeError(f"{who} must be a minillm model (a GPT, or one of minillm.lm's models: they have .config "
                        f"and .configure_optimizer), got {type(model).__name__}; e.g. GPT(GPTConfig(...))")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{who} ({type(model).__name__}) has no parameter that requires a gradient, so there is "
                         "nothing to train: a CountingBigram is counted (CountingBigram.from_tokens), not trained; "
                         "a frozen model needs requires_grad_(True) on what should learn")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _diverged(step: int, loss: float, model, optimizer, scaler, config: TrainConfig, completed: int,
              rng_state: dict, last_good_path: str | None, last_good_step: int | None = None
              ) -> TrainingDivergedError:
    """Keep (or write) the last finite state, then describe what went wrong and where to restart from.

    With finite weights the state after step `completed` is saved to config.checkpoint_path or, when the run
    has none, to a new file runs/last_good-<date>-<time>-<random>.pt: a name of this run's own, so that
    another run that diverges (at the same time, or later) never overwrites it. When `last_good_path`
    already holds that state (a resumed run that diverges before completing a step), nothing new is
    written without a checkpoint_path. With weights that are not finite, `last_good_path` (the resumed or
    last saved checkpoint, or None) is left as it is.
    """
    weights_finite = all(torch.isfinite(p).all() for p in model.parameters())
    already_saved = last_good_path is not None and last_good_step == completed
    if weights_finite and (config.checkpoint_path or not already_saved):
        # The weights from the last completed step are still finite: save them as the restart point.
        last_good_path = config.checkpoint_path or _new_run_file("last_good")
        save_checkpoint(last_good_path, model, optimizer, completed, config, scaler=scaler, rng_state=rng_state)
    where = (f"the last good checkpoint is {last_good_path}" if last_good_path
             else "no good checkpoint was saved (set checkpoint_path and checkpoint_interval to keep one)")
    return TrainingDivergedError(
        f"training diverged at step {step}: loss={loss} (or the gradient norm is not finite); {where}. "
        "Lower lr, raise warmup_steps or keep grad_clip on, then resume_from that checkpoint.",
        step=step, checkpoint_path=last_good_path)


def _new_run_file(kind: str) -> str:
    """runs/<kind>-<date>-<time>-<random>.pt: a path no other run picks (24 random bits beside the second)."""
    return os.fspath(runs_dir() / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.pt")
