"""Check cells: right answers print one line, wrong ones raise AssertionError with a hint, stubs raise."""
import linecache
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm import grading
from minillm.notebooks import load

ROOT = Path(__file__).resolve().parents[1]


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


def test_a_failed_check_shows_the_students_frames_not_the_checkers():
    """Under the cell a student sees their own code; the checker's source (which holds the reference) stays out."""
    import traceback

    def frames(error):
        return [(Path(frame.filename).name, frame.name) for frame in traceback.extract_tb(error.__traceback__)]

    def helper_of_the_student(m):
        raise NotImplementedError("exercise ex00.1: replace this line with your code")

    def stub(m, k, n):
        return helper_of_the_student(m)

    with pytest.raises(NotImplementedError, match="replace this line") as error:
        grading.check("ex00.1", stub)
    assert frames(error.value)[-2:] == [("test_grading.py", "stub"), ("test_grading.py", "helper_of_the_student")]
    assert not any(name.startswith("ch00") for name, _ in frames(error.value))
    with pytest.raises(AssertionError, match="Hint") as error:   # the checker's verdict: no frame of minillm/checks
        grading.check("ex00.1", lambda m, k, n: m * k * n)
    assert frames(error.value)[-1] == ("grading.py", "check")
    assert not any(name.startswith("ch00") or fn == "<lambda>" for name, fn in frames(error.value))

    def chained(m, k, n):   # the student's own chain of causes stays
        try:
            return {}["flops"]
        except KeyError as missing:
            raise ValueError("flops missing") from missing
    with pytest.raises(ValueError, match="flops missing") as error:
        grading.check("ex00.1", chained)
    assert isinstance(error.value.__cause__, KeyError) and frames(error.value)[-1] == ("test_grading.py", "chained")

    def interrupted(m, k, n):   # Ctrl-C in the student's code: their frame, no checker frame
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as error:
        grading.check("ex00.1", interrupted)
    assert not any(name.startswith("ch00") for name, _ in frames(error.value))
    assert frames(error.value)[-1] == ("test_grading.py", "interrupted")

    def merge_pair(ids, pair, new_id):   # called by minillm.tokenizers, which the checker calls
        raise IndexError("a bug of the student's")
    with pytest.raises(IndexError, match="a bug of the student's") as error:
        grading.check("ex01.3", merge_pair)
    assert [name for name, _ in frames(error.value)][-2:] == ["grading.py", "test_grading.py"]


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


def test_expect_close_refuses_text():
    for text in ("123", b"123", "1e3"):
        with pytest.raises(AssertionError, match="expected a number"):
            grading.expect_close(text, float(text), "text")
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex00.1", lambda m, k, n: str(2 * m * k * n))
    with pytest.raises(AssertionError, match="shape"):
        grading.expect_close(torch.ones(3), 1.0, "many numbers")
    grading.expect_close(torch.tensor(2.0), 2.0, "one-element tensor")
    grading.expect_close(np.float32(2.0), 2.0, "numpy scalar")


# --- the reference solutions, and correct answers in other forms, pass -----------------------------------------

SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def _solution_namespace(path: Path) -> tuple[dict, list[str]]:
    """Run a solution notebook's exercise cells (only those) and return their namespace and check cells."""
    import math

    import torch.nn.functional as F

    import minillm
    namespace = {"math": math, "torch": torch, "F": F, "minillm": minillm}
    if path.name.startswith("02"):
        triton = pytest.importorskip("triton")
        import triton.language as tl
        namespace.update(triton=triton, tl=tl)
    checks = []
    for cell in load(path)["cells"]:
        meta = cell["metadata"].get("nbgrader", {})
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if meta.get("solution"):
            exec(compile(source, f"{path.name}:{cell['id']}", "exec"), namespace)
        elif meta.get("grade"):
            checks.append(source)
    return namespace, checks


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_reference_solutions_pass_their_checks(path, capsys):
    namespace, checks = _solution_namespace(path)
    assert checks
    for source in checks:
        exec(source, namespace)
    out = capsys.readouterr().out
    assert out.count("✓") == len(checks), out


def _route(logits, bias, top_k, scale):
    affinity = torch.sigmoid(logits)
    index = (affinity + bias).topk(top_k, dim=-1).indices
    chosen = affinity.gather(1, index)
    return index, chosen / chosen.sum(dim=-1, keepdim=True) * scale


def _nll(probabilities, ids):
    chosen = probabilities[ids[:-1], ids[1:]].double()
    nll = float(-chosen.log().mean())
    return nll, math.exp(nll)


def test_correct_answers_in_other_forms_pass():
    grading.check("ex04.1", lambda *args: list(_route(*args)))        # a list, not a tuple
    grading.check("ex04.1", lambda *args: (_route(*args)[0].int(), _route(*args)[1].double()))
    grading.check("ex01.2", lambda p, ids: [torch.tensor(value) for value in _nll(p, ids)])

    def in_place_bias(bias, load, gamma):  # the bias handed over is a copy: updating it and returning it is fine
        load = load.float()
        bias += gamma * torch.sign(load.mean() - load)
        return bias
    grading.check("ex04.2", in_place_bias)


# --- inputs changed in place: a failure that says so, never a pass -------------------------------------------------

def _nll_clamped(probabilities, ids):  # wrong smoothing that changes the checker's table, then the right formula
    probabilities.clamp_(min=0.5 / probabilities.shape[0])
    return _nll(probabilities, ids)


def _nll_filled(probabilities, ids):  # makes the table uniform, then answers for a uniform table
    probabilities.fill_(1 / probabilities.shape[0])
    return math.log(probabilities.shape[0]), float(probabilities.shape[0])


def _route_inplace(logits, bias, top_k, scale):
    affinity = logits.sigmoid_()
    index = (affinity + bias).topk(top_k, dim=-1).indices
    chosen = affinity.gather(1, index)
    return index, chosen / chosen.sum(dim=-1, keepdim=True) * scale


def _attention_scaling_q_in_place(q, k, v):
    q.div_(math.sqrt(q.shape[-1]))
    time = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)).masked_fill(torch.ones(time, time, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def _counts_sorting_ids(ids, vocab_size):
    counts = torch.zeros(vocab_size, vocab_size)
    counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
    ids.copy_(ids.flip(0))
    return counts


@pytest.mark.parametrize("grade_id, answer, name", [
    ("ex01.2", _nll_clamped, "probabilities"), ("ex01.2", _nll_filled, "probabilities"),
    ("ex04.1", _route_inplace, "logits"), ("ex03.1", _attention_scaling_q_in_place, "q"),
    ("ex01.1", _counts_sorting_ids, "ids")])
def test_changing_an_input_in_place_fails_and_says_so(grade_id, answer, name):
    with pytest.raises(AssertionError, match=f"changed its input {name} in place"):
        grading.check(grade_id, answer)


# --- wrong answers get a failure with a hint, not an exception -----------------------------------------------------

def _dispatch_float32(x, expert_index, gate_weight, experts):
    from minillm.moe import reference_moe_loop
    return reference_moe_loop(x, expert_index, gate_weight, experts).float()


@pytest.mark.parametrize("grade_id, answers, message", [
    ("ex01.2", [lambda p, ids: (-p[ids[:-1], ids[1:]].log(), 1.0)], "tensor of shape"),
    ("ex04.1", [lambda *args: (_route(*args)[0], _route(*args)[1].tolist())], "gate_weight must be a tensor"),
    ("ex04.1", [lambda *args: [*_route(*args), None]], "pair"),
    ("ex04.3", [_dispatch_float32], "float32"),
    ("ex04.2", [lambda bias, load, gamma: None], "None"),
    ("ex03.2", [lambda x, h: x.view(*x.shape[:2], h, -1).transpose(1, 2),
                lambda y: y.transpose(1, 2).view(y.shape[0], y.shape[2], -1)], "contiguous"),
])
def test_wrong_shapes_and_types_fail_with_a_hint(grade_id, answers, message):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check(grade_id, *answers)
    assert message in str(failure.value)


# --- chapter 02 kernels: strided views catch mixed-up strides; a kernel must not write into its inputs -------------

def _solution_kernel(grade_id: str, old: str, new: str):
    """The reference kernel of chapter 02 with one line changed (the way a learner might get it wrong)."""
    path = next(p for p in SOLUTIONS if p.name.startswith("02"))
    namespace, _ = _solution_namespace(path)
    cell = next(c for c in load(path)["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id)
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    assert old in source, f"{grade_id}: the solution no longer contains {old!r}; update this test"
    source = source.replace(old, new)
    filename = f"<{grade_id}-wrong>"
    # Registered as IPython registers a cell's source, so that inspect.getsource finds it.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return namespace[source.split("def ", 1)[1].split("(", 1)[0]]


@pytest.mark.parametrize("grade_id, old, new, message", [
    ("ex02.3-solution", "out_ptr + row * out_row_stride", "out_ptr + row * in_row_stride", "wrote outside the rows"),
    ("ex02.3-solution", "in_ptr + row * in_row_stride", "in_ptr + row * n_cols", "values differ"),
    ("ex02.4-solution", "a_ptrs += BLOCK_K * stride_ak", "a_ptrs += BLOCK_K", "values differ"),
    ("ex02.4-solution", "b_ptrs += BLOCK_K * stride_bk", "b_ptrs += BLOCK_K * N", "values differ"),
    ("ex02.2-solution", "    tl.store(out_ptr + offsets, x + y, mask=mask)",
     "    tl.store(out_ptr + offsets, x + y, mask=mask)\n    tl.store(x_ptr + offsets, x + y, mask=mask)",
     "changed its input x in place"),
    ("ex02.2-solution", "x = tl.load(x_ptr + offsets, mask=mask)", "x = tl.load(x_ptr + offsets)", "has no mask"),
    ("ex02.3-solution", ", mask=in_row, other=-float(\"inf\"))", ")", "has no mask"),
    # found in review: mask=None, a K mask on A only (B reads past K), a row loop without its step
    ("ex02.2-solution", "x = tl.load(x_ptr + offsets, mask=mask)", "x = tl.load(x_ptr + offsets, mask=None)",
     "has no mask"),
    ("ex02.4-solution", "b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)",   # masks A only
     "b = tl.load(b_ptrs, mask=ks[:, None] < K + 99, other=0.0)", "both with a mask"),
    ("ex02.3-solution", "range(first_row, n_rows, row_step)", "range(first_row, n_rows)", "exactly one program"),
])
def test_kernels_with_wrong_strides_or_writes_fail(grade_id, old, new, message):
    kernel = _solution_kernel(grade_id, old, new)
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check(grade_id.removesuffix("-solution"), kernel)
    assert message in str(failure.value)


def test_add_kernel_check_takes_a_mask_passed_by_position():
    kernel = _solution_kernel("ex02.2-solution", "tl.load(y_ptr + offsets, mask=mask)",
                              "tl.load(y_ptr + offsets, mask)")
    grading.check("ex02.2", kernel)


# --- answers found by adversarial review: wrong ones fail with a hint, right ones in other forms pass ----------------

def _sample(logits, temperature, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator).squeeze(-1)


def _sample_first_row_only(logits, temperature, generator=None):  # every row drawn from row 0's distribution
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits[0] / temperature, dim=-1)
    return torch.multinomial(probabilities, logits.shape[0], replacement=True, generator=generator)


@pytest.mark.parametrize("answer, message", [
    (lambda logits, t, g=None: _sample(logits, t, None), "same generator seed"),            # ignores the generator
    (_sample_first_row_only, "own distribution"),
    (lambda logits, t, g=None: torch.tensor([1, 0, 2]) if t == 0 else _sample(logits, t, g), "temperature=0"),
    (lambda logits, t, g=None: None, "not token ids"),
    (lambda logits, t, g=None: (logits.argmax(-1), None)[1] if t == 0 else _sample(logits, t, g), "not token ids"),
])
def test_sampling_wrong_answers_found_in_review_fail(answer, message):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex01.5", answer)
    assert message in str(failure.value)


def test_merge_pair_other_forms_and_a_number_instead_of_a_list():
    from minillm.tokenizers import _merge   # the library's merge step, wrapped in other return types
    grading.check("ex01.3", lambda ids, pair, new_id: torch.tensor(_merge(ids, pair, new_id), dtype=torch.long))
    grading.check("ex01.3", lambda ids, pair, new_id: tuple(_merge(ids, pair, new_id)))
    with pytest.raises(AssertionError, match="returned int"):
        grading.check("ex01.3", lambda ids, pair, new_id: len(_merge(ids, pair, new_id)))


def _split_two_heads(x, n_head):  # right for the first example (n_head=2), sizes fixed for it
    return x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)


def _split(x, n_head):
    return x.view(x.shape[0], x.shape[1], n_head, -1).transpose(1, 2)


@pytest.mark.parametrize("split, merge, message", [
    (_split_two_heads, lambda y: y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1), "split_heads(x of shape"),
    (_split, lambda y: y.transpose(1, 2).reshape(y.shape[0], -1, 8), "merge_heads(y of shape"),
    (_split, lambda y: y.transpose(1, 2).reshape(y.shape[0], y.shape[2], 2 * y.shape[3]), "invalid for input"),
])
def test_heads_with_sizes_fixed_for_one_example_fail_with_a_hint(split, merge, message):
    with pytest.raises(AssertionError, match="Hint") as failure:
        grading.check("ex03.2", split, merge)
    assert message in str(failure.value)


@pytest.mark.parametrize("grade_id, right", [
    ("ex00.1", lambda m, k, n: 2 * m * k * n), ("ex00.2", lambda n, size: 2 * n * size),
    ("ex01.4", lambda nll, tokens, n_bytes: nll * tokens / (n_bytes * math.log(2))),
    ("ex02.1", lambda m, k, n, size: 2 * m * k * n / ((m * k + k * n + m * n) * size)),
    ("ex03.4", lambda tokens, flops, peak: tokens * flops / peak),
])
def test_a_table_of_the_checks_own_answers_fails(grade_id, right, capsys):
    table = {}

    def recorder(*args):
        table[args] = right(*args)
        return table[args]
    grading.check(grade_id, recorder)
    with pytest.raises(AssertionError):
        grading.check(grade_id, lambda *args: table.get(args, 0))


def test_parameter_count_table_fails():
    from minillm.model import GPT
    table = {}

    def recorder(config):
        table[repr(config)] = GPT(config).num_parameters()
        return table[repr(config)]
    grading.check("ex03.3", recorder)
    with pytest.raises(AssertionError, match="Hint"):
        grading.check("ex03.3", lambda config: table.get(repr(config), 0))


def test_a_kernel_refused_for_its_dtype_gets_the_fp32_hint_and_others_the_pointer_hint():
    from minillm.checks import ch02

    class FakeKernel:   # kernel[grid](...) as Triton launches it; the error as a GPU compile wraps it
        def __init__(self, error):
            self.error = error

        def __getitem__(self, grid):
            def launch(*args, **meta):
                try:
                    raise ValueError("Expected dtype ['fp32', 'fp64'] but got fp16")
                except ValueError as inner:
                    raise RuntimeError("at 5:20: compilation failed") from inner if self.error == "dtype" else None
            return launch

    with pytest.raises(AssertionError, match=r"refused the input's dtype.*tl\.float32"):
        ch02._launch(FakeKernel("dtype"), (1,))
    with pytest.raises(AssertionError, match="pointer arithmetic and mask") as caught:
        ch02._launch(FakeKernel("other"), (1,))
    assert "float32" not in str(caught.value)


# --- an answer cannot decide for itself that it matches the reference ------------------------------------------

class _AlwaysEqualInt(int):
    __hash__ = int.__hash__

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False


class _AlwaysEqualList(list):
    __eq__, __ne__ = _AlwaysEqualInt.__eq__, _AlwaysEqualInt.__ne__


class _EqualToAnything:
    __eq__, __ne__ = _AlwaysEqualInt.__eq__, _AlwaysEqualInt.__ne__


class _AgreeingTensor(torch.Tensor):
    """A tensor that answers torch.allclose and torch.equal itself: True."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})


def test_an_answer_that_decides_its_own_comparison_fails():
    """Each of these swallowed the check's comparison, so a wrong answer passed."""
    with pytest.raises(AssertionError, match="values differ"):
        grading.check("ex01.1", lambda ids, size: torch.zeros(size, size).as_subclass(_AgreeingTensor))
    with pytest.raises(AssertionError, match="values differ"):
        grading.expect_close(torch.zeros(3).as_subclass(_AgreeingTensor), torch.ones(3), "a tensor")

    class Router:   # a callable object, not a function; its tensors agree with torch.equal and torch.allclose
        def __call__(self, logits, bias, top_k, scale):
            zeros = torch.zeros(logits.shape[0], top_k).as_subclass(_AgreeingTensor)
            return zeros.long(), zeros
    with pytest.raises(AssertionError, match="different experts"):
        grading.check("ex04.1", Router())
    for wrong in (_AlwaysEqualList([0]), [_AlwaysEqualInt(0)], _EqualToAnything(), (_EqualToAnything(),)):
        with pytest.raises(AssertionError, match="expected"):
            grading.expect_equal(wrong, [1], "a list")
    with pytest.raises(AssertionError, match="built-in Python values"):
        grading.expect_equal([_EqualToAnything()], [1], "a list")
    with pytest.raises(AssertionError, match="expected 7"):
        grading.expect_equal(_AlwaysEqualInt(0), 7, "a number")


def test_answers_of_other_plain_types_still_pass():
    grading.expect_equal([np.int64(1), torch.tensor(2), 3], [1, 2, 3], "numbers of numpy and torch")
    grading.expect_equal(torch.Size([2, 3]), (2, 3), "a shape")
    grading.expect_equal(_AlwaysEqualInt(7), 7, "an int subclass of the right value")
    grading.expect_close(torch.nn.Parameter(torch.ones(2)), torch.ones(2), "a parameter")
    assert type(grading.plain(torch.ones(2).as_subclass(_AgreeingTensor))) is torch.Tensor
    assert grading.plain({"a": (_AlwaysEqualInt(1), [2.5])}) == {"a": (1, [2.5])}
    # numpy floats are no float subclass, but an equal one is a right answer; an unequal one is not
    grading.expect_equal([np.float32(0.5), np.float64(1.25)], [0.5, 1.25], "numpy floats")
    with pytest.raises(AssertionError, match="expected"):
        grading.expect_equal(np.float32(0.25), 0.5, "a numpy float")


def test_only_functions_are_wrapped_modules_and_classes_keep_their_attributes():
    layer = torch.nn.Linear(2, 2)
    assert grading._returning_plain(layer) is layer   # .parameters() and friends must stay reachable
    assert grading._returning_plain(torch.nn.Linear) is torch.nn.Linear
    wrapped = grading._returning_plain(lambda: [_AlwaysEqualInt(3)])
    assert type(wrapped()[0]) is int
