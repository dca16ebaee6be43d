"""Check cells: right answers print one line, wrong ones raise AssertionError with a hint, stubs raise."""
import pytest
import torch

from minillm import grading


def test_right_answer_prints_one_deterministic_line(capsys):
    points = grading.check("ex00.1", lambda m, k, n: 2 * m * k * n)
    out = capsys.readouterr().out
    assert points == 1
    assert out.startswith("✓ ex00.1 ") and out.count("\n") == 1


@pytest.mark.parametrize("wrong", [lambda m, k, n: m * k * n, lambda m, k, n: 2 * m * n, lambda m, k, n: "lots"])
def test_wrong_answer_raises_with_hint(wrong):
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex00.1", wrong)


def test_stub_raises_not_implemented():
    def stub(m, k, n):
        raise NotImplementedError("exercise ex00.1")
    with pytest.raises(NotImplementedError):
        grading.check("ex00.1", stub)


def test_unknown_exercise_and_bad_ids():
    with pytest.raises(KeyError, match="ex00.1"):
        grading.check("ex00.99", lambda: 0)
    with pytest.raises(KeyError, match="no checks"):
        grading.check("ex97.1", lambda: 0)
    with pytest.raises(ValueError, match="look like"):
        grading.check("chapter0", lambda: 0)


def test_expect_close_tensors():
    grading.expect_close(torch.ones(3), torch.ones(3), "same")
    with pytest.raises(AssertionError, match="shape"):
        grading.expect_close(torch.ones(3), torch.ones(4), "shapes")
    with pytest.raises(AssertionError, match="differ"):
        grading.expect_close(torch.ones(3), torch.zeros(3), "values")
    with pytest.raises(AssertionError, match="torch.Tensor"):
        grading.expect_close([1.0], torch.ones(1), "type")
