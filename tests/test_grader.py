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


def test_malformed_submissions_are_grader_errors_and_the_rest_are_graded(tmp_path, monkeypatch):
    from minillm import grader

    monkeypatch.setattr(grader, "run_submission", lambda path, cell_timeout, notebook_timeout, workdir: ({}, ""))
    check = cell(SOLUTION, "check-ex00-1")
    malformed = {
        "top_level_array": [],
        "null": None,
        "cell_is_a_string": {**SOLUTION, "cells": ["print(1)"] + SOLUTION["cells"]},
        "cell_without_type": {**SOLUTION, "cells": [{"source": "x", "metadata": {}}] + SOLUTION["cells"]},
        "metadata_null": {**SOLUTION, "cells": [{**check, "metadata": None}] + SOLUTION["cells"]},
        "nbgrader_null": {**SOLUTION, "cells": [{**check, "metadata": {"nbgrader": None}}] + SOLUTION["cells"]},
        "grade_id_int": {**SOLUTION, "cells": [{**check, "metadata": {"nbgrader": {"grade_id": 5}}}]
                         + SOLUTION["cells"]},
    }
    reasons = {"top_level_array": "holds an array", "null": "holds null", "cell_is_a_string": "cell 1 is a string",
               "cell_without_type": "cell 1 has no cell_type", "metadata_null": "metadata is null",
               "nbgrader_null": "nbgrader metadata is null", "grade_id_int": "grade_id is 5"}
    for student, nb in malformed.items():
        (tmp_path / f"{student}.ipynb").write_text(json.dumps(nb))
    (tmp_path / "fine.ipynb").write_text(json.dumps(SOLUTION))
    subs = {s.student: s for s in grade([tmp_path], chapter="00", progress=False)}
    for student, reason in reasons.items():
        assert subs[student].grader_error.startswith("cannot read") and reason in subs[student].grader_error
    assert not subs["fine"].grader_error and [e.grade_id for e in subs["fine"].exercises] == ["ex00.1", "ex00.2"]
    rows = write_reports(list(subs.values()), tmp_path / "out")[0].read_text().splitlines()
    assert sum("grader-error" in row for row in rows) == len(malformed)


def tiny(between: str) -> dict:
    """The two exercises and their checks only, with a code cell `between` them."""
    nb = copy.deepcopy(SOLUTION)
    nb["cells"] = [c for c in nb["cells"] if c["id"] in ("ex00-1", "check-ex00-1", "ex00-2", "check-ex00-2")]
    nb["cells"].insert(2, {**copy.deepcopy(nb["cells"][0]), "id": "between", "source": between, "metadata": {}})
    return nb


def test_time_limit_and_dead_kernel_keep_the_checks_that_ran(tmp_path):
    write(tmp_path, "hangs", tiny("import time\nwhile True:\n    time.sleep(0.2)\n"))
    write(tmp_path, "kernel_dies", tiny("import os\nos._exit(1)\n"))
    limit = 45  # room for the first check on a busy machine; the kernel's death is noticed long before
    subs = {s.student: s for s in grade([tmp_path], chapter="00", cell_timeout=120, notebook_timeout=limit,
                                        progress=False, jobs=2)}
    hangs = {e.grade_id: (e.status, e.points, e.message) for e in subs["hangs"].exercises}
    assert hangs == {"ex00.1": ("passed", 1, ""),
                     "ex00.2": ("timeout", 0, f"the notebook ran past the {limit} s limit")}
    died = {e.grade_id: (e.status, e.points) for e in subs["kernel_dies"].exercises}
    assert died == {"ex00.1": ("passed", 1), "ex00.2": ("missing", 0)}, subs["kernel_dies"].cell_outcomes
    assert "kernel died" in subs["kernel_dies"].exercises[1].message
    assert subs["kernel_dies"].cell_outcomes["between"]["ename"] == "DeadKernelError"
    assert subs["kernel_dies"].seconds < limit  # noticed at once, not at the time limit


def test_find_submissions_skips_junk_picks_the_chapter_and_names_clashing_files(tmp_path):
    chapter01 = copy.deepcopy(SOLUTION)
    for c in chapter01["cells"]:
        if c["metadata"].get("nbgrader"):
            c["metadata"]["nbgrader"]["grade_id"] = c["metadata"]["nbgrader"]["grade_id"].replace("ex00.", "ex01.")
    junk = b"\x00\x05\x16\x07\xff"
    write(tmp_path / "class", "alice", SOLUTION)
    (tmp_path / "class" / "alice" / "renamed.ipynb").write_text(json.dumps(chapter01))  # chapter 01 by its ids
    (tmp_path / "class" / "bob" / "__MACOSX").mkdir(parents=True)
    (tmp_path / "class" / "bob" / "__MACOSX" / "._00_setup.ipynb").write_bytes(junk)
    write(tmp_path / "class" / "bob", "work", SOLUTION)
    (tmp_path / "class" / "__MACOSX").mkdir()
    (tmp_path / "class" / "__MACOSX" / "._carol.ipynb").write_bytes(junk)
    (tmp_path / "class" / "._carol.ipynb").write_bytes(junk)
    (tmp_path / "class" / "carol.ipynb").write_text(json.dumps(SOLUTION))
    found = {s.student: s.path.relative_to(tmp_path / "class") for s in find_submissions([tmp_path / "class"], "01")}
    assert found == {"alice": Path("alice/renamed.ipynb"), "bob": Path("bob/work/00_setup.ipynb"),
                     "carol": Path("carol.ipynb")}
    assert find_submissions([tmp_path / "class"], "0")[0].path.name == "00_setup.ipynb"
    files = [tmp_path / "class" / "alice" / "00_setup.ipynb", tmp_path / "class" / "bob" / "work" / "00_setup.ipynb",
             tmp_path / "class" / "carol.ipynb"]
    assert [s.student for s in find_submissions(files)] == ["alice", "work", "carol"]


def test_unknown_extra_tests_and_timeouts_below_one_second_are_refused(tmp_path):
    write(tmp_path, "alice", SOLUTION)
    extra = tmp_path / "private"
    extra.mkdir()
    (extra / "ex00.1.py").write_text("assert True\n")
    (extra / "ex00_2.py").write_text("assert False\n")  # a typo: ex00.2
    with pytest.raises(GraderError, match=r"ex00_2\.py.*would never run.*ex00\.1, ex00\.2"):
        grade([tmp_path / "alice"], chapter="00", extra_tests=extra, progress=False)
    for option in ("cell_timeout", "notebook_timeout"):
        with pytest.raises(GraderError, match=f"--{option.replace('_', '-')} 0: give a number of seconds above 0"):
            grade([tmp_path / "alice"], chapter="00", progress=False, **{option: 0})
