"""Tests of minillm.tokenizers (chapter 01): round trips, the BPE trainer against a naive reference,
special tokens, saving and loading, and the errors a learner will meet."""
from __future__ import annotations

import functools
import io
import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer, pretokenize, train_bpe_by_recount

MIXED_TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox doesn't!\n"
    "def add(a, b):\n    return a + b  # 1234 + 5678 = 6912\n"
    "Ünïcödé: café, naïve, Straße, 東京, Москва, 🙂🚀 and     spaces\t\ttabs.\n"
) * 3


def corpus_text() -> str:
    try:
        from minillm.data import load_corpus
        return load_corpus("pydocs")
    except (ImportError, AttributeError):
        import pydoc_data.topics
        topics = pydoc_data.topics.topics
        return "".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=None)
def small_bpe() -> BPETokenizer:
    return BPETokenizer().train(MIXED_TEXT, 256 + 80)


@functools.lru_cache(maxsize=None)
def small_char() -> CharTokenizer:
    return CharTokenizer().train(MIXED_TEXT)


def naive_bpe_merges(text: str, n_merges: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Textbook BPE: every chunk occurrence kept separately, every pair recounted before every merge."""
    words = [list(chunk.encode("utf-8")) for chunk in pretokenize(text)]
    merges = []
    for merge_index in range(n_merges):
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        top = max(counts.values())
        best = min(pair for pair, count in counts.items() if count == top)
        new_id = 256 + merge_index
        merges.append(best)
        for w, word in enumerate(words):
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == list(best):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
    return merges, [token for word in words for token in word]


# --- pre-splitting --------------------------------------------------------------------------------

def test_pretokenize_rejoins_and_splits_like_gpt2():
    assert pretokenize("Hello world, it's 2024!!  ok") == [
        "Hello", " world", ",", " it", "'s", " 2024", "!!", " ", " ok"]
    assert "".join(pretokenize(MIXED_TEXT)) == MIXED_TEXT


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_pretokenize_covers_every_character(text):
    assert "".join(pretokenize(text)) == text


# --- round trips ----------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(text):
    tokenizer = small_bpe()
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_char_with_byte_fallback_round_trips_any_text(text):
    tokenizer = small_char()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def printable(text: str) -> str:
    """`text`, after checking that print() to a UTF-8 terminal can write it (a lone surrogate could not)."""
    text.encode("utf-8")
    print(text, file=io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    return text


@pytest.mark.parametrize("encode", [
    lambda text: small_bpe().encode(text), lambda text: small_char().encode(text),
    lambda text: CharTokenizer(byte_fallback=False).train("abc").encode(text),
    lambda text: BPETokenizer().train(text, 260), lambda text: CharTokenizer().train(text),
    lambda text: train_bpe_by_recount(text, 2)])
def test_text_with_a_lone_surrogate_is_refused_with_a_clear_error(encode):
    # It used to be encoded as the 3 bytes ED A0 80 ("surrogatepass"), which decode turned back into "\ud800",
    # a string print() cannot write.
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' \(U\+D800\) at index 1.*errors='replace'"):
        encode("a\ud800b\udfffc")


def test_a_lone_surrogate_is_refused_in_special_tokens_and_saved_characters(tmp_path):
    with pytest.raises(ValueError, match="special token.*lone surrogate"):
        BPETokenizer(special_tokens=["<|\ud83d|>"])
    path = tmp_path / "chars.json"
    state = {"type": "CharTokenizer", "version": 1, "byte_fallback": True, "chars": ["a", "\ud800"]}
    path.write_text(json.dumps(state))   # as an older minillm saved a tokenizer trained on such text
    with pytest.raises(ValueError, match="lone surrogate.*retrain"):
        load_tokenizer(path)


def test_after_refusing_a_surrogate_the_tokenizer_still_encodes():
    tokenizer = BPETokenizer().train(MIXED_TEXT, 300)
    with pytest.raises(ValueError, match="lone surrogate"):
        tokenizer.encode("fox \udc80")
    assert tokenizer.decode(tokenizer.encode("fox \u00e9")) == "fox \u00e9"


@pytest.mark.parametrize("make", [small_bpe, small_char])
def test_decode_of_bytes_that_are_not_utf8_gives_the_replacement_character(make):
    tokenizer = make()
    byte_id = (lambda b: b) if isinstance(tokenizer, BPETokenizer) else (lambda b: len(tokenizer.chars) + b)
    cut = [byte_id(b) for b in "\u6771".encode("utf-8")[:2]]           # a 3-byte character, cut after 2
    assert printable(tokenizer.decode(cut)) == "\ufffd"
    assert printable(tokenizer.decode(cut + tokenizer.encode("ok"))) == "\ufffdok"
    # The UTF-8 form of a surrogate used to decode to the lone surrogate itself.
    assert printable(tokenizer.decode([byte_id(b) for b in b"\xed\xa0\x80"])) == "\ufffd" * 3
    assert printable(tokenizer.decode([byte_id(0xFF), byte_id(ord("a"))])) == "\ufffda"


@pytest.mark.parametrize("make", [small_bpe, small_char])
def test_tokens_decoded_one_at_a_time_print_and_decode_bytes_is_lossless(make):
    tokenizer = make()
    text = "caf\u00e9 \u6771\u4eac \U0001f642\U0001f680 zebra \u00a7"   # some characters unseen in training
    ids = tokenizer.encode(text)
    pieces = [printable(tokenizer.decode([token_id])) for token_id in ids]
    assert "".join(pieces) != text and "\ufffd" in "".join(pieces)   # some tokens hold part of a character
    streamed = b"".join(tokenizer.decode_bytes([token_id]) for token_id in ids)
    assert streamed == tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert tokenizer.decode_bytes(ids[:0]) == b""
    with pytest.raises(ValueError, match="decode_bytes: token id"):
        tokenizer.decode_bytes([tokenizer.vocab_size])


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_decode_of_any_ids_prints_and_equals_decode_bytes_replaced(data):
    for tokenizer in (small_bpe(), small_char()):
        ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=12))
        text = printable(tokenizer.decode(ids))
        assert text == tokenizer.decode_bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("make", [small_bpe, small_char, lambda: BPETokenizer(), lambda: CharTokenizer()])
def test_empty_string(make):
    tokenizer = make()
    assert tokenizer.encode("") == []
    assert tokenizer.decode([]) == ""


# --- BPE training -----------------------------------------------------------------------------------

def test_hand_checkable_first_merge():
    # "aaabdaaabac" is one chunk; pairs: aa x4, ab x2, bd, da, ba, ac once each
    tokenizer = BPETokenizer().train("aaabdaaabac", 256 + 3)
    a = ord("a")
    assert tokenizer.merges[0] == (a, a)
    assert tokenizer.token_bytes(256) == b"aa"
    assert tokenizer.vocab_size == 256 + len(tokenizer.merges) == 259
    assert tokenizer.encode("aaabdaaabac")[0] >= 256


def test_incremental_trainer_equals_naive_reference():
    n_merges = 120
    tokenizer = BPETokenizer().train(MIXED_TEXT, 256 + n_merges)
    reference_merges, reference_ids = naive_bpe_merges(MIXED_TEXT, n_merges)
    assert tokenizer.merges == reference_merges
    # encoding by merge rank reproduces the segmentation training ended with
    assert tokenizer.encode(MIXED_TEXT) == reference_ids


def test_training_is_deterministic_and_save_load_keeps_encodings(tmp_path):
    first = BPETokenizer().train(MIXED_TEXT, 256 + 60)
    second = BPETokenizer().train(MIXED_TEXT, 256 + 60)
    assert first.merges == second.merges
    path = tmp_path / "bpe.json"
    first.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.merges == first.merges
    assert loaded.encode(MIXED_TEXT) == first.encode(MIXED_TEXT)
    assert isinstance(load_tokenizer(path), BPETokenizer)


def test_training_stops_with_a_warning_when_nothing_is_left_to_merge():
    with pytest.warns(UserWarning, match="no pairs left"):
        tokenizer = BPETokenizer().train("abab", 256 + 10)
    assert tokenizer.merges == [(ord("a"), ord("b")), (256, 256)]


@pytest.mark.slow
def test_bpe_compresses_real_text():
    sample = corpus_text()[:50_000]
    tokenizer = BPETokenizer().train(sample, 512)
    ids = tokenizer.encode(sample)
    bytes_per_token = len(sample.encode("utf-8")) / len(ids)
    # observed ~2.1 on this sample; a broken merge loop gives 1.0
    assert bytes_per_token > 1.8
    assert tokenizer.decode(ids) == sample


# --- special tokens -----------------------------------------------------------------------------------

def test_special_tokens_are_single_ids_and_never_merged():
    specials = ["<|end|>", "<|endoftext|>"]
    text = "<|endoftext|>".join(["hello there", "general kenobi", "hello again"] * 20)
    tokenizer = BPETokenizer(special_tokens=specials).train(text, 256 + 20 + len(specials))
    assert tokenizer.vocab_size == 256 + len(tokenizer.merges) + 2
    end_of_text = tokenizer.special_token_id("<|endoftext|>")
    assert end_of_text == 256 + len(tokenizer.merges) + 1
    ids = tokenizer.encode("hi<|endoftext|>there<|end|>")
    assert ids.count(end_of_text) == 1
    assert ids[-1] == tokenizer.special_token_id("<|end|>")
    assert tokenizer.decode(ids) == "hi<|endoftext|>there<|end|>"
    # without atomic matching "<|" would be among the most frequent pairs of this text
    merged = [tokenizer.token_bytes(i) for i in range(256, 256 + len(tokenizer.merges))]
    assert not any(b"<|" in token or b"|>" in token for token in merged)


def test_longest_special_token_wins():
    tokenizer = BPETokenizer(special_tokens=["<s>", "<s>>"])
    ids = tokenizer.encode("a<s>>b")
    assert ids == [ord("a"), tokenizer.special_token_id("<s>>"), ord("b")]


# --- CharTokenizer ---------------------------------------------------------------------------------

def test_char_vocabulary_order_cap_and_fallback_ids():
    tokenizer = CharTokenizer().train("bbaacd", vocab_size=3)
    assert tokenizer.chars == ["a", "b", "c"]  # ties broken by codepoint, "d" cut by the cap
    assert tokenizer.vocab_size == 3 + 256
    assert tokenizer.encode("abc") == [0, 1, 2]
    assert tokenizer.encode("d") == [3 + ord("d")]  # fallback bytes come after the characters
    assert tokenizer.encode("é") == [3 + 0xC3, 3 + 0xA9]
    assert tokenizer.decode(tokenizer.encode("dé!")) == "dé!"


def test_char_save_load(tmp_path):
    tokenizer = CharTokenizer(byte_fallback=False).train(MIXED_TEXT)
    path = tmp_path / "char.json"
    tokenizer.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, CharTokenizer) and not loaded.byte_fallback
    assert loaded.chars == tokenizer.chars
    assert loaded.encode(MIXED_TEXT) == tokenizer.encode(MIXED_TEXT)


# --- errors ------------------------------------------------------------------------------------------

def test_bpe_vocab_size_below_256_is_refused():
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        BPETokenizer().train(MIXED_TEXT, 200)
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        BPETokenizer(special_tokens=["<|endoftext|>"]).train(MIXED_TEXT, 256)


def test_non_str_input_is_refused():
    with pytest.raises(TypeError, match="expected a str"):
        small_bpe().encode(b"bytes")
    with pytest.raises(TypeError, match="expected a str"):
        CharTokenizer().train(["a", "b"])


def test_out_of_range_decode_names_the_id():
    tokenizer = small_bpe()
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is out of range for vocab_size"):
        tokenizer.decode([65, tokenizer.vocab_size])
    with pytest.raises(ValueError, match="token id -1"):
        small_char().decode([-1])


def test_char_without_fallback_names_the_unseen_character():
    tokenizer = CharTokenizer(byte_fallback=False).train("abc")
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\).*byte_fallback=True"):
        tokenizer.encode("abé")


def test_loading_the_wrong_kind_or_a_corrupted_file(tmp_path):
    char_path = tmp_path / "char.json"
    CharTokenizer().train("abc").save(char_path)
    with pytest.raises(ValueError, match=r"char\.json.*holds a 'CharTokenizer', expected 'BPETokenizer'"):
        BPETokenizer.load(char_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "BPETokenizer", "merges": [[1, 2]')
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        load_tokenizer(broken)
    bad_merge = tmp_path / "bad_merge.json"
    bad_merge.write_text(json.dumps({"type": "BPETokenizer", "version": 1, "pattern": ".", "special_tokens": [],
                                     "merges": [[1, 2], [300, 1]]}))
    with pytest.raises(ValueError, match="merge 1 is"):
        BPETokenizer.load(bad_merge)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")


def test_textbook_recount_trainer_picks_the_same_merges_as_the_incremental_one():
    text = "the cat sat on the mat; the hat, the bat — ünïcödé 123 123 the end " * 3
    assert train_bpe_by_recount(text, 30) == BPETokenizer().train(text, 256 + 30).merges


def test_decode_accepts_numpy_and_torch_integer_ids():
    import numpy as np
    import torch

    bpe, char = small_bpe(), small_char()
    ids = bpe.encode("the fox")
    assert bpe.decode([np.int64(i) for i in ids]) == "the fox"
    assert bpe.decode([np.int32(i) for i in ids]) == "the fox"
    assert bpe.decode([torch.tensor(i) for i in ids]) == "the fox"
    assert bpe.token_bytes(np.int64(104)) == b"h"
    char_ids = char.encode("dog")
    assert char.decode([np.int64(i) for i in char_ids]) == "dog"
    assert char.decode(np.array(char_ids, dtype=np.uint16)) == "dog"
    with pytest.raises(TypeError, match="token ids must be ints, got True"):
        bpe.decode([True])
    with pytest.raises(TypeError, match="token ids must be ints"):
        char.decode([np.bool_(True)])
    with pytest.raises(TypeError, match="token ids must be ints"):
        bpe.decode([np.float64(104.0)])


@pytest.mark.parametrize("single", [104, "np.int64", "np.array", "torch.tensor"])
def test_decode_of_a_single_id_says_to_wrap_it_in_a_list(single):
    import numpy as np
    import torch

    values = {"np.int64": np.int64(104), "np.array": np.array(104), "torch.tensor": torch.tensor(104)}
    value = values.get(single, single)
    for tokenizer in (small_bpe(), small_char()):
        with pytest.raises(TypeError, match=r"single id .*wrap it in a list"):
            tokenizer.decode(value)


def _bpe_file(tmp_path, **fields) -> str:
    state = {"type": "BPETokenizer", "version": 1, "pattern": small_bpe().pattern, "special_tokens": [],
             "merges": [[104, 101], [116, 104]]}
    state.update(fields)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(state))
    return str(path)


@pytest.mark.parametrize("fields, complaint", [
    ({"pattern": "a"}, "does not cut text into chunks that re-join"),
    ({"pattern": "("}, "is not a regular expression"),
    ({"pattern": r"\w+|\s+"}, "does not cut text into chunks that re-join"),    # drops punctuation
    ({"pattern": r"(\w+)|(\W+)"}, "does not cut text into chunks that re-join"),  # groups: findall gives tuples
    ({"merges": [[97, 98], [97, 98]]}, "merge 1 .* repeats an earlier merge"),
    ({"merges": [[True, False]]}, "merge 0 is"),
    ({"merges": [[97, 1.0]]}, "merge 0 is"),
    ({"special_tokens": [""]}, "special_tokens"),
])
def test_loading_an_invalid_bpe_file_says_why(tmp_path, fields, complaint):
    path = _bpe_file(tmp_path, **fields)
    with pytest.raises(ValueError, match="is not a valid BPETokenizer: .*" + complaint):
        BPETokenizer.load(path)
    with pytest.raises(ValueError, match=complaint):
        load_tokenizer(path)


def test_loading_keeps_a_custom_pattern_that_covers_all_text(tmp_path):
    tokenizer = BPETokenizer.load(_bpe_file(tmp_path, pattern=r"\S+|\s+"))
    assert tokenizer.pattern == r"\S+|\s+"
    text = "the end, thé 東京!\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert BPETokenizer.load(_bpe_file(tmp_path)).merges == [(104, 101), (116, 104)]


# ---- review: adversarial inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("content", ['{"type": [], "version": 1}', '{"type": {"a": 1}, "version": 1}',
                                     '{"type": null, "version": 1}'])
def test_load_tokenizer_with_a_type_that_is_not_a_name_is_a_clear_error(tmp_path, content):
    path = tmp_path / "odd.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"odd\.json.*'type' field"):
        load_tokenizer(path)


def test_a_version_of_true_is_not_version_1(tmp_path):
    path = tmp_path / "tok.json"
    BPETokenizer().train("abab abab", 258).save(path)
    state = json.loads(path.read_text(encoding="utf-8"))
    state["version"] = True
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError, match="format version True"):
        load_tokenizer(path)


def test_vocab_sizes_may_be_numpy_integers_but_not_floats():
    np = pytest.importorskip("numpy")
    text = "abab abab cdcd"
    assert BPETokenizer().train(text, np.int64(258)).merges == BPETokenizer().train(text, 258).merges
    assert CharTokenizer().train(text, np.int32(2)).chars == CharTokenizer().train(text, 2).chars
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        BPETokenizer().train(text, 258.0)
    with pytest.raises(ValueError, match="vocab_size=2.0 must be a positive int"):
        CharTokenizer().train(text, 2.0)


@pytest.mark.parametrize("tokenizer", [CharTokenizer().train("ab"), BPETokenizer()])
def test_decode_of_something_that_is_not_a_sequence_says_what_it_expected(tokenizer):
    with pytest.raises(TypeError, match="expected a sequence of token ids.*got NoneType"):
        tokenizer.decode(None)


def test_a_deeply_nested_file_is_a_clear_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(ValueError, match=r"deep\.json.*not valid JSON"):
        load_tokenizer(path)
