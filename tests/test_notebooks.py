"""The course machinery: student twins in sync with solutions, shared first cells, stubs that fail."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm import grading
from minillm.notebooks import (BEGIN, BOOTSTRAP, END, PARAMETERS, build_notebooks, build_student, chapter_paths,
                               load, stub_solution_regions)

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = chapter_paths(folder=ROOT / "solutions")


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_chapters():
    assert SOLUTIONS and SOLUTIONS[0].name == "00_setup.ipynb"


def test_stub_keeps_indentation_and_signature():
    src = f"def f(x):\n    {BEGIN}\n    return x + 1\n    {END}\n\nprint(f)"
    out = stub_solution_regions(src, "ex01.2")
    assert "return x + 1" not in out
    assert "    raise NotImplementedError(\"exercise ex01.2" in out
    assert out.startswith("def f(x):\n    # YOUR CODE HERE") and out.endswith("print(f)")
    namespace = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="ex01.2"):
        namespace["f"](1)


@pytest.mark.parametrize("bad", [f"{BEGIN}\nx = 1", f"x = 1\n{END}", f"{BEGIN}\n{BEGIN}\n{END}\n{END}"])
def test_unbalanced_markers_are_errors(bad):
    with pytest.raises(ValueError, match="SOLUTION"):
        stub_solution_regions(bad, "ex00.1")


def _one_cell_notebook(source, cell_type="code", solution=True):
    nb = copy.deepcopy(load(SOLUTIONS[0]))
    cell = {"cell_type": cell_type, "id": "answer", "source": source,
            "metadata": {"nbgrader": {"grade_id": "ex00.1-solution", "solution": solution}}}
    if cell_type == "code":
        cell.update(outputs=[], execution_count=None)
    nb["cells"] = [cell]
    return nb


@pytest.mark.parametrize("begin, end", [
    ("# BEGIN SOLUTION", "# END SOLUTION"), ("## BEGIN SOLUTION", "## END SOLUTION"),
    ("### begin solution", "### end solution"), ("#### BEGIN SOLUTION", "#### END SOLUTION"),
    (f"{BEGIN} (ex 1)", END), ("#BEGIN SOLUTION", "#END SOLUTION")])
def test_near_miss_markers_are_errors_not_leaks(begin, end):
    nb = _one_cell_notebook(f"def f():\n    {begin}\n    return 42\n    {end}\n")
    with pytest.raises(ValueError, match="looks like a solution marker"):
        build_student(nb)


@pytest.mark.parametrize("cell_type", ["markdown", "raw"])
def test_solution_markers_outside_code_cells_are_errors(cell_type):
    for solution in (True, False):
        nb = _one_cell_notebook(f"**Answer:**\n{BEGIN}\nIt is 42.\n{END}", cell_type, solution)
        with pytest.raises(ValueError, match="only work in code cells"):
            build_student(nb)
    with pytest.raises(ValueError, match="flagged as a solution"):
        build_student(_one_cell_notebook("It is 42.", cell_type))
    build_student(_one_cell_notebook("Explain why.", cell_type, solution=False))  # ordinary prose is fine


def test_solution_cell_without_markers_is_an_error():
    with pytest.raises(ValueError, match="no '### BEGIN SOLUTION'"):
        build_student(_one_cell_notebook("def f():\n    return 42\n"))
    student = build_student(_one_cell_notebook("def f():\n    return 42\n", solution=False))  # not an exercise
    assert "return 42" in source(student["cells"][0])


def test_widget_state_is_not_shipped():
    nb = _one_cell_notebook(f"def f():\n    {BEGIN}\n    return 42\n    {END}\n")
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"m": {"value": "42"}}}}
    student = build_student(nb)
    assert "widgets" not in student["metadata"] and "42" not in json.dumps(student)
    assert "widgets" in nb["metadata"]  # the solution itself is left alone


def test_a_bad_solution_stops_the_build_before_anything_is_written(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    (solutions / SOLUTIONS[0].name).write_text(json.dumps(load(SOLUTIONS[0])))
    (solutions / "99_bad.ipynb").write_text(json.dumps(_one_cell_notebook("def f():\n    # BEGIN SOLUTION\n")))
    with pytest.raises(ValueError, match="99_bad.ipynb: cell 0 .id answer, code.*looks like a solution marker"):
        build_notebooks(verbose=False, source_dir=solutions, out_dir=notebooks)
    assert not notebooks.exists() or not list(notebooks.iterdir())


def test_build_check_detects_drift(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    nb = load(SOLUTIONS[0])
    (solutions / SOLUTIONS[0].name).write_text(json.dumps(nb))
    assert build_notebooks(check=True, source_dir=solutions, out_dir=notebooks)  # missing twin
    assert build_notebooks(verbose=False, source_dir=solutions, out_dir=notebooks) == []
    assert build_notebooks(check=True, source_dir=solutions, out_dir=notebooks) == []
    nb["cells"][-1]["source"] = "# an edit to the solution"
    (solutions / SOLUTIONS[0].name).write_text(json.dumps(nb))
    problems = build_notebooks(check=True, source_dir=solutions, out_dir=notebooks)
    assert problems and "out of date" in problems[0]


def test_repository_notebooks_are_in_sync():
    assert build_notebooks(check=True) == [], "run `minillm build-notebooks`"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_conventions(path):
    nb = load(path)
    cells = nb["cells"]
    assert source(cells[0]) == BOOTSTRAP, "first cell must be the shared bootstrap (minillm.notebooks.BOOTSTRAP)"
    assert source(cells[1]) == PARAMETERS and "parameters" in cells[1]["metadata"].get("tags", [])
    ids = [c["id"] for c in cells]
    assert len(ids) == len(set(ids)), "cell ids must be unique"
    checks = [c for c in cells if c["metadata"].get("nbgrader", {}).get("grade")]
    solutions = [c for c in cells if BEGIN in source(c)]
    assert checks and solutions, "every chapter has at least one graded exercise"
    chapter = path.name[:2]
    for cell in checks:
        meta = cell["metadata"]["nbgrader"]
        assert meta["grade_id"].startswith(f"ex{chapter}.") and meta["points"] > 0
        exercise = grading.get_exercise(meta["grade_id"])
        assert exercise.points == meta["points"]
        assert f'check("{meta["grade_id"]}"' in source(cell)
    for cell in cells:
        if cell["cell_type"] == "code":
            assert not cell["outputs"], f"{path.name}: cell {cell['id']} has outputs; solutions are stored clean"


def _top_level_names(code: str) -> set[str]:
    """Names a notebook cell sets at the top level (assignments, loops, imports, def and class)."""
    import ast
    tree = ast.parse("\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                names.add(inner.id)
            elif isinstance(inner, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in inner.names)
    return names


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_ledger_cells_read_names_that_only_one_other_cell_sets(path):
    # before: chapter 02's roofline cell and its fusion section both set `rows, cols`; rerunning the roofline
    # cell after the fusion section (as one does in JupyterLab) made the ledger label the softmax wrongly
    import ast
    cells = [c for c in load(path)["cells"] if c["cell_type"] == "code"]
    set_by = {}
    for cell in cells:
        for name in _top_level_names(source(cell)):
            set_by.setdefault(name, []).append(cell["id"])
    for cell in cells:
        if cell["id"] not in ("ledger", "savings"):
            continue
        own = _top_level_names(source(cell))
        read = {n.id for n in ast.walk(ast.parse(source(cell))) if isinstance(n, ast.Name)
                and isinstance(n.ctx, ast.Load)} - own
        shared = {name: set_by[name] for name in read if len(set_by.get(name, [])) > 1}
        assert not shared, f"{path.name}: cell {cell['id']} reads names that several cells set: {shared}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_student_twin_scores_zero_and_fails_only_on_stubs(path):
    """Grade the untouched student notebook: zero points, and nothing raised but the stubs' NotImplementedError."""
    from minillm.grader import grade

    student_path = ROOT / "notebooks" / path.name
    assert [c["id"] for c in load(student_path)["cells"]] == [c["id"] for c in load(path)["cells"]]
    assert BEGIN not in student_path.read_text()
    (sub,) = grade([student_path], cell_timeout=300, notebook_timeout=600, progress=False)
    assert not sub.grader_error, sub.grader_error
    assert sub.points == 0 and sub.points_possible > 0
    assert all(e.status == "error" for e in sub.exercises), [(e.grade_id, e.status, e.message) for e in sub.exercises]
    raised = {cell: o for cell, o in sub.cell_outcomes.items() if o["status"] != "passed"}
    assert raised, "the grader recorded no failing cell"
    for cell, outcome in raised.items():
        assert outcome.get("ename") == "NotImplementedError", f"cell {cell}: {outcome}"


def test_cli_env_and_build_check():
    env = subprocess.run([sys.executable, "-m", "minillm", "env"], capture_output=True, text=True)
    assert env.returncode == 0, env.stdout + env.stderr
    assert "[OK] torch" in env.stdout and "[FAIL]" not in env.stdout
    check = subprocess.run([sys.executable, "-m", "minillm", "build-notebooks", "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0 and "in sync" in check.stdout


def test_course_run_writes_ledger_and_report(tmp_path):
    env = {**os.environ, "MINILLM_RUNS": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "minillm", "course", "run", "--fast", "00"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "00_setup.ipynb ok" in run.stdout
    assert (tmp_path / "course" / "00_setup.ipynb").exists()
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert {e["chapter"] for e in ledger} == {"00"} and len(ledger) >= 5
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_course_run_unknown_chapter_is_a_clear_error(tmp_path):
    unknown = subprocess.run([sys.executable, "-m", "minillm", "course", "run", "99"], capture_output=True, text=True,
                             env={**os.environ, "MINILLM_RUNS": str(tmp_path)})
    assert unknown.returncode == 2 and "no chapter 99" in unknown.stderr


def test_a_failing_chapter_is_reported_by_name_and_cell(tmp_path):
    import nbformat
    from minillm.notebooks import run_chapter

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", id="fine"), nbformat.v4.new_code_cell("1 / 0", id="broken"),
                nbformat.v4.new_code_cell("y = 2", id="after")]
    path = tmp_path / "98_broken.ipynb"
    nbformat.write(nb, path)
    run = run_chapter(path, fast=True, timeout=60, out_dir=tmp_path / "out")
    assert not run.ok
    assert "cell 1 (broken" in run.error and "ZeroDivisionError" in run.error
    assert run.output_path.exists()


def test_a_chapter_that_runs_out_of_time_names_the_cell_and_the_way_to_allow_more(tmp_path):
    import nbformat
    from minillm.notebooks import run_chapter

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", id="fine"),
                nbformat.v4.new_code_cell("import time\ntime.sleep(30)", id="slow"),
                nbformat.v4.new_code_cell("y = 2", id="after")]
    path = tmp_path / "97_slow.ipynb"
    nbformat.write(nb, path)
    run = run_chapter(path, fast=True, timeout=2, out_dir=tmp_path / "out")
    assert not run.ok
    assert "cell 1 (slow: 'import time')" in run.error, run.error
    assert "2 s per cell" in run.error and "--timeout 4" in run.error and "TIMEOUT=4" in run.error


def test_chapter_02_measures_the_ceilings_again_when_the_cached_ones_were_taken_on_a_busy_machine(tmp_path,
                                                                                               monkeypatch):
    # before: a ceiling cached by chapter 00 while the machine was busy stayed, and chapter 02 printed its best
    # matmul at 188% of "the measured peak"
    from minillm.cost import hardware_id, probe_hardware
    from minillm.notebooks import run_chapter

    monkeypatch.setenv("MINILLM_RUNS", str(tmp_path))
    cache = tmp_path / f"peaks-{hardware_id(probe_hardware())}.json"
    cache.write_text(json.dumps({"device": "cpu", "measured_at": "2026-01-01T00:00:00+00:00", "fast": True,
                                 "matmul_flops_per_second": {"float32": 1e6}, "memory_bytes_per_second": 1e9}))
    run = run_chapter(ROOT / "solutions" / "02_gpu_linear_algebra.ipynb", fast=True, timeout=600,
                      out_dir=tmp_path / "out")
    assert run.ok, run.error
    printed = "".join("".join(output.get("text", "")) for cell in load(run.output_path)["cells"]
                      for output in cell.get("outputs", []))
    assert "well above the cached ceiling (1 MFLOP/s, measured 2026-01-01T00:00" in printed
    assert json.loads(cache.read_text())["matmul_flops_per_second"]["float32"] > 1e6   # measured again, cached
