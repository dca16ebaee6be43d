"""Tests of minillm.lm (chapter 01): counts, losses, the small models, and the chapter's exercise checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minillm import grading, lm
from minillm.tokenizers import _merge
from minillm.train import TrainConfig, train


@pytest.fixture
def one_thread():
    """These models are tiny; on a busy 2-core machine, threads waiting on each other dominate their time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_ids(length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed))


def markov_text(length: int, seed: int = 0) -> torch.Tensor:
    """Tokens where the next one depends on the previous TWO: after (a, b) comes (a + b) % 5, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ids = [0, 1]
    for _ in range(length - 2):
        ids.append((ids[-1] + ids[-2]) % 5 if torch.rand(1, generator=g) < 0.9 else int(torch.randint(5, (1,), generator=g)))
    return torch.tensor(ids)


def test_bigram_counts_match_a_python_loop():
    ids = random_ids(300, 6)
    expected = torch.zeros(6, 6, dtype=torch.long)
    for a, b in zip(ids.tolist(), ids[1:].tolist()):
        expected[a, b] += 1
    assert torch.equal(lm.bigram_counts(ids, 6), expected)
    assert lm.bigram_counts([2, 0], 3).tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]  # row = previous token


@pytest.mark.parametrize("ids, vocab_size, message", [
    (torch.tensor([0.5, 1.0]), 3, "integer token ids"),
    (torch.tensor([[0, 1]]), 3, "1-D"),
    ([0, 5], 3, "vocab_size is 3"),
    ([0, 1], 0, "positive integer"),
])
def test_bigram_counts_bad_input(ids, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        lm.bigram_counts(ids, vocab_size)


def test_probabilities_rows_sum_to_one_and_smoothing_removes_zeros():
    counts = lm.bigram_counts([0, 1, 0, 1, 1], 3)  # token 2 never occurs: its row is empty
    raw = lm.bigram_probabilities(counts, smoothing=0)
    torch.testing.assert_close(raw.sum(1), torch.ones(3, dtype=torch.float64))
    assert raw[0, 2] == 0 and torch.allclose(raw[2], torch.full((3,), 1 / 3, dtype=torch.float64))
    smoothed = lm.bigram_probabilities(counts, smoothing=1.0)
    assert (smoothed > 0).all()
    assert math.isclose(smoothed[0, 1].item(), (2 + 1) / (2 + 3))
    with pytest.raises(ValueError, match="smoothing"):
        lm.bigram_probabilities(counts, smoothing=-1)
    with pytest.raises(ValueError, match="square"):
        lm.bigram_probabilities(torch.ones(2, 3))


def test_nll_perplexity_and_bits_per_byte():
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    nll = lm.bigram_nll(uniform, [0, 1, 2, 3, 0])
    assert math.isclose(nll, math.log(4)) and math.isclose(lm.perplexity(nll), 4.0)
    assert lm.bigram_nll(lm.bigram_probabilities(lm.bigram_counts([0, 1], 2), 0), [0, 0]) == math.inf
    assert lm.perplexity(1e6) == math.inf
    # 1 nat per token over 2 bytes per token is 1 / (2 ln 2) bits per byte
    assert math.isclose(lm.bits_per_byte(1.0, 100, 200), 1 / (2 * math.log(2)))
    with pytest.raises(ValueError, match="n_bytes"):
        lm.bits_per_byte(1.0, 10, 0)
    with pytest.raises(ValueError, match="at least 2"):
        lm.bigram_nll(uniform, [1])


@pytest.mark.parametrize("block_size", [7, 64])
def test_evaluate_nll_scores_every_transition_once(block_size):
    ids = random_ids(503, 9, seed=3)  # 502 predictions: not a multiple of 7 or 64, so the ragged tail is used
    train_ids = random_ids(2000, 9, seed=4)
    probabilities = lm.bigram_probabilities(lm.bigram_counts(train_ids, 9), smoothing=0.5)
    counting = lm.CountingBigram(probabilities, block_size=block_size)
    assert math.isclose(lm.evaluate_nll(counting, ids, batch_size=3), lm.bigram_nll(probabilities, ids), rel_tol=1e-5)


def test_neural_bigram_trained_with_train_reaches_the_counting_loss(one_thread):
    ids = random_ids(20000, 8, seed=5) % 8
    ids = torch.where(torch.rand(len(ids), generator=torch.Generator().manual_seed(6)) < 0.5,
                      torch.roll(ids, 1) * 3 % 8, ids)  # some structure, so the table is not uniform
    optimum = lm.bigram_nll(lm.bigram_probabilities(lm.bigram_counts(ids, 8), 0), ids)
    model = lm.NeuralBigram(lm.BigramConfig(vocab_size=8, block_size=32))
    start = lm.evaluate_nll(model, ids)
    assert math.isclose(start, math.log(8), rel_tol=1e-5)  # zero-initialised: uniform
    result = train(model, ids, None, TrainConfig(steps=150, batch_size=32, lr=0.3, warmup_steps=5, weight_decay=0.0,
                                                  progress=False, device="cpu"))
    final = lm.evaluate_nll(model, ids)
    assert optimum - 1e-4 < final < optimum + 0.02 < start
    assert result.meter.tokens == 150 * 32 * 32 and result.meter.flops == 0


def test_mlp_sees_exactly_its_context_and_nothing_later():
    torch.manual_seed(0)
    model = lm.MLPLanguageModel(lm.MLPConfig(vocab_size=11, context=3, n_embd=4, hidden=8, block_size=16)).eval()
    idx = random_ids(12, 11, seed=7).unsqueeze(0)
    changed = idx.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 11
    difference = (model(idx)[0] - model(changed)[0]).abs().amax(-1)[0]
    moved = (difference > 0).nonzero().flatten().tolist()
    assert moved == [5, 6, 7]  # position t sees tokens t-2..t
    assert model.context_window == 3


def test_mlp_flops_per_token_match_the_flop_counter():
    model = lm.MLPLanguageModel(lm.MLPConfig(vocab_size=50, context=4, n_embd=6, hidden=20, block_size=8))
    idx = random_ids(2 * 8, 50).view(2, 8)
    with FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() == model.flops_per_token(training=False) * idx.numel()
    assert model.flops_per_token() == 3 * model.flops_per_token(training=False)


def test_mlp_with_two_tokens_of_context_beats_a_bigram(one_thread):
    ids = markov_text(6000)
    losses = {}
    for context in (1, 2):
        torch.manual_seed(0)
        model = lm.MLPLanguageModel(lm.MLPConfig(vocab_size=5, context=context, n_embd=8, hidden=32, block_size=32))
        train(model, ids, None, TrainConfig(steps=150, batch_size=16, lr=1e-2, progress=False, device="cpu"))
        losses[context] = lm.evaluate_nll(model, ids)
    assert losses[2] < losses[1] - 0.3, losses


@pytest.mark.parametrize("make, message", [
    (lambda: lm.MLPConfig(vocab_size=10, context=0), "context=0"),
    (lambda: lm.BigramConfig(vocab_size=-1), "vocab_size"),
    (lambda: lm.NeuralBigram(lm.MLPConfig(vocab_size=4)), "BigramConfig"),
    (lambda: lm.CountingBigram(torch.ones(2, 3)), "square"),
    (lambda: lm.NeuralBigram(lm.BigramConfig(4))(torch.tensor([1, 2])), "batch, time"),
])
def test_bad_configs_and_inputs_say_what_to_do(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


# ---- the chapter's exercise checks: right answers pass, wrong ones fail with a hint ----

def _counts_loop(ids, vocab_size):
    counts = torch.zeros(vocab_size, vocab_size)
    for a, b in zip(list(ids)[:-1], list(ids)[1:]):
        counts[int(a), int(b)] += 1
    return counts


def _merge_overlapping(ids, pair, new_id):  # merges (5, 5) twice in [5, 5, 5]: wrong
    out = list(ids)
    for i in range(len(out) - 1):
        if out[i] == pair[0] and out[i + 1] == pair[1]:
            out[i] = new_id
            out[i + 1] = new_id
    return out


@pytest.mark.parametrize("grade_id, right, wrong", [
    ("ex01.1", _counts_loop, lambda ids, v: _counts_loop(ids, v).T),
    ("ex01.2", lambda p, ids: (lm.bigram_nll(p, ids), math.exp(lm.bigram_nll(p, ids))),
     lambda p, ids: (lm.bigram_nll(p, ids) / math.log(2), 2 ** (lm.bigram_nll(p, ids) / math.log(2)))),
    ("ex01.3", _merge, _merge_overlapping),
    ("ex01.4", lm.bits_per_byte, lambda nll, t, b: nll * t / b * math.log(2)),
])
def test_chapter_checks(grade_id, right, wrong, capsys):
    assert grading.check(grade_id, right) == grading.get_exercise(grade_id).points
    assert capsys.readouterr().out.startswith(f"✓ {grade_id} ")
    with pytest.raises(AssertionError, match="Hint"):
        grading.check(grade_id, wrong)


# ---- fixes from review ----

def test_perplexity_of_nan_is_nan():
    assert math.isnan(lm.perplexity(float("nan")))
    assert lm.perplexity(float("inf")) == math.inf
    assert math.isclose(lm.perplexity(math.log(7)), 7.0)


def test_bigram_counts_of_an_empty_list_is_an_empty_table():
    for ids in ([], (), torch.tensor([], dtype=torch.long)):
        counts = lm.bigram_counts(ids, 4)
        assert counts.dtype == torch.int64 and torch.equal(counts, torch.zeros(4, 4, dtype=torch.long))
    assert lm.bigram_counts([3], 4).sum() == 0
    with pytest.raises(ValueError, match="integer token ids"):
        lm.bigram_counts(torch.tensor([], dtype=torch.float32), 4)  # an explicit float tensor is still refused


def test_configs_accept_numpy_integers_and_store_python_ints():
    import numpy as np

    config = lm.BigramConfig(np.int64(5), block_size=np.int32(8))
    assert config.vocab_size == 5 and type(config.vocab_size) is int and type(config.block_size) is int
    assert lm.NeuralBigram(config)(torch.zeros(1, 3, dtype=torch.long))[0].shape == (1, 3, 5)
    assert lm.MLPConfig(np.int64(7), context=np.int64(2)).context == 2
    assert lm.bigram_counts([0, 1], np.int64(2)).tolist() == [[0, 1], [0, 0]]
    with pytest.raises(ValueError, match="positive integer"):
        lm.BigramConfig(np.float64(5.0))
    with pytest.raises(ValueError, match="positive integer"):
        lm.BigramConfig(True)


@pytest.mark.parametrize("smoothing", [math.inf, math.nan, -math.inf])
def test_non_finite_smoothing_is_refused(smoothing):
    with pytest.raises(ValueError, match="finite number >= 0"):
        lm.bigram_probabilities(lm.bigram_counts([0, 1, 1], 2), smoothing=smoothing)


# ---- review: adversarial inputs -------------------------------------------------------------------------

def test_bits_per_byte_matches_a_hand_computation_and_refuses_non_integer_counts():
    assert lm.bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert lm.bits_per_byte(1.5, 300, 1000) == pytest.approx(1.5 * 300 / 1000 / math.log(2))
    assert lm.bits_per_byte(1.5, torch.tensor(300), 1000) == pytest.approx(1.5 * 300 / 1000 / math.log(2))
    # before: 2.5 tokens, True tokens and NaN tokens gave a number (or NaN) without complaint
    for n_tokens in (2.5, True, float("nan")):
        with pytest.raises(TypeError, match="n_tokens=.* must be an integer count"):
            lm.bits_per_byte(1.0, n_tokens, 10)
    with pytest.raises(TypeError, match="n_bytes=10.0"):
        lm.bits_per_byte(1.0, 3, 10.0)


@pytest.mark.parametrize("counts", [torch.tensor([[-1, 2], [0, 0]]), torch.tensor([[float("nan"), 2.0], [0, 0]])])
def test_bigram_probabilities_refuses_counts_no_text_could_give(counts):
    # before: a negative count became a negative "probability", a NaN row silently became uniform
    with pytest.raises(ValueError, match="counts must be numbers >= 0"):
        lm.bigram_probabilities(counts, 0)


def test_bigram_nll_refuses_a_table_that_is_not_square():
    # before: IndexError from deep inside the indexing
    with pytest.raises(ValueError, match=r"\(vocab, vocab\) tensor"):
        lm.bigram_nll(torch.full((3, 2), 0.5), [0, 2])


@pytest.mark.parametrize("make", [lambda: lm.CountingBigram.from_tokens([0, 1, 2, 1], 3),
                                  lambda: lm.NeuralBigram(lm.BigramConfig(3)),
                                  lambda: lm.MLPLanguageModel(lm.MLPConfig(3, context=2))])
def test_models_refuse_token_ids_outside_the_vocabulary(make):
    model = make()
    # before: the MLP silently read id 3 (== vocab_size) as its "before the start" token; the bigrams raised
    # a bare IndexError (on a GPU, a device-side assert that breaks the whole session)
    for bad in (3, -1):
        with pytest.raises(ValueError, match="token ids range over .* but vocab_size is 3"):
            model(torch.tensor([[0, bad]]))
    with pytest.raises(ValueError, match="targets must be a tensor"):
        model(torch.tensor([[0, 1]]), [[1, 2]])
    logits, _ = model(torch.zeros(2, 0, dtype=torch.long))
    assert logits.shape == (2, 0, 3)


# ---- review: token-id dtypes, targets, tables and losses ------------------------------------------------

def _three_models():
    return [lm.CountingBigram.from_tokens([0, 1, 2, 1], 3), lm.NeuralBigram(lm.BigramConfig(3)),
            lm.MLPLanguageModel(lm.MLPConfig(3, context=2))]


# uint16/32/64: numpy token files (torch had no min/max for them: NotImplementedError "min_all" before)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32,
                                   torch.uint64])
def test_models_read_any_integer_dtype_as_token_ids(dtype):
    idx = torch.tensor([[0, 1], [1, 0]])
    for model in _three_models():
        # before: the counting bigram indexed with a uint8 tensor as a MASK (silently wrong logits of shape
        # (2,)), the embeddings refused int8, int16 and uint8
        logits, loss = model(idx.to(dtype), idx.flip(1).to(dtype))
        expected_logits, expected_loss = model(idx, idx.flip(1))
        assert torch.equal(logits, expected_logits) and torch.equal(loss, expected_loss)


@pytest.mark.parametrize("idx", [torch.tensor([[True, False], [False, True]]), torch.tensor([[1.0, 0.0]])])
def test_models_refuse_bool_and_float_ids(idx):
    for model in _three_models():
        # before: a bool tensor indexed the counting table as a mask, silently; floats failed deep in torch
        with pytest.raises(ValueError, match="idx must hold integer token ids"):
            model(idx)


@pytest.mark.parametrize("targets, message", [
    (torch.tensor([[1.0, 0.0]]), "targets must hold integer token ids"),
    (torch.tensor([[True, False]]), "targets must hold integer token ids"),
    (torch.tensor([[1, 3]]), "target 3 is outside the vocabulary"),
    (torch.tensor([[-5, 1]]), "target -5 is outside the vocabulary"),
    (torch.tensor([[-100, -100]]), "every target is -100"),
])
def test_models_refuse_targets_that_give_no_loss(targets, message):
    idx = torch.tensor([[0, 1]])
    for model in _three_models():
        # before: torch's "expected target dtype to be Long", "Target 3 is out of bounds", or a NaN loss
        with pytest.raises(ValueError, match=message):
            model(idx, targets)
        with pytest.raises(ValueError, match="holds no tokens"):  # before: a NaN loss
            model(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long))
        _, masked_loss = model(idx, torch.tensor([[-100, 2]]))
        torch.testing.assert_close(masked_loss, F.cross_entropy(model(idx)[0][0, 1:], torch.tensor([2])))
        _, int32_loss = model(idx, torch.tensor([[1, 2]], dtype=torch.int32))  # before: a dtype error
        torch.testing.assert_close(int32_loss, model(idx, torch.tensor([[1, 2]]))[1])


@pytest.mark.parametrize("ids, message", [("hello", r"got text \(str\).*tokenizer.encode"),
                                          (None, "got NoneType"), (["a", "b"], "got list")])
def test_ids_that_are_not_ids_say_to_encode_the_text(ids, message):
    # before: torch's "new(): invalid data type 'str'", "Could not infer dtype of NoneType", ...
    with pytest.raises(ValueError, match=message):
        lm.bigram_counts(ids, 5)
    with pytest.raises(ValueError, match=message):
        lm.bigram_nll(torch.full((5, 5), 0.2), ids)


def test_bigram_probabilities_refuses_infinite_and_empty_counts():
    # before: an inf count gave a row of NaN "probabilities", an empty table a ZeroDivisionError
    with pytest.raises(ValueError, match="finite"):
        lm.bigram_probabilities(torch.tensor([[math.inf, 1.0], [1.0, 1.0]]), 0)
    with pytest.raises(ValueError, match=r"empty \(0, 0\) table"):
        lm.bigram_probabilities(torch.zeros(0, 0), 1.0)


@pytest.mark.parametrize("table, shown", [
    (lm.bigram_counts([0, 1, 1, 0, 1], 2), r"values in \[0.0, 2.0\]"),   # counts, not probabilities
    (torch.tensor([[-0.5, 1.5], [0.5, 0.5]]), r"values in \[-0.5, 1.5\]"),
    (torch.tensor([[math.nan, 1.0], [0.5, 0.5]]), "NaN"),
])
def test_bigram_nll_refuses_a_table_that_is_not_probabilities(table, shown):
    # before: -0.23 nats for the counts, -0.41 for the negative table, NaN for the NaN one, all without a word
    message = f"probabilities must be numbers in \\[0, 1\\], got {shown}.*bigram_probabilities"
    with pytest.raises(ValueError, match=message):
        lm.bigram_nll(table, [0, 1, 1, 0])
    rounded = torch.softmax(torch.randn(2, 2, generator=torch.Generator().manual_seed(0)), 1).float()
    assert lm.bigram_nll(rounded, [0, 1, 1, 0]) > 0  # float32 rounding is fine


@pytest.mark.parametrize("table", [torch.tensor([[-0.5, 1.5], [0.5, 0.5]]), torch.tensor([[math.nan, 1.0], [0.5, 0.5]]),
                                   torch.tensor([[0.0, 0.0], [0.5, 0.5]]), torch.tensor([[math.inf, 1.0], [0.5, 0.5]])])
def test_counting_bigram_refuses_a_table_without_a_distribution_in_every_row(table):
    # before: NaN or -inf log-probabilities, and so a NaN loss (or nothing to sample) once that row came up
    with pytest.raises(ValueError, match="finite numbers >= 0 with some mass in every row"):
        lm.CountingBigram(table)


def test_perplexity_is_finite_up_to_where_floats_overflow_and_losses_may_be_tensors():
    # before: any loss >= 700 nats gave inf although exp(705) ~ 1.5e306 is a float
    assert lm.perplexity(705.0) == pytest.approx(math.exp(705.0))
    assert lm.perplexity(710.0) == math.inf
    np = pytest.importorskip("numpy")
    for loss in (torch.tensor(1.5), torch.tensor([1.5]), np.float32(1.5), np.array(1.5), np.array([1.5])):
        assert type(lm.perplexity(loss)) is float and lm.perplexity(loss) == pytest.approx(math.exp(1.5))
        # before: a tensor loss gave a tensor back
        assert type(lm.bits_per_byte(loss, 10, 20)) is float
        assert lm.bits_per_byte(loss, 10, 20) == pytest.approx(1.5 * 10 / (20 * math.log(2)))
    for nonsense in ("1.5", None, True, torch.tensor([1.0, 2.0])):
        with pytest.raises(TypeError, match="mean_nll=.* must be one number"):
            lm.perplexity(nonsense)
        with pytest.raises(TypeError, match="mean_nll=.* must be one number"):
            lm.bits_per_byte(nonsense, 10, 20)


def test_a_negative_loss_is_refused_by_perplexity_and_bits_per_byte():
    # before: perplexity(-2.0) gave 0.135, "better than certain", for a log-probability passed by mistake
    for function, args in ((lm.perplexity, ()), (lm.bits_per_byte, (10, 20))):
        with pytest.raises(ValueError, match="mean_nll=-2 is negative"):
            function(-2.0, *args)
        with pytest.raises(ValueError, match="negative"):
            function(torch.tensor(-0.5), *args)
    assert lm.perplexity(-1e-9) == pytest.approx(1.0)   # rounding just below 0 is still a loss of 0
    assert lm.perplexity(0.0) == 1.0
