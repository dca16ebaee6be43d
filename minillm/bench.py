"""Benchmarks that print what a trick saves on this machine: `python -m minillm.bench SUBCOMMAND`.

Each benchmark measures its baseline in the same run and prints the ratio, so the figures hold for the
machine they ran on. `bpe` belongs to chapter 01 (tokenization).

Adding a benchmark: write one function `bench_NAME(**options) -> dict` that prints plain lines and
returns its figures, then add one line to `BENCHMARKS` naming its help text and command-line options.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable

from minillm.cost import Meter, best_seconds
from minillm.data import load_corpus
from minillm.paths import file_in_the_way
from minillm.tokenizers import BPETokenizer, CharTokenizer, train_bpe_by_recount


def _naive_merge_seconds(text: str, n_merges: int) -> float:
    """Seconds per merge of the textbook trainer, which recounts every pair of every chunk each merge.

    It still counts each distinct chunk once, so the ratio printed isolates the incremental update.
    """
    return best_seconds(lambda: train_bpe_by_recount(text, n_merges), repeats=1, warmup=0) / max(n_merges, 1)


def bench_bpe(vocab_size: int = 512, corpus: str = "pydocs", baseline_merges: int = 10) -> dict:
    """Train byte-level BPE on one core; compare its token count and encode speed with characters."""
    if isinstance(baseline_merges, bool) or not isinstance(baseline_merges, int) or baseline_merges < 0:
        raise ValueError(f"bench bpe: --baseline-merges={baseline_merges!r} must be a whole number >= 0 "
                         "(0 skips the naive trainer)")
    text = load_corpus(corpus)
    n_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    if n_bytes == 0:  # nothing to train on, and every per-byte and per-token figure would divide by zero
        raise ValueError(f"bench bpe: corpus {corpus!r} is empty; give a corpus with some text")

    with Meter("bench bpe: train") as train_meter:
        bpe = BPETokenizer().train(text, vocab_size)
    train_seconds = train_meter.seconds
    n_merges = len(bpe.merges)

    with Meter("bench bpe: encode") as encode_meter:
        bpe_ids = bpe.encode(text)
    bpe_encode_seconds = encode_meter.seconds
    if bpe.decode(bpe_ids) != text:
        raise RuntimeError("bench bpe: decode(encode(text)) != text; the tokenizer is broken")

    char = CharTokenizer().train(text)
    with Meter("bench bpe: char encode") as char_meter:
        char_ids = char.encode(text)
    char_encode_seconds = char_meter.seconds

    naive_seconds_per_merge = _naive_merge_seconds(text, baseline_merges) if baseline_merges > 0 else None

    megabytes = n_bytes / 1e6
    result = {
        "corpus": corpus, "bytes": n_bytes, "vocab_size": bpe.vocab_size, "merges": n_merges,
        "train_seconds": train_seconds, "merges_per_second": n_merges / train_seconds,
        "bpe_tokens": len(bpe_ids), "char_tokens": len(char_ids),
        "bpe_bytes_per_token": n_bytes / len(bpe_ids), "char_bytes_per_token": n_bytes / len(char_ids),
        "bpe_encode_megabytes_per_second": megabytes / bpe_encode_seconds,
        "char_encode_megabytes_per_second": megabytes / char_encode_seconds,
        "naive_seconds_per_merge": naive_seconds_per_merge,
    }
    print(f"bpe: {n_merges} merges on {corpus} ({n_bytes:,} bytes) in {train_seconds:.2f} s "
          f"({result['merges_per_second']:,.0f} merges/s, vocab_size {bpe.vocab_size})")
    if naive_seconds_per_merge is not None:
        incremental_per_merge = train_seconds / max(n_merges, 1)
        print(f"bpe: naive trainer (recount all pairs each merge) measured on {baseline_merges} merges: "
              f"{naive_seconds_per_merge * 1e3:.1f} ms/merge vs {incremental_per_merge * 1e3:.2f} ms/merge "
              f"incremental (setup included), {naive_seconds_per_merge / incremental_per_merge:.0f}x")
    print(f"bpe: {len(bpe_ids):,} tokens ({result['bpe_bytes_per_token']:.2f} bytes/token) vs "
          f"{len(char_ids):,} char tokens ({result['char_bytes_per_token']:.2f} bytes/token): "
          f"{len(char_ids) / len(bpe_ids):.2f}x fewer tokens")
    print(f"bpe: encode {result['bpe_encode_megabytes_per_second']:.2f} MB/s "
          f"({bpe_encode_seconds:.2f} s) vs char encode {result['char_encode_megabytes_per_second']:.2f} MB/s "
          f"({char_encode_seconds:.3f} s)")
    return result


def _whole_number(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, else a usage error naming the option's meaning."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ({what})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} must be >= {minimum} ({what})")
        return value
    parse.__name__ = "whole number"
    return parse


def _expert_counts(text: str) -> str:
    """--experts: comma-separated whole numbers >= 1, checked before anything runs; bench_moe takes the text."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated expert counts >= 1, e.g. 8,16,32")
    return text


@dataclass
class Benchmark:
    run: Callable[..., dict]
    help: str
    # option name -> argparse.add_argument keyword arguments
    options: dict[str, dict] = field(default_factory=dict)


def bench_kernels(**options) -> dict:
    # Imported on use, so `python -m minillm.bench bpe` works without Triton.
    from minillm.kernels.bench import bench_kernels as run
    return run(**options)


def bench_train(**options) -> dict:
    from minillm.bench_train import bench_train as run
    return run(**options)


def bench_moe(**options) -> dict:
    from minillm.bench_moe import bench_moe as run
    return run(**options)


def _moe_options() -> dict:
    from minillm.bench_moe import BENCH_MOE_OPTIONS
    # Checked by argparse, before the benchmark prints or changes anything (thread count, allocator).
    options = {name: dict(kwargs) for name, kwargs in BENCH_MOE_OPTIONS.items()}
    for name, kwargs in options.items():
        if kwargs.get("type") is int:
            kwargs["type"] = _positive
    if "--experts" in options:
        options["--experts"]["type"] = _expert_counts
    return options


_positive = _whole_number(1, "a positive count")


BENCHMARKS: dict[str, Benchmark] = {
    "bpe": Benchmark(bench_bpe, "train byte-level BPE; tokens and encode speed vs characters (chapter 01)", {
        "--vocab-size": dict(type=_whole_number(1, "a vocabulary size"), default=512,
                             help="BPE vocabulary size, >= 256 (default 512)"),
        "--corpus": dict(default="pydocs", help="corpus name for minillm.data.load_corpus (default pydocs)"),
        "--baseline-merges": dict(type=_whole_number(0, "merges, 0 to skip"), default=10,
                                  help="merges to time with the naive recount trainer, 0 to skip (default 10)"),
    }),
    "kernels": Benchmark(bench_kernels, "each Triton kernel vs torch on this GPU; writes "
                         "benchmarks/kernels-<gpu>-<date>.json (chapter 02)", {
        "--size": dict(type=int, default=4096, help="square matmul size, at least 64 (default 4096)"),
        "--out-dir": dict(default=None, help="folder for the JSON (default benchmarks/)"),
    }),
    "train": Benchmark(bench_train, "minillm's GPT training step vs transformers' GPT2LMHeadModel at the same "
                       "shape, tokens/s (chapter 03; needs pip install transformers)", {
        "--layers": dict(type=_positive, default=4), "--heads": dict(type=_positive, default=4),
        "--width": dict(type=_positive, default=128), "--context": dict(type=_positive, default=128),
        "--vocab": dict(type=_positive, default=1024), "--batch": dict(type=_positive, default=16),
        "--steps": dict(type=_positive, default=10, help="timed training steps per round"),
        "--rounds": dict(type=_positive, default=3, help="alternating rounds of both models"),
        "--device": dict(default=None, help="cpu, cuda or mps (default: the fastest available)"),
    }),
    "moe": Benchmark(bench_moe, "MoE layer forward+backward tokens/s: sorted dispatch vs the naive per-expert "
                     "loop, the same dispatch left to autograd, transformers' Mixtral block, and the "
                     "experts' matmuls alone (chapter 04)", _moe_options()),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minillm.bench", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="SUBCOMMAND")
    subcommands = {}
    for name, benchmark in BENCHMARKS.items():
        subparser = subcommands[name] = subparsers.add_parser(name, help=benchmark.help, description=benchmark.help)
        for option, kwargs in benchmark.options.items():
            subparser.add_argument(option, **kwargs)
    args = vars(parser.parse_args(argv))
    name = args.pop("benchmark")
    # the subcommand's own usage line (its options), not the top-level one, goes with an error in its options
    usage_error = subcommands[name].error
    blocker = file_in_the_way(args["out_dir"]) if args.get("out_dir") else None
    if blocker is not None:
        # checked before a benchmark of minutes, which would otherwise fail only when it writes its figures
        usage_error(f"--out-dir {args['out_dir']}: {blocker} is a file, not a folder; give a folder "
                    "(it is created if missing)")
    try:
        return BENCHMARKS[name].run(**args)
    except ValueError as err:  # bad options (e.g. vocab size too small): a usage message, not a traceback
        usage_error(str(err))
    except ImportError as err:  # an optional dependency of one benchmark (transformers, triton)
        raise SystemExit(f"python -m minillm.bench {name}: {err}")
    except OSError as err:  # a folder that cannot be written, a full disk: one line naming the path
        path = getattr(err, "filename2", None) or err.filename
        raise SystemExit(f"python -m minillm.bench {name}: {err.strerror or err}" + (f" ({path})" if path else ""))
    except KeyboardInterrupt:  # Ctrl-C: the user's choice, not a crash to show a traceback for
        print(f"python -m minillm.bench {name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
