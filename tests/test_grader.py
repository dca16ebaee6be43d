"""`minillm grade` on a class of fake submissions made from the real chapter 00 notebooks.

The expected score of every submission is asserted exactly. One grading run serves all tests (each
submission runs in its own process under nbval, which takes seconds).
"""
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from minillm.grader import (GUARD, ExerciseResult, GraderError, Submission, find_submissions, grade, prepare,
                            write_reports)
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


def without(nb, cell_id):
    return {**nb, "cells": [c for c in nb["cells"] if c["id"] != cell_id]}


def moved(nb, cell_id, index):
    """`nb` with cell `cell_id` moved to position `index` (None: the end)."""
    nb = copy.deepcopy(nb)
    moving = cell(nb, cell_id)
    nb["cells"].remove(moving)
    nb["cells"].insert(len(nb["cells"]) if index is None else index, moving)
    return nb


def without_ids(nb):
    """`nb` as nbformat 4.4 saves it (Jupyter before 2021, some other tools): no cell ids."""
    nb = copy.deepcopy(nb)
    nb["nbformat_minor"] = 4
    for c in nb["cells"]:
        del c["id"]
    return nb


def write(folder: Path, student: str, nb: dict) -> None:
    (folder / student).mkdir(parents=True)
    (folder / student / "00_setup.ipynb").write_text(json.dumps(nb))


WRONG_FLOPS = "def matmul_flops(m, k, n):\n    return m * k * n\n"
FLOAT_FLOPS = "def matmul_flops(m, k, n):\n    return 2.0 * m * k * n\n"
WRONG_BYTES = "def copy_bytes(n_elements, bytes_per_element):\n    return n_elements * bytes_per_element\n"
LOOP = "def matmul_flops(m, k, n):\n    return 2*m*k*n\nwhile True:\n    pass\n"
# Wrong answers that print the check's line themselves, with the check's AssertionError hidden: by the function
# that shows errors, or by an input transformer that wraps each line of every later cell in a try/except.
HIDDEN_ERROR = "get_ipython()._showtraceback = lambda *a, **k: None\ndef matmul_flops(m, k, n):\n" \
               "    print('✓ ex00.1')\n    return m * k * n\n"
SWALLOWED = "get_ipython().input_transformers_post.append(lambda lines: [f'try:\\n    {line.rstrip()}\\n" \
            "except BaseException:\\n    pass\\n' for line in lines])\n" \
            "def matmul_flops(m, k, n):\n    print('✓ ex00.1')\n    return m * k * n\n"

SHADOWS = "list = [1, 2, 3]\nprint = lambda *args, **kwargs: None\n"


def _source(c):
    return "".join(c["source"]) if isinstance(c["source"], list) else c["source"]


CLASS = {
    "all_correct": (SOLUTION, {"ex00.1": "passed", "ex00.2": "passed"}, 2),
    "one_wrong": (with_source(SOLUTION, "ex00-1", WRONG_FLOPS), {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "check_edited_to_pass": (with_source(with_source(SOLUTION, "ex00-1", WRONG_FLOPS), "check-ex00-1", "pass"),
                             {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "check_deleted": ({**SOLUTION, "cells": [c for c in SOLUTION["cells"] if c["id"] != "check-ex00-2"]},
                      {"ex00.1": "passed", "ex00.2": "passed"}, 2),
    "infinite_loop": (with_source(SOLUTION, "ex00-1", LOOP), {"ex00.1": "timeout", "ex00.2": "passed"}, 1),
    "syntax_error": (with_source(SOLUTION, "ex00-2", "def copy_bytes(n, b)\n    return 2 * n * b\n"),
                     {"ex00.1": "passed", "ex00.2": "error"}, 1),
    "untouched_stubs": (STUDENT, {"ex00.1": "error", "ex00.2": "error"}, 0),
    "float_answer": (with_source(SOLUTION, "ex00-1", FLOAT_FLOPS), {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    # a copy of the ex00.1 check pasted above the exercise (new id): the official one still runs after it
    "check_copied_above": ({**SOLUTION, "cells": [{**copy.deepcopy(cell(SOLUTION, "check-ex00-1")), "id": "pasted"}]
                            + copy.deepcopy(SOLUTION["cells"])}, {"ex00.1": "passed", "ex00.2": "passed"}, 2),
    # cheats: an exception handler that swallows the check's AssertionError; a replaced grading.check
    "handler_hides_errors": (with_source(SOLUTION, "ex00-1", "get_ipython().set_custom_exc((BaseException,), "
                                         "lambda *a, **k: None)\n" + WRONG_FLOPS),
                             {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "check_replaced": (with_source(SOLUTION, "ex00-1", "import minillm.grading\nminillm.grading.check = "
                                   "lambda *a, **k: print('✓')\n" + WRONG_FLOPS),
                       {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "check_replaced_prints_its_line": (with_source(SOLUTION, "ex00-1", "import minillm.grading\nminillm.grading."
                                                   "check = lambda gid, *a, **k: print(f'✓ {gid}')\n" + WRONG_FLOPS),
                                       {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "error_output_hidden": (with_source(SOLUTION, "ex00-1", HIDDEN_ERROR), {"ex00.1": "failed", "ex00.2": "passed"},
                            1),
    "error_swallowed_by_transformer": (with_source(SOLUTION, "ex00-1", SWALLOWED),
                                       {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    # a check moved below course code that imports the library's copy_bytes would test that one, not the answer
    "check_moved_to_the_end": (moved(with_source(SOLUTION, "ex00-2", WRONG_BYTES), "check-ex00-2", None),
                               {"ex00.1": "passed", "ex00.2": "failed"}, 1),
    "check_moved_to_the_top": (moved(SOLUTION, "check-ex00-2", 2), {"ex00.1": "passed", "ex00.2": "passed"}, 2),
    # notebooks without cell ids: a deleted check goes after its exercise (was: at the end, after time-one's
    # `from minillm.cost import matmul_flops`), and a cell of the exercise that times out costs its points
    "no_ids_check_deleted_wrong": (without_ids(without(with_source(SOLUTION, "ex00-1", WRONG_FLOPS),
                                                       "check-ex00-1")), {"ex00.1": "failed", "ex00.2": "passed"}, 1),
    "no_ids_check_deleted": (without_ids(without(SOLUTION, "check-ex00-2")), {"ex00.1": "passed", "ex00.2": "passed"},
                             2),
    "no_ids_infinite_loop": (without_ids(with_source(SOLUTION, "ex00-1", LOOP)),
                             {"ex00.1": "timeout", "ex00.2": "passed"}, 1),
    # names of builtins rebound by the notebook: the restored checks do not use them (was: `list = [...]` made every
    # check an error, `print = ...` every check a failure; a replaced check with `list` rebound passed)
    "builtins_rebound": (with_source(SOLUTION, "parameters", SHADOWS + _source(cell(SOLUTION, "parameters"))),
                         {"ex00.1": "passed", "ex00.2": "passed"}, 2),
    "check_replaced_list_rebound": (with_source(SOLUTION, "ex00-1", "import minillm.grading\nminillm.grading.check = "
                                                "lambda gid, *a, **k: print(f'✓ {gid}')\nlist = lambda *a: []\n"
                                                + WRONG_FLOPS), {"ex00.1": "failed", "ex00.2": "passed"}, 1),
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


def test_grades_of_students_not_graded_again_are_kept_not_replaced(tmp_path):
    def graded(student):
        return Submission(student, tmp_path / f"{student}.ipynb", "00", [ExerciseResult("ex00.1", 1, 1, "passed")])

    out = tmp_path / "grades"
    write_reports([graded("alice"), graded("bob")], out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        csv_path, json_path = write_reports([graded("bob"), graded("alice")], out)   # the class graded again: replaced
    assert sorted(p.name for p in out.iterdir()) == ["grades.csv", "grades.json"]
    earlier = csv_path.read_text(), json_path.read_text()
    assert earlier[0].splitlines()[1].startswith("bob,")
    with pytest.warns(UserWarning, match=r"1 student\(s\) not graded in this run \(alice\): the earlier grades are"):
        write_reports([graded("bob")], out)   # a late submission graded into the class's --out (was: alice lost)
    kept = sorted(p for p in out.iterdir() if p.name not in ("grades.csv", "grades.json"))
    assert [p.suffix for p in kept] == [".csv", ".json"] and (kept[0].read_text(), kept[1].read_text()) == earlier
    assert "alice" not in csv_path.read_text() and "bob" in csv_path.read_text()


def test_names_and_messages_that_look_like_formulas_are_text_in_the_csv(tmp_path):
    import csv
    student = '=HYPERLINK("http://example.com/x","open")'
    sub = Submission(student, tmp_path / "x.ipynb", "00", [ExerciseResult("ex00.1", 1, 0, "error", "@SUM(1)")])
    csv_path, json_path = write_reports([sub], tmp_path / "out")
    (row,) = csv.DictReader(csv_path.open(encoding="utf-8"))
    assert (row["student"], row["message"]) == ("'" + student, "'@SUM(1)")   # was: the formula itself
    assert json.loads(json_path.read_text())[0]["student"] == student    # the JSON keeps the name as it is


def test_prepare_reinserts_deleted_check_after_its_exercise():
    nb = {**SOLUTION, "cells": [c for c in SOLUTION["cells"] if c["id"] != "check-ex00-1"]}
    cells = prepare(nb, SOLUTION)["cells"]
    ids = [c["id"] for c in cells]
    assert ids.index("check-ex00-1") == ids.index("ex00-1") + 2   # after the grader's guard cell
    assert cells[ids.index("ex00-1") + 1]["source"] == GUARD


def shape(nb):
    """What runs, in order: each code cell's first 60 characters (a restored check's differ only after those)."""
    return [source(c)[:60] for c in nb["cells"] if c["cell_type"] == "code"]


def source(c):
    return "".join(c["source"]) if isinstance(c["source"], list) else c["source"]


def test_a_notebook_without_cell_ids_is_prepared_as_one_with_them():
    """Ids stripped (nbformat 4.4) or replaced by another tool, a check deleted or moved: each check still runs
    right after its exercise and before the course's next code cell. (Without ids a deleted ex00.1 check went to
    the end, after time-one's `from minillm.cost import matmul_flops`, so a wrong answer passed; a check moved to
    the end ran after bandwidth's `from minillm.cost import copy_bytes`.)"""
    import nbformat

    renamed = copy.deepcopy(SOLUTION)
    for c in renamed["cells"]:
        c["id"] = f"new-{c['id']}"      # other ids, as a tool that makes new ones gives
    expected = shape(prepare(SOLUTION, SOLUTION))
    variants = {
        "no ids": without_ids(SOLUTION), "new ids": renamed,
        "no ids, ex00.1 check deleted": without_ids(without(SOLUTION, "check-ex00-1")),
        "no ids, ex00.2 check deleted": without_ids(without(SOLUTION, "check-ex00-2")),
        "new ids, both checks deleted": without(without(renamed, "new-check-ex00-1"), "new-check-ex00-2"),
        "check moved to the end": moved(SOLUTION, "check-ex00-2", None),
        "check moved to the top": moved(SOLUTION, "check-ex00-1", 0),
        "no ids, check moved to the end": without_ids(moved(SOLUTION, "check-ex00-1", None)),
    }
    for name, nb in variants.items():
        given = copy.deepcopy(nb)
        prepared = prepare(nb, SOLUTION)
        assert nb == given, name                                   # the student's notebook is not changed
        assert shape(prepared) == expected, name
        nbformat.validate(nbformat.from_dict(prepared))          # format 4.5, every cell with a valid id
        ids = [c["id"] for c in prepared["cells"]]
        assert len(ids) == len(set(ids)), name
        assert [c["id"] for c in prepared["cells"] if c["metadata"].get("nbgrader", {}).get("grade")] \
            == ["check-ex00-1", "check-ex00-2"], name


def test_copies_of_a_check_keep_their_code_and_only_the_official_check_is_graded():
    nb = copy.deepcopy(SOLUTION)
    check = cell(nb, "check-ex00-2")
    nb["cells"] += [{**copy.deepcopy(check), "id": "mine", "source": "print('✓ ex00.2')"},   # a copy, edited
                    {**copy.deepcopy(cell(nb, "env")), "id": "check-ex00-2", "source": "x = 1"}]  # took its id
    check["metadata"]["nbgrader"]["grade_id"] = "ex00.9"        # the check's metadata changed
    for prepared in (prepare(nb, SOLUTION), prepare(without_ids(nb), SOLUTION)):
        cells = prepared["cells"]
        graded = [c for c in cells if c["metadata"].get("nbgrader", {}).get("grade")]
        assert [c["id"] for c in graded] == ["check-ex00-1", "check-ex00-2"]
        assert all("minillm grade: the check ran to its end" in source(c) for c in graded)
        ids = [c["id"] for c in cells]
        assert len(ids) == len(set(ids))
        kept = [source(c) for c in cells]
        assert "print('✓ ex00.2')" in kept and "x = 1" in kept    # the student's code stays, ungraded
        at = {source(c): i for i, c in enumerate(cells)}
        assert cells.index(graded[1]) < at[source(cell(SOLUTION, "bandwidth"))]
        assert cells.index(graded[1]) > at[source(cell(SOLUTION, "ex00-2"))]


def test_a_check_whose_exercise_cannot_be_found_says_where_it_ran():
    from minillm.grader import score

    nb = without_ids(without(SOLUTION, "check-ex00-1"))
    answer = next(c for c in nb["cells"] if "def matmul_flops" in source(c))
    answer["metadata"], answer["source"] = {}, WRONG_FLOPS      # neither its id, nor its grade_id, nor its source
    prepared = prepare(nb, SOLUTION)
    cells = prepared["cells"]
    at = next(i for i, c in enumerate(cells) if c.get("id") == "check-ex00-1")
    assert source(cells[at - 2]) == source(cell(SOLUTION, "flops-md"))   # after the last cell it could place
    note = cells[at]["metadata"]["minillm_grade"]["note"]
    assert "'flops-md'" in note and "'ex00-1'" in note and "'ex00.1-solution'" in note
    outcomes = {"check-ex00-1": {"status": "error", "ename": "NameError", "message": "NameError: matmul_flops"},
                "check-ex00-2": {"status": "passed"}}
    results = score(SOLUTION, outcomes, "", prepared)
    assert results[0].message == f"NameError: matmul_flops ({note})" and results[1].message == ""
    unrecognizable = without_ids(SOLUTION)
    for c in unrecognizable["cells"]:
        c["metadata"], c["source"] = {}, source(c) + "\n# mine"
    unrecognizable["cells"].append(copy.deepcopy(cell(SOLUTION, "check-ex00-1")))   # only the ex00.1 check kept
    with pytest.raises(GraderError, match="cannot place the check ex00.2: no cell of the course notebook was"):
        prepare(unrecognizable, SOLUTION)   # it would have to go at the end, after bandwidth's import


def test_a_timeout_in_a_cell_without_an_official_id_costs_its_exercise():
    from minillm.grader import score

    prepared = prepare(without_ids(SOLUTION), SOLUTION)
    outcomes = {c["id"]: {"status": "passed"} for c in prepared["cells"] if c["cell_type"] == "code"}
    answer = next(c["id"] for c in prepared["cells"] if "def matmul_flops" in source(c))
    outcomes[answer] = {"status": "timeout", "message": "Timeout of 9 seconds exceeded executing cell"}
    results = score(SOLUTION, outcomes, "", prepared)
    assert [(e.status, e.points) for e in results] == [("timeout", 0), ("passed", 1)]   # was: passed
    assert "Timeout of 9 seconds" in results[0].message


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
        "top_level_array": ([], "holds an array"),
        "null": (None, "holds null"),
        "cell_is_a_string": ({**SOLUTION, "cells": ["print(1)"] + SOLUTION["cells"]}, "cell 1 is a string"),
        "cell_without_type": ({**SOLUTION, "cells": [{"source": "x", "metadata": {}}] + SOLUTION["cells"]},
                              "cell 1 has no cell_type"),
        "metadata_null": ({**SOLUTION, "cells": [{**check, "metadata": None}] + SOLUTION["cells"]},
                          "cell 1's metadata is null"),
        "nbgrader_null": ({**SOLUTION, "cells": [{**check, "metadata": {"nbgrader": None}}] + SOLUTION["cells"]},
                          "cell 1's nbgrader metadata is null"),
        "grade_id_int": ({**SOLUTION, "cells": [{**check, "metadata": {"nbgrader": {"grade_id": 5}}}]
                          + SOLUTION["cells"]}, "cell 1's grade_id is 5"),
        "source_number": ({**SOLUTION, "cells": [{**check, "source": 3}] + SOLUTION["cells"]},
                          "cell 1's source is a number"),
        # was: run, then "nbval could not run the notebook ... NBFormatError" (a grader error naming nbval)
        "nbformat_5": ({**SOLUTION, "nbformat": 5}, "it has nbformat 5, which no Jupyter reads"),
    }
    for student, (nb, _) in malformed.items():
        (tmp_path / f"{student}.ipynb").write_text(json.dumps(nb))
    (tmp_path / "fine.ipynb").write_text(json.dumps(SOLUTION))
    subs = {s.student: s for s in grade([tmp_path], chapter="00", progress=False)}
    for student, (_, reason) in malformed.items():
        assert subs[student].grader_error.startswith("cannot read") and reason in subs[student].grader_error, student
    assert not subs["fine"].grader_error and [e.grade_id for e in subs["fine"].exercises] == ["ex00.1", "ex00.2"]
    rows = write_reports(list(subs.values()), tmp_path / "out")[0].read_text().splitlines()
    assert sum("grader-error" in row for row in rows) == len(malformed)


def tiny_notebook(path: Path, sources: dict) -> Path:
    """A notebook of code cells {id: source}, the cells that run_submission's tests need and no more."""
    cells = [{"id": cid, "cell_type": "code", "source": src, "metadata": {}, "outputs": [], "execution_count": None}
             for cid, src in sources.items()]
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "cells": cells, "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}))
    return path


def stopped(pid: int) -> bool:
    """True when process `pid` has ended (a zombie no one has reaped yet counts as ended)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"
        except (FileNotFoundError, ProcessLookupError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_results_are_written_after_every_cell_and_a_dead_kernel_is_reported(tmp_path):
    from minillm.grader import KERNEL_STOPPED, run_submission

    nb = tiny_notebook(tmp_path / "nb.ipynb", {
        "first": "x = 1",
        # Runs while the notebook is still going: the first cell's outcome must already be on disk.
        "reads_results": "import json, os\n"
                         "results = json.loads(json.load(open(os.environ['MINILLM_GRADER_RESULTS']))['results'])\n"
                         "assert results['cells']['first'] == {'status': 'passed'}, results\n"
                         "assert results['kernel_pid'] == os.getpid(), results",
        "dies": "import os\nos._exit(1)",
        "after": "assert x == 1",
    })
    outcomes, note = run_submission(nb, cell_timeout=10, notebook_timeout=300, workdir=tmp_path)
    assert note == ""
    assert outcomes["first"] == {"status": "passed"} and outcomes["reads_results"] == {"status": "passed"}, outcomes
    assert outcomes["dies"]["status"] == "timeout" and "may have died" in outcomes["dies"]["message"]
    assert "\x1b[" not in outcomes["dies"]["message"]
    assert outcomes["after"]["status"] == "error" and outcomes["after"]["ename"] == KERNEL_STOPPED


def test_the_notebook_time_limit_keeps_what_ran_and_stops_the_kernel(tmp_path):
    from minillm.grader import run_submission

    # The limit must leave time for the first cell, which a busy machine may not: retry with a longer one
    # until the hanging cell was reached, so the test does not depend on how fast the machine is today.
    for limit in (20, 60, 180):
        workdir = tmp_path / f"limit{limit}"
        workdir.mkdir()
        nb = tiny_notebook(workdir / "nb.ipynb", {
            "first": "x = 1",
            # The kernel starts a process of its own (a DataLoader worker, say), then never finishes.
            "hangs": "import os, pathlib, subprocess, sys\n"
                     "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                     "pathlib.Path('reached').write_text(f'{os.getpid()} {child.pid}')\nwhile True:\n    pass",
        })
        start = time.monotonic()
        outcomes, note = run_submission(nb, cell_timeout=600, notebook_timeout=limit, workdir=workdir)
        if (workdir / "reached").exists():
            break
    assert (workdir / "reached").exists(), "the hanging cell never started, even with a 180 s limit"
    assert time.monotonic() - start < limit + 30
    assert note == f"the notebook ran past the {limit} s limit"
    assert outcomes == {"first": {"status": "passed"}}
    kernel, child = map(int, (workdir / "reached").read_text().split())
    deadline = time.monotonic() + 10
    while not (stopped(kernel) and stopped(child)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stopped(kernel), f"the kernel (pid {kernel}) still runs after the time limit"
    assert stopped(child), f"the kernel's child process (pid {child}) still runs after the time limit"


def test_results_written_by_the_notebook_are_not_trusted(tmp_path):
    from minillm.grader import run_submission

    # The notebook writes a record of passed checks where the plugin writes its own, then stops pytest before the
    # plugin writes again. Was: both checks passed, for a notebook that answers nothing.
    nb = tiny_notebook(tmp_path / "nb.ipynb", {
        "forges": "import json, os, signal\n"
                  "json.dump({'cells': {'check-ex00-1': {'status': 'passed'}, 'check-ex00-2': {'status': 'passed'}}},\n"
                  "          open(os.environ['MINILLM_GRADER_RESULTS'], 'w'))\n"
                  "os.kill(os.getppid(), signal.SIGKILL)",
        "check-ex00-1": "raise NotImplementedError",
    })
    with pytest.raises(GraderError, match="rewrote the grader's record of its results"):
        run_submission(nb, cell_timeout=10, notebook_timeout=120, workdir=tmp_path)


def test_a_notebook_nbval_cannot_run_is_a_grader_error_not_a_zero(tmp_path):
    from minillm.grader import run_submission

    (tmp_path / "nb.ipynb").write_text("{not a notebook")
    with pytest.raises(GraderError, match="nbval could not run the notebook"):
        run_submission(tmp_path / "nb.ipynb", cell_timeout=10, notebook_timeout=120, workdir=tmp_path)


def test_score_keeps_passed_checks_before_a_stop():
    from minillm.grader import KERNEL_STOPPED, score

    stopped_cell = {"status": "error", "ename": KERNEL_STOPPED, "message": "the kernel had stopped before this cell"}
    limit = {"check-ex00-1": {"status": "passed"}}
    assert [(e.grade_id, e.status, e.points) for e in score(SOLUTION, limit, "the notebook ran past the 9 s limit")] \
        == [("ex00.1", "passed", 1), ("ex00.2", "timeout", 0)]
    died_in_exercise = {"check-ex00-1": {"status": "passed"},
                        "ex00-2": {"status": "timeout", "message": "Timeout of 9 seconds (it may have died)"},
                        "check-ex00-2": stopped_cell}
    results = score(SOLUTION, died_in_exercise, "")
    assert [(e.status, e.points) for e in results] == [("passed", 1), ("timeout", 0)]
    assert "may have died" in results[1].message
    died_in_check = {"check-ex00-1": {"status": "passed"}, "check-ex00-2": stopped_cell}
    results = score(SOLUTION, died_in_check, "")
    assert [(e.status, e.points) for e in results] == [("passed", 1), ("missing", 0)]
    assert results[1].message == stopped_cell["message"]


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
    (tmp_path / "class" / "bob" / "scratch.ipynb").write_text(json.dumps({"cells": [], "metadata": {}}))
    (tmp_path / "class" / "__MACOSX").mkdir()
    (tmp_path / "class" / "__MACOSX" / "._carol.ipynb").write_bytes(junk)
    (tmp_path / "class" / "._carol.ipynb").write_bytes(junk)
    (tmp_path / "class" / "carol.ipynb").write_text(json.dumps(SOLUTION))
    found = {s.student: (s.path.relative_to(tmp_path / "class"), s.grader_error)
             for s in find_submissions([tmp_path / "class"], "01")}
    assert found["alice"] == (Path("alice/renamed.ipynb"), "")
    assert found["bob"][0] == Path("bob") and "no chapter 01 notebook" in found["bob"][1]
    assert found["carol"] == (Path("carol.ipynb"), "")
    assert len(found) == 3
    by_chapter_00 = {s.student: s for s in find_submissions([tmp_path / "class"], "0")}
    assert by_chapter_00["alice"].path.name == "00_setup.ipynb"
    assert by_chapter_00["bob"].path.relative_to(tmp_path / "class") == Path("bob/work/00_setup.ipynb")
    no_chapter = {s.student: s for s in find_submissions([tmp_path / "class"])}
    assert "several course notebooks" in no_chapter["alice"].grader_error    # 00 and 01: which one?
    assert no_chapter["bob"].path.name == "00_setup.ipynb" and not no_chapter["bob"].grader_error  # scratch skipped
    files = [tmp_path / "class" / "alice" / "00_setup.ipynb", tmp_path / "class" / "bob" / "work" / "00_setup.ipynb",
             tmp_path / "class" / "carol.ipynb"]
    assert [s.student for s in find_submissions(files)] == ["alice", "work", "carol"]


def test_a_file_given_with_its_students_folder_settles_which_notebook_counts(tmp_path):
    write(tmp_path / "class", "bob", SOLUTION)
    chosen = tmp_path / "class" / "bob" / "00_setup-Copy1.ipynb"
    chosen.write_text(json.dumps(STUDENT))
    write(tmp_path / "class", "carol", SOLUTION)
    (error,) = [s.grader_error for s in find_submissions([tmp_path / "class"], "00") if s.grader_error]
    assert f"say {chosen}): it is graded as bob" in error   # was: "pass the one to grade"
    carol = ("carol", tmp_path / "class" / "carol" / "00_setup.ipynb", "")
    for inputs in ([tmp_path / "class", chosen], [chosen, tmp_path / "class"]):
        # was: bob's grader error, and the chosen file graded again as a student named "00_setup-Copy1"
        assert [(s.student, s.path, s.grader_error) for s in find_submissions(inputs, "00")] == [("bob", chosen, ""),
                                                                                                 carol]


def test_unknown_extra_tests_and_bad_timeouts_are_refused(tmp_path):
    write(tmp_path, "alice", SOLUTION)
    extra = tmp_path / "private"
    extra.mkdir()
    (extra / "ex00.1.py").write_text("assert True\n")
    (extra / "ex00_2.py").write_text("assert False\n")  # a typo: ex00.2
    with pytest.raises(GraderError, match=r"ex00_2\.py.*would never run.*ex00\.1, ex00\.2"):
        grade([tmp_path / "alice"], chapter="00", extra_tests=extra, progress=False)
    for option in ("cell_timeout", "notebook_timeout"):
        for bad in (0, -5, float("nan"), float("inf"), True, "60"):
            with pytest.raises(GraderError, match=f"--{option.replace('_', '-')} .*give a number of seconds above 0"):
                grade([tmp_path / "alice"], chapter="00", progress=False, **{option: bad})


def test_grading_refuses_early_what_would_waste_the_run(tmp_path, capsys):
    from minillm.cli import main
    write(tmp_path / "class", "alice", SOLUTION)
    with pytest.raises(GraderError, match="no chapter 99"):       # was: one complaint per submission
        grade([tmp_path / "class"], chapter="99", progress=False)
    (tmp_path / "afile").write_text("")
    started = time.perf_counter()
    assert main(["grade", str(tmp_path / "class"), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert time.perf_counter() - started < 5                       # refused before any notebook ran
    (tmp_path / "out" / "grades.csv").mkdir(parents=True)         # was: graded the class, then failed to write
    assert main(["grade", str(tmp_path / "class"), "--out", str(tmp_path / "out")]) == 2
    assert "grades.csv is a folder" in capsys.readouterr().err
    assert time.perf_counter() - started < 10
    nb = copy.deepcopy(SOLUTION)
    del nb["nbformat"]                                             # was read as format 3: every check "missing"
    (tmp_path / "headless.ipynb").write_text(json.dumps(nb))
    (sub,) = grade([tmp_path / "headless.ipynb"], progress=False)
    assert "nbformat" in sub.grader_error and not sub.exercises


def test_a_notebook_named_twice_is_graded_once(tmp_path):
    write(tmp_path, "alice", SOLUTION)
    found = find_submissions([tmp_path, tmp_path / "alice" / "00_setup.ipynb", tmp_path])
    assert [sub.student for sub in found] == ["alice"]


def test_prepare_keeps_an_answer_cell_that_took_a_checks_metadata():
    nb = copy.deepcopy(SOLUTION)
    cell(nb, "ex00-1")["metadata"]["nbgrader"] = copy.deepcopy(cell(nb, "check-ex00-1")["metadata"]["nbgrader"])
    prepared = prepare(nb, SOLUTION)
    ids = [c.get("id") for c in prepared["cells"]]
    assert ids.index("ex00-1") < ids.index("check-ex00-1")        # was: the answer replaced by the check
    assert "def matmul_flops" in "".join(cell(prepared, "ex00-1")["source"])
    assert "nbgrader" not in cell(prepared, "ex00-1")["metadata"]


class _FakePytest:
    """Stands in for the nbval process: writes `log` to its stdout and, when given, `cells` as the results."""
    runs = []

    def __init__(self, command, cwd, env, stdout, stderr, pass_fds, *, log, cells, key=None):
        from minillm.grader import KEY_FD_ENV, seal

        _FakePytest.runs.append(command)
        stdout.write(log)
        fd = int(env[KEY_FD_ENV])
        assert fd in pass_fds
        real_key = os.read(fd, 100).decode()
        if cells is not None:
            Path(env["MINILLM_GRADER_RESULTS"]).write_text(seal(real_key if key is None else key, {"cells": cells}))
        self.returncode = 0 if cells else 1

    def wait(self, timeout=None):
        return self.returncode

    def poll(self):
        return self.returncode


@pytest.mark.parametrize("first_log, retried", [
    ("ERROR sub.ipynb::Cell 0 - RuntimeError: Kernel died before replying to kernel_info", True),
    ("ERROR collecting sub.ipynb - nbformat.reader.NotJSONError", False),
])
def test_a_kernel_that_dies_while_starting_is_started_again(tmp_path, monkeypatch, first_log, retried):
    from minillm import grader

    outcomes = iter([(first_log, None), ("1 passed", {"a": {"status": "passed"}})])

    def popen(command, **kwargs):
        log, cells = next(outcomes)
        return _FakePytest(command, log=log, cells=cells, **kwargs)
    _FakePytest.runs = []
    monkeypatch.setattr(grader.subprocess, "Popen", popen)
    assert grader.RESULTS_ENV == "MINILLM_GRADER_RESULTS"
    if retried:
        assert grader.run_submission(tmp_path / "sub.ipynb", 5, 60, tmp_path) == ({"a": {"status": "passed"}}, "")
        assert len(_FakePytest.runs) == 2
    else:   # the notebook itself is at fault: no second run, a grader error that shows the log
        with pytest.raises(GraderError, match="NotJSONError"):
            grader.run_submission(tmp_path / "sub.ipynb", 5, 60, tmp_path)
        assert len(_FakePytest.runs) == 1


@pytest.mark.parametrize("written", ["unsigned", "other key", "not JSON", "cells not a dict"])
def test_a_results_file_the_plugin_did_not_sign_is_a_grader_error(tmp_path, monkeypatch, written):
    from minillm import grader

    cells = {"check-ex00-1": {"status": "passed"}}

    def popen(command, **kwargs):
        fake = _FakePytest(command, log="", cells=cells, key="0" * 32, **kwargs)
        results = Path(kwargs["env"][grader.RESULTS_ENV])
        if written == "unsigned":
            results.write_text(json.dumps({"cells": cells}))
        elif written == "not JSON":
            results.write_text("{")
        elif written == "cells not a dict":   # was: a TypeError in score() that stopped the whole class's grading
            results.write_text(json.dumps({"results": json.dumps({"cells": ["x"]}), "mac": "0"}))
        return fake
    monkeypatch.setattr(grader.subprocess, "Popen", popen)
    with pytest.raises(GraderError, match="rewrote the grader's record"):
        grader.run_submission(tmp_path / "sub.ipynb", 5, 60, tmp_path)


def test_grades_that_cannot_be_written_to_out_are_kept_elsewhere(tmp_path, capsys, monkeypatch):
    import minillm.grader as grader
    from minillm.cli import main
    write(tmp_path / "class", "alice", SOLUTION)
    real = grader.write_reports

    def disk_full(submissions, out_dir):
        if Path(out_dir) == tmp_path / "out":
            raise OSError(28, "No space left on device")
        return real(submissions, out_dir)
    monkeypatch.setattr(grader, "write_reports", disk_full)
    assert main(["grade", str(tmp_path / "class"), "--chapter", "00", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and "they are in" in err
    rescue = Path(err.split("they are in ")[1].split()[0])
    assert [row["student"] for row in json.loads((rescue / "grades.json").read_text())] == ["alice"]


def test_a_timeout_names_the_students_cell_not_its_number_in_the_graders_copy(graded):
    # before: "Timeout of 30 seconds exceeded executing cell: 7", a number counted in the prepared copy
    sub = graded[0]["infinite_loop"]
    message = next(e.message for e in sub.exercises if e.grade_id == "ex00.1")
    assert message.startswith("the cell 'ex00-1' (") and "ran past the 30 s limit for one cell" in message, message
    assert "executing cell" not in message
