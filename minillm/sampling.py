"""Turning a model's scores into text: temperature, top-k, top-p (nucleus) sampling and a generation loop.

Taught in chapter 01 (next-word prediction); chapter 10 (test-time compute) samples many answers with the
same functions. Everything works on logits of shape (..., vocab) and never changes them in place.

- temperature T divides the logits: T < 1 sharpens the distribution, T > 1 flattens it, T = 0 is greedy
  (always the most likely token).
- top-k keeps the k highest-scoring tokens; top-p keeps the smallest set of most likely tokens whose
  probability adds up to at least p. Both renormalise what is left.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["top_k_filter", "top_p_filter", "next_token_probabilities", "sample_next_token", "generate"]


def _check_logits(logits, where: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{where}: logits must be a tensor of shape (..., vocab), got {type(logits).__name__}; "
                         "convert it with torch.as_tensor(logits)")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{where}: logits must be a tensor of shape (..., vocab), got {tuple(logits.shape)}")
    if logits.dtype == torch.bool or logits.is_complex():
        # argmax refuses bool, and a complex score would lose its imaginary part without a word
        raise ValueError(f"{where}: logits must be real scores (a float tensor), got dtype {logits.dtype}")


def _check_generator(generator, where: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}; "
                        "for a seed, pass generator=torch.Generator().manual_seed(seed)")


def _check_scores(logits: torch.Tensor, where: str) -> None:
    """Refuse scores no distribution can come from: NaN or +inf anywhere, or a row that is all -inf."""
    if not logits.is_floating_point() or logits.numel() == 0:
        return
    not_finite_above = ~(logits < math.inf)  # NaN or +inf
    all_minus_inf = (logits == -math.inf).all(dim=-1)
    has_nan_or_inf, has_empty_row = torch.stack([not_finite_above.any(), all_minus_inf.any()]).tolist()
    if has_nan_or_inf:
        raise ValueError(f"{where}: logits contain NaN or +inf, so they give no probabilities; the model's "
                         "output has overflowed or diverged (check the loss, the learning rate or the precision)")
    if has_empty_row:
        raise ValueError(f"{where}: a row of logits is -inf for every token, so no token can be drawn; "
                         "keep at least one token's score finite (e.g. fewer masks)")


# numbers.Real / numbers.Integral also cover numpy scalars (np.float32(0.7), np.int64(5)), as from sliders
# or arrays of settings; bools are refused although Python counts them as numbers.
def _check_options(temperature, top_k, top_p, where: str) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"{where}: temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"{where}: top_k={top_k!r} must be an integer >= 1, or None to keep every token")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"{where}: top_p={top_p!r} must be a number in (0, 1], or None to keep every token")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """A copy of `logits` where all but the k largest scores per row are -inf (ties at the k-th all stay)."""
    _check_logits(logits, "top_k_filter")
    _check_options(1.0, k, None, "top_k_filter")
    k = int(k)
    if not logits.is_floating_point():
        logits = logits.float()  # -inf has no integer form
    if k >= logits.shape[-1]:
        return logits.clone()
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """A copy of `logits` keeping the fewest most-likely tokens whose probabilities sum to >= p."""
    _check_logits(logits, "top_p_filter")
    _check_options(1.0, None, p, "top_p_filter")
    p = float(p)
    if not logits.is_floating_point():
        logits = logits.float()  # -inf has no integer form
    if p >= 1:
        # Every token is needed to reach a mass of 1. Rounding in the running sum can reach 1.0 before the
        # last token, which would drop the least likely tokens, so keep them all without summing.
        return logits.clone()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    # float64: a float32 running sum over a large vocabulary drifts by more than 1 - p for p close to 1.
    # MPS has no float64, so there the sum is taken on the CPU.
    work_device = torch.device("cpu") if logits.device.type == "mps" else logits.device
    sorted_probabilities = F.softmax(sorted_logits.to(work_device, torch.float64), dim=-1)
    # Probability mass strictly before each token: a token is kept while that mass is still below p,
    # so the most likely token is always kept.
    mass_before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities
    drop_sorted = (mass_before >= p).to(logits.device)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token_probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                             top_p: float | None = None) -> torch.Tensor:
    """The distribution `sample_next_token` draws from, as float32 probabilities of shape (..., vocab)."""
    _check_logits(logits, "next_token_probabilities")
    _check_options(temperature, top_k, top_p, "next_token_probabilities")
    # float64 scores are worked on in float64: in float32, 1e10 and 1e10 + 1 are the same number (and 1e300 is
    # inf), which would change the distribution. The result is float32 either way.
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    temperature = float(temperature)
    _check_scores(logits, "next_token_probabilities")
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    scaled = logits / temperature
    # A tiny temperature (say 1e-40, which float32 even rounds to 0) overflows logits / temperature to inf
    # or NaN, and softmax then gives NaN. Such rows are scaled after subtracting their maximum instead: the
    # best tokens score exactly 0 and the others <= 0, possibly -inf, so nothing overflows, and the
    # distribution is the right one (all mass on the best tokens, as greedy). Other rows keep the plain
    # division, so ordinary temperatures give exactly the probabilities they always did.
    overflowed = (~torch.isfinite(scaled) & torch.isfinite(logits)).any(dim=-1, keepdim=True)
    row_max = logits.amax(dim=-1, keepdim=True)
    shifted = torch.where(logits == row_max, 0.0, (logits - row_max) / temperature)
    logits = torch.where(overflowed, shifted, scaled)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return F.softmax(logits, dim=-1).float()


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row of `logits` (..., vocab); returns int64 of shape (...).

    temperature=0 returns the argmax without drawing. Pass a seeded torch.Generator to repeat a draw.
    """
    _check_logits(logits, "sample_next_token")
    _check_options(temperature, top_k, top_p, "sample_next_token")
    _check_generator(generator, "sample_next_token")
    _check_scores(logits, "sample_next_token")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = next_token_probabilities(logits, temperature, top_k, top_p)
    flat = probabilities.reshape(-1, probabilities.shape[-1])
    if generator is not None and generator.device != flat.device:
        # A generator draws on its own device (e.g. a CPU generator for reproducible GPU sampling).
        drawn = torch.multinomial(flat.to(generator.device), 1, generator=generator).to(flat.device)
    else:
        drawn = torch.multinomial(flat, 1, generator=generator)
    return drawn.view(probabilities.shape[:-1])


def _context_window(model) -> int:
    # Models that only look a few tokens back (bigram, MLP) say so; a GPT sees its whole block.
    config = getattr(model, "config", None)
    block_size = getattr(config, "block_size", None)
    window = getattr(model, "context_window", None)   # `is None`, not `or`: a window of 0 is wrong, not missing
    if window is None and block_size is None:
        raise TypeError(f"generate: {type(model).__name__} has neither context_window nor config.block_size; "
                        "give the model one of them so generate knows how much context to pass")
    for name, value in (("context_window", window), ("config.block_size", block_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise TypeError(f"generate: {type(model).__name__}'s context window ({name}) is {value!r}; it must be "
                            "a whole number of tokens >= 1")
    return int(min(w for w in (window, block_size) if w is not None))


def _last_logits(output, batch: int, model) -> torch.Tensor:
    """The scores at the last position from `model(idx)`, which must return (logits (batch, time, vocab), loss)."""
    logits = output[0] if isinstance(output, (tuple, list)) and len(output) == 2 else None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != batch:
        if isinstance(output, torch.Tensor):
            got = f"a tensor of shape {tuple(output.shape)}"
        elif isinstance(logits, torch.Tensor):
            got = f"logits of shape {tuple(logits.shape)}"
        else:
            got = type(output).__name__
        raise TypeError(f"generate: {type(model).__name__}(idx) must return (logits, loss) with logits of shape "
                        f"(batch={batch}, time, vocab), as GPT does; it returned {got}")
    return logits[:, -1, :]


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             stop_token: int | None = None) -> torch.Tensor:
    """Append up to `max_new_tokens` sampled tokens to `idx` ((time,) or (batch, time)); returns the same rank.

    Works for any model following GPT's protocol (`model(idx) -> (logits, loss)`): each step feeds the
    last `model.context_window` tokens (else `config.block_size`) and samples from the last position.
    idx may have any integer dtype that holds the model's token ids; the result keeps it.
    stop_token (e.g. the id of "<|endoftext|>"): a row that draws it is finished; it keeps the stop token
    and, while other rows of the batch go on, is filled with it; generation ends early once every row is
    finished, so the result may be shorter than prompt + max_new_tokens.
    """
    _check_options(temperature, top_k, top_p, "generate")
    _check_generator(generator, "generate")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    max_new_tokens = int(max_new_tokens)
    if stop_token is not None:
        if isinstance(stop_token, torch.Tensor) and stop_token.numel() == 1 and not stop_token.is_floating_point():
            stop_token = stop_token.item()
        if isinstance(stop_token, bool) or not isinstance(stop_token, numbers.Integral) or stop_token < 0:
            raise ValueError(f"generate: stop_token={stop_token!r} must be a token id (an integer >= 0), or None; "
                             "e.g. tokenizer.encode('<|endoftext|>')[0]")
        stop_token = int(stop_token)
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"generate: idx must have shape (time,) or (batch, time), a torch tensor of token ids, "
                         f"got {type(idx).__name__}; e.g. torch.tensor(tokenizer.encode(text))")
    if idx.dim() not in (1, 2):
        raise ValueError(f"generate: idx must have shape (time,) or (batch, time), got {tuple(idx.shape)}")
    if idx.shape[-1] == 0:
        raise ValueError("generate: the prompt is empty; give at least one token to start from")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"generate: idx must hold integer token ids, got dtype {idx.dtype}; "
                         "e.g. torch.tensor(tokenizer.encode(text))")
    window = _context_window(model)
    # The result keeps idx's dtype, so that dtype must hold every id the model can draw (uint8 stops at 255).
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    id_limit = torch.iinfo(idx.dtype).max
    if isinstance(vocab_size, numbers.Integral) and vocab_size - 1 > id_limit:
        raise ValueError(f"generate: idx has dtype {idx.dtype}, which holds ids up to {id_limit}, but the model's "
                         f"vocab_size is {vocab_size}; pass idx.long()")
    if stop_token is not None and isinstance(vocab_size, numbers.Integral) and stop_token >= vocab_size:
        raise ValueError(f"generate: stop_token={stop_token} is not a token of this model (ids 0 to "
                         f"{vocab_size - 1}); it would never be drawn")
    if max_new_tokens == 0:
        return idx.clone()  # a new tensor, as for any other length
    squeeze = idx.dim() == 1
    # Models get int64 ids whatever the prompt's integer type (embeddings refuse int16, indexing reads uint8
    # as a mask); the result is cast back to idx's dtype.
    sequence = (idx.unsqueeze(0) if squeeze else idx).long()
    was_training = model.training
    model.eval()
    try:
        finished = None
        for _ in range(max_new_tokens):
            logits = _last_logits(model(sequence[:, -window:]), sequence.shape[0], model)
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator).to(sequence.device)
            if stop_token is not None:
                if finished is not None:   # finished rows keep repeating the stop token
                    next_token = next_token.masked_fill(finished, stop_token)
                finished = next_token == stop_token if finished is None else finished | (next_token == stop_token)
            sequence = torch.cat([sequence, next_token.unsqueeze(-1)], dim=1)
            if finished is not None and finished.numel() and bool(finished.all()):   # an empty batch: full length,
                break                                                                 # as without a stop_token
    finally:
        model.train(was_training)
    if idx.dtype != torch.long and sequence.numel() and int(sequence.max()) > id_limit:
        raise ValueError(f"generate: the model drew token id {int(sequence.max())}, which idx's dtype {idx.dtype} "
                         f"cannot hold (at most {id_limit}); pass idx.long()")
    sequence = sequence.to(idx.dtype)
    return sequence.squeeze(0) if squeeze else sequence
