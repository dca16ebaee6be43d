"""Small language models before the GPT: bigram counts, a neural bigram, a Bengio-style MLP, and their losses.

Taught in chapter 01 (next-word prediction). Every model here follows GPT's protocol, so the course's
one training loop (`minillm.train.train`), `minillm.sampling.generate` and `evaluate_nll` work on all of
them unchanged:

    logits, loss = model(idx, targets)      # idx, targets: (batch, time) token ids; logits (batch, time, vocab)
    model.config.vocab_size, model.config.block_size
    model.flops_per_token(training=True)    # analytic matmul FLOPs, as GPT counts them
    model.configure_optimizer(lr, weight_decay, betas, device_type)
    model.context_window                    # how many previous tokens a prediction can see

Losses are in nats (natural log) per token. Perplexity is exp(loss): the number of equally likely
choices the model is as unsure as. Bits per byte divides the loss of a whole text by its UTF-8 bytes, so
models with different tokenizers compare fairly.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.kernels.reference import _wide
from minillm.model import GPT

__all__ = ["bigram_counts", "bigram_probabilities", "bigram_nll", "perplexity", "bits_per_byte",
           "BigramConfig", "CountingBigram", "NeuralBigram", "MLPConfig", "MLPLanguageModel", "evaluate_nll"]


# ---- counting --------------------------------------------------------------------------------------------

def _as_ids(ids, where: str, vocab_size: int | None = None) -> torch.Tensor:
    from_tensor = isinstance(ids, torch.Tensor)
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{where}: expected a 1-D sequence of integer token ids, got text ({type(ids).__name__}); "
                         "encode it with a tokenizer first, e.g. tokenizer.encode(text)")
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as error:  # None, strings in a list, ragged lists...
        raise ValueError(f"{where}: expected a 1-D sequence of integer token ids, got {type(ids).__name__} that "
                         f"torch cannot read as one ({error}); encode the text with a tokenizer first") from None
    if not from_tensor and ids.numel() == 0:
        ids = ids.long()  # torch makes an empty list float32; it is still an empty sequence of ids
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: expected a 1-D sequence of integer token ids, got a {ids.dtype} tensor of "
                         f"shape {tuple(ids.shape)}; encode the text with a tokenizer first")
    ids = ids.long()
    if vocab_size is not None and len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{where}: token ids range over [{int(ids.min())}, {int(ids.max())}] but vocab_size is "
                         f"{vocab_size}; pass the tokenizer's vocab_size")
    return ids


def _check_positive_int(value, name: str, where: str) -> int:
    """`value` as a Python int; any integer type (int, numpy) is accepted, bools are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name}={value!r} must be a positive integer")
    return int(value)


def bigram_counts(ids, vocab_size: int) -> torch.Tensor:
    """counts[a, b] = how often token b directly follows token a in `ids`; shape (vocab, vocab), int64."""
    vocab_size = _check_positive_int(vocab_size, "vocab_size", "bigram_counts")
    ids = _as_ids(ids, "bigram_counts", vocab_size)
    # Each (previous, next) pair becomes one cell number of the flattened table; bincount tallies them.
    cells = ids[:-1] * vocab_size + ids[1:]
    return torch.bincount(cells, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size)


def bigram_probabilities(counts: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """Rows of P(next | previous) from a count table, adding `smoothing` to every count first.

    smoothing=0 is the maximum-likelihood estimate: a pair never counted gets probability 0 (and an
    infinite loss if it ever occurs). A row with no counts at all becomes uniform.
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() != 2 or counts.shape[0] != counts.shape[1]:
        shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise ValueError(f"bigram_probabilities: counts must be a square (vocab, vocab) tensor, got {shape}; "
                         "build it with bigram_counts(ids, vocab_size)")
    if (isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not smoothing >= 0
            or not math.isfinite(smoothing)):
        raise ValueError(f"bigram_probabilities: smoothing={smoothing!r} must be a finite number >= 0 "
                         "(0: no smoothing, 1: add-one)")
    if counts.numel() == 0:
        raise ValueError("bigram_probabilities: counts is an empty (0, 0) table; a vocabulary has at least one "
                         "token: build it with bigram_counts(ids, vocab_size)")
    if counts.is_complex() or not bool(((counts.double() >= 0) & (counts.double() < math.inf)).all()):
        raise ValueError("bigram_probabilities: counts must be numbers >= 0 and finite (no negatives, NaN, inf "
                         "or complex); build them with bigram_counts(ids, vocab_size)")
    table = counts.double() + smoothing
    totals = table.sum(dim=1, keepdim=True)
    uniform = torch.full_like(table, 1.0 / table.shape[1])
    return torch.where(totals > 0, table / totals.clamp_min(1e-300), uniform)


def _check_probability_table(probabilities: torch.Tensor, where: str) -> None:
    """Refuse a table whose entries are not probabilities (counts, negatives, NaN): its loss means nothing."""
    if probabilities.is_complex() or probabilities.dtype == torch.bool:
        raise ValueError(f"{where}: probabilities must be real numbers in [0, 1], got dtype {probabilities.dtype}")
    if probabilities.numel():
        table = probabilities.double()
        low, high = torch.stack([table.min(), table.max()]).tolist()
        # NaN compares false both ways; 1e-6 leaves room for a float32 softmax that rounds up
        if not (low >= 0 and high <= 1 + 1e-6):
            got = "NaN" if math.isnan(low) else f"values in [{low}, {high}]"
            raise ValueError(f"{where}: probabilities must be numbers in [0, 1], got {got}; "
                             "for a table of counts use bigram_probabilities(counts, smoothing)")


def bigram_nll(probabilities: torch.Tensor, ids) -> float:
    """Mean negative log-likelihood (nats per token) of each next token of `ids` under a bigram table."""
    if not isinstance(probabilities, torch.Tensor) or probabilities.dim() != 2 \
            or probabilities.shape[0] != probabilities.shape[1]:
        raise ValueError("bigram_nll: probabilities must be a (vocab, vocab) tensor from bigram_probabilities")
    _check_probability_table(probabilities, "bigram_nll")
    ids = _as_ids(ids, "bigram_nll", probabilities.shape[0])
    if len(ids) < 2:
        raise ValueError(f"bigram_nll: {len(ids)} token(s) hold no (previous, next) pair; give at least 2")
    chosen = probabilities[ids[:-1], ids[1:]].double()
    return float(-chosen.log().mean())


def _as_loss(value, where: str) -> float:
    """A loss as a Python float: a number, or a one-element tensor or array such as a model's `loss`."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    else:
        kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy arrays and scalars have a dtype
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) if kind is None \
            else kind in "iuf" and getattr(value, "size", 0) == 1
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
        raise TypeError(f"{where}: mean_nll={shown} must be one number (nats per token), e.g. loss.item() or "
                        "evaluate_nll(model, tokens)")
    value = float(value.item() if hasattr(value, "item") else value)
    if value < -1e-6:   # -ln p >= 0 for every probability p <= 1; a hair below 0 is rounding
        raise ValueError(f"{where}: mean_nll={value:g} is negative, and a negative log-likelihood never is "
                         "(-ln p >= 0 for p <= 1); pass the loss itself, not a log-probability or a difference")
    return value


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL in nats): a loss of ln(V) is perplexity V, as unsure as a uniform pick among V tokens."""
    mean_nll = _as_loss(mean_nll, "perplexity")
    if math.isnan(mean_nll):
        return math.nan  # an undefined loss has an undefined perplexity, not an infinite one
    try:
        return math.exp(mean_nll)
    except OverflowError:  # above ~709.78 nats
        return math.inf


def bits_per_byte(mean_nll: float, n_tokens: int, n_bytes: int) -> float:
    """Convert a loss in nats per token into bits per UTF-8 byte of the same text.

    The text's total loss is mean_nll * n_tokens nats; divided by ln 2 it is in bits, divided by the
    bytes it covers it no longer depends on how the text was cut into tokens.
    """
    mean_nll = _as_loss(mean_nll, "bits_per_byte")
    counts = []
    for name, value in (("n_tokens", n_tokens), ("n_bytes", n_bytes)):
        # counts are whole numbers: a float (or a bool) here is a mix-up of arguments, not a count
        try:
            if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
                raise TypeError
            counts.append(operator.index(value))
        except TypeError:
            raise TypeError(f"bits_per_byte: {name}={value!r} must be an integer count, e.g. len(ids) or "
                            "len(text.encode('utf-8'))") from None
    n_tokens, n_bytes = counts
    if n_tokens < 1 or n_bytes < 1:
        raise ValueError(f"bits_per_byte: n_tokens={n_tokens} and n_bytes={n_bytes} must both be >= 1")
    return mean_nll * n_tokens / (n_bytes * math.log(2))


# ---- models that follow GPT's protocol -------------------------------------------------------------------

@dataclass
class BigramConfig:
    vocab_size: int
    block_size: int = 64   # window length train() cuts; a bigram only ever looks one token back

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size"):
            # stored as a Python int, so a numpy integer (e.g. from an array of sizes) works like an int
            setattr(self, name, _check_positive_int(getattr(self, name), name, "BigramConfig"))


@dataclass
class MLPConfig:
    vocab_size: int
    context: int = 8       # previous tokens each prediction sees (1 = a bigram)
    n_embd: int = 32       # size of each token's vector
    hidden: int = 256      # width of the tanh layer
    block_size: int = 64   # window length train() cuts; predictions are made at every position

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_embd", "hidden", "block_size"):
            # stored as a Python int, so a numpy integer (e.g. from an array of sizes) works like an int
            setattr(self, name, _check_positive_int(getattr(self, name), name, "MLPConfig"))


class _LanguageModel(nn.Module):
    """What the small models share with GPT: the loss, the optimizer, the parameter count."""

    config: BigramConfig | MLPConfig
    context_window: int

    # GPT's AdamW set-up (decay matrices, not vectors) works for any module: reuse it, don't copy it.
    configure_optimizer = GPT.configure_optimizer

    def _check_input(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Refuse what no text could give (wrong shape or dtype, ids outside the vocabulary); idx as int64.

        Targets are checked here too, before any work: same shape as idx, integer ids in the vocabulary or
        -100 (a masked position), and at least one that is not masked, else the mean loss is NaN.
        """
        name = type(self).__name__
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"{name}.forward: idx must be a (batch, time) tensor of token ids, got {shape}; "
                             "for a single sequence pass idx.unsqueeze(0)")
        # A float id is a mix-up; a bool or uint8 tensor would even index a table as a mask, silently.
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"{name}.forward: idx must hold integer token ids, got dtype {idx.dtype}; "
                             "e.g. torch.tensor([tokenizer.encode(text)])")
        if targets is not None:
            if not isinstance(targets, torch.Tensor):
                raise ValueError(f"{name}.forward: targets must be a tensor of token ids like idx, "
                                 f"got {type(targets).__name__}")
            if targets.shape != idx.shape:
                raise ValueError(f"{name}.forward: targets shape {tuple(targets.shape)} must equal idx "
                                 f"shape {tuple(idx.shape)}")
            if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool \
                    or targets.device != idx.device:
                raise ValueError(f"{name}.forward: targets must hold integer token ids (or -100 to mask a "
                                 f"position) on idx's device ({idx.device}), got {targets.dtype} on {targets.device}")
            if idx.numel() == 0:
                raise ValueError(f"{name}.forward: idx of shape {tuple(idx.shape)} holds no tokens, so the mean "
                                 "loss would be over nothing (NaN); give at least one token, or call without targets")
        vocab_size = self.config.vocab_size
        # int64 first: torch has no min or max for uint16/32/64 (numpy's token files are often uint16)
        idx = idx.long()
        if targets is not None:
            targets = targets.long()
        if idx.numel() and not torch.compiler.is_compiling():  # one wait for the device for all the checks
            checks = [idx.min(), idx.max()]
            if targets is not None:
                masked = targets == -100
                checks += [torch.where(masked, 0, targets).min(), targets.max(), (~masked).sum()]
            low, high, *target_checks = torch.stack([value.long() for value in checks]).tolist()
            if low < 0 or high >= vocab_size:
                raise ValueError(f"{name}.forward: token ids range over [{low}, {high}] but vocab_size is "
                                 f"{vocab_size}; were they made by another tokenizer?")
            if target_checks:
                target_low, target_high, unmasked = target_checks
                if target_low < 0 or target_high >= vocab_size:
                    bad = target_low if target_low < 0 else target_high
                    raise ValueError(f"{name}.forward: target {bad} is outside the vocabulary (0..{vocab_size - 1}, "
                                     "or -100 to mask a position); were the targets made by another tokenizer?")
                if unmasked == 0:
                    raise ValueError(f"{name}.forward: every target is -100 (masked), so the mean loss would be "
                                     "over no tokens (NaN); leave at least one target unmasked, or call without "
                                     "targets")
        return idx

    def _with_loss(self, logits: torch.Tensor, targets: torch.Tensor | None):
        if targets is None:
            return logits, None
        # at least float32 (as GPT): a float64 model's loss stays float64, so it can be gradchecked
        loss = F.cross_entropy(_wide(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1).long(),
                               ignore_index=-100)
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class CountingBigram(_LanguageModel):
    """The counting model as a module: its logits are the log-probabilities of a bigram table.

    Nothing in it is trained by gradients (the table is a buffer); it exists so that the counting model
    is scored, sampled and timed by the same code as the neural ones.
    """

    context_window = 1

    def __init__(self, probabilities: torch.Tensor, block_size: int = 64):
        super().__init__()
        if not isinstance(probabilities, torch.Tensor) or probabilities.dim() != 2 \
                or probabilities.shape[0] != probabilities.shape[1]:
            raise ValueError("CountingBigram: probabilities must be a square (vocab, vocab) tensor; "
                             "use CountingBigram.from_tokens(ids, vocab_size) to count one")
        if probabilities.is_complex() or probabilities.dtype == torch.bool:
            raise ValueError(f"CountingBigram: probabilities must be real numbers >= 0, got dtype "
                             f"{probabilities.dtype}")
        table = probabilities.double()
        # log of a negative or NaN entry is NaN, and a row of zeros gives a NaN loss and nothing to sample
        if table.numel() and not bool(((table >= 0) & (table < math.inf)).all() and (table.sum(dim=1) > 0).all()):
            raise ValueError("CountingBigram: probabilities must be finite numbers >= 0 with some mass in every "
                             "row; build the table with bigram_probabilities(counts, smoothing)")
        self.config = BigramConfig(probabilities.shape[0], block_size)
        self.register_buffer("log_probabilities", table.log().float())

    @classmethod
    def from_tokens(cls, ids, vocab_size: int, smoothing: float = 1.0, block_size: int = 64) -> "CountingBigram":
        return cls(bigram_probabilities(bigram_counts(ids, vocab_size), smoothing), block_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        idx = self._check_input(idx, targets)
        return self._with_loss(self.log_probabilities[idx], targets)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        return 0.0  # a table lookup: no matmul at all

    def num_parameters(self) -> int:
        return self.log_probabilities.numel()  # counted, not learnt, but still numbers the model stores


class NeuralBigram(_LanguageModel):
    """One learnt table: row `a` holds the logits of the token after `a` (the counting model, by gradients)."""

    context_window = 1

    def __init__(self, config: BigramConfig):
        super().__init__()
        if not isinstance(config, BigramConfig):
            raise TypeError(f"NeuralBigram: expected a BigramConfig, got {type(config).__name__}")
        self.config = config
        self.logits_table = nn.Embedding(config.vocab_size, config.vocab_size)
        nn.init.zeros_(self.logits_table.weight)  # start uniform: loss ln(vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        idx = self._check_input(idx, targets)
        return self._with_loss(self.logits_table(idx), targets)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        # Mathematically one_hot(a) @ W, but a row lookup does no multiply-adds: 0, like GPT's embedding.
        return 0.0


class MLPLanguageModel(_LanguageModel):
    """Bengio et al. (2003): embed the last `context` tokens, concatenate, one tanh layer, scores over the vocab.

    Predicts at every position of the input, like GPT. Positions with fewer than `context` earlier tokens
    in the window see a learnt "before the start" token in place of the missing ones.
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        if not isinstance(config, MLPConfig):
            raise TypeError(f"MLPLanguageModel: expected an MLPConfig, got {type(config).__name__}")
        self.config = config
        self.context_window = config.context
        self.start_token = config.vocab_size  # one extra embedding row
        self.token_embedding = nn.Embedding(config.vocab_size + 1, config.n_embd)
        self.hidden = nn.Linear(config.context * config.n_embd, config.hidden)
        self.output = nn.Linear(config.hidden, config.vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        # Small output weights: the first predictions are near uniform instead of confidently wrong.
        nn.init.normal_(self.output.weight, std=0.02)
        nn.init.zeros_(self.output.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        idx = self._check_input(idx, targets)
        context = self.config.context
        if idx.shape[1] == 0:  # nothing to predict; unfold below needs at least one position
            return self._with_loss(self.output.bias.new_zeros(idx.shape[0], 0, self.config.vocab_size), targets)
        padded = F.pad(idx, (context - 1, 0), value=self.start_token)
        windows = padded.unfold(1, context, 1)                      # (batch, time, context)
        vectors = self.token_embedding(windows).flatten(2)           # (batch, time, context * n_embd)
        logits = self.output(torch.tanh(self.hidden(vectors)))
        return self._with_loss(logits, targets)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """2 FLOPs per weight of the two matmuls forward; training = 3x (backward does twice the forward)."""
        config = self.config
        forward = 2.0 * (config.context * config.n_embd * config.hidden + config.hidden * config.vocab_size)
        return 3.0 * forward if training else forward


@torch.no_grad()
def evaluate_nll(model: nn.Module, tokens, block_size: int | None = None, batch_size: int = 64) -> float:
    """Mean loss (nats per token) over EVERY next token of `tokens`, in consecutive windows.

    Unlike train.estimate_loss (a fixed sample of random windows), this scores the whole text once, so
    two models are compared on exactly the same predictions. Windows start fresh, so each window's first
    positions see less context than a long-context model could use.
    """
    block_size = model.config.block_size if block_size is None else block_size
    _check_positive_int(block_size, "block_size", "evaluate_nll")
    _check_positive_int(batch_size, "batch_size", "evaluate_nll")
    tokens = _as_ids(tokens, "evaluate_nll", model.config.vocab_size)
    if len(tokens) < 2:
        raise ValueError(f"evaluate_nll: {len(tokens)} token(s) hold nothing to predict; give at least 2")
    device = _model_device(model)
    inputs, targets = tokens[:-1], tokens[1:]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        full = (len(inputs) // block_size) * block_size
        x_full = inputs[:full].view(-1, block_size)
        y_full = targets[:full].view(-1, block_size)
        batches = [(x_full[i:i + batch_size], y_full[i:i + batch_size]) for i in range(0, len(x_full), batch_size)]
        if full < len(inputs):
            batches.append((inputs[full:].unsqueeze(0), targets[full:].unsqueeze(0)))
        for x, y in batches:
            _, loss = model(x.to(device), y.to(device))
            total += loss.item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
