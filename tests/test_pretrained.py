"""minillm.pretrained: the load-or-train call gives a model that beats a unigram model, then loads it back."""
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
