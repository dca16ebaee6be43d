"""minillm.pretrained: the load-or-train call gives a model that beats a unigram model, then loads it back."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm import pretrained
from minillm.model import GPT, GPTConfig
from minillm.tokenizers import BPETokenizer
from minillm.pretrained import base_tokens, load_base, load_or_train_base, unigram_loss, validation_loss


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_RUNS", str(tmp_path / "runs"))


def test_load_or_train_beats_unigram_then_loads_the_same_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="chapter 03"):
        load_base(fast=True)
    model, tokenizer, info = load_or_train_base(fast=True, device="cpu", progress=False)
    assert info["trained_now"] and info["fast"]
    assert (tmp_path / "runs" / "base" / "fast" / "model.pt").is_file()
    assert (tmp_path / "runs" / "base" / "fast" / "tokenizer.json").is_file()
    train_tokens, val_tokens = base_tokens(tokenizer)
    unigram = unigram_loss(train_tokens, val_tokens, tokenizer.vocab_size)
    assert unigram == pytest.approx(info["unigram_val_loss"])
    model_loss = validation_loss(model, val_tokens)
    assert model_loss < unigram - 0.1, (model_loss, unigram)

    again, tokenizer_again, info_again = load_or_train_base(fast=True, progress=False)
    assert not info_again["trained_now"]
    assert tokenizer_again.encode("def f(x): return x") == tokenizer.encode("def f(x): return x")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a.cpu(), b), name


def test_unigram_loss_is_the_entropy_of_the_frequencies():
    train = torch.tensor([0, 0, 0, 1])  # add-one smoothed over 2 symbols: p = (4/6, 2/6)
    assert unigram_loss(train, torch.tensor([0, 1]), 2) == pytest.approx(-(torch.tensor([4 / 6, 2 / 6]).log().mean()).item())
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_loss(torch.tensor([0, 5]), torch.tensor([0]), 2)


def test_recipes_are_valid_for_every_mode():
    for fast in (True, False):
        for device in ("cpu", "cuda"):
            recipe = pretrained.base_recipe(fast, device)
            assert recipe.model.vocab_size == recipe.vocab_size


def test_save_base_with_numpy_numbers_and_paths_loads_back(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=260, block_size=8, n_layer=1, n_head=2, n_embd=16))
    tokenizer = BPETokenizer().train("def f(x): return x + x\n" * 20, 260)
    info = {"val_loss": np.float64(2.0), "steps": np.int64(7), "source": Path("/data/corpus.txt")}
    folder = pretrained.save_base(model, tokenizer, info, fast=True)
    loaded, _, loaded_info = load_base(fast=True)
    assert loaded_info["val_loss"] == 2.0 and type(loaded_info["val_loss"]) is float
    assert loaded_info["steps"] == 7 and type(loaded_info["steps"]) is int
    assert loaded_info["source"] == str(Path("/data/corpus.txt"))
    assert '"steps": 7' in (folder / "info.json").read_text()  # a number, not the string "7"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match=r"save_base: info\['bad'\]"):
        pretrained.save_base(model, tokenizer, {"bad": object()}, fast=False)
    assert not (tmp_path / "runs" / "base" / "full").exists()  # refused before anything was written


@pytest.mark.parametrize("train_ids, val_ids", [([0, 1], [-1]), ([0, 1], [2]), ([0, -1], [0])])
def test_unigram_loss_refuses_ids_outside_the_vocabulary(train_ids, val_ids):
    # A validation id of -1 used to index the last token's probability silently.
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_loss(torch.tensor(train_ids), torch.tensor(val_ids), 2)


def test_load_base_refuses_a_tokenizer_larger_than_the_model_vocabulary():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=258, block_size=8, n_layer=1, n_head=2, n_embd=16))
    text = "def f(x): return x + x\n" * 20
    folder = pretrained.save_base(model, BPETokenizer().train(text, 258), {"steps": 1}, fast=True)
    BPETokenizer().train(text, 262).save(folder / "tokenizer.json")   # from another run
    with pytest.raises(ValueError, match="262 tokens.*vocab_size=258"):
        load_base(fast=True)


def test_unigram_loss_refuses_fractional_ids_and_a_bad_vocab_size():
    with pytest.raises(ValueError, match="val_tokens must hold integer token ids"):
        unigram_loss(torch.tensor([0, 1]), torch.tensor([0.2, 1.9]), 2)
    with pytest.raises(ValueError, match="train_tokens must hold integer token ids"):
        unigram_loss(torch.tensor([0.5, 1.7]), torch.tensor([0, 1]), 2)
    for vocab_size in (2.0, 0, True):
        with pytest.raises(ValueError, match="vocab_size"):
            unigram_loss(torch.tensor([0, 1]), torch.tensor([0, 1]), vocab_size)
    assert unigram_loss(torch.tensor([0, 1]), torch.tensor([0, 1]), np.int64(2)) == pytest.approx(np.log(2))


@pytest.mark.parametrize("steps", [None, 7.9, -1, "3"])
def test_save_base_names_a_bad_steps_entry(tmp_path, monkeypatch, steps):
    monkeypatch.setenv("MINILLM_RUNS", str(tmp_path))
    model = GPT(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match=r"info\['steps'\]"):
        pretrained.save_base(model, BPETokenizer(), {"steps": steps}, fast=True)
    assert not any(tmp_path.rglob("model.pt"))


# --- saving the three files as one set -----------------------------------------------------------------

TEXT = "def f(x): return x + x\n" * 20


def tiny_base(seed: int):
    """(model, tokenizer, info) of a small base model; each seed gives different weights and info."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=260, block_size=8, n_layer=1, n_head=2, n_embd=16))
    return model, BPETokenizer().train(TEXT, 258 + seed % 3), {"steps": seed, "val_loss": 1.0 + seed / 10}


def assert_loads_as(model, info, fast=True):
    loaded, tokenizer, loaded_info = load_base(fast=fast)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_info["steps"] == info["steps"] and loaded_info["val_loss"] == info["val_loss"]
    folder = pretrained.base_dir(fast)
    assert sorted(p.name for p in folder.iterdir()) == sorted(pretrained.BASE_FILES)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]   # no temp or old folder left
    return tokenizer


def test_save_base_replaces_the_previous_model_whole():
    first, second = tiny_base(0), tiny_base(1)
    pretrained.save_base(*first, fast=True)
    assert_loads_as(first[0], first[2])
    pretrained.save_base(*second, fast=True)
    assert assert_loads_as(second[0], second[2]).vocab_size == second[1].vocab_size


def fail_writing_info(path, text):
    raise KeyboardInterrupt  # Ctrl-C after model.pt and tokenizer.json were written


def fail_saving_tokenizer(self, path):
    Path(path).write_text("{")  # half a file, then the error
    raise OSError("No space left on device")


def fail_moving_the_new_folder_in(real_rename):
    def rename(source, target):
        if str(source).endswith(".tmp"):
            raise OSError("Permission denied")
        return real_rename(source, target)
    return rename


@pytest.mark.parametrize("where", ["tokenizer", "info", "swap"])
def test_an_interrupted_save_base_leaves_the_previous_model_loadable_and_intact(monkeypatch, where):
    # save_base used to write model.pt, tokenizer.json and info.json one after another into the folder
    # itself, so a failure after model.pt left a new model beside the old tokenizer and info.
    previous = tiny_base(0)
    pretrained.save_base(*previous, fast=True)
    with monkeypatch.context() as patch:
        if where == "tokenizer":
            patch.setattr(BPETokenizer, "save", fail_saving_tokenizer)
        elif where == "info":
            patch.setattr(pretrained, "atomic_write_text", fail_writing_info)
        else:
            patch.setattr(os, "rename", fail_moving_the_new_folder_in(os.rename))
        with pytest.raises((OSError, KeyboardInterrupt)):
            pretrained.save_base(*tiny_base(1), fast=True)
    assert_loads_as(previous[0], previous[2])


def test_a_first_save_base_that_fails_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "atomic_write_text", fail_writing_info)
    with pytest.raises(KeyboardInterrupt):
        pretrained.save_base(*tiny_base(0), fast=True)
    assert list((tmp_path / "runs" / "base").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="chapter 03"):
        load_base(fast=True)


def test_a_save_that_lands_while_save_base_swaps_its_folder_in_is_replaced(monkeypatch):
    first, meanwhile, last = tiny_base(0), tiny_base(1), tiny_base(2)
    pretrained.save_base(*first, fast=True)
    real_rename, calls = os.rename, []

    def rename(source, target):
        if str(source).endswith(".tmp") and not calls:  # another process saves just before this rename
            calls.append(source)
            pretrained.save_base(*meanwhile, fast=True)
        return real_rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", rename)
        pretrained.save_base(*last, fast=True)
    assert calls
    assert_loads_as(last[0], last[2])  # the last save wins whole; both older folders are deleted


def test_load_base_puts_back_a_model_left_aside_by_a_killed_save(tmp_path):
    # before: load_base only named the folder to rename, and load_or_train_base trained a new model instead
    folder = pretrained.save_base(*tiny_base(0), fast=True)
    older = folder.with_name(".fast.aaaaaaaaaaaa.old")
    shutil.copytree(folder, older)
    os.utime(older / "model.pt", (1, 1))                         # an older save's leftover
    folder.rename(folder.with_name(".fast.0123456789ab.old"))   # killed between the two renames
    with pytest.warns(UserWarning, match=r"\.fast\.0123456789ab\.old; it is back in .*fast"):
        _, _, info = pretrained.load_or_train_base(fast=True, progress=False)
    assert info["trained_now"] is False and info["steps"] == 0 and folder.is_dir()
    assert (folder / "model.pt").stat().st_mtime > 1              # the newest one came back
    (folder / "model.pt").unlink()
    shutil.rmtree(older)
    folder.rename(folder.with_name(".fast.0123456789ab.old"))
    with pytest.raises(FileNotFoundError, match="no base model"):   # an aside folder without a model stays
        load_base(fast=True)


@pytest.mark.parametrize("missing", ["model.pt", "tokenizer.json", "info.json"])
def test_load_base_refuses_an_incomplete_folder(missing):
    folder = pretrained.save_base(*tiny_base(0), fast=True)
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=rf"incomplete, it has no {missing}.*delete the folder"):
        load_base(fast=True)
    with pytest.raises(ValueError, match="incomplete"):  # not trained again over it
        load_or_train_base(fast=True, progress=False)


def test_load_base_refuses_files_of_different_saves():
    # What an interrupted save_base of an older minillm left: a new model.pt, the old tokenizer and info.
    folder = pretrained.save_base(*tiny_base(0), fast=True)
    old_files = {name: (folder / name).read_bytes() for name in ("tokenizer.json", "info.json")}
    pretrained.save_base(*tiny_base(1), fast=True)
    for name, content in old_files.items():
        (folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=r"different saves \(info.json has steps=0, model.pt steps=1\)"):
        load_base(fast=True)
    (folder / "info.json").write_text('{"steps": 1')
    with pytest.raises(ValueError, match="different saves.*not valid JSON"):
        load_base(fast=True)


def test_unigram_loss_empty_and_nested_inputs():
    # No training ids: add-one smoothing alone, a uniform model over the vocabulary.
    assert unigram_loss([], [0, 1, 2], 3) == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="val_tokens is empty"):
        unigram_loss([0, 1], [], 2)
    with pytest.raises(ValueError, match="flat sequence"):
        unigram_loss(torch.tensor([[0, 1], [1, 0]]), torch.tensor([0]), 2)


def test_load_base_refuses_a_tokenizer_json_from_another_run_of_the_same_vocabulary_size():
    # before: a hand-copied tokenizer.json of the same size loaded, and the model read every token as another
    folder = pretrained.save_base(*tiny_base(0), fast=True)
    info = json.loads((folder / "info.json").read_text())
    assert len(info["tokenizer_sha256"]) == 64
    other = BPETokenizer().train(TEXT[::-1], 258)     # the same vocab size as tiny_base(0)'s, other merges
    other.save(folder / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json is not the tokenizer this model was saved with"):
        load_base(fast=True)


def test_an_interrupted_base_training_saves_nothing(tmp_path, monkeypatch):
    # before: Stop during load_or_train_base's training saved the half-trained model as the base model
    from minillm import train as train_module

    real_lr_at = train_module.lr_at

    def stop_at_step_2(step, config):
        if step == 2:
            raise KeyboardInterrupt
        return real_lr_at(step, config)

    monkeypatch.setattr(train_module, "lr_at", stop_at_step_2)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 1 of .*nothing was saved"):
        load_or_train_base(fast=True, device="cpu", progress=False)
    assert not (tmp_path / "runs" / "base" / "fast" / "model.pt").exists()
    with pytest.raises(FileNotFoundError, match="chapter 03"):
        load_base(fast=True)
