"""Text to train on, and batches of it.

Taught in chapter 01. `load_corpus("pydocs")` is real English text that ships with every Python install
(the standard library's bundled documentation), so every chapter works offline. Larger public corpora
(TinyShakespeare, TinyStories) are downloaded on request through `minillm/datasets/manifest.json`, which pins
each file's URL, size and sha256: a download is verified before it is used, and a verified file in the
cache (`MINILLM_DATA`, default `~/.cache/minillm/data`) is never fetched again.

    text = load_corpus("pydocs")                  # offline, deterministic
    train_text, val_text = split(text, 0.1)       # contiguous, validation at the end
    ids = tokenize_corpus(train_text, tokenizer)  # 1-D int64 tensor
    x, y = get_batch(ids, block_size=64, batch_size=8)
"""
from __future__ import annotations

import functools
import glob
import hashlib
import http.client
import json
import numbers
import operator
import os
import socket
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .paths import atomic_write_text, clear_stale_files, data_dir, datasets_dir

PYDOCS = "pydocs"
MANIFEST_FIELDS = ("url", "filename", "size", "sha256", "licence", "source", "description")
_CHUNK_BYTES = 1 << 20
# A download's .part file untouched this long is a leftover of a killed process (a live one writes every chunk).
_STALE_PART_S = 600


class CorpusUnavailableError(RuntimeError):
    """The corpus cannot be had right now: offline, host unreachable, or not in the cache."""


class ChecksumError(ValueError):
    """A file's bytes are not the ones the manifest pins (corrupt, truncated or changed upstream)."""


# ---------------------------------------------------------------------------------------------- corpora

@functools.lru_cache(maxsize=1)
def pydocs_text() -> str:
    """Python's bundled documentation topics, concatenated in sorted-key order (so always the same)."""
    try:
        from pydoc_data import topics
    except ImportError as error:
        raise CorpusUnavailableError(
            "pydocs: this Python has no `pydoc_data` module (some Linux distributions ship the standard "
            "library without it). Use a python.org, conda or uv Python, install your distribution's full "
            "standard-library package, or pass load_corpus() the path of a UTF-8 text file instead."
        ) from error
    return "".join(topics.topics[key] for key in sorted(topics.topics))


def _manifest_path(manifest: str | os.PathLike | None) -> Path:
    return Path(manifest) if manifest is not None else datasets_dir() / "manifest.json"


def read_manifest(manifest: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The downloadable corpora, `{name: entry}`, checked for the fields the loader needs.

    The default manifest ships inside the package; should it be missing (a broken install) there are no
    downloadable corpora, only "pydocs" and local files. A manifest named explicitly must exist.
    """
    path = _manifest_path(manifest)
    if not path.exists():
        if manifest is None:
            return {}
        raise FileNotFoundError(f"manifest {path} does not exist; pass the path of a manifest.json "
                                "or leave manifest=None to use the one shipped in minillm/datasets/manifest.json")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"manifest {path} is not valid UTF-8 JSON ({error}); fix or restore the file") from error
    corpora = document.get("corpora") if isinstance(document, dict) else None
    if not isinstance(corpora, dict):
        raise ValueError(f'manifest {path} must be a JSON object {{"corpora": {{name: entry}}}}')
    for name, entry in corpora.items():
        if not isinstance(entry, dict):
            raise ValueError(f"manifest {path}: corpus {name!r} must be a JSON object with the fields "
                             f"{list(MANIFEST_FIELDS)}, got {type(entry).__name__}")
        missing = [field for field in MANIFEST_FIELDS if field not in entry]
        if missing:
            raise ValueError(f"manifest {path}: corpus {name!r} lacks {missing}; every entry needs "
                             f"{list(MANIFEST_FIELDS)} (sha256 may be null)")
        filename = entry["filename"]
        # The filename becomes a path in the cache; a separator would let an entry write elsewhere.
        if not isinstance(filename, str) or not filename or Path(filename).name != filename or filename in (".", ".."):
            raise ValueError(f"manifest {path}: corpus {name!r} has filename {filename!r}; "
                             "it must be a plain file name without folders")
        if name == PYDOCS:
            raise ValueError(f"manifest {path}: {PYDOCS!r} is built in; give the corpus another name")
        size, sha256 = entry["size"], entry["sha256"]
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"manifest {path}: corpus {name!r} has size {size!r}; it must be the file's "
                             "length in bytes (an integer >= 0) or null")
        if sha256 is not None and (not isinstance(sha256, str) or len(sha256) != 64
                                   or any(c not in "0123456789abcdefABCDEF" for c in sha256)):
            raise ValueError(f"manifest {path}: corpus {name!r} has sha256 {sha256!r}; it must be the file's "
                             "SHA-256 digest as 64 hexadecimal characters, or null")
        if not isinstance(entry["url"], str) or not entry["url"]:
            raise ValueError(f"manifest {path}: corpus {name!r} has url {entry['url']!r}; it must be a "
                             "non-empty string")
    return corpora


def list_corpora(manifest: str | os.PathLike | None = None) -> list[str]:
    """Names `load_corpus` accepts: "pydocs" first, then the manifest's corpora."""
    return [PYDOCS, *sorted(read_manifest(manifest))]


def load_corpus(name: str | os.PathLike = PYDOCS, *, manifest: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, download: bool = True) -> str:
    """The text of a corpus: "pydocs", a manifest name, or the path of a local UTF-8 text file.

    Manifest corpora are read from `cache_dir` (default: `minillm.paths.data_dir()`, which honours
    MINILLM_DATA) and downloaded there first when missing and `download` is true.
    """
    if name == PYDOCS:
        return pydocs_text()
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"load_corpus: name must be a corpus name such as {PYDOCS!r} or the path of a UTF-8 text "
                        f"file, got {type(name).__name__} ({name!r:.80})")
    corpora = read_manifest(manifest)
    if isinstance(name, str) and name in corpora:
        return _load_manifest_corpus(name, corpora[name], cache_dir, download)
    local = Path(name)
    if local.is_file():
        try:
            return _read_utf8(local)
        except UnicodeDecodeError as error:
            raise ValueError(f"{local} is not UTF-8 text ({error}); convert it to UTF-8 first") from error
    available = ", ".join(repr(n) for n in list_corpora(manifest))
    raise ValueError(f"unknown corpus {str(name)!r}: it is neither a corpus name nor an existing file. "
                     f"Available: {available}; or pass the path of a UTF-8 text file.")


def _load_manifest_corpus(name: str, entry: dict[str, Any], cache_dir: str | os.PathLike | None,
                          download: bool) -> str:
    folder = Path(cache_dir) if cache_dir is not None else data_dir()
    path = folder / entry["filename"]
    expected = entry["sha256"]

    # MINILLM_DATA is only read when no cache_dir is given: name the knob that applies to this call.
    elsewhere = (f"set the environment variable MINILLM_DATA to a folder that holds {entry['filename']}"
                 if cache_dir is None else f"pass cache_dir= a folder that holds {entry['filename']}")

    def unavailable(reason: str) -> CorpusUnavailableError:
        return CorpusUnavailableError(
            f"corpus {name!r} is not available: {reason}. To use it offline, download {entry['url']} "
            f"by hand and save it as {path} (or {elsewhere}).")

    if path.exists():
        _verify_cached(path, expected, entry.get("size"))
    elif not download:
        raise unavailable("it is not in the cache and download=False")
    else:
        try:
            download_file(entry["url"], path, expected, size=entry.get("size"), desc=name)
        except CorpusUnavailableError as error:
            raise unavailable(str(error)) from error
    try:
        return _read_utf8(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus {name!r} ({path}) is not UTF-8 text ({error}); its manifest entry must "
                         "point to a UTF-8 text file") from error


def _read_utf8(path: Path) -> str:
    # Decoding the bytes keeps "\r\n" as it is; read_text would turn it into "\n" (universal newlines), and
    # then the text no longer matches the file's bytes and size.
    return path.read_bytes().decode("utf-8")


def _verify_cached(path: Path, expected: str | None, size: int | None) -> None:
    """Check a cached file before trusting it; a file without a pinned sha256 is checked against the
    digest recorded when it was downloaded, which at least catches later corruption."""
    record = _digest_record(path)
    if expected is None and record.exists():
        # an empty record (e.g. from an interrupted write by an older version) records nothing
        expected = (record.read_text(encoding="utf-8").split() or [None])[0]
    found_size = path.stat().st_size
    if expected is None and (size is None or found_size == size):
        return
    actual = sha256_of_file(path)
    if (expected is not None and actual != expected.lower()) or (size is not None and found_size != size):
        raise ChecksumError(f"{path}: expected sha256 {expected}"
                            f"{'' if size is None else f' ({size} bytes)'}, got {actual} ({found_size} "
                            "bytes). The cached file is corrupt or a different version; delete it and "
                            "load again to download a fresh copy.")


def _digest_record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# --------------------------------------------------------------------------------------------- download

def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Everything a dead network, a refused connection, a timeout or a bad DNS name can raise mid-transfer.
_NETWORK_ERRORS = (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                   http.client.HTTPException)


def download_file(url: str, dest: str | os.PathLike, sha256: str | None, size: int | None = None,
                  desc: str | None = None, timeout: float = 30.0) -> Path:
    """Stream `url` into `dest`, verified, with a progress bar; returns `dest`.

    Bytes go to a temporary file in `dest`'s folder that replaces `dest` (atomically) only once its
    sha256 matches, so a crash, a network error or a wrong file never leaves anything at `dest` or any
    temporary file behind. With `sha256=None` the file cannot be verified: a warning says so, and the
    computed digest is recorded in `<dest>.sha256` so later loads detect corruption.

    Raises CorpusUnavailableError on network failure, ChecksumError when the bytes are wrong.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_parts(dest)
    handle, temp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    temp = Path(temp_name)
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    total = size if size is not None else _content_length(response)
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=desc or dest.name) as progress:
                        for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            progress.update(len(chunk))
                    # http.client ends the read quietly when the connection drops early; without a pinned
                    # size or sha256 the truncated file would be kept (and its digest recorded as the truth).
                    promised = _content_length(response)
                    if promised is not None and received != promised and not response.headers.get(
                            "Content-Encoding"):
                        raise CorpusUnavailableError(f"could not download {url} (the connection ended after "
                                                     f"{received} of {promised} bytes); try again")
            except _NETWORK_ERRORS as error:
                raise CorpusUnavailableError(f"could not download {url} ({_describe(error)})") from error
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumError(f"{dest.name}: expected sha256 {sha256}, got {actual} ({received} bytes"
                                f"{'' if size is None else f', expected {size}'}) from {url}; the file "
                                "was discarded. The server sent different bytes: check the URL or the "
                                "manifest entry.")
        if size is not None and received != size:
            raise ChecksumError(f"{dest.name}: expected {size} bytes, got {received} (sha256 {actual}) "
                                f"from {url}; the file was discarded")
        record = _digest_record(dest)
        if sha256 is None:   # before the file: a process killed between the two never leaves it unrecorded
            atomic_write_text(record, f"{actual}  {dest.name}\n")
        os.replace(temp, dest)
    finally:
        if temp.exists():
            temp.unlink()
    if sha256 is None:
        warnings.warn(f"{dest} could not be verified: its manifest entry has no sha256. Its digest "
                      f"{actual} is recorded in {record}; add it to the manifest once you trust the file.",
                      UserWarning, stacklevel=2)
    return dest


def _clear_stale_parts(dest: Path) -> None:
    """The .part files that downloads of `dest` killed midway (SIGKILL, a crash, a closed laptop) left in its
    folder, each up to the corpus's size; a running download (another notebook's) writes its own every chunk."""
    clear_stale_files(dest.parent, f".{glob.escape(dest.name)}.*.part", _STALE_PART_S)


def _content_length(response) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return f"{type(error).__name__}: {reason if reason is not None else error}"


# ----------------------------------------------------------------------------------- splits and tokens

def split(data, val_fraction: float = 0.1) -> tuple:
    """(train, val): the first part for training, the last `val_fraction` for validation.

    Contiguous rather than shuffled so that validation text is text the model has never seen a window
    of. Works on anything sliceable with a length: str, list, 1-D tensor or array.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"split: val_fraction={val_fraction!r} must be between 0 and 1 (exclusive), "
                         "e.g. 0.1 for 10% validation")
    if isinstance(data, (dict, set, frozenset)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"split: data must be a str, list, 1-D tensor or array (sliceable, with a length), got "
                        f"{type(data).__name__}")
    if getattr(data, "ndim", 1) != 1:  # tensors and numpy arrays
        raise ValueError(f"split: expected a 1-D tensor of token ids, got shape {tuple(data.shape)}")
    length = len(data)
    val_length = round(length * val_fraction)
    if val_length == 0 or val_length == length:
        raise ValueError(f"split: {length} items are too few to keep a {val_fraction:.0%} validation part "
                         "and a training part; use more data or another val_fraction")
    cut = length - val_length
    return data[:cut], data[cut:]


def tokenize_corpus(text: str, tokenizer) -> torch.Tensor:
    """Token ids of `text` as a 1-D int64 tensor; `tokenizer` has `.encode(str)` or is a callable.

    `.encode` may return a list, array or tensor of ids, or a Hugging Face `tokenizers.Encoding` (its `.ids`)."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize_corpus: text must be a str, got {type(text).__name__}")
    encode = getattr(tokenizer, "encode", None) or (tokenizer if callable(tokenizer) else None)
    if encode is None:
        raise TypeError(f"tokenize_corpus: {type(tokenizer).__name__} has no .encode(text) method; "
                        "pass a minillm tokenizer or a function from str to a list of ids")
    ids = encode(text)
    if isinstance(getattr(ids, "ids", None), list):   # a Hugging Face `tokenizers.Encoding`: its ids
        ids = ids.ids
    if isinstance(ids, (str, bytes)) or not (isinstance(ids, torch.Tensor) or hasattr(ids, "__iter__")):
        raise TypeError(f"tokenize_corpus: the tokenizer returned {type(ids).__name__}, expected a list of "
                        "integer token ids")
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().to("cpu")
    else:
        try:
            array = np.asarray(ids if hasattr(ids, "__len__") else list(ids))
        except ValueError as error:   # ragged nesting: [[1, 2], [3]]
            raise ValueError(f"tokenize_corpus: the tokenizer returned nested lists of different lengths "
                             f"({error}); expected a flat sequence of ids") from error
        if array.dtype.kind not in "iubf" and array.size:
            raise ValueError(f"tokenize_corpus: the tokenizer returned ids that are not all integers of at most "
                             f"64 bits (numpy makes them {array.dtype})")
        if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"tokenize_corpus: the tokenizer returned the id {int(array.max())}, beyond int64; "
                             "token ids must be below 2**63")
        ids = torch.as_tensor(array.astype(np.int64) if array.dtype.kind == "u" else array)
    if ids.dim() != 1:
        raise ValueError(f"tokenize_corpus: the tokenizer returned shape {tuple(ids.shape)}, expected a "
                         "flat sequence of ids")
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise ValueError(f"tokenize_corpus: the tokenizer returned {ids.dtype} values, expected integer ids")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"tokenize_corpus: the tokenizer returned the negative id {int(ids.min())}; token ids "
                         "are >= 0")
    return ids.to(torch.long)


# ------------------------------------------------------------------------------------------------ batches

def _check_int(value, name: str, where: str, minimum: int) -> int:
    """An integer argument as a Python int (numpy and 0-d torch integers too, bools no), at least `minimum`."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        raise TypeError(f"{where}: {name}={value!r} must be an int >= {minimum}, not a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name}={value!r} must be an int >= {minimum}, got {type(value).__name__}; "
                        f"e.g. int({name})") from None
    if value < minimum:
        raise ValueError(f"{where}: {name}={value} must be >= {minimum}")
    return value


def get_batch(tokens: torch.Tensor, block_size: int, batch_size: int,
              generator: torch.Generator | None = None, device: str | torch.device = "cpu"):
    """`batch_size` random windows of `block_size` tokens: inputs x and next-token targets y.

    `tokens` is a 1-D tensor of token ids; a list or numpy array of integer ids is converted to one.
    The windows depend only on `generator`'s state, so a seeded generator gives the same batch again
    (this is what makes resumed training identical to uninterrupted training).
    """
    tokens, block_size, batch_size, device = _check_batch_arguments(tokens, block_size, batch_size, device,
                                                                    "get_batch")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"get_batch: generator must be a torch.Generator or None, got {type(generator).__name__}; "
                        "e.g. torch.Generator().manual_seed(0)")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = tokens[starts[:, None] + offsets[None, :]].long()
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type != "cpu":
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()


def _check_batch_arguments(tokens, block_size, batch_size, device, where: str):
    """(tokens as a 1-D integer tensor, block_size, batch_size, torch.device), checked for get_batch and
    BatchSampler alike; errors start with `where`, the function the caller called."""
    if not isinstance(tokens, torch.Tensor):
        tokens = _ids_from_array_like(tokens, where)
    if tokens.dim() != 1:
        raise ValueError(f"{where}: tokens must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{where}: tokens must be integer token ids, got a {tokens.dtype} tensor; "
                        "encode the text with a tokenizer (see tokenize_corpus)")
    if tokens.dtype == torch.uint64 and tokens.numel() and bool((tokens.long() < 0).any()):
        # .long() (in get_batch) would wrap an id beyond int64 round to a negative number without a word
        raise ValueError(f"{where}: tokens hold an id beyond int64 (and any vocabulary); token ids must be below "
                         "2**63, encode the text with the model's tokenizer")
    block_size = _check_int(block_size, "block_size", where, 1)
    batch_size = _check_int(batch_size, "batch_size", where, 1)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{where}: device={device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'"
                         ) from error
    if len(tokens) < block_size + 1:
        raise ValueError(f"{where}: need at least block_size+1={block_size + 1} tokens, got {len(tokens)}; "
                         "use a smaller block_size or more text")
    return tokens, block_size, batch_size, device


def _ids_from_array_like(tokens, where: str = "get_batch") -> torch.Tensor:
    """A list, tuple or numpy array of integer token ids as a 1-D-or-more int64 tensor (shape checked later)."""
    try:
        array = np.asarray(tokens)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{where}: tokens must be a 1-D tensor, list or array of integer token ids, got "
                        f"{type(tokens).__name__} ({error})") from error
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise TypeError(f"{where}: tokens must be integer token ids, got {type(tokens).__name__} of dtype "
                        f"{array.dtype}; encode the text with a tokenizer (see tokenize_corpus)")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        # astype(int64) would wrap such an id round to a negative number without a word
        raise ValueError(f"{where}: tokens hold the id {int(array.max())}, beyond int64 (and any vocabulary); token "
                         "ids must be below 2**63, encode the text with the model's tokenizer")
    return torch.as_tensor(array.astype(np.int64, copy=False))


# Batch `step` of seed `seed` seeds its generator with seed * _STEP_STRIDE + step while that is unambiguous
# (step < _STEP_STRIDE, and the product fits in 63 bits), which keeps the batches of every earlier version;
# any other (seed, step) is hashed into [2**63, 2**64), a range the first rule never reaches.
_STEP_STRIDE = 1_000_003
_LINEAR_SEEDS = (2 ** 63) // _STEP_STRIDE


def _batch_seed(seed: int, step: int) -> int:
    """A torch seed for (seed, step); different pairs give different seeds (up to a 64-bit hash collision)."""
    if step < _STEP_STRIDE and seed < _LINEAR_SEEDS:
        return seed * _STEP_STRIDE + step
    digest = hashlib.blake2b(f"minillm.BatchSampler:{seed}:{step}".encode(), digest_size=8).digest()
    return 2 ** 63 + int.from_bytes(digest, "big") % 2 ** 63


class BatchSampler:
    """Seeded random windows where batch `step` is a pure function of (seed, step).

    `seed` and `step` are integers >= 0. Different (seed, step) pairs draw independently seeded batches.
    The tokens (a 1-D tensor, list or array of integer ids, at least block_size+1 of them), the sizes and the
    device are checked here, as get_batch checks them, so a mistake is reported where it was made rather
    than at the first batch(); a list or array is converted to a tensor once, here.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, batch_size: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        seed = _check_int(seed, "seed", "BatchSampler", 0)
        tokens, block_size, batch_size, _ = _check_batch_arguments(tokens, block_size, batch_size, device,
                                                                   "BatchSampler")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.device = seed, device

    def batch(self, step: int):
        # A fresh generator per step (not one advancing generator) makes step k reproducible on its
        # own, e.g. after resuming from a checkpoint.
        step = _check_int(step, "step", "BatchSampler.batch", 0)
        g = torch.Generator().manual_seed(_batch_seed(self.seed, step))
        return get_batch(self.tokens, self.block_size, self.batch_size, generator=g, device=self.device)
