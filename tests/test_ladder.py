"""Chapter 03's benchmark (`python -m minillm.bench train`): runs at a tiny shape, and says how to get transformers."""
import builtins

import pytest

from minillm import bench_train as bench


def test_missing_transformers_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match="pip install transformers"):
        bench.bench_train(layers=1, heads=1, width=8, context=8, vocab=32, batch=1, steps=1, rounds=1, device="cpu")


def test_bad_option_is_a_clear_error():
    with pytest.raises(ValueError, match="--width"):
        bench.bench_train(width=0)


def test_tiny_benchmark_reports_both_speeds():
    pytest.importorskip("transformers")
    result = bench.bench_train(layers=1, heads=2, width=16, context=16, vocab=64, batch=2, steps=1, rounds=1,
                               device="cpu")
    assert result["minillm_tokens_per_second"] > 0 and result["transformers_tokens_per_second"] > 0
    assert result["ratio"] == pytest.approx(result["minillm_tokens_per_second"] / result["transformers_tokens_per_second"])
