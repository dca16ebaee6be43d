"""The course's base model: pretrained in chapter 03, loaded by chapters 07-10 with one call.

    model, tokenizer, info = load_or_train_base()       # loads runs/base/..., or trains it first

Chapter 03 trains it step by step with the same recipe (`base_recipe`) and saves it with `save_base`;
any later chapter run from a fresh kernel gets it from `load_or_train_base`, which trains it when it is
absent (a small model in fast mode, seconds; a larger one in full mode, minutes on a CPU).

The base model reads the default corpus ("pydocs", Python's bundled documentation) through a byte-level
BPE tokenizer trained on the training part only, saved beside the checkpoint as tokenizer.json.

A saved base model is one folder, runs/base/fast or runs/base/full, holding model.pt, tokenizer.json and
info.json. `save_base` writes the three as a set (in a temporary folder that then takes the old one's place),
so an interrupted save never leaves files of two runs side by side; `load_base` refuses a folder that misses
some of them or whose info.json disagrees with model.pt.
"""
from __future__ import annotations

import errno
import hashlib
import json
import numbers
import os
import secrets
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minillm.data import load_corpus, split, tokenize_corpus
from minillm.model import GPT, GPTConfig
from minillm.paths import (atomic_write_text, ensure_writable_folder, fast_mode, runs_dir,
                           unwritable_folder_error)
from minillm.tokenizers import BPETokenizer, load_tokenizer
from minillm.train import (TrainConfig, checkpoint_safe, estimate_loss, load_checkpoint, save_checkpoint,
                           train)

__all__ = ["BaseRecipe", "base_recipe", "base_dir", "train_base_tokenizer", "base_tokens", "unigram_loss",
           "save_base", "load_base", "load_or_train_base", "validation_loss"]

BASE_CORPUS = "pydocs"
VAL_FRACTION = 0.1
# The files of a saved base model, all written by one save_base call.
BASE_FILES = ("model.pt", "tokenizer.json", "info.json")
TOKENIZER_DIGEST = "tokenizer_sha256"   # info entry: sha256 of the tokenizer.json saved with the model
# Temporary (.tmp) and moved-aside (.old) folders untouched this long are leftovers of a killed save_base.
LEFTOVER_AGE_S = 600


@dataclass
class BaseRecipe:
    """Everything that defines the base model: tokenizer size, model shape, training run."""
    vocab_size: int
    model: GPTConfig
    train: TrainConfig


def base_recipe(fast: bool | None = None, device: str | torch.device | None = None) -> BaseRecipe:
    """The base model's recipe for this run size and device.

    fast: a 2-layer model and 120 steps (seconds). Full on a CPU: 4 layers of width 128, a few minutes.
    Full on a GPU: 6 layers of width 384 with a longer context.
    """
    fast = fast_mode(fast)
    device_type = torch.device(device).type if device is not None else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if fast:
        return BaseRecipe(512, GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64),
                          TrainConfig(steps=120, batch_size=16, lr=1e-2, warmup_steps=10, eval_interval=20,
                                      eval_batches=4))
    if device_type == "cuda":
        return BaseRecipe(1024, GPTConfig(vocab_size=1024, block_size=256, n_layer=6, n_head=6, n_embd=384,
                                          dropout=0.1),
                          TrainConfig(steps=1500, batch_size=32, lr=1e-3, warmup_steps=100, eval_interval=100,
                                      eval_batches=20))
    return BaseRecipe(1024, GPTConfig(vocab_size=1024, block_size=128, n_layer=4, n_head=4, n_embd=128),
                      TrainConfig(steps=500, batch_size=16, lr=2e-3, warmup_steps=30, eval_interval=50,
                                  eval_batches=10))


def base_dir(fast: bool | None = None) -> Path:
    """Folder of the base checkpoint: runs/base/fast or runs/base/full (runs/ moves with MINILLM_RUNS)."""
    return runs_dir() / "base" / ("fast" if fast_mode(fast) else "full")


def _train_and_val_text(corpus: str = BASE_CORPUS) -> tuple[str, str]:
    return split(load_corpus(corpus), VAL_FRACTION)


def train_base_tokenizer(vocab_size: int, corpus: str = BASE_CORPUS) -> BPETokenizer:
    """Byte-level BPE trained on the training part of the corpus only (validation text stays unseen)."""
    train_text, _ = _train_and_val_text(corpus)
    return BPETokenizer().train(train_text, vocab_size)


def base_tokens(tokenizer, corpus: str = BASE_CORPUS) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_tokens, val_tokens): the corpus split as text (last 10% for validation), then encoded."""
    train_text, val_text = _train_and_val_text(corpus)
    return tokenize_corpus(train_text, tokenizer), tokenize_corpus(val_text, tokenizer)


def unigram_loss(train_tokens, val_tokens, vocab_size: int) -> float:
    """Validation cross-entropy (nats/token) of a model that ignores context: token frequencies of the
    training text, add-one smoothed. Any language model worth its compute must beat it."""
    train_tokens, val_tokens = torch.as_tensor(train_tokens), torch.as_tensor(val_tokens)
    if val_tokens.numel() == 0:
        raise ValueError("unigram_loss: val_tokens is empty; give some validation tokens")
    if train_tokens.numel() == 0:   # torch.as_tensor([]) is float32: no ids at all, so a uniform (add-one) model
        train_tokens = train_tokens.long()
    for name, tokens in (("train_tokens", train_tokens), ("val_tokens", val_tokens)):
        if tokens.dim() != 1:
            raise ValueError(f"unigram_loss: {name} must be a flat sequence of token ids, got shape "
                             f"{tuple(tokens.shape)}; flatten it (tokens.reshape(-1))")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"unigram_loss: {name} must hold integer token ids, got {tokens.dtype}; encode the "
                             "text with a tokenizer (ids are whole numbers)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise ValueError(f"unigram_loss: vocab_size={vocab_size!r} must be a positive integer")
    vocab_size = int(vocab_size)
    if (len(train_tokens) and int(train_tokens.min()) < 0) or int(val_tokens.min()) < 0 \
            or int(val_tokens.max()) >= vocab_size:
        # A negative validation id would silently index from the end of the table.
        raise ValueError(f"unigram_loss: token ids must lie in 0..{vocab_size - 1} (vocab_size={vocab_size}); "
                         "encode both texts with the tokenizer of that vocabulary")
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1.0
    if counts.numel() != vocab_size:
        raise ValueError(f"unigram_loss: token ids reach {counts.numel() - 1} but vocab_size={vocab_size}")
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[val_tokens.long()].mean())


def save_base(model: GPT, tokenizer, info: dict | None = None, fast: bool | None = None) -> Path:
    """Save the model (as a training checkpoint), its tokenizer and a readable info.json; returns the folder.

    The three files are written into a temporary folder beside the target, which takes the target's place
    only once all of them are complete; the previous model is kept until then, and deleted after. An error
    or Ctrl-C midway leaves the previous model as it was, and no temporary folder behind.
    """
    folder = base_dir(fast)
    # numpy scalars become Python numbers and paths strings (a safe load, and info.json, need plain values);
    # anything a safe load could not read back is refused here, before a file is written.
    info = checkpoint_safe(dict(info or {}, fast=fast_mode(fast)), "save_base: info")
    steps = info.get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"save_base: info['steps']={steps!r} must be the whole number of optimizer steps the model "
                         "was trained for (e.g. result.step), or left out")
    try:
        info_text = json.dumps(info, indent=2, default=str) + "\n"
    except (TypeError, ValueError) as error:  # e.g. a dict with tuple keys somewhere inside
        raise TypeError(f"save_base: info cannot be written as info.json ({error}); use str or number keys "
                        "and plain values") from error
    _check_replaceable(folder, "save_base")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:   # e.g. runs/base is a file
        raise unwritable_folder_error(error, folder / "model.pt", "save_base", folder.parent) from None
    staging = _new_sibling_folder(folder)
    try:
        tokenizer.save(staging / "tokenizer.json")
        # The tokenizer's digest goes into the model's info: a tokenizer.json from another run, even of the
        # same vocabulary size, is then refused by load_base instead of silently mis-decoding the model.
        info[TOKENIZER_DIGEST] = _file_digest(staging / "tokenizer.json")
        info_text = json.dumps(info, indent=2, default=str) + "\n"
        save_checkpoint(staging / "model.pt", model, step=steps, extra=info)
        atomic_write_text(staging / "info.json", info_text)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the swap succeeded
        raise
    _clear_leftovers(folder)
    return folder


def _check_replaceable(folder: Path, where: str) -> None:
    """Refuse (FileExistsError) a `folder` that save_base would replace but that is not a saved base model: a file,
    or a folder holding files of the user's own, which the swap would delete. Absent or empty is fine."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, f"{where}: {folder} is a file, not a base model folder, and saving the "
                              "base model would replace it; move or rename that file (or set MINILLM_RUNS to "
                              "another folder), then try again", str(folder))
    try:
        foreign = sorted(path.name for path in folder.iterdir() if path.name not in BASE_FILES)
    except OSError:   # absent, or cannot be listed (then the swap says why it fails)
        return
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(errno.EEXIST, f"{where}: {folder} holds files that are not part of a saved base "
                              f"model ({listed}), and saving the base model replaces the whole folder; move "
                              "them elsewhere, then try again", str(folder))


def _clear_leftovers(folder: Path) -> None:
    """Delete the .tmp and .old folders that save_base calls killed midway (SIGKILL, a crash) left beside
    `folder`, once untouched for LEFTOVER_AGE_S: a running save's own are fresh, so they are kept."""
    now = time.time()
    for pattern in (f".{folder.name}.*.tmp", f".{folder.name}.*.old"):
        for path in folder.parent.glob(pattern):
            try:
                stat = path.lstat()   # a rename updates ctime: a folder moved aside just now is fresh
            except OSError:
                continue
            if now - max(stat.st_mtime, stat.st_ctime) >= LEFTOVER_AGE_S:
                _remove(path)


def _new_sibling_folder(folder: Path) -> Path:
    """Create an empty, uniquely named folder next to `folder` (hidden, ending in .tmp) for one save."""
    for _ in range(100):
        staging = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.tmp")
        try:
            staging.mkdir()  # mode 0o777 less the umask, as for any folder
        except FileExistsError:
            continue
        except OSError as error:   # no permission, a read-only disk
            raise unwritable_folder_error(error, folder / "model.pt", "save_base", folder.parent) from None
        return staging
    raise FileExistsError(f"save_base: could not create a temporary folder next to {folder}; clear out the "
                          f".{folder.name}.*.tmp folders there")


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the complete folder `staging` at `folder`. What is there is moved aside first (a folder cannot be
    renamed over a non-empty one) and deleted once `staging` is in place; if that fails, it goes back."""
    moved_aside: list[Path] = []
    try:
        for _ in range(10):
            if os.path.lexists(folder):
                moved_aside.append(folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.old"))
                try:
                    os.rename(folder, moved_aside[-1])
                except FileNotFoundError:  # another save moved it aside just now
                    moved_aside.pop()
            try:
                os.rename(staging, folder)
                break
            except OSError:
                if not os.path.lexists(folder):
                    raise
                # another save_base put its folder there in between: move that aside too, the last save wins
        else:
            raise FileExistsError(f"save_base: other saves kept writing {folder} at the same time; save again")
    except BaseException:
        moved_aside = [path for path in moved_aside if os.path.lexists(path)]
        if moved_aside and not os.path.lexists(folder):
            os.rename(moved_aside.pop(), folder)  # the newest of the folders that were there
        for path in moved_aside:
            _remove(path)
        raise
    for path in moved_aside:
        _remove(path)


def _remove(path: Path) -> None:
    """Delete a folder (or a file or link) if it is there, ignoring errors: it only frees space."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _check_info_matches(folder: Path, checkpoint: dict) -> None:
    """Raise a ValueError unless info.json is the copy of model.pt's info that the same save wrote (an older
    save_base, interrupted, could leave a new model.pt beside an old tokenizer.json and info.json)."""
    def mixed(reason: str) -> ValueError:
        return ValueError(f"load_base: {folder} holds files of different saves ({reason}), as an interrupted "
                          "save_base of an older minillm could leave; delete the folder and run "
                          "load_or_train_base() again, or save the model again with save_base")

    try:
        saved = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise mixed(f"info.json is not valid JSON: {error}") from error
    extra = checkpoint.get("extra") or {}
    if not isinstance(extra, dict):
        raise mixed(f"model.pt holds no info dict but a {type(extra).__name__}")
    try:
        expected = json.loads(json.dumps(extra, default=str))  # info.json as this checkpoint's save wrote it
    except (TypeError, ValueError) as error:
        raise mixed(f"model.pt's info cannot be written as JSON ({error}), so info.json is not its copy") from error
    if not isinstance(saved, dict) or set(saved) != set(expected):
        entries = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise mixed(f"info.json has the entries {entries}, model.pt {sorted(expected)}")
    for key, value in extra.items():
        # Plain values only: str() of a tensor, say, names its device, which loading may change.
        if isinstance(key, str) and (value is None or type(value) in (bool, int, float, str)) \
                and json.dumps(saved[key]) != json.dumps(value):
            raise mixed(f"info.json has {key}={saved[key]!r}, model.pt {key}={value!r}")


def load_base(fast: bool | None = None, device: str | torch.device | None = None):
    """(model, tokenizer, info) from runs/base/. Full mode loads only the full model; fast mode prefers
    the full model when it exists (it is better) and takes the fast one otherwise.

    Raises FileNotFoundError, saying how to make one, when there is none, and ValueError for a folder that
    is not one whole save (a file missing, or files of different runs).
    """
    fast = fast_mode(fast)
    candidates = [base_dir(False)] + ([base_dir(True)] if fast else [])
    attempts = 20
    for attempt in range(attempts):
        # A save_base in another process (another notebook) may swap a folder in while it is read here: its
        # files would then come from two saves, or vanish. Such a read is retried, never reported as mixed.
        swapped = False
        for folder in candidates:
            identity = _folder_identity(folder)
            try:
                loaded = _read_base_folder(folder)
            except (OSError, ValueError):
                if attempt + 1 < attempts and _folder_identity(folder) != identity:
                    swapped = True
                    break
                raise
            if _folder_identity(folder) != identity and attempt + 1 < attempts:
                swapped = True
                break
            if loaded is not None:
                model, tokenizer, checkpoint = loaded
                if device is not None:
                    model.to(device)
                model.eval()
                info = dict(checkpoint.get("extra") or {}, path=str(folder), trained_now=False)
                return model, tokenizer, info
        if swapped:
            continue
        # Killed between the two renames of _swap_in, a save leaves no folder but the previous one aside; a
        # running save leaves it so for an instant, so look again a few times before saying so.
        aside = [(path, folder) for folder in candidates if folder.parent.is_dir()
                 for path in sorted(folder.parent.glob(f".{folder.name}.*.old")) if (path / "model.pt").is_file()]
        if aside and attempt + 1 < attempts:
            time.sleep(0.05)
            continue
        if aside and _restore_aside(*aside[0]):
            return load_base(fast, device)
        hint = (f"; a save_base killed midway left the previous model in {aside[0][0]}: rename that folder to "
                f"{aside[0][1]} to use it" if aside else "")
        raise FileNotFoundError(f"no base model in {' or '.join(map(str, candidates))}; run chapter 03 "
                                "(solutions/03_pretraining.ipynb) or call minillm.pretrained.load_or_train_base()"
                                + hint)
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _restore_aside(aside: Path, folder: Path) -> bool:
    """Put back the model a save_base killed between its two renames left in `aside` (what the save itself
    does when it fails); True when `folder` holds a model afterwards."""
    def saved_at(path: Path) -> float:
        try:
            return (path / "model.pt").stat().st_mtime
        except OSError:   # no model in it, or gone already
            return -1.0

    newest = max(folder.parent.glob(f".{folder.name}.*.old"), default=aside, key=saved_at)
    try:
        os.rename(newest, folder)
    except OSError:   # another process restored or saved one just now, or the folder cannot be written
        return (folder / "model.pt").is_file()
    warnings.warn(f"load_base: a save_base killed midway had left the previous base model in {newest}; it is "
                  f"back in {folder}", stacklevel=3)
    return True


def _folder_identity(folder: Path) -> tuple | None:
    """What changes when another folder takes `folder`'s place (a rename sets the ctime); None when absent."""
    try:
        stat = os.stat(folder)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def _read_base_folder(folder: Path):
    """(model, tokenizer, checkpoint) from one base model folder, or None when it holds none of BASE_FILES."""
    missing = [name for name in BASE_FILES if not (folder / name).is_file()]
    if len(missing) == len(BASE_FILES):
        return None
    if missing:
        raise ValueError(f"load_base: {folder} is incomplete, it has no {' or '.join(missing)} (an interrupted "
                         "save, or files removed), so its files may come from different runs; delete the "
                         "folder and run load_or_train_base() again, or save the model again with save_base")
    checkpoint = load_checkpoint(folder / "model.pt")
    _check_info_matches(folder, checkpoint)
    model = checkpoint["model"]
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        # The two files come from different runs: some token ids would be outside the model's vocabulary.
        raise ValueError(f"load_base: {folder} holds a tokenizer of {tokenizer.vocab_size} tokens but a model "
                         f"of vocab_size={model.config.vocab_size}; the files come from different runs, so "
                         "delete the folder and run load_or_train_base() again")
    saved_digest = (checkpoint.get("extra") or {}).get(TOKENIZER_DIGEST)
    if saved_digest is not None and _file_digest(folder / "tokenizer.json") != saved_digest:
        raise ValueError(f"load_base: {folder}/tokenizer.json is not the tokenizer this model was saved with (its "
                         "digest differs from the one in model.pt's info); put the original back, or delete the "
                         "folder and run load_or_train_base() again")
    return model, tokenizer, checkpoint


def load_or_train_base(fast: bool | None = None, device: str | torch.device | None = None,
                       progress: bool = True):
    """The base model, tokenizer and an info dict: loaded from runs/base/ or, if absent, trained and saved.

    info holds at least: path, trained_now, fast, val_loss, unigram_val_loss, steps, tokens, seconds.
    """
    fast = fast_mode(fast)
    try:
        return load_base(fast, device)
    except FileNotFoundError:
        pass
    # Checked before the training, not found by save_base after it: a file (or the user's own files) where the
    # base model goes, or a runs folder that cannot be written.
    _check_replaceable(base_dir(fast), "load_or_train_base")
    ensure_writable_folder(base_dir(fast), "load_or_train_base")
    recipe = base_recipe(fast, device)
    if progress:
        print(f"No base model in {base_dir(fast)}: training one ({'fast' if fast else 'full'} recipe).")
    tokenizer = train_base_tokenizer(recipe.vocab_size)
    train_tokens, val_tokens = base_tokens(tokenizer)
    torch.manual_seed(recipe.train.seed)
    model = GPT(recipe.model)
    train_config = TrainConfig(**{**asdict(recipe.train), "progress": progress,
                                  "device": str(device) if device is not None else recipe.train.device})
    result = train(model, train_tokens, val_tokens, train_config)
    if result.interrupted:   # Stop pressed: later chapters would load a half-trained model as the base one
        raise KeyboardInterrupt(f"training the base model stopped at step {result.step} of {train_config.steps}; "
                                "nothing was saved, call load_or_train_base() again to train it from the start")
    info = {
        "val_loss": result.final_val_loss,
        "unigram_val_loss": unigram_loss(train_tokens, val_tokens, tokenizer.vocab_size),
        "steps": result.step, "tokens": result.meter.tokens, "seconds": result.meter.seconds,
        "tokens_per_second": result.tokens_per_second, "corpus": BASE_CORPUS,
        "n_params": model.num_parameters(),
    }
    folder = save_base(model, tokenizer, info, fast)
    model.eval()
    return model, tokenizer, dict(info, fast=fast, path=str(folder), trained_now=True)


def validation_loss(model: GPT, val_tokens, batches: int = 10, batch_size: int = 16) -> float:
    """Mean validation loss of a model on fixed windows (a convenience over train.estimate_loss)."""
    return estimate_loss(model, val_tokens, model.config.block_size, batch_size, batches)
