"""Benchmark for chapter 03 (pretraining): minillm's GPT training step vs Hugging Face transformers' GPT-2.

    python -m minillm.bench train [--layers 4 --heads 4 --width 128 --context 128 --vocab 1024 --batch 16]

Both models get the same shape (layers, heads, width, context, vocabulary, batch), the same device and
the same step: forward, cross-entropy, backward, AdamW. Runs alternate (minillm, transformers, minillm,
...) so that a machine busy with something else slows both alike; the best run of each is kept and the
tokens/s ratio is printed. `transformers` is a benchmark-only extra: `pip install transformers`.
"""
from __future__ import annotations


import torch

from minillm.cost import best_seconds_interleaved, resolve_device
from minillm.model import GPT, GPTConfig

__all__ = ["bench_train"]

INSTALL_HINT = ("bench train compares against Hugging Face transformers, which is not installed; "
                "install it with `pip install transformers` (a benchmark-only extra, not a minillm dependency)")


def _transformers_gpt2(layers: int, heads: int, width: int, context: int, vocab: int):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=width, n_positions=context, vocab_size=vocab,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    try:
        return GPT2LMHeadModel(config, attn_implementation="sdpa")
    except (TypeError, ValueError):
        return GPT2LMHeadModel(config)


def _step_function(model: torch.nn.Module, kind: str, inputs: torch.Tensor, targets: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if kind == "minillm":
            loss = model(inputs, targets)[1]
        else:  # transformers shifts labels itself, so pass the inputs as labels
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def bench_train(layers: int = 4, heads: int = 4, width: int = 128, context: int = 128, vocab: int = 1024,
                batch: int = 16, steps: int = 10, rounds: int = 3, device: str | None = None) -> dict:
    """Tokens/s of one training step of each model, best of `rounds` alternating timed runs of `steps` steps."""
    for name, value in dict(layers=layers, heads=heads, width=width, context=context, vocab=vocab, batch=batch,
                            steps=steps, rounds=rounds).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"bench train: --{name}={value!r} must be a positive integer")
    device = resolve_device(device, "bench train")
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=vocab, block_size=context, n_layer=layers, n_head=heads, n_embd=width)).to(device)
    theirs = _transformers_gpt2(layers, heads, width, context, vocab).to(device)
    ours.train()
    theirs.train()
    inputs = torch.randint(0, vocab, (batch, context), device=device)
    targets = torch.roll(inputs, -1, dims=1)
    steppers = {"minillm": _step_function(ours, "minillm", inputs, targets),
                "transformers": _step_function(theirs, "transformers", inputs, targets)}
    for step in steppers.values():  # warm-up: allocator, kernels, optimizer state
        step()
        step()
    # Alternate the two models, so a slow moment of the machine hits both.
    best = best_seconds_interleaved({name: (lambda step=step: [step() for _ in range(steps)])
                                     for name, step in steppers.items()}, device=device, repeats=rounds, warmup=0)
    tokens = steps * batch * context
    tokens_per_second = {name: tokens / seconds for name, seconds in best.items()}
    ratio = tokens_per_second["minillm"] / tokens_per_second["transformers"]
    import transformers
    result = {"device": str(device), "layers": layers, "heads": heads, "width": width, "context": context,
              "vocab": vocab, "batch": batch, "steps": steps, "rounds": rounds,
              "minillm_parameters": ours.num_parameters(),
              "transformers_parameters": sum(p.numel() for p in theirs.parameters()),
              "minillm_tokens_per_second": tokens_per_second["minillm"],
              "transformers_tokens_per_second": tokens_per_second["transformers"],
              "ratio": ratio, "transformers_version": transformers.__version__, "torch": torch.__version__}
    print(f"train: {layers} layers, {heads} heads, width {width}, context {context}, vocab {vocab}, batch {batch} "
          f"on {device} (torch {torch.__version__}, transformers {transformers.__version__})")
    print(f"train: minillm GPT       {result['minillm_parameters']:>10,} parameters "
          f"{tokens_per_second['minillm']:>12,.0f} tokens/s")
    print(f"train: transformers GPT2 {result['transformers_parameters']:>10,} parameters "
          f"{tokens_per_second['transformers']:>12,.0f} tokens/s")
    print(f"train: ratio minillm / transformers = {ratio:.2f}x (best of {rounds} alternating runs of {steps} steps)")
    return result


if __name__ == "__main__":
    bench_train()
