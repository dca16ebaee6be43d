"""`minillm grade` on a class of fake submissions made from the real chapter 00 notebooks.

The expected score of every submission is asserted exactly. One grading run serves all tests (each
submission runs in its own process under nbval, which takes seconds).
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.grader import GraderError, find_submissions, grade, prepare, write_reports
from minillm.notebooks import load

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = load(ROOT / "solutions" / "00_setup.ipynb")
STUDENT = load(ROOT / "notebooks" / "00_setup.ipynb")


def cell(nb, cell_id):
    return next(c for c in nb["cells"] if c["id"] == cell_id)


def with_source(nb, cell_id, source):
    nb = copy.deepcopy(nb)
    cell(nb, cell_id)["source"] = source
    return nb


def write(folder: Path, student: str, nb: dict) -> None:
    (folder / student).mkdir(parents=True)
    (folder / student / "00_setup.ipynb").write_text(json.dumps(nb))


WRONG_FLOPS = "def matmul_flops(m, k, n):\n    return m * k * n\n"
FLOAT_FLOPS = "def matmul_flops(m, k, n):\n    return 2.0 * m * k * n\n"

CLASS = {
    "all_correct": (SOLUTION, {"ex00.1": "passed", "ex00.2": "passed"}, 2),
    "one_wrong": (with_source(SOLUTION, "ex00-1", WRONG_FLOPS), {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "check_edited_to_pass": (with_source(with_source(SOLUTION, "ex00-1", WRONG_FLOPS), "check-ex00-1", "pass"),
                             {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "check_deleted": ({**SOLUTION, "cells": [c for c in SOLUTION["cells"] if c["id"] != "check-ex00-2"]},
                      {"ex00.1": "passed", "ex00.2": "passed"}, 2),
    "infinite_loop": (with_source(SOLUTION, "ex00-1", "def matmul_flops(m, k, n):\n    return 2*m*k*n\nwhile True:\n    pass\n"),
                      {"ex00.1": "timeout", "ex00.2": "passed"}, 1),
    "syntax_error": (with_source(SOLUTION, "ex00-2", "def copy_bytes(n, b)\n    return 2 * n * b\n"),
                     {"ex00.1": "passed", "ex00.2": "error"}, 1),
    "untouched_stubs": (STUDENT, {"ex00.1": "error", "ex00.2": "error"}, 0),
    "float_answer": (with_source(SOLUTION, "ex00-1", FLOAT_FLOPS), {"ex00.1": "failed", "ex00.2": "passed"}, 1),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class")
    for student, (nb, _, _) in CLASS.items():
        write(folder, student, nb)
    extra = tmp_path_factory.mktemp("private")
    (extra / "ex00.1.py").write_text("assert isinstance(matmul_flops(2, 3, 4), int), 'return an int'\n")
    submissions = grade([folder], extra_tests=extra, cell_timeout=30, notebook_timeout=300, progress=False,
                        jobs=2)
    return {s.student: s for s in submissions}, folder


@pytest.mark.parametrize("student", list(CLASS))
def test_scores_are_exact(graded, student):
    submissions, _ = graded
    sub = submissions[student]
    _, expected, points = CLASS[student]
    assert not sub.grader_error
    assert {e.grade_id: e.status for e in sub.exercises} == expected
    assert sub.points == points and sub.points_possible == 2


def test_stubs_fail_only_with_not_implemented(graded):
    sub = graded[0]["untouched_stubs"]
    assert all(e.message.startswith("NotImplementedError") for e in sub.exercises)


def test_wrong_answer_message_has_the_hint(graded):
    failed = next(e for e in graded[0]["one_wrong"].exercises if e.grade_id == "ex00.1")
    assert "Hint" in failed.message


def test_student_files_are_not_modified(graded):
    _, folder = graded
    for student, (nb, _, _) in CLASS.items():
        assert json.loads((folder / student / "00_setup.ipynb").read_text()) == nb


def test_reports_are_written(graded, tmp_path):
    submissions, _ = graded
    csv_path, json_path = write_reports(list(submissions.values()), tmp_path)
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("student,chapter,grade_id,points") and len(rows) == 1 + 2 * len(CLASS)
    data = {s["student"]: s for s in json.loads(json_path.read_text())}
    assert data["all_correct"]["points"] == 2 and data["untouched_stubs"]["points"] == 0


def test_prepare_reinserts_deleted_check_after_its_exercise():
    nb = {**SOLUTION, "cells": [c for c in SOLUTION["cells"] if c["id"] != "check-ex00-1"]}
    ids = [c["id"] for c in prepare(nb, SOLUTION)["cells"]]
    assert ids.index("check-ex00-1") == ids.index("ex00-1") + 1


def test_wrong_chapter_and_unreadable_files_are_grader_errors(tmp_path):
    other = copy.deepcopy(SOLUTION)
    for c in other["cells"]:
        meta = c["metadata"].get("nbgrader")
        if meta:
            meta["grade_id"] = meta["grade_id"].replace("ex00.", "ex01.")
    (tmp_path / "other.ipynb").write_text(json.dumps(other))
    (tmp_path / "broken.ipynb").write_text("{not json")
    subs = {s.student: s for s in grade([tmp_path], chapter="00", progress=False)}
    assert "chapter 01's notebook" in subs["other"].grader_error
    assert "cannot read" in subs["broken"].grader_error
    with pytest.raises(GraderError, match="does not exist"):
        find_submissions([tmp_path / "nobody"])
    cli = subprocess.run([sys.executable, "-m", "minillm", "grade", str(tmp_path), "--chapter", "00",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert cli.returncode == 2 and "grader error" in cli.stdout
