"""Tests of minillm.sampling (chapter 01): temperature, top-k, top-p, generation, and the ex01.5 check."""
from __future__ import annotations

import math

import pytest
import torch

from minillm import grading, lm, sampling
from minillm.model import GPT, GPTConfig

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 3.0, 0.0, 0.0]])


def test_top_k_keeps_the_k_best_and_leaves_the_input_alone():
    before = LOGITS.clone()
    kept = sampling.top_k_filter(LOGITS, 2)
    assert torch.equal(LOGITS, before)
    assert torch.isfinite(kept).sum(-1).tolist() == [2, 5]  # row 2: a four-way tie at the 2nd place stays whole
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [0, 1]
    assert torch.equal(sampling.top_k_filter(LOGITS, 99), LOGITS)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda p: torch.isfinite(sampling.top_p_filter(logits, p)).nonzero().flatten().tolist()
    assert kept(0.5) == [0]          # the best token alone already holds 0.5
    assert kept(0.51) == [0, 1]
    assert kept(0.9) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(0.01) == [0]         # the most likely token is always kept
    shuffled = logits[[2, 0, 3, 1]]
    assert torch.isfinite(sampling.top_p_filter(shuffled, 0.51)).nonzero().flatten().tolist() == [1, 3]


def test_temperature_sharpens_and_flattens():
    entropy = lambda p: -(p * p.clamp_min(1e-30).log()).sum().item()
    cold, warm, hot = (sampling.next_token_probabilities(LOGITS[0], t) for t in (0.5, 1.0, 2.0))
    torch.testing.assert_close(warm, torch.softmax(LOGITS[0], -1))
    assert entropy(cold) < entropy(warm) < entropy(hot)
    greedy = sampling.next_token_probabilities(LOGITS, 0)
    assert greedy.tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]
    assert torch.equal(sampling.sample_next_token(LOGITS, 0), torch.tensor([0, 2]))
    with_k = sampling.next_token_probabilities(LOGITS[0], 1.0, top_k=2)
    torch.testing.assert_close(with_k[:2], torch.softmax(LOGITS[0, :2], -1))


def test_samples_follow_the_distribution_and_repeat_with_a_seed():
    batch = LOGITS[0].repeat(40000, 1)
    draws = sampling.sample_next_token(batch, 1.5, top_k=4, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (40000,) and draws.dtype == torch.long
    frequencies = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = sampling.next_token_probabilities(LOGITS[0], 1.5, top_k=4).double()
    assert (frequencies - expected).abs().max() < 0.01 and frequencies[3] == 0
    again = sampling.sample_next_token(batch, 1.5, top_k=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        sampling.sample_next_token(LOGITS, **options)


def test_generate_follows_a_deterministic_table_and_keeps_the_rank():
    cycle = torch.full((4, 4), 1e-9)
    for a in range(4):
        cycle[a, (a + 1) % 4] = 1.0  # 0 -> 1 -> 2 -> 3 -> 0
    model = lm.CountingBigram(lm.bigram_probabilities(cycle, smoothing=0), block_size=8)
    out = sampling.generate(model, torch.tensor([2]), 6, temperature=0)
    assert out.tolist() == [2, 3, 0, 1, 2, 3, 0]
    batch = sampling.generate(model, torch.tensor([[0], [3]]), 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert batch.tolist() == [[0, 1, 2, 3], [3, 0, 1, 2]]
    with pytest.raises(ValueError, match="empty"):
        sampling.generate(model, torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate(model, torch.tensor([1]), -1)


def test_generate_crops_to_the_context_window():
    model = lm.MLPLanguageModel(lm.MLPConfig(vocab_size=7, context=2, n_embd=4, hidden=8, block_size=4))
    seen = []
    original = model.forward
    model.forward = lambda idx, targets=None: (seen.append(idx.shape[1]), original(idx, targets))[1]
    out = sampling.generate(model, torch.tensor([1, 2, 3, 4, 5, 6]), 3)
    assert out.shape == (9,) and set(seen) == {2}


def test_generate_matches_gpt_generate():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    prompt = torch.tensor([[1, 2, 3]])
    for options in (dict(temperature=0.0), dict(temperature=0.9, top_k=5)):
        ours = sampling.generate(gpt, prompt, 12, generator=torch.Generator().manual_seed(3), **options)
        theirs = gpt.generate(prompt, 12, generator=torch.Generator().manual_seed(3), **options)
        assert torch.equal(ours, theirs)


def test_check_ex01_5_passes_right_and_fails_wrong(capsys):
    def right(logits, temperature, generator=None):
        return sampling.sample_next_token(logits, temperature, generator=generator)

    def multiplies(logits, temperature, generator=None):  # T * logits: sharpens when it should flatten
        return sampling.sample_next_token(logits * temperature, 1.0, generator=generator) if temperature else logits.argmax(-1)

    def never_greedy(logits, temperature, generator=None):
        return sampling.sample_next_token(logits, max(temperature, 1.0), generator=generator)

    assert grading.check("ex01.5", right) == 2
    assert capsys.readouterr().out.startswith("✓ ex01.5 ")
    for wrong in (multiplies, never_greedy):
        with pytest.raises(AssertionError, match="Hint"):
            grading.check("ex01.5", wrong)


def test_top_p_of_one_keeps_every_token_of_a_large_vocabulary():
    # In float32 the running sum of 1000 probabilities reaches 1.0 before the last token.
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 5
    kept = sampling.top_p_filter(logits, 1.0)
    assert torch.equal(kept, logits) and kept is not logits
    assert torch.equal(sampling.top_p_filter(logits, 1), logits)


def test_top_p_just_below_one_drops_only_what_the_exact_sum_allows():
    logits = torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 4
    probabilities = torch.softmax(logits.double(), -1)
    descending = probabilities.sort(descending=True).values
    for p in (1 - 1e-6, 1 - 1e-5, 0.999):
        mass_before = descending.cumsum(0) - descending
        expected = int((mass_before < p).sum())  # the exact count of tokens to keep
        assert int(torch.isfinite(sampling.top_p_filter(logits, p)).sum()) == expected, p


def test_a_tiny_temperature_is_greedy_not_a_nan_error():
    for temperature in (1e-40, 1e-300):
        probabilities = sampling.next_token_probabilities(LOGITS, temperature)
        assert torch.isfinite(probabilities).all()
        assert probabilities.tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]
        drawn = sampling.sample_next_token(LOGITS, temperature, generator=torch.Generator().manual_seed(0))
        assert drawn.tolist() == [0, 2]
    # Ordinary temperatures divide as they always did.
    torch.testing.assert_close(sampling.next_token_probabilities(LOGITS, 0.5), torch.softmax(LOGITS / 0.5, -1),
                               rtol=0, atol=0)


# ---- review: adversarial inputs -------------------------------------------------------------------------

NAN_ROW = torch.tensor([1.0, float("nan"), 0.0])
PLUS_INF_ROW = torch.tensor([float("inf"), 0.0, 1.0])
MASKED_ROW = torch.tensor([[0.0, 1.0, 2.0], [float("-inf")] * 3])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("logits, message", [(NAN_ROW, "NaN or \\+inf"), (PLUS_INF_ROW, "NaN or \\+inf"),
                                             (MASKED_ROW, "-inf for every token")])
def test_logits_without_a_distribution_are_clear_errors_not_a_silent_pick(logits, message, temperature):
    # before: temperature 0 silently returned the NaN's index (or 0 for an all -inf row), temperature 1 failed
    # inside torch.multinomial with "probability tensor contains either inf, nan or element < 0"
    with pytest.raises(ValueError, match=message):
        sampling.sample_next_token(logits, temperature=temperature)
    with pytest.raises(ValueError, match=message):
        sampling.next_token_probabilities(logits, temperature=temperature)


def test_some_minus_inf_scores_are_fine():
    logits = torch.tensor([[float("-inf"), 0.0, 1.0], [2.0, float("-inf"), float("-inf")]])
    probabilities = sampling.next_token_probabilities(logits, top_p=0.9)
    assert probabilities[:, 0].tolist() == [0.0, 1.0] and probabilities[0, 1] > 0
    assert sampling.sample_next_token(logits, generator=torch.Generator().manual_seed(0)).tolist()[1] == 0


def test_numpy_settings_work_like_python_numbers():
    np = pytest.importorskip("numpy")
    row = torch.tensor([1.0, 2.0, 3.0, 0.5])
    assert torch.equal(sampling.next_token_probabilities(row, np.float32(0.5), np.int64(2), np.float64(0.9)),
                       sampling.next_token_probabilities(row, 0.5, 2, 0.9))
    with pytest.raises(ValueError, match="top_k=2.0"):
        sampling.next_token_probabilities(row, top_k=2.0)


def test_filters_accept_integer_logits():
    ints = torch.tensor([[1, 3, 2], [5, 4, 4]])
    assert sampling.top_k_filter(ints, 1).tolist() == [[-math.inf, 3.0, -math.inf], [5.0, -math.inf, -math.inf]]
    assert sampling.top_p_filter(ints, 0.01).tolist() == [[-math.inf, 3.0, -math.inf], [5.0, -math.inf, -math.inf]]


def test_generate_takes_numpy_counts_and_refuses_float_prompts():
    np = pytest.importorskip("numpy")
    model = lm.CountingBigram(torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    assert sampling.generate(model, torch.tensor([0]), np.int64(3), temperature=0).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="integer token ids"):
        sampling.generate(model, torch.tensor([0.0]), 1)
