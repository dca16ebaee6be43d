"""Check cells for the exercises: one call per exercise, one deterministic line when right, a hint when wrong.

A check cell in a notebook looks like

    minillm.grading.check("ex00.1", matmul_flops)

The reference answer and the hints live in `minillm/checks/chNN.py`, registered with `@exercise`.
A right answer prints `✓ ex00.1 matmul FLOPs formula matches the reference (1 point)`; a wrong one raises
`AssertionError` with a hint a student can act on; an unfinished stub raises its `NotImplementedError`.
Instructors grade whole notebooks with `minillm grade` (see docs/INSTRUCTORS.md).
"""
from __future__ import annotations

import functools
import importlib
import math
import numbers
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class Exercise:
    grade_id: str
    title: str
    points: int
    checker: Callable[..., str | None]


_REGISTRY: dict[str, Exercise] = {}
_GRADE_ID = re.compile(r"^ex(\d\d)\.\d+$")


def exercise(grade_id: str, title: str, points: int = 1):
    """Register the checker of one exercise. The checker raises AssertionError (with a hint) when wrong
    and may return a short phrase that replaces the default 'matches the reference'."""
    if not _GRADE_ID.match(grade_id):
        raise ValueError(f"grade_id {grade_id!r} must look like 'ex03.2' (chapter number, dot, exercise number)")

    def register(checker):
        _REGISTRY[grade_id] = Exercise(grade_id, title, points, checker)
        return checker
    return register


def get_exercise(grade_id: str) -> Exercise:
    match = _GRADE_ID.match(grade_id)
    if not match:
        raise ValueError(f"grade_id {grade_id!r} must look like 'ex03.2'")
    if grade_id not in _REGISTRY:
        try:
            importlib.import_module(f"minillm.checks.ch{match.group(1)}")
        except ModuleNotFoundError as error:
            raise KeyError(f"no checks are defined for chapter {match.group(1)} (looked for "
                           f"minillm/checks/ch{match.group(1)}.py)") from error
    if grade_id not in _REGISTRY:
        known = ", ".join(sorted(g for g in _REGISTRY if g.startswith(f"ex{match.group(1)}."))) or "none"
        raise KeyError(f"unknown exercise {grade_id!r}; chapter {match.group(1)} has: {known}")
    return _REGISTRY[grade_id]


def check(grade_id: str, *answer: Any, **options: Any) -> int:
    """Run the registered checker on the student's answer; print one line and return the points earned.

    What the student's functions return reaches the checker as plain values (see `plain`)."""
    # What a student reads under the cell: their own frames, not minillm's. A wrong answer's hint (or a Ctrl-C
    # while the checker runs) comes with no traceback through minillm/checks, whose source, shown around the
    # raise, holds the reference; an error in the student's code (their stub's NotImplementedError, a bug, a
    # Ctrl-C there) keeps the frames from their function on, and its chain of causes, and IPython skips this
    # frame (__tracebackhide__). The exception itself is the same object: graders still see its type.
    __tracebackhide__ = True
    ex = get_exercise(grade_id)
    try:
        verdict = ex.checker(*map(_returning_plain, answer), **options) or "matches the reference"
    except BaseException as error:
        students = _from_the_students_code(error.__traceback__)
        if students is None:   # raised by minillm: the checker's verdict, whose message says it all
            raise error.with_traceback(None) from None
        raise error.with_traceback(students)
    plural = "s" if ex.points != 1 else ""
    print(f"✓ {ex.grade_id} {ex.title} {verdict} ({ex.points} point{plural})")
    return ex.points


_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


def _from_the_students_code(tb):
    """The traceback `tb` from the first frame outside the minillm package on (None if there is none): the
    checker's frames, and library code it calls the student's function through, go."""
    while tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        tb = tb.tb_next
    return tb


def plain(value):
    """`value` as the built-in type it claims to be, inside tuples, lists and dicts too: an instance of a subclass
    of bool, int, float, str, tuple, list, dict or torch.Tensor becomes one of that type. So an answer cannot
    decide for itself that it matches the reference (an int subclass whose == is always True, a tensor subclass
    whose __torch_function__ makes torch.allclose say True)."""
    if isinstance(value, torch.Tensor):
        if type(value) is torch.Tensor:
            return value
        with torch._C.DisableTorchFunctionSubclass():  # the subclass's own __torch_function__ does not run
            return torch.Tensor.as_subclass(value, torch.Tensor)
    for kind, convert in ((bool, bool), (int, int.__int__), (float, float.__float__), (str, str.__str__)):
        if isinstance(value, kind):
            return value if type(value) is kind else convert(value)
    if isinstance(value, (tuple, list)):
        items = [plain(item) for item in (tuple.__iter__ if isinstance(value, tuple) else list.__iter__)(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in dict.items(value)}
    return value


def _builtin(value):
    """A `plain` value with its numbers of other kinds as Python numbers: a one-element tensor, a numpy integer."""
    if isinstance(value, (tuple, list)):
        items = [_builtin(item) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {_builtin(key): _builtin(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if not isinstance(value, (bool, int, float, str, torch.Tensor)):
        if hasattr(type(value), "__index__"):   # numpy and other integers
            return int.__int__(operator.index(value))
        if isinstance(value, numbers.Real):   # numpy floats (np.float32 is no float subclass)
            return float.__float__(float(value))
    return value


def _is_builtin(value) -> bool:
    """True when `value` is made of built-in values only (None, bool, int, float, str, tuple, list, dict)."""
    if type(value) in (tuple, list):
        return all(_is_builtin(item) for item in value)
    if type(value) is dict:
        return all(_is_builtin(key) and _is_builtin(item) for key, item in value.items())
    return value is None or type(value) in (bool, int, float, str)


def _returning_plain(answer):
    """A student's function (or other callable) whose results are `plain`; anything else as it is: a value, or a
    Triton kernel (launched as kernel[grid](...), it returns nothing and checkers look at its type and source)."""
    # A class, a module (an nn.Module is callable too) or a Triton kernel (kernel[grid]) keeps its attributes.
    if not callable(answer) or isinstance(answer, (type, torch.nn.Module)) or hasattr(answer, "__getitem__"):
        return answer

    @functools.wraps(answer)
    def returning_plain(*args, **kwargs):
        return plain(answer(*args, **kwargs))
    return returning_plain


# Helpers for writing checkers: each raises AssertionError with a message a student can act on.

def expect_close(got, expected, what: str, rtol: float = 1e-5, atol: float = 1e-8, hint: str = "") -> None:
    """Assert two numbers or tensors agree; the message shows what was expected and what came back."""
    suffix = f" Hint: {hint}" if hint else ""
    got = plain(got)
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{what}: expected a torch.Tensor, got {type(got).__name__}.{suffix}")
        if got.shape != expected.shape:
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}.{suffix}")
        if not torch.allclose(got.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True):
            worst = (got.double() - expected.double()).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(f"{what}: values differ from the reference (largest difference {worst:.3g}).{suffix}")
        return
    got = as_number(got, what, hint)
    if not math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol):
        raise AssertionError(f"{what}: expected {expected:.6g}, got {float(got):.6g}.{suffix}")


def as_number(got, what: str, hint: str = "") -> float:
    """`got` as a float when it is one number (int, float, numpy scalar, one-element tensor); else AssertionError.

    Text is refused even when it spells a number: float("123") would accept a string where a number is due."""
    suffix = f" Hint: {hint}" if hint else ""
    got = plain(got)
    if isinstance(got, (str, bytes, bytearray)):
        raise AssertionError(f"{what}: expected a number, got the {type(got).__name__} {got!r}; return the number "
                             f"itself, not its text.{suffix}")
    if isinstance(got, torch.Tensor) and got.numel() != 1:
        raise AssertionError(f"{what}: expected one number, got a tensor of shape {tuple(got.shape)}; return a "
                             f"single value (a float, or .item() of a one-element tensor).{suffix}")
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        try:
            return float(got)
        except (TypeError, ValueError, RuntimeError):
            shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
            raise AssertionError(f"{what}: expected a number, got {type(got).__name__} {shown}.{suffix}") from None
    return float(got)


def snapshot(**inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of a checker's tensor inputs, taken before the student's function sees them (see expect_unchanged).
    Anything that is not a tensor is skipped."""
    return {name: (value, value.detach().clone()) for name, value in inputs.items() if isinstance(value, torch.Tensor)}


def expect_unchanged(saved: dict[str, tuple[torch.Tensor, torch.Tensor]], what: str, hint: str = "") -> None:
    """Assert the student's function left its inputs as they were: an answer computed by changing the checker's
    tensors in place could pass with wrong values, or fail with a misleading hint."""
    suffix = f" Hint: {hint}" if hint else ""
    for name, (live, before) in saved.items():
        live = live.detach()
        if live.shape != before.shape or not torch.allclose(live, before, rtol=0, atol=0, equal_nan=True):
            raise AssertionError(f"{what}: your function changed its input {name} in place; work on a copy "
                                 f"(x.clone()) or out-of-place ops (x / t, not x /= t or x.div_(t)).{suffix}")


def expect_equal(got, expected, what: str, hint: str = "") -> None:
    """Assert got == expected. When the reference is made of built-in values, so must the answer be (after
    `plain`): an object of another type would decide the comparison itself."""
    suffix = f" Hint: {hint}" if hint else ""
    got = plain(got)
    if _is_builtin(expected):
        got = _builtin(got)
        if not _is_builtin(got):
            shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
            raise AssertionError(f"{what}: expected {expected!r}, got {type(got).__name__} {shown}; return built-in "
                                 f"Python values (lists, tuples, ints, floats, strings), not objects of other types."
                                 f"{suffix}")
    if expected != got:
        raise AssertionError(f"{what}: expected {expected!r}, got {got!r}.{suffix}")
