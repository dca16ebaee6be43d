"""Tokenizers: characters and byte-level BPE, with one interface.

Taught in chapter 01 (tokenization: chars -> byte BPE). Both classes share
`train / encode / decode / vocab_size / save / load`; `load_tokenizer(path)` opens either kind.

Byte-level BPE in brief: ids 0..255 are the raw UTF-8 bytes, so any text can be encoded before any
training. Training repeatedly fuses the most frequent adjacent pair of ids into a new id (256, 257, ...).
Text is first cut into chunks (words with their leading space, numbers, punctuation runs, whitespace) exactly
as GPT-2 cuts it (`GPT2_PATTERN`, with the `regex` module), and merges never cross
a chunk boundary, so a token never spans "the end of one word + the start of the next". Training counts
each distinct chunk once and updates pair counts incrementally after each merge, touching only the chunks
that contain the merged pair.

Decoding always gives printable text: bytes that are not valid UTF-8 (a multi-byte character cut between
tokens, or an arbitrary id list) become U+FFFD, the replacement character, as in GPT-2 and tiktoken;
`decode_bytes` gives the exact bytes instead (join them, then decode, when streaming tokens one at a time).
Text holding a lone surrogate (U+D800..U+DFFF, which has no UTF-8 bytes) is refused with a ValueError.
"""
from __future__ import annotations

import heapq
import json
import numbers
import operator
import os
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import regex

from minillm.paths import atomic_write_text

__all__ = ["CHUNK_PATTERN", "GPT2_PATTERN", "LEGACY_PATTERN", "pretokenize", "CharTokenizer", "BPETokenizer",
           "load_tokenizer"]

# GPT-2's split as published (openai/gpt-2's encoder.py; also tiktoken's "gpt2" and minbpe's). It is written for
# the `regex` module, which knows Unicode properties: \p{L} is any letter, \p{N} any number (digits, but also
# '²', '½', 'Ⅻ'). Python's own `re` has neither: its closest spelling, `[^\W\d_]` for a letter and `\d` for a
# number (LEGACY_PATTERN, what minillm used before), counts '²' as a letter, so "x²" stays one chunk where
# GPT-2 cuts "x" + "²", and its \s takes U+001C..U+001F as spaces. The alternatives cover every character,
# so the chunks always re-join to the input. `\s+(?!\S)` leaves the last space of a run to the next word,
# so " the" stays one chunk.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHUNK_PATTERN = GPT2_PATTERN
LEGACY_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
_CHUNK_REGEX = regex.compile(CHUNK_PATTERN)


def _compile_chunk_pattern(pattern: str):
    """A chunk pattern compiled as it was meant: minillm's earlier pattern with Python's `re` (so tokenizers
    saved with it cut text exactly as before), any other with the `regex` module (which reads `re`'s syntax
    too, and \\p{..})."""
    return re.compile(pattern) if pattern == LEGACY_PATTERN else regex.compile(pattern)


_FORMAT_VERSION = 1
_SURROGATE_REGEX = re.compile("[\ud800-\udfff]")
# Encoded chunks are cached; the cap only stops an endless stream of new chunks from eating memory.
_ENCODE_CACHE_LIMIT = 500_000


def pretokenize(text: str, pattern=CHUNK_PATTERN) -> list[str]:
    """Cut `text` into the chunks that BPE merges stay inside; `"".join(chunks) == text`."""
    _check_text(text, "pretokenize")
    compiled = _compile_chunk_pattern(pattern) if isinstance(pattern, str) else pattern
    return compiled.findall(text)


def _check_text(text, where: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected a str, got {type(text).__name__}; "
                        "decode bytes first (e.g. data.decode('utf-8')) or join a list of strings")


def _lone_surrogate_error(text: str, where: str) -> ValueError:
    """The error for text holding a lone surrogate, which has no UTF-8 bytes and so cannot be tokenized."""
    match = _SURROGATE_REGEX.search(text)
    found = f" {match.group()!r} (U+{ord(match.group()):04X}) at index {match.start()}" if match else ""
    return ValueError(f"{where}: the text holds a lone surrogate{found}, half of a UTF-16 pair rather than a "
                      "character, so it has no UTF-8 bytes to encode; it usually comes from reading a file with "
                      "errors='surrogateescape' or from a broken JSON escape. Clean the text first, e.g. "
                      "text.encode('utf-8', errors='replace').decode('utf-8') turns each one into '?'")


def _as_index(value) -> int | None:
    """`value` as a Python int when it is an integer of any kind (int, numpy or torch), else None.

    Bools are refused although Python counts them as ints: True as a token id is always a mistake.
    """
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_ids(ids, vocab_size: int, where: str) -> list[int]:
    """Ids as a list of Python ints, accepting lists, tuples, numpy arrays and torch tensors.

    Each id may be any integer type (int, numpy or torch integers) but not a bool. A single id (an int,
    a numpy scalar, a 0-d array or tensor) is refused with a TypeError rather than guessed at: wrap it in
    a list, e.g. decode([token_id]) or decode(tensor.reshape(-1)).
    """
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{where}: expected a list of token ids, got {type(ids).__name__}")
    if isinstance(ids, numbers.Number) or getattr(ids, "ndim", None) == 0:
        raise TypeError(f"{where}: expected a sequence of token ids, got the single id {ids!r} "
                        f"({type(ids).__name__}); wrap it in a list, e.g. decode([token_id])")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not hasattr(ids, "__iter__"):
        raise TypeError(f"{where}: expected a sequence of token ids (a list, array or 1-D tensor), "
                        f"got {type(ids).__name__}")
    checked = []
    for token_id in ids:
        index = _as_index(token_id)
        if index is None:
            raise TypeError(f"{where}: token ids must be ints, got {token_id!r} ({type(token_id).__name__})"
                            + ("; pass a flat (1-D) sequence of ids" if isinstance(token_id, list) else ""))
        token_id = index
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{where}: token id {token_id} is out of range for vocab_size {vocab_size} "
                             f"(valid ids are 0..{vocab_size - 1}); were these ids made by another tokenizer?")
        checked.append(token_id)
    return checked


def _bytes_to_text(data: bytes) -> str:
    # Arbitrary id lists can form invalid or cut-off UTF-8: each bad sequence becomes U+FFFD, so the result
    # is always printable (surrogatepass would return lone surrogates that print() cannot write).
    return data.decode("utf-8", errors="replace")


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of `pair` in `ids` (left to right) with `new_id`."""
    first, second = pair
    merged = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == first and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def train_bpe_by_recount(text: str, n_merges: int, merge=None) -> list[tuple[int, int]]:
    """The textbook BPE trainer: before every merge, recount every pair of every distinct chunk.

    It picks the same merges as `BPETokenizer.train` (most frequent pair, ties to the smallest pair,
    never across chunk boundaries), only slower: chapter 01 checks a student's merge step with it
    (`merge(ids, pair, new_id) -> ids`), and `python -m minillm.bench bpe` times it against the
    incremental trainer.
    """
    merge = merge or _merge
    chunk_counts = Counter(pretokenize(text))
    try:
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    except UnicodeEncodeError:
        raise _lone_surrogate_error(text, "train_bpe_by_recount") from None
    freqs = list(chunk_counts.values())
    merges: list[tuple[int, int]] = []
    for new_id in range(256, 256 + n_merges):
        pair_counts: Counter = Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freq
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        words = [list(merge(list(word), best, new_id)) for word in words]
    return merges


def _read_json(path, expected_type: str | None) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist; save one with tokenizer.save(path)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # deep nesting: not ours
        raise ValueError(f"tokenizer file {str(path)!r} is not valid JSON ({err}); expected a file written by "
                         "CharTokenizer.save or BPETokenizer.save, retrain and save it again") from err
    if not isinstance(state, dict) or not isinstance(state.get("type"), str):
        raise ValueError(f"tokenizer file {str(path)!r} has no 'type' field naming its class; expected a JSON "
                         "object written by CharTokenizer.save or BPETokenizer.save")
    if expected_type is not None and state["type"] != expected_type:
        raise ValueError(f"tokenizer file {str(path)!r} holds a {state['type']!r}, expected {expected_type!r}; "
                         "open it with minillm.tokenizers.load_tokenizer(path), which picks the right class")
    if isinstance(state.get("version"), bool) or state.get("version") != _FORMAT_VERSION:
        raise ValueError(f"tokenizer file {str(path)!r} has format version {state.get('version')!r}, this minillm "
                         f"reads version {_FORMAT_VERSION}; retrain and save it again")
    return state


# A saved chunk pattern must cut this text into pieces that re-join to it: letters, digits, spaces,
# punctuation, newlines, tabs and non-ASCII. A pattern that skips characters would make encode drop text.
_PATTERN_SAMPLE = ("Hello, World! It's 2024: x_1 = 3.14 * (y + 42); don't\n\n  stop.\t"
                   "Caf\u00e9 na\u00efve Stra\u00dfe \u6771\u4eac \u041c\u043e\u0441\u043a\u0432\u0430 "
                   "\U0001f642\r\n  end  ")


def _checked_chunk_regex(pattern: str, invalid):
    """Compile a chunk pattern read from a file; `invalid(reason)` builds the error to raise."""
    try:
        compiled = _compile_chunk_pattern(pattern)
    except (re.error, regex.error) as error:
        raise invalid(f"its 'pattern' {pattern!r} is not a regular expression ({error})") from error
    chunks = compiled.findall(_PATTERN_SAMPLE)
    if not all(isinstance(chunk, str) for chunk in chunks) or "".join(chunks) != _PATTERN_SAMPLE:
        raise invalid(f"its 'pattern' {pattern!r} does not cut text into chunks that re-join to the text "
                      "(it would skip characters when encoding)")
    return compiled


def _field(state: dict, name: str, kind: type, path) -> object:
    if name not in state or not isinstance(state[name], kind):
        raise ValueError(f"tokenizer file {str(path)!r}: field {name!r} is missing or not a {kind.__name__}; "
                         "the file is corrupted, retrain and save it again")
    return state[name]


class CharTokenizer:
    """One id per character seen in training, most frequent first; unseen characters fall back to bytes.

    Ids 0..n_chars-1 are the characters sorted by (descending frequency, codepoint). With `byte_fallback`
    the 256 ids after them stand for UTF-8 bytes, so a character never seen in training still encodes
    (as 1-4 byte ids) and every string round-trips.
    """

    def __init__(self, byte_fallback: bool = True):
        # bool("no") is True: only a bool (numpy's too) or 0/1 is taken, anything else is refused
        if type(byte_fallback).__name__ not in ("bool", "bool_") and not (
                isinstance(byte_fallback, numbers.Integral) and byte_fallback in (0, 1)):
            raise TypeError(f"CharTokenizer: byte_fallback={byte_fallback!r} must be True or False")
        self.byte_fallback = bool(byte_fallback)
        self.chars: list[str] = []
        self._stoi: dict[str, int] = {}

    def train(self, text: str, vocab_size: int | None = None) -> "CharTokenizer":
        """Learn the characters of `text`; `vocab_size` keeps only that many most frequent characters.

        `vocab_size` counts characters only: with byte_fallback the 256 byte ids come on top of it.
        """
        _check_text(text, "CharTokenizer.train")
        if vocab_size is not None:
            index = _as_index(vocab_size)
            if index is None or index < 1:
                raise ValueError(f"CharTokenizer.train: vocab_size={vocab_size!r} must be a positive int "
                                 "(the number of characters to keep) or None to keep every character")
            vocab_size = index
        counts = Counter(text)
        if any("\ud800" <= c <= "\udfff" for c in counts):
            raise _lone_surrogate_error(text, "CharTokenizer.train")
        chars = sorted(counts, key=lambda c: (-counts[c], ord(c)))
        if vocab_size is not None:
            chars = chars[:vocab_size]
        self._set_chars(chars)
        return self

    def _set_chars(self, chars: list[str]) -> None:
        self.chars = list(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (256 if self.byte_fallback else 0)

    def encode(self, text: str) -> list[int]:
        _check_text(text, "CharTokenizer.encode")
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass  # some character is unseen: take the slower path that handles it
        byte_offset = len(self.chars)
        ids: list[int] = []
        for c in text:
            token_id = stoi.get(c)
            if token_id is not None:
                ids.append(token_id)
            elif "\ud800" <= c <= "\udfff":  # never in the vocabulary: train and load refuse it
                raise _lone_surrogate_error(text, "CharTokenizer.encode")
            elif self.byte_fallback:
                ids.extend(byte_offset + b for b in c.encode("utf-8"))
            else:
                raise ValueError(
                    f"CharTokenizer.encode: character {c!r} (U+{ord(c):04X}) is not in the vocabulary; "
                    "train on text that contains it, or create CharTokenizer(byte_fallback=True) so unseen "
                    "characters are encoded as their UTF-8 bytes")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; fallback bytes that do not form valid UTF-8 become U+FFFD, never an error."""
        ids = _check_ids(ids, self.vocab_size, "CharTokenizer.decode")
        n_chars = len(self.chars)
        pieces: list[str] = []
        pending = bytearray()  # consecutive fallback bytes form one UTF-8 sequence
        for token_id in ids:
            if token_id < n_chars:
                if pending:
                    pieces.append(_bytes_to_text(bytes(pending)))
                    pending.clear()
                pieces.append(self.chars[token_id])
            else:
                pending.append(token_id - n_chars)
        if pending:
            pieces.append(_bytes_to_text(bytes(pending)))
        return "".join(pieces)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact UTF-8 bytes of `ids`, nothing replaced: decode(ids) is these bytes decoded with
        errors="replace". Join the bytes of tokens streamed one at a time, then decode them."""
        ids = _check_ids(ids, self.vocab_size, "CharTokenizer.decode_bytes")
        chars, n_chars = self.chars, len(self.chars)
        return b"".join(chars[i].encode("utf-8") if i < n_chars else bytes([i - n_chars]) for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a character's UTF-8, or a single fallback byte)."""
        (token_id,) = _check_ids([token_id], self.vocab_size, "CharTokenizer.token_bytes")
        if token_id < len(self.chars):
            return self.chars[token_id].encode("utf-8")
        return bytes([token_id - len(self.chars)])

    def save(self, path: str | os.PathLike) -> None:
        state = {"type": "CharTokenizer", "version": _FORMAT_VERSION,
                 "byte_fallback": self.byte_fallback, "chars": self.chars}
        # ensure_ascii: the file is plain ASCII, every non-ASCII character stored as a \uXXXX escape
        atomic_write_text(path, json.dumps(state, ensure_ascii=True), where="CharTokenizer.save")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        state = _read_json(path, "CharTokenizer")
        chars = _field(state, "chars", list, path)
        byte_fallback = _field(state, "byte_fallback", bool, path)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError(f"tokenizer file {str(path)!r}: 'chars' must be distinct single characters; "
                             "the file is corrupted, retrain and save it again")
        surrogates = [c for c in chars if "\ud800" <= c <= "\udfff"]
        if surrogates:
            raise ValueError(f"tokenizer file {str(path)!r}: 'chars' holds the lone surrogate {surrogates[0]!r}, "
                             "which is not a character (an older minillm accepted it); retrain on text without "
                             "lone surrogates and save it again")
        tokenizer = cls(byte_fallback=byte_fallback)
        tokenizer._set_chars(chars)
        return tokenizer

    def __repr__(self) -> str:
        return (f"CharTokenizer(chars={len(self.chars)}, byte_fallback={self.byte_fallback}, "
                f"vocab_size={self.vocab_size})")


class BPETokenizer:
    """Byte-level byte-pair encoding, GPT-2 style.

    Ids 0..255 are bytes, ids 256.. are merges in the order they were learnt, and special tokens (e.g.
    "<|endoftext|>") take the ids after the merges. Special tokens are matched whole in `encode`, longest
    first, and never take part in merges.
    """

    def __init__(self, special_tokens: list[str] | tuple | None = ()):
        if special_tokens is None:   # as in other libraries: no special tokens
            special_tokens = ()
        if isinstance(special_tokens, str):
            raise TypeError("BPETokenizer: special_tokens must be a list of strings, e.g. ['<|endoftext|>'], "
                            f"not the single string {special_tokens!r}")
        if isinstance(special_tokens, (set, frozenset)):
            # a set's order changes from one Python process to the next, and so would the special tokens' ids
            raise TypeError(f"BPETokenizer: special_tokens must be an ordered list (their ids follow its order), "
                            f"not a {type(special_tokens).__name__}; e.g. sorted({special_tokens!r})")
        if not hasattr(special_tokens, "__iter__"):
            raise TypeError(f"BPETokenizer: special_tokens must be a list of strings, e.g. ['<|endoftext|>'], "
                            f"got {type(special_tokens).__name__}")
        special_tokens = list(special_tokens)
        for token in special_tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"BPETokenizer: special token {token!r} must be a non-empty str")
            if _SURROGATE_REGEX.search(token):
                raise _lone_surrogate_error(token, f"BPETokenizer: special token {token!r}")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"BPETokenizer: special_tokens {special_tokens} contain duplicates; list each once")
        self.special_tokens: list[str] = special_tokens
        self.pattern: str = CHUNK_PATTERN
        self._chunk_regex = _CHUNK_REGEX
        # longest first, so "<|end|>x" never wins over "<|end|>xy" when both are special
        by_length = sorted(special_tokens, key=lambda t: (-len(t), t))
        self._special_regex = (re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")")
                               if special_tokens else None)
        self._set_merges([])

    # --- state -------------------------------------------------------------------------------------
    def _set_merges(self, merges: list[tuple[int, int]]) -> None:
        self.merges: list[tuple[int, int]] = [tuple(pair) for pair in merges]
        # a merge's rank is its new id: lower id = learnt earlier = applied first
        self._merge_ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self._vocab_bytes = [bytes([b]) for b in range(256)]
        for first, second in self.merges:
            self._vocab_bytes.append(self._vocab_bytes[first] + self._vocab_bytes[second])
        first_special = 256 + len(self.merges)
        self._special_ids = {t: first_special + i for i, t in enumerate(self.special_tokens)}
        for token in self.special_tokens:
            self._vocab_bytes.append(token.encode("utf-8"))
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges) + len(self.special_tokens)

    def special_token_id(self, token: str) -> int:
        if token not in self._special_ids:
            raise KeyError(f"BPETokenizer: {token!r} is not a special token of this tokenizer "
                           f"(it has {self.special_tokens}); pass it in BPETokenizer(special_tokens=[...])")
        return self._special_ids[token]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for; special tokens give their UTF-8 text."""
        (token_id,) = _check_ids([token_id], self.vocab_size, "BPETokenizer.token_bytes")
        return self._vocab_bytes[token_id]

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """(piece, is_special) in order; ordinary pieces may be empty."""
        if self._special_regex is None:
            return [(text, False)]
        parts = self._special_regex.split(text)
        # re.split with one capturing group alternates ordinary text and matched specials
        return [(part, i % 2 == 1) for i, part in enumerate(parts)]

    # --- training ----------------------------------------------------------------------------------
    def train(self, text: str, vocab_size: int, verbose: bool = False) -> "BPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text` (replacing earlier ones)."""
        _check_text(text, "BPETokenizer.train")
        n_special = len(self.special_tokens)
        smallest = 256 + n_special
        if _as_index(vocab_size) is None:
            raise TypeError(f"BPETokenizer.train: vocab_size must be an int, got {vocab_size!r}")
        vocab_size = _as_index(vocab_size)
        if vocab_size < smallest:
            extra = f" plus {n_special} for special tokens" if n_special else ""
            raise ValueError(f"BPETokenizer.train: vocab_size={vocab_size} is too small; byte-level BPE needs "
                             f"256 ids for the raw bytes{extra}, so pass vocab_size >= {smallest} "
                             f"(e.g. {smallest + 256} for 256 merges)")
        n_merges = vocab_size - smallest

        # Each distinct chunk is stored once with its frequency: " the" appears thousands of times but
        # is merged (and counted) once, weighted by how often it occurs.
        chunk_counts: Counter[str] = Counter()
        for piece, is_special in self._split_special(text):
            if not is_special:
                chunk_counts.update(self._chunk_regex.findall(piece))
        try:
            words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        except UnicodeEncodeError:
            raise _lone_surrogate_error(text, "BPETokenizer.train") from None
        freqs = list(chunk_counts.values())

        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        chunks_with_pair: dict[tuple[int, int], set[int]] = defaultdict(set)
        for index, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freqs[index]
                chunks_with_pair[pair].add(index)

        # Max-heap via negated counts; ties pop the smallest pair, which makes training deterministic.
        # Stale entries (a count that has since changed) are skipped when popped.
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        while len(merges) < n_merges:
            best = None
            while heap:
                negative_count, pair = heapq.heappop(heap)
                if pair_counts.get(pair, 0) == -negative_count:
                    best = pair
                    break
            if best is None:
                warnings.warn(f"BPETokenizer.train: the text has no pairs left to merge after {len(merges)} "
                              f"merges, so vocab_size is {smallest + len(merges)} instead of {vocab_size}; "
                              "train on more text for a larger vocabulary", stacklevel=2)
                break
            best_count = pair_counts[best]
            new_id = 256 + len(merges)
            merges.append(best)

            changed: set[tuple[int, int]] = set()
            for index in chunks_with_pair.pop(best):
                old_word = words[index]
                new_word = _merge(old_word, best, new_id)
                words[index] = new_word
                freq = freqs[index]
                old_pairs = Counter(zip(old_word, old_word[1:]))
                new_pairs = Counter(zip(new_word, new_word[1:]))
                for pair, n in old_pairs.items():
                    pair_counts[pair] -= n * freq
                for pair, n in new_pairs.items():
                    pair_counts[pair] += n * freq
                for pair in old_pairs.keys() - new_pairs.keys():
                    if pair != best:
                        chunks_with_pair[pair].discard(index)
                for pair in new_pairs.keys() - old_pairs.keys():
                    chunks_with_pair[pair].add(index)
                changed.update(old_pairs)
                changed.update(new_pairs)
            for pair in changed:
                count = pair_counts[pair]
                if count > 0:
                    heapq.heappush(heap, (-count, pair))
                else:
                    del pair_counts[pair]
                    chunks_with_pair.pop(pair, None)

            if verbose:
                shown = self._vocab_bytes_of(merges, best)
                print(f"merge {len(merges)}/{n_merges}: {best} -> {new_id} {shown!r} ({best_count} occurrences)")

        self._set_merges(merges)
        return self

    @staticmethod
    def _vocab_bytes_of(merges: list[tuple[int, int]], pair: tuple[int, int]) -> bytes:
        # only for verbose printing during training, before the vocabulary table is rebuilt
        def expand(token_id: int) -> bytes:
            if token_id < 256:
                return bytes([token_id])
            first, second = merges[token_id - 256]
            return expand(first) + expand(second)
        return expand(pair[0]) + expand(pair[1])

    # --- encoding ----------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        ids = list(chunk.encode("utf-8"))  # UnicodeEncodeError for a lone surrogate: encode explains it
        ranks = self._merge_ranks
        no_merge = len(ranks) + 256
        while len(ids) >= 2:
            # apply the earliest-learnt merge present; this reproduces training's order on this chunk
            best = min(zip(ids, ids[1:]), key=lambda pair: ranks.get(pair, no_merge))
            new_id = ranks.get(best)
            if new_id is None:
                break
            ids = _merge(ids, best, new_id)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        _check_text(text, "BPETokenizer.encode")
        cache = self._cache
        ids: list[int] = []
        for piece, is_special in self._split_special(text):
            if is_special:
                ids.append(self._special_ids[piece])
                continue
            for chunk in self._chunk_regex.findall(piece):
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    try:
                        chunk_ids = self._encode_chunk(chunk)
                    except UnicodeEncodeError:
                        raise _lone_surrogate_error(text, "BPETokenizer.encode") from None
                    if len(cache) >= _ENCODE_CACHE_LIMIT:
                        cache.clear()
                    cache[chunk] = chunk_ids
                ids.extend(chunk_ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. Bytes that do not form valid UTF-8 (e.g. one token of a multi-byte character)
        become U+FFFD, so the result always prints; decode_bytes gives the exact bytes."""
        ids = _check_ids(ids, self.vocab_size, "BPETokenizer.decode")
        vocab_bytes = self._vocab_bytes
        return _bytes_to_text(b"".join(vocab_bytes[token_id] for token_id in ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of `ids`, nothing replaced: decode(ids) is these bytes decoded with
        errors="replace". Join the bytes of tokens streamed one at a time, then decode them."""
        ids = _check_ids(ids, self.vocab_size, "BPETokenizer.decode_bytes")
        vocab_bytes = self._vocab_bytes
        return b"".join(vocab_bytes[token_id] for token_id in ids)

    # --- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        state = {"type": "BPETokenizer", "version": _FORMAT_VERSION, "pattern": self.pattern,
                 "special_tokens": self.special_tokens, "merges": [list(pair) for pair in self.merges]}
        atomic_write_text(path, json.dumps(state, ensure_ascii=True), where="BPETokenizer.save")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        state = _read_json(path, "BPETokenizer")
        merges = _field(state, "merges", list, path)
        special_tokens = _field(state, "special_tokens", list, path)
        pattern = _field(state, "pattern", str, path)

        def invalid(reason: str) -> ValueError:
            return ValueError(f"tokenizer file {str(path)!r} is not a valid BPETokenizer: {reason}; "
                              "the file is corrupted, retrain and save it again")

        seen: set[tuple[int, int]] = set()
        for i, pair in enumerate(merges):
            # merge i may only use bytes and earlier merges
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 256 + i for t in pair)):
                raise invalid(f"merge {i} is {pair!r}, expected a pair of integer ids below {256 + i}")
            if tuple(pair) in seen:
                raise invalid(f"merge {i} {pair!r} repeats an earlier merge (each pair is merged once)")
            seen.add(tuple(pair))
        chunk_regex = _checked_chunk_regex(pattern, invalid)
        try:
            tokenizer = cls(special_tokens=special_tokens)
        except (TypeError, ValueError) as error:
            raise invalid(f"its 'special_tokens' are wrong ({error})") from error
        # the chunking rule is part of the tokenizer: keep the one it was trained with
        tokenizer.pattern = pattern
        tokenizer._chunk_regex = chunk_regex
        tokenizer._set_merges([tuple(pair) for pair in merges])
        return tokenizer

    def __repr__(self) -> str:
        return (f"BPETokenizer(merges={len(self.merges)}, special_tokens={self.special_tokens}, "
                f"vocab_size={self.vocab_size})")


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | BPETokenizer:
    """Open a tokenizer saved by either class, choosing the class from the file's "type" field."""
    state = _read_json(path, None)
    classes = {"CharTokenizer": CharTokenizer, "BPETokenizer": BPETokenizer}
    if state["type"] not in classes:
        raise ValueError(f"tokenizer file {str(path)!r} has type {state['type']!r}; expected one of "
                         f"{sorted(classes)}")
    return classes[state["type"]].load(path)
