"""minillm used from a student's own project, as README's "Using `minillm` in your own project" shows: defects
found by calling the public API the way such a project would (each test failed before its fix)."""
import errno

import numpy as np
import pytest
import torch

from minillm import cost
from minillm.data import BatchSampler, get_batch
from minillm.model import GPT, GPTConfig
from minillm.moe import MoEConfig
from minillm.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer
from minillm.train import save_checkpoint

MOE = MoEConfig(n_routed=4, top_k=2, expert_hidden=8)


def _config(moe=None) -> GPTConfig:
    return GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, moe=moe,
                     n_dense_layers=1 if moe else 0)


# ---- model: built on the meta device (the usual way to load a large model without initialising it twice) ----

@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_gpt_built_on_meta_then_to_empty_and_loaded_matches_the_original(moe):
    torch.manual_seed(0)
    original = GPT(_config(moe)).eval()
    with torch.device("meta"):
        model = GPT(_config(moe))
    model.to_empty(device="cpu")
    model.load_state_dict(original.state_dict())
    model.eval()
    idx = torch.randint(0, 50, (2, 8))
    # The RoPE tables are not in the state dict: to_empty left them uninitialised (NaN logits before the fix).
    torch.testing.assert_close(model(idx)[0], original(idx)[0], rtol=0, atol=0)
    for layer in model.moe_layers():   # uninitialised token counters would steer the first bias update
        assert layer.step_load.tolist() == [0] * MOE.n_routed


@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_gpt_built_on_meta_and_loaded_with_assign_runs(moe):
    torch.manual_seed(0)
    original = GPT(_config(moe)).eval()
    with torch.device("meta"):
        model = GPT(_config(moe))
    model.load_state_dict(original.state_dict(), assign=True)
    model.eval()
    idx = torch.randint(0, 50, (2, 8))
    # Before the fix: RuntimeError, the RoPE tables were still on the meta device.
    torch.testing.assert_close(model(idx)[0], original(idx)[0], rtol=0, atol=0)
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    model.after_optimizer_step()   # the MoE counters must be real numbers, not meta tensors
    for layer in model.moe_layers():
        assert sum(layer.load_history[-1]) == idx.numel() * MOE.top_k


def test_moe_layer_built_on_meta_gets_zero_counters_when_given_memory():
    from minillm.moe import MoE
    with torch.device("meta"):
        layer = MoE(16, MOE)
    # what to_empty does, with memory that is not zero (uninitialised memory often happens to be)
    layer._apply(lambda t: torch.full(t.shape, 7, dtype=t.dtype, device="cpu"))
    assert layer.step_load.tolist() == [0] * MOE.n_routed and not layer.step_load.is_meta
    with torch.device("meta"):
        assigned = MoE(16, MOE)
    assigned.load_state_dict(MoE(16, MOE).state_dict(), assign=True)
    assigned.train()(torch.randn(2, 4, 16))   # counts tokens into real counters, not meta ones
    assigned.after_optimizer_step()
    assert sum(assigned.load_history[-1]) == 8 * MOE.top_k


# ---- tokenizers ------------------------------------------------------------------------------------------------

def test_bpe_special_tokens_none_means_no_special_tokens():
    tokenizer = BPETokenizer(special_tokens=None)   # TypeError "'NoneType' object is not iterable" before
    assert tokenizer.special_tokens == [] and tokenizer.vocab_size == 256


def test_bpe_special_tokens_as_a_set_are_refused():
    # A set's order (so the tokens' ids) changes from one Python process to the next: ids would not be stable.
    with pytest.raises(TypeError, match=r"BPETokenizer: special_tokens must be an ordered list .*set"):
        BPETokenizer(special_tokens={"<|endoftext|>", "<|pad|>"})


@pytest.mark.parametrize("value", ["no", "False", 2, None, 0.5])
def test_char_tokenizer_byte_fallback_must_be_a_bool(value):
    # bool("no") is True: the tokenizer silently kept the byte fallback it was asked to turn off
    with pytest.raises(TypeError, match=r"CharTokenizer: byte_fallback=.* must be True or False"):
        CharTokenizer(byte_fallback=value)


@pytest.mark.parametrize("value", [True, False, 0, 1, np.bool_(False)])
def test_char_tokenizer_byte_fallback_takes_bools(value):
    assert CharTokenizer(byte_fallback=value).byte_fallback is bool(value)


@pytest.mark.parametrize("tokenizer", [BPETokenizer(["<|endoftext|>"]).train("hello hello world", 260),
                                       CharTokenizer().train("hello")], ids=["bpe", "char"])
def test_tokenizer_saved_to_a_folder_names_the_folder(tmp_path, tokenizer):
    # Before: IsADirectoryError naming a temp file ("/x/.out.3f2a.tmp' -> '/x/out'"), after writing it in full.
    name = type(tokenizer).__name__
    with pytest.raises(IsADirectoryError, match=rf"{name}\.save: .* is a folder; give the path of a file") as info:
        tokenizer.save(tmp_path)
    assert info.value.errno == errno.EISDIR
    assert list(tmp_path.iterdir()) == []   # no temp file left behind
    tokenizer.save(tmp_path / "tok.json")   # a file path works
    assert load_tokenizer(tmp_path / "tok.json").encode("hello") == tokenizer.encode("hello")


def test_save_checkpoint_to_a_folder_names_the_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"save_checkpoint: .* is a folder"):
        save_checkpoint(tmp_path, GPT(_config()))
    assert list(tmp_path.iterdir()) == []


# ---- data ------------------------------------------------------------------------------------------------------

def test_get_batch_refuses_numpy_uint64_ids_beyond_int64():
    tokens = np.full(30, 2 ** 63 + 5, dtype=np.uint64)   # used to wrap round to -9223372036854775803
    with pytest.raises(ValueError, match=r"get_batch: tokens hold the id 9223372036854775813, beyond int64"):
        get_batch(tokens, 4, 2)
    with pytest.raises(ValueError, match=r"BatchSampler: tokens hold the id 9223372036854775813"):
        BatchSampler(tokens, 4, 2)


def test_get_batch_refuses_torch_uint64_ids_beyond_int64():
    tokens = torch.full((30,), 2 ** 63 + 5, dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"get_batch: tokens hold an id beyond int64"):
        get_batch(tokens, 4, 2)


def test_get_batch_still_takes_small_uint64_ids():
    tokens = np.arange(30, dtype=np.uint64)
    x, y = get_batch(tokens, 4, 2, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[:, 1] - x[:, 0],
                                                                                      torch.ones(2, dtype=torch.long))
    x2, _ = get_batch(torch.from_numpy(tokens.astype(np.int64)).to(torch.uint64), 4, 2,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


# ---- cost ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", [None, "", 5])
def test_meter_refuses_a_label_that_is_not_text(label):
    # Before: accepted, and the work measured was lost when Ledger.record refused the label afterwards.
    with pytest.raises(ValueError, match=r"Meter: label=.* must be a non-empty string"):
        cost.Meter(label)


def test_meter_refuses_a_bad_chapter_at_once():
    with pytest.raises(ValueError, match=r"Meter 'x': chapter=.* must be a non-empty string"):
        cost.Meter("x", chapter="")


def test_ledger_record_refuses_what_is_not_a_meter(tmp_path):
    ledger = cost.Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(TypeError, match=r"Ledger.record: expected a Meter, got dict; .*Ledger.append"):
        ledger.record({"seconds": 1.0}, chapter="01")   # AttributeError 'dict' object has no attribute before
    assert not ledger.path.exists()


# ---- checkpoints -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_load_checkpoint_rebuilds_the_model_in_the_dtype_it_was_saved_in(tmp_path, dtype, moe):
    from minillm.train import load_checkpoint
    torch.manual_seed(0)
    model = GPT(_config(moe)).to(dtype).eval()
    save_checkpoint(tmp_path / "model.pt", model)
    loaded = load_checkpoint(tmp_path / "model.pt")["model"].eval()
    # Before: rebuilt as float32, so a float64 model silently lost its precision (and gave other logits).
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    idx = torch.randint(0, 50, (2, 8))
    assert model(idx)[0].dtype == loaded(idx)[0].dtype == dtype
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_load_checkpoint_of_a_float32_model_stays_float32(tmp_path):
    from minillm.train import load_checkpoint
    save_checkpoint(tmp_path / "model.pt", GPT(_config()))
    assert {p.dtype for p in load_checkpoint(tmp_path / "model.pt")["model"].parameters()} == {torch.float32}


def test_tokenize_corpus_takes_a_hugging_face_tokenizers_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from minillm.data import tokenize_corpus
    vocab = {"a": 0, "b": 1, "c": 2}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    # Before: TypeError "the tokenizer returned Encoding"; its .encode gives an Encoding whose .ids are the ids.
    ids = tokenize_corpus("c", hf)
    assert ids.dtype == torch.int64 and ids.tolist() == hf.encode("c").ids == [2]
