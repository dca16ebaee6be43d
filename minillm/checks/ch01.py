"""Checks for chapter 01 (next-word prediction): bigram counts, NLL and perplexity, the BPE merge step,
bits per byte, and sampling with temperature."""
from __future__ import annotations

import math
import random

import torch

from .. import lm, sampling
from ..grading import as_number, expect_close, expect_equal, expect_unchanged, exercise, snapshot
from ..tokenizers import BPETokenizer, train_bpe_by_recount


def _small_ids(seed: int, length: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed))


def _counts_of(bigram_counts, ids, vocab_size: int, what: str) -> torch.Tensor:
    """The student's table for `ids`, checked to be a tensor and to leave `ids` as it was."""
    saved = snapshot(ids=ids)
    got = bigram_counts(ids, vocab_size)
    expect_unchanged(saved, what)
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"bigram_counts returned {type(got).__name__}; return a torch.Tensor of shape "
                             "(vocab_size, vocab_size)")
    return got


@exercise("ex01.1", "bigram counts", points=2)
def check_bigram_counts(bigram_counts) -> str:
    # [0, 1, 1, 2]: 0->1, 1->1, 1->2 once each; a transposed table has 1 at [1, 0] instead of [0, 1].
    ids = torch.tensor([0, 1, 1, 2])
    saved = snapshot(ids=ids)
    got = bigram_counts(ids, 3)
    expect_unchanged(saved, "bigram_counts([0, 1, 1, 2], 3)")
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"bigram_counts returned {type(got).__name__}; return a torch.Tensor of shape "
                             "(vocab_size, vocab_size). Hint: start from torch.zeros(vocab_size, vocab_size)")
    expected = lm.bigram_counts(torch.tensor([0, 1, 1, 2]), 3)
    if got.shape == expected.shape and torch.equal(got.double().T, expected.double()) \
            and not torch.equal(got.double(), expected.double()):
        raise AssertionError("bigram_counts([0, 1, 1, 2], 3) is transposed. Hint: the row is the previous "
                             "token and the column the next one: counts[previous, next] += 1")
    expect_close(got.double(), expected.double(), "bigram_counts([0, 1, 1, 2], 3)",
                 hint="count each (ids[t], ids[t+1]) pair once, for t = 0 .. len(ids)-2")
    for seed, length, vocab_size in [(1, 500, 7), (2, 2000, 30), (3, 2, 4)]:
        ids = _small_ids(seed, length, vocab_size)
        expected = lm.bigram_counts(ids, vocab_size).double()
        got = _counts_of(bigram_counts, ids, vocab_size, f"bigram_counts of {length} random ids")
        expect_close(got.double(), expected,
                     f"bigram_counts of {length} random ids, vocab_size={vocab_size}",
                     hint=f"the table must sum to len(ids) - 1 = {length - 1} pairs and be "
                          "(vocab_size, vocab_size) even when some tokens never occur")
    # One token 3000 times in a row: counts[0, 0] = 2999 overflows int8/uint8 and float16 cannot hold it exactly.
    ids = torch.cat([torch.zeros(3000, dtype=torch.long), torch.tensor([1, 0])])
    got = _counts_of(bigram_counts, ids, 2, "bigram_counts of a token repeated 3000 times")
    expect_close(got.double(), torch.tensor([[2999.0, 1.0], [1.0, 0.0]], dtype=torch.float64),
                 "bigram_counts of token 0 repeated 3000 times, then 1, 0",
                 hint="counts grow large (here counts[0, 0] = 2999): keep them in torch.long (the default of "
                      "torch.zeros(..., dtype=torch.long)); int8/uint8 wrap around and float16 is not exact past 2048")
    return "matches the reference on 5 sequences"


def _nll_pair(answer, what: str) -> tuple[float, float]:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        shown = repr(answer) if len(repr(answer)) <= 80 else repr(answer)[:77] + "..."
        raise AssertionError(f"nll_and_perplexity returned {shown}; return a pair (nll, perplexity). "
                             "Hint: end with `return nll, math.exp(nll)`")
    hint = ("average over the pairs: the NLL is one number, the mean of -ln P[ids[t], ids[t+1]], "
            "and the perplexity is exp of it")
    return as_number(answer[0], what, hint), as_number(answer[1], what.replace("NLL", "perplexity", 1), hint)


@exercise("ex01.2", "average NLL and perplexity", points=2)
def check_nll_and_perplexity(nll_and_perplexity) -> str:
    generator = torch.Generator().manual_seed(4)
    for vocab_size, length in [(5, 40), (12, 300)]:
        probabilities = torch.softmax(torch.randn(vocab_size, vocab_size, generator=generator, dtype=torch.float64), 1)
        ids = torch.randint(0, vocab_size, (length,), generator=generator)
        expected = lm.bigram_nll(probabilities, ids)  # before the student's function can touch the inputs
        saved = snapshot(probabilities=probabilities, ids=ids)
        answer = nll_and_perplexity(probabilities, ids)
        expect_unchanged(saved, f"nll_and_perplexity on {length} random ids")
        nll, ppl = _nll_pair(answer, f"NLL of {length} random ids (vocab {vocab_size})")
        hint = "the mean of -ln P[ids[t], ids[t+1]] over the len(ids)-1 pairs (natural log, row = previous token)"
        if math.isclose(nll, expected / math.log(2), rel_tol=1e-6):
            hint = "use the natural log (torch.log), not log2: losses are in nats"
        elif math.isclose(nll, expected * (length - 1), rel_tol=1e-6):
            hint = "take the mean over the pairs, not the sum"
        elif math.isclose(nll, -expected, rel_tol=1e-6):
            hint = "negative log-likelihood: put a minus sign in front of the mean log-probability"
        expect_close(nll, expected, f"NLL of {length} random ids (vocab {vocab_size})", rtol=1e-6, hint=hint)
        expect_close(ppl, lm.perplexity(expected), f"perplexity of {length} random ids", rtol=1e-6,
                     hint="perplexity is exp(NLL), with NLL in nats")
    uniform, ids = torch.full((8, 8), 1 / 8, dtype=torch.float64), torch.arange(8)
    saved = snapshot(probabilities=uniform, ids=ids)
    nll, ppl = _nll_pair(nll_and_perplexity(uniform, ids), "NLL of a uniform model over 8 tokens")
    expect_unchanged(saved, "nll_and_perplexity on a uniform model")
    expect_close(ppl, 8.0, "perplexity of a uniform model over 8 tokens", rtol=1e-6,
                 hint="a model that spreads its bet evenly over V tokens has perplexity V")
    return "matches the reference; a uniform model over 8 tokens has perplexity 8"


def _merges_with(merge_pair, text: str, n_merges: int) -> list[tuple[int, int]]:
    """BPE training as BPETokenizer.train does it, with the student's merge step doing the merging."""
    # int(...): ids handed back as a tuple, array or tensor count as the same ids (a 0-d tensor hashes by identity)
    return train_bpe_by_recount(text, n_merges,
                                merge=lambda ids, pair, new_id: [int(i) for i in merge_pair(ids, pair, new_id)])


@exercise("ex01.3", "BPE merge step", points=2)
def check_merge_pair(merge_pair) -> str:
    cases = [([1, 2, 3, 1, 2], (1, 2), 9, [9, 3, 9]),
             ([5, 5, 5], (5, 5), 7, [7, 5]),               # left to right, never overlapping
             ([5, 5, 5, 5], (5, 5), 7, [7, 7]),
             ([1, 2], (2, 1), 9, [1, 2]),                  # order matters: (2, 1) is not (1, 2)
             ([], (1, 2), 9, []),
             ([1], (1, 2), 9, [1]),
             ([11, 2, 1, 23, 1, 2], (1, 2), 9, [11, 2, 1, 23, 9])]   # ids, not digits: 11, 2 is not (1, 2)
    for ids, pair, new_id, expected in cases:
        original = list(ids)
        got = merge_pair(ids, pair, new_id)
        expect_equal(ids, original, f"the input list after merge_pair({original}, {pair}, {new_id})",
                     hint="build and return a new list; do not change the one you were given")
        try:
            got = list(got) if got is not None else got
        except TypeError:
            raise AssertionError(f"merge_pair({original}, {pair}, {new_id}) returned {type(got).__name__} {got!r}; "
                                 "return the new list of ids. Hint: end with `return merged`") from None
        hint = ("scan left to right; after a merge skip both ids, so (5, 5) in [5, 5, 5] merges once"
                if pair == (5, 5) else "replace each occurrence of pair[0] immediately followed by pair[1]")
        if 11 in ids:
            hint = ("compare whole ids, not the digits of their text: 11 followed by 2 is not the pair (1, 2), nor "
                    "is 1 followed by 23; walk the list and compare ids[i] == pair[0] and ids[i + 1] == pair[1]")
        expect_equal(got, expected, f"merge_pair({original}, {pair}, {new_id})", hint=hint)
    text = ("the cat sat on the mat; the theory of the other thing. " * 3
            + "Albert Einstein's theory of relativity. 1234 12 34")
    vocab_size = 256 + 20
    reference = BPETokenizer().train(text, vocab_size=vocab_size).merges
    got = _merges_with(merge_pair, text, vocab_size - 256)
    expect_equal(got, reference, "the 20 merges learnt with your merge_pair",
                 hint="your merge step changes the pair counts differently from BPETokenizer; "
                      "check the cases above and that merged ids stay in order")
    return "matches minillm.tokenizers.BPETokenizer on 20 merges"


@exercise("ex01.4", "bits per byte", points=1)
def check_bits_per_byte(bits_per_byte) -> str:
    fresh = random.Random()  # one case the student cannot foresee: a table of the fixed cases' answers fails
    unforeseen = (round(fresh.uniform(0.5, 8), 3), fresh.randint(10, 10**5), fresh.randint(10, 10**6))
    for nll, n_tokens, n_bytes in [(math.log(2), 100, 100), (1.5, 300, 1000), (4.2, 16000, 46000), unforeseen]:
        expected = lm.bits_per_byte(nll, n_tokens, n_bytes)
        got = bits_per_byte(nll, n_tokens, n_bytes)
        hint = "total loss = nll * n_tokens nats; divide by ln 2 for bits and by n_bytes for 'per byte'"
        if isinstance(got, (int, float)) and math.isclose(got, expected * math.log(2) ** 2, rel_tol=1e-6):
            hint = "one nat is 1/ln 2 bits: divide by math.log(2), don't multiply"
        expect_close(got, expected, f"bits_per_byte({nll:.4g}, {n_tokens}, {n_bytes})", rtol=1e-6, hint=hint)
    return "matches nll · tokens / (bytes · ln 2)"


def _sampled_ids(answer, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(answer)
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError(f"{what} returned {type(answer).__name__}, not token ids. Hint: return the tensor of "
                             "ids, one per row (logits.argmax(dim=-1) at temperature 0)") from None


@exercise("ex01.5", "sampling with temperature", points=2)
def check_sample_with_temperature(sample_with_temperature) -> str:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    # Fixed rows, then rows the student cannot foresee (a fresh seed each run): a hard-coded answer fails.
    fresh = torch.Generator()
    fresh.seed()
    fixed = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0], [-1.0, -2.0, -0.5]])
    for rows in (fixed, torch.randn(6, 9, generator=fresh)):
        expected_ids = rows.argmax(dim=-1).tolist()
        saved = snapshot(logits=rows)
        what = f"sample_with_temperature(rows of shape {tuple(rows.shape)}, temperature=0)"
        greedy = sample_with_temperature(rows, 0.0, torch.Generator().manual_seed(0))
        expect_unchanged(saved, what)
        expect_equal(_sampled_ids(greedy, what).tolist(), expected_ids, what,
                     hint="temperature 0 means greedy: return logits.argmax(dim=-1) without drawing")
    draws = 20000
    # Rows alternate between two different logit vectors: each row must be drawn from its own distribution.
    patterns = torch.stack([logits, logits.flip(0)])
    for temperature in (0.5, 1.0, 2.0):
        batch = patterns.repeat(draws, 1)
        saved = snapshot(logits=batch)
        what = f"sample_with_temperature at temperature {temperature}"
        got = _sampled_ids(sample_with_temperature(batch, temperature, torch.Generator().manual_seed(1)), what)
        expect_unchanged(saved, what,
                         hint="compute logits / temperature into a new tensor instead of dividing in place")
        expect_equal(tuple(got.shape), (2 * draws,), f"shape of the ids for {2 * draws} rows of logits",
                     hint="draw one id per row: torch.multinomial(probabilities, 1) gives (rows, 1); drop the last dim")
        for start, pattern in enumerate(patterns):
            frequencies = torch.bincount(got[start::2].long().flatten(), minlength=len(logits)).double() / draws
            expected = sampling.next_token_probabilities(pattern, temperature).double()
            distance = 0.5 * (frequencies - expected).abs().sum().item()  # total variation
            if distance > 0.03:
                flatter = "flatter" if temperature > 1 else "sharper" if temperature < 1 else "the softmax"
                raise AssertionError(
                    f"at temperature {temperature} your samples' frequencies for logits {pattern.tolist()} "
                    f"{[round(f, 3) for f in frequencies.tolist()]} are far from softmax(logits / T) = "
                    f"{[round(p, 3) for p in expected.tolist()]}. Hint: divide the logits by the temperature (the "
                    f"distribution should get {flatter}), softmax over the last dim, then "
                    "torch.multinomial(probabilities, 1, generator=generator): one draw from each row's own "
                    "distribution")
        if temperature == 1.0:
            again = _sampled_ids(sample_with_temperature(batch, temperature, torch.Generator().manual_seed(1)), what)
            other = _sampled_ids(sample_with_temperature(batch, temperature, torch.Generator().manual_seed(2)), what)
            if not torch.equal(again, got) or torch.equal(other, got):
                raise AssertionError(f"{what}: the same generator seed must give the same ids, and another seed other "
                                     "ids. Hint: draw with torch.multinomial(probabilities, 1, generator=generator), "
                                     "passing the generator you were given (not the global one, nor a seed of yours)")
    # Logits in the thousands: exp(logits) overflows (inf / inf is NaN) unless the row max is subtracted first.
    big = torch.tensor([[1000.0, 999.0, 997.0], [-997.0, -1000.0, -999.0]])
    batch, draws = big.repeat(2000, 1), 2000
    what = "sample_with_temperature on logits in the thousands (temperature 1)"
    stable = ("exp of a logit in the thousands overflows, and exp of minus a thousand is 0 (0 / 0 is NaN): use "
              "torch.softmax(logits / temperature, dim=-1), or subtract each row's max before torch.exp")
    saved = snapshot(logits=batch)
    try:
        answer = sample_with_temperature(batch, 1.0, torch.Generator().manual_seed(3))
    except NotImplementedError:
        raise
    except (RuntimeError, ValueError, OverflowError) as error:   # e.g. multinomial refusing NaN probabilities
        raise AssertionError(f"{what} failed: {type(error).__name__}: {str(error)[:200]}. Hint: {stable}") from None
    expect_unchanged(saved, what)
    got = _sampled_ids(answer, what)
    expect_equal(tuple(got.shape), (2 * draws,), f"shape of the ids for {2 * draws} rows of logits",
                 hint="draw one id per row: torch.multinomial(probabilities, 1) gives (rows, 1); drop the last dim")
    for start, pattern in enumerate(big):
        frequencies = torch.bincount(got[start::2].long().flatten().clamp(0, 3), minlength=4)[:3].double() / draws
        expected = torch.softmax(pattern.double(), dim=-1)
        if 0.5 * (frequencies - expected).abs().sum().item() > 0.05:
            raise AssertionError(f"{what}: your samples' frequencies for logits {pattern.tolist()} "
                                 f"{[round(f, 3) for f in frequencies.tolist()]} are far from softmax = "
                                 f"{[round(p, 3) for p in expected.tolist()]}. Hint: {stable}")
    return "greedy at T=0; 20,000 draws follow softmax(logits/T) at T = 0.5, 1, 2; stable for huge logits"
