"""Tests of minillm.sampling (chapter 01): temperature, top-k, top-p, generation, and the ex01.5 check."""
from __future__ import annotations

import math
from types import SimpleNamespace

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


# ---- review: generators, dtypes, prompts and models -----------------------------------------------------

def test_matches_transformers_logits_warpers():
    warpers = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(3, 1, dtype=torch.long)
    for temperature, k, p in [(0.7, 10, 0.9), (1.3, 50, 0.5), (1.0, 3, 1.0), (0.2, 200, 0.99)]:
        logits = torch.randn(3, 100, generator=g) * 3  # no ties: which of two tied tokens stays is arbitrary
        scores = warpers.TemperatureLogitsWarper(temperature)(ids, logits.clone())
        scores = warpers.TopPLogitsWarper(p)(ids, warpers.TopKLogitsWarper(k)(ids, scores))
        ours = sampling.next_token_probabilities(logits, temperature, top_k=k, top_p=p)
        assert torch.equal(ours > 0, torch.isfinite(scores))
        torch.testing.assert_close(ours, torch.softmax(scores, -1))


@pytest.mark.parametrize("generator", [0, "seed", pytest.param("numpy", id="numpy-generator")])
def test_a_generator_that_is_not_a_torch_generator_is_a_clear_error(generator):
    if generator == "numpy":
        generator = pytest.importorskip("numpy").random.default_rng(0)
    model = lm.CountingBigram(torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    # before: AttributeError: 'int' object has no attribute 'device' (and generate at temperature 0 ignored it)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator.*manual_seed"):
        sampling.sample_next_token(LOGITS, 1.0, generator=generator)
    for temperature in (0.0, 1.0):
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            sampling.generate(model, torch.tensor([0]), 2, temperature=temperature, generator=generator)


def test_float64_logits_are_not_rounded_to_float32():
    # before: float32 made 1e10 and 1e10 + 1 equal (probabilities 0.5, 0.5) and 1e300 inf (a "NaN or +inf" error)
    for row in ([1e10, 1e10 + 1, 1e10 - 2], [1e300, 0.0, -1e300], [-1e300, -1e300 + 1e285, -1e300]):
        logits = torch.tensor(row, dtype=torch.float64)
        expected = torch.softmax(logits / 0.8, -1).float()
        probabilities = sampling.next_token_probabilities(logits, 0.8)
        assert probabilities.dtype == torch.float32
        torch.testing.assert_close(probabilities, expected)
        drawn = sampling.sample_next_token(logits.repeat(2000, 1), 0.8, generator=torch.Generator().manual_seed(0))
        frequencies = torch.bincount(drawn, minlength=3).float() / 2000
        assert (frequencies - expected).abs().max() < 0.05
    with_top_k = sampling.next_token_probabilities(torch.tensor([1e10, 1e10 + 1, 0.0], dtype=torch.float64), 1.0, 2)
    torch.testing.assert_close(with_top_k, torch.tensor([1 / (1 + math.e), math.e / (1 + math.e), 0.0]))


@pytest.mark.parametrize("logits", [torch.tensor([True, False]), torch.tensor([1 + 1j, 2 + 0j])])
def test_bool_and_complex_logits_are_refused(logits):
    # before: bool logits failed in argmax at temperature 0 and were read as 0/1 otherwise; complex ones lost
    # their imaginary part with only a warning
    for call in (lambda: sampling.sample_next_token(logits, 0.0), lambda: sampling.sample_next_token(logits, 1.0),
                 lambda: sampling.next_token_probabilities(logits), lambda: sampling.top_k_filter(logits, 1)):
        with pytest.raises(ValueError, match="logits must be real scores"):
            call()


def test_logits_that_are_not_a_tensor_say_how_to_convert_them():
    np = pytest.importorskip("numpy")
    for logits in ([1.0, 2.0], np.array([1.0, 2.0])):
        with pytest.raises(ValueError, match=r"must be a tensor of shape .* convert it with torch.as_tensor"):
            sampling.sample_next_token(logits)
    with pytest.raises(ValueError, match=r"torch.tensor\(tokenizer.encode"):
        sampling.generate(lm.CountingBigram(torch.full((2, 2), 0.5)), [0, 1], 2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_generate_takes_prompts_of_any_integer_dtype_and_keeps_it(dtype):
    table = torch.full((4, 4), 1e-9)
    for a in range(4):
        table[a, (a + 1) % 4] = 1.0
    counting = lm.CountingBigram(lm.bigram_probabilities(table, 0))
    mlp = lm.MLPLanguageModel(lm.MLPConfig(vocab_size=4, context=2, n_embd=4, hidden=8))
    for model in (counting, mlp):
        # before: the bigram read a uint8 prompt as a mask (IndexError), int8 and int16 failed in indexing or
        # in the embedding, and the MLP could not pad a uint8 prompt
        out = sampling.generate(model, torch.tensor([[2], [1]], dtype=dtype), 5, temperature=0)
        assert out.dtype == dtype
        assert torch.equal(out, sampling.generate(model, torch.tensor([[2], [1]]), 5, temperature=0).to(dtype))
    assert sampling.generate(counting, torch.tensor([2], dtype=dtype), 3, temperature=0).tolist() == [2, 3, 0, 1]


def test_generate_refuses_a_prompt_dtype_too_small_for_the_ids_it_would_draw():
    model = lm.NeuralBigram(lm.BigramConfig(vocab_size=300))
    with pytest.raises(ValueError, match=r"dtype torch.uint8, which holds ids up to 255.* vocab_size is 300"):
        sampling.generate(model, torch.tensor([1], dtype=torch.uint8), 3)

    class Unsized(torch.nn.Module):  # no config.vocab_size: checked on what it drew
        context_window = 1

        def forward(self, idx, targets=None):
            logits = torch.full((*idx.shape, 300), -1e4)
            logits[..., 299] = 0.0
            return logits, None

    # before: 299 was silently wrapped to 43 in uint8
    with pytest.raises(ValueError, match="token id 299, which idx's dtype torch.uint8 cannot hold"):
        sampling.generate(Unsized(), torch.tensor([1], dtype=torch.uint8), 2, temperature=0)
    wide_enough = sampling.generate(Unsized(), torch.tensor([1], dtype=torch.int16), 2, temperature=0)
    assert wide_enough.dtype == torch.int16 and wide_enough.tolist() == [1, 299, 299]


def test_generate_of_zero_tokens_returns_a_new_tensor():
    model = lm.CountingBigram(torch.full((3, 3), 1 / 3))
    for prompt in (torch.tensor([1, 2]), torch.tensor([[1, 2]])):
        out = sampling.generate(model, prompt, 0)
        # before: the prompt itself (or a view of it), so writing into the result changed the prompt
        assert torch.equal(out, prompt) and out.data_ptr() != prompt.data_ptr()


def test_generate_explains_a_model_that_does_not_follow_the_protocol():
    class LogitsOnly(torch.nn.Module):
        context_window = 2

        def forward(self, idx, targets=None):
            return torch.zeros(*idx.shape, 5)

    class LastPositionOnly(LogitsOnly):
        def forward(self, idx, targets=None):
            return torch.zeros(idx.shape[0], 5), None

    class HalfAWindow(LogitsOnly):
        context_window = 2.5

        def forward(self, idx, targets=None):
            return torch.zeros(*idx.shape, 5), None

    # before: "not enough values to unpack", an IndexError, or "slice indices must be integers"
    with pytest.raises(TypeError, match=r"must return \(logits, loss\) .* returned a tensor of shape \(1, 2, 5\)"):
        sampling.generate(LogitsOnly(), torch.tensor([[1, 2]]), 1)
    with pytest.raises(TypeError, match=r"returned logits of shape \(2, 5\)"):
        sampling.generate(LastPositionOnly(), torch.tensor([[1, 2], [3, 4]]), 1)
    with pytest.raises(TypeError, match="context window .* is 2.5"):
        sampling.generate(HalfAWindow(), torch.tensor([1]), 1)

    class NoWindow(HalfAWindow):
        context_window = 0

    class NoWindowInABlock(NoWindow):
        config = SimpleNamespace(block_size=8)

    # before: "has neither context_window nor config.block_size" (0 taken for missing), or a window of 0 silently
    # replaced by the block size
    for model in (NoWindow(), NoWindowInABlock()):
        with pytest.raises(TypeError, match=r"context window \(context_window\) is 0; it must be a whole number"):
            sampling.generate(model, torch.tensor([1]), 1)


def test_non_contiguous_inputs_give_the_same_results():
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    strided = logits.t().contiguous().t()
    assert not strided.is_contiguous()
    for options in (dict(temperature=0.7, top_k=3), dict(temperature=1.3, top_p=0.6)):
        assert torch.equal(sampling.next_token_probabilities(strided, **options),
                           sampling.next_token_probabilities(logits, **options))
        assert torch.equal(sampling.sample_next_token(strided, generator=torch.Generator().manual_seed(1), **options),
                           sampling.sample_next_token(logits, generator=torch.Generator().manual_seed(1), **options))
    model = lm.CountingBigram(torch.softmax(torch.randn(5, 5, generator=torch.Generator().manual_seed(2)), -1))
    prompt = torch.tensor([[1, 2, 3], [4, 0, 1]]).t()  # (3, 2), not contiguous
    assert torch.equal(sampling.generate(model, prompt, 4, generator=torch.Generator().manual_seed(3)),
                       sampling.generate(model, prompt.contiguous(), 4, generator=torch.Generator().manual_seed(3)))


def test_generate_stops_at_the_stop_token_and_fills_finished_rows():
    cycle = torch.full((4, 4), 1e-9)
    for a in range(4):
        cycle[a, (a + 1) % 4] = 1.0  # 0 -> 1 -> 2 -> 3 -> 0
    model = lm.CountingBigram(lm.bigram_probabilities(cycle, smoothing=0), block_size=8)
    assert sampling.generate(model, torch.tensor([1]), 10, temperature=0, stop_token=3).tolist() == [1, 2, 3]
    # row 0 reaches 3 after two tokens, row 1 after three: row 0 is filled with the stop token, then both end
    batch = sampling.generate(model, torch.tensor([[1], [0]]), 10, temperature=0, stop_token=3)
    assert batch.tolist() == [[1, 2, 3, 3], [0, 1, 2, 3]]
    # never drawn within the budget: the full length; a tensor id works like an int
    assert sampling.generate(model, torch.tensor([0]), 2, temperature=0, stop_token=torch.tensor(3)).tolist() == [0, 1, 2]
    gpt = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    greedy = gpt.generate(torch.tensor([1, 2]), 6, temperature=0)
    stop = int(greedy[-1])
    first = 2 + greedy[2:].tolist().index(stop)   # where greedy decoding first draws it
    assert torch.equal(gpt.generate(torch.tensor([1, 2]), 6, temperature=0, stop_token=stop), greedy[:first + 1])
    for bad, message in ((-1, "integer >= 0"), (2.0, "integer >= 0"), (True, "integer >= 0"), (4, "ids 0 to 3")):
        with pytest.raises(ValueError, match=message):
            sampling.generate(model, torch.tensor([0]), 2, stop_token=bad)
