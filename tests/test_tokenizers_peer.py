"""minillm.tokenizers against peer libraries: GPT-2's own split (the `regex` module with GPT-2's pattern, the
pattern tiktoken's "gpt2" encoding uses) and Hugging Face `tokenizers` (ByteLevel pre-tokenizer, BPE model,
BpeTrainer).

1. `pretokenize` cuts text exactly as GPT-2 does, for prose, code, numbers, whitespace runs and scripts
   of every kind, and for (nearly) every assigned code point.
2. With the same merges, `BPETokenizer.encode` gives the same ids as a Hugging Face BPE model, and both
   decode any id list to the same text.
3. Training counts pairs as BpeTrainer does: the merges agree up to the first tie between equally frequent
   pairs, and after it differ only because the two number the bytes differently before taking the smallest
   pair (`test_training_matches_hf_bpe_trainer_up_to_tie_breaking`).
"""
from __future__ import annotations

import functools
import json
import random
import re
import unicodedata
from collections import Counter

import pytest

import minillm.tokenizers as tokenizers_module
from minillm.tokenizers import CHUNK_PATTERN, LEGACY_PATTERN, BPETokenizer, pretokenize

hf_tokenizers = pytest.importorskip("tokenizers", reason="the peer checks need Hugging Face `tokenizers`")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

# GPT-2's split as published (openai/gpt-2 encoder.py; tiktoken's "gpt2" pat_str is the same string).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TEXTS = [
    "I don't think they'll come, I'M sure. We've done it; you'd know. It's Bob's, isn't it?",
    "'s 'S ''ll 'llama' rock'n'roll O'Neil\n",
    "def f(x_1, y):\n\treturn x_1**2 + 3.14  # ok\n\nif __name__ == '__main__':\n    f(1, 2)\n",
    "3.14 2026-12-02 1,000,000 12345678 -7 +1e-9 0x1F 1_000",
    "a  b\t\tc\n\n\nd   \n  e \r\n\r\n  \t end   ",
    "café naïve Straße ÉCOLE Ångström Œuvre ǅemal",
    "東京タワー 北京 서울 漢字かなカナ、。「」",
    "🙂🚀 hi 👍🏽 👨‍👩‍👧 🇫🇷!",
    "e\u0301te\u0301 cafe\u0301 a\u0308\u0304 \u0301x",
    "x² ½ Ⅻ ٣ x₁ ³⁄₄ 2³ ⅷ ① ⑴ १२ ٣٤٥ 〇〆々 ¼cup H₂O",
    "__init__ snake_case _x __ x_ _1",
    "ภาษาไทย สวัสดีครับ ๑๒๓",
    "مرحبا بالعالم ١٢٣ عَرَبِيّ",
    "Привет, мир! Ελληνικά κείμενα. עברית",
    "a\x1cb \x1c! \x1c word x\x1dy\x1e\x1f z",
    "\u00a0x \u3000y \u2028z\u2029 \x85w \u200bzero\u2060 \u180e \u2007\u202f",
    "tabs\tand\x0bvertical\x0cfeed \x00nul \x7fdel",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (openai/gpt-2 encoder.py), used in vocab strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def as_bytes(byte_level: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in byte_level)


def as_byte_level(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def hf_pieces(text: str) -> list[str]:
    """Hugging Face's GPT-2 pre-tokenization of `text`, its byte-level pieces mapped back to text."""
    splits = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    pieces = [as_bytes(piece).decode("utf-8") for piece, _ in splits]
    assert [text[start:end] for _, (start, end) in splits] == pieces  # the offsets say the same
    return pieces


def gpt2_pieces(text: str) -> list[str]:
    regex = pytest.importorskip("regex", reason="GPT-2's pattern needs the `regex` module (\\p{L}, \\p{N})")
    return regex.findall(GPT2_PATTERN, text)


# --- 1. pre-tokenization --------------------------------------------------------------------------

def test_byte_mapping_is_gpt2s():
    assert tokenizers_module.GPT2_PATTERN == GPT2_PATTERN
    assert set(BYTE_TO_CHAR.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert BYTE_TO_CHAR[ord(" ")] == "Ġ" and BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert hf_pieces(" é") == [" é"]  # two UTF-8 bytes after the space, each its own stand-in


@pytest.mark.parametrize("text", TEXTS)
def test_pretokenize_matches_hf_byte_level(text):
    assert pretokenize(text) == hf_pieces(text)


@pytest.mark.parametrize("text", TEXTS)
def test_pretokenize_matches_gpt2_pattern(text):
    assert pretokenize(text) == gpt2_pieces(text)


def test_pretokenize_numbers_are_not_letters():
    # \p{N} holds the non-decimal numerals too (superscripts, fractions, Roman numerals, circled digits):
    # GPT-2 cuts them off a word, as it does ASCII digits.
    assert pretokenize("x² H₂O ½cup Ⅻth ①a a٣") == [
        "x", "²", " H", "₂", "O", " ½", "cup", " Ⅻ", "th", " ①", "a", " a", "٣"]
    # Information separators U+001C..U+001F are whitespace to str.isspace but not to Unicode's White_Space
    assert pretokenize("a \x1c! b") == ["a", " \x1c!", " b"]


@functools.lru_cache(maxsize=None)
def every_code_point_text() -> str:
    """Every assigned, non-control code point, shuffled, with spaces, letters, digits and punctuation
    sprinkled between them so that every kind of boundary occurs; plus the ASCII controls that are spaces.

    Left out: code points whose kind Python's `unicodedata` and the `regex` module see differently. The two
    may follow different Unicode versions, and a newer one assigns new letters (see CHUNK_PATTERN)."""
    regex = pytest.importorskip("regex")
    candidates = "".join(chr(i) for i in range(0x40000) if unicodedata.category(chr(i))[0] != "C")
    letters, numbers = set(regex.findall(r"\p{L}", candidates)), set(regex.findall(r"\p{N}", candidates))
    chars = [c for c in candidates if (c in letters, c in numbers) == (unicodedata.category(c)[0] == "L",
                                                                       unicodedata.category(c)[0] == "N")]
    assert len(chars) > 0.99 * len(candidates)
    chars += list("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85") * 50
    rng = random.Random(0)
    rng.shuffle(chars)
    glue = [" ", "  ", "a", "1", "!", "'s", "'ll", "\n"]
    return "".join(c + (rng.choice(glue) if rng.random() < 0.3 else "") for c in chars)


def test_pretokenize_matches_gpt2_on_every_code_point():
    text = every_code_point_text()
    assert len(text) > 200_000
    assert pretokenize(text) == gpt2_pieces(text)


def test_pretokenize_matches_hf_on_every_code_point():
    text = every_code_point_text()
    ours, theirs = pretokenize(text), hf_pieces(text)
    if ours != theirs:  # show the first chunk that differs, not 300k of them
        index = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        assert ours[index:index + 3] == theirs[index:index + 3]
    assert ours == theirs


def test_files_saved_with_the_old_pattern_keep_their_split(tmp_path):
    # Before the split matched GPT-2's, the pattern used Python's \w and \d, where '²' is a letter. A file
    # saved then stores that pattern and keeps it (compiled with `re`, as then), so its ids do not change
    # under a model trained with it.
    old_pattern = LEGACY_PATTERN
    assert CHUNK_PATTERN != old_pattern
    assert pretokenize("a \x1c! b", old_pattern) == ["a", " ", "\x1c", "!", " b"]   # re's \s, as before
    tokenizer = BPETokenizer()
    tokenizer.pattern, tokenizer._chunk_regex = old_pattern, re.compile(old_pattern)
    tokenizer.train("x² y² x²y x²", 256 + 3)
    tokenizer.save(tmp_path / "old.json")
    loaded = BPETokenizer.load(tmp_path / "old.json")
    assert loaded.pattern == old_pattern
    assert pretokenize("x²", loaded.pattern) == ["x²"] and pretokenize("x²") == ["x", "²"]
    assert len(loaded.encode("x²")) == 1  # merged across what the new split would cut
    assert loaded.encode("x² x²") == tokenizer.encode("x² x²")


# --- 2. encoding with the same merges -------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def corpus_parts() -> tuple[str, str]:
    """(train, held_out): Python's own documentation, which ships with every Python install."""
    from minillm.data import load_corpus, split
    text = load_corpus("pydocs")
    train, held_out = split(text[:240_000], 0.25)
    return train, held_out


@functools.lru_cache(maxsize=None)
def trained_bpe() -> BPETokenizer:
    return BPETokenizer().train(corpus_parts()[0], 256 + 600)


def hf_tokenizer_with_merges(tokenizer: BPETokenizer) -> Tokenizer:
    """A Hugging Face byte-level BPE model holding exactly `tokenizer`'s vocabulary and merges."""
    vocab = {as_byte_level(tokenizer.token_bytes(i)): i for i in range(256 + len(tokenizer.merges))}
    assert len(vocab) == 256 + len(tokenizer.merges)  # no two ids stand for the same bytes
    merges = [(as_byte_level(tokenizer.token_bytes(a)), as_byte_level(tokenizer.token_bytes(b)))
              for a, b in tokenizer.merges]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def test_encode_matches_hf_bpe_with_the_same_merges():
    ours = trained_bpe()
    hf = hf_tokenizer_with_merges(ours)
    held_out = corpus_parts()[1]
    for text in [held_out, *TEXTS, "".join(TEXTS)]:
        ids = ours.encode(text)
        assert ids == hf.encode(text).ids
        assert ours.decode(ids) == hf.decode(ids) == text
    assert len(ours.encode(held_out)) < len(held_out.encode("utf-8")) / 2  # the merges do compress


def test_encode_matches_hf_bpe_on_the_unusual_characters():
    # Trained on the odd texts themselves, so that merges form inside every chunk (e.g. " ½", " ³", "\x1c!")
    # and a chunk boundary placed differently from GPT-2's would change the ids.
    ours = BPETokenizer().train("".join(TEXTS) * 3, 256 + 250)
    hf = hf_tokenizer_with_merges(ours)
    for text in [*TEXTS, "".join(reversed(TEXTS)), "x²y² ½½ Ⅻ\x1c\x1c! H₂O₂"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text).ids
        assert ours.decode(ids) == hf.decode(ids) == text


def test_decode_of_any_ids_matches_hf():
    # Ids that cut a character in two give invalid UTF-8: both replace it with U+FFFD the same way.
    ours = trained_bpe()
    hf = hf_tokenizer_with_merges(ours)
    rng = random.Random(1)
    ids = ours.encode("".join(TEXTS))
    cases = [ids[i:j] for i, j in (sorted(rng.sample(range(len(ids) + 1), 2)) for _ in range(200))]
    cases += [[i] for i in range(ours.vocab_size)]
    cases += [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    for case in cases:
        assert ours.decode(case) == hf.decode(case), case


# --- 3. training ----------------------------------------------------------------------------------

def textbook_merges(text: str, n_merges: int, byte_order) -> tuple[list[tuple[bytes, bytes]], int]:
    """(merges, n_tie_free) of textbook BPE on `text`: recount every pair before every merge, take the most
    frequent, break ties by the smallest pair of ids, where byte b has id `byte_order(b)` and merge k id
    256 + k. `n_tie_free` counts the merges made before the first tie."""
    words = Counter(tuple(byte_order(b) for b in chunk.encode("utf-8")) for chunk in pretokenize(text))
    token_bytes = {byte_order(b): bytes([b]) for b in range(256)}
    merges, n_tie_free = [], None
    for new_id in range(256, 256 + n_merges):
        counts: Counter = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += freq
        if not counts:
            break
        top = max(counts.values())
        tied = [pair for pair, count in counts.items() if count == top]
        if len(tied) > 1 and n_tie_free is None:
            n_tie_free = len(merges)
        best = min(tied)
        token_bytes[new_id] = token_bytes[best[0]] + token_bytes[best[1]]
        merges.append((token_bytes[best[0]], token_bytes[best[1]]))
        merged: Counter = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges, len(merges) if n_tie_free is None else n_tie_free


def hf_trained_merges(text: str, n_merges: int) -> list[tuple[bytes, bytes]]:
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=0, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([text], trainer=trainer)
    assert hf.get_vocab_size() == 256 + n_merges
    merges = json.loads(hf.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return [(as_bytes(a), as_bytes(b)) for a, b in pairs]


# BpeTrainer numbers the 256 byte stand-in characters in code point order ("!" is 0, "Ġ", the space, 220),
# and like minillm breaks ties between equally frequent pairs by the smallest pair of its ids.
HF_BYTE_ID = {b: i for i, b in enumerate(sorted(range(256), key=BYTE_TO_CHAR.__getitem__))}


def test_training_matches_hf_bpe_trainer_up_to_tie_breaking():
    text = corpus_parts()[0][:40_000]
    n_merges = 200
    ours = BPETokenizer().train(text, 256 + n_merges)
    ours_merges = [(ours.token_bytes(a), ours.token_bytes(b)) for a, b in ours.merges]
    theirs = hf_trained_merges(text, n_merges)
    reference, n_tie_free = textbook_merges(text, n_merges, byte_order=lambda b: b)
    assert ours_merges == reference
    assert n_tie_free >= 10  # enough merges to mean something
    # Up to the first tie the merges are fixed by the counts alone: the two trainers agree exactly.
    assert theirs[:n_tie_free] == ours_merges[:n_tie_free]
    # After it they may differ, only because their ids for bytes differ: with BpeTrainer's ids, the same
    # textbook BPE (same counts, same tie rule) learns BpeTrainer's merges, every one of them.
    assert theirs == textbook_merges(text, n_merges, byte_order=HF_BYTE_ID.__getitem__)[0]
    assert theirs != ours_merges  # this text does hit a tie that the two id orders break differently
