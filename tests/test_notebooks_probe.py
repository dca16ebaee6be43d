"""Edge cases of the course machinery (minillm.notebooks, `minillm course run`, `build-notebooks`) on bad input:
malformed notebooks and markers, odd chapter arguments, unwritable output, a kernel that dies, Ctrl-C, settings."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minillm import cli
from minillm import notebooks as nbs
from minillm.notebooks import BEGIN, END, build_notebooks, build_student, chapter_paths, load, stub_solution_regions

ROOT = Path(__file__).resolve().parents[1]


def _notebook(*cells):
    return {"nbformat": 4, "nbformat_minor": 4, "metadata": {}, "cells": list(cells)}


def _code(source, **metadata):
    return {"cell_type": "code", "metadata": metadata, "source": source, "outputs": [], "execution_count": None}


def _write_chapter(folder: Path, name: str, *sources, tags=None) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s, id=f"c{i}") for i, s in enumerate(sources)]
    for index, cell_tags in (tags or {}).items():
        nb.cells[index].metadata["tags"] = cell_tags
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / name)
    return folder / name


# --- load, build_student, build_notebooks -----------------------------------------------------------

def test_load_reads_a_byte_order_mark_and_names_a_file_that_is_not_utf8(tmp_path):
    nb = _notebook(_code("print('é ✓')"))
    bom = tmp_path / "bom.ipynb"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(nb, ensure_ascii=False).encode("utf-8"))
    assert load(bom) == nb
    latin = tmp_path / "latin.ipynb"
    latin.write_bytes(json.dumps(nb, ensure_ascii=False).encode("utf-8").replace("é".encode(), b"\xe9"))
    with pytest.raises(ValueError, match=r"latin\.ipynb is not a valid notebook: it is not UTF-8.*save it again"):
        load(latin)


def test_load_and_build_keep_crlf_non_ascii_and_notebooks_without_ids(tmp_path):
    nb = _notebook(_code(f"def f():\r\n    {BEGIN}\r\n    return 'é'\r\n    {END}\r\n",
                         nbgrader={"grade_id": "ex01.1-solution", "solution": True}),
                   {"cell_type": "markdown", "metadata": {}, "source": "héllo ✓"})
    nb["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["é\n"]}]
    path = tmp_path / "crlf.ipynb"
    path.write_bytes(json.dumps(nb, indent=1).replace("\n", "\r\n").encode())
    student = build_student(load(path))
    code, text = student["cells"]
    assert "return 'é'" not in code["source"] and 'NotImplementedError("exercise ex01.1' in code["source"]
    assert code["outputs"] == [] and text["source"] == "héllo ✓" and "id" not in code
    assert "héllo ✓" in nbs.dumps(student)


@pytest.mark.parametrize("nb, message", [
    ([], "holds an array, not a notebook"),
    ({"nbformat": 3, "worksheets": []}, "no list of cells .nbformat 3"),
    (_notebook(_code("x", nbgrader=None)), r"cell 0 .*nbgrader metadata is null"),
    (_notebook({"cell_type": "code", "metadata": None, "source": "x"}), r"cell 0 .*metadata is null"),
    (_notebook({"metadata": {}, "source": "x"}), r"cell 0 .*has no cell_type"),
    (_notebook(_code(None)), r"cell 0 .*source is null"),
    (_notebook(_code(["x\n", 1])), r"cell 0 .*source is an array"),
    (_notebook(_code("x", nbgrader={"grade_id": 5})), r"cell 0 .*grade_id is 5"),
    (_notebook("not a cell"), r"cell 0 is a string, not a cell"),
])
def test_a_malformed_solution_notebook_is_a_clear_error(nb, message):
    with pytest.raises(ValueError, match=message):
        build_student(nb)


def test_a_malformed_solution_notebook_is_named_by_the_build(tmp_path):
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    (solutions / "00_bad.ipynb").write_text(json.dumps(_notebook(_code("x", nbgrader=None))))
    with pytest.raises(ValueError, match=r"solutions/00_bad\.ipynb: cell 0 .*nbgrader metadata is null"):
        build_notebooks(verbose=False, source_dir=solutions, out_dir=tmp_path / "notebooks")


@pytest.mark.parametrize("begin, end", [("### BEGIN_SOLUTION", "### END_SOLUTION"),
                                        ("# begin_solution", "# end_solution")])
def test_underscore_markers_are_near_misses_not_leaks(begin, end):
    # without nbgrader metadata nothing else would stop the answer from shipping
    nb = _notebook(_code(f"def f():\n    {begin}\n    return 42\n    {end}\n"))
    with pytest.raises(ValueError, match="looks like a solution marker"):
        build_student(nb)


def test_a_region_in_a_cell_without_grade_id_gets_a_plain_stub():
    student = build_student(_notebook(_code(f"def f():\n    {BEGIN}\n    return 42\n    {END}\n")))
    source = student["cells"][0]["source"]
    assert "return 42" not in source and "this exercise" not in source
    assert 'raise NotImplementedError("replace this line with your code")' in source
    assert "exercise ex01.2:" in stub_solution_regions(f"{BEGIN}\nx\n{END}", "ex01.2")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_build_and_check_refuse_a_solutions_folder_without_chapters(tmp_path, make):
    source = tmp_path / "solutions"
    if make == "empty":
        source.mkdir()
    for check in (True, False):
        with pytest.raises(FileNotFoundError, match="nothing to build notebooks/ from"):
            build_notebooks(check=check, verbose=False, source_dir=source, out_dir=tmp_path / "notebooks")


def test_check_names_a_missing_twin_and_a_stray_notebook(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    for path in chapter_paths(folder=ROOT / "solutions")[:2]:
        (solutions / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert build_notebooks(verbose=False, source_dir=solutions, out_dir=notebooks) == []
    first, second = sorted(p.name for p in solutions.iterdir())
    (notebooks / second).unlink()
    (notebooks / "07_stray.ipynb").write_text("{}")
    problems = build_notebooks(check=True, source_dir=solutions, out_dir=notebooks)
    assert problems == [f"notebooks/{second} is missing",
                        "notebooks/07_stray.ipynb has no source in solutions/ (delete it, or add "
                        "solutions/07_stray.ipynb)"]


# --- course run: arguments ----------------------------------------------------------------------------

def test_chapter_numbers_in_any_width_and_an_empty_one_refused(monkeypatch):
    paths = chapter_paths(["0", "00", "4", "04"])
    assert [p.name[:2] for p in paths] == ["00", "04"]
    monkeypatch.setattr(nbs, "run_chapter", lambda *a, **k: pytest.fail("ran a chapter for an empty argument"))
    with pytest.raises(ValueError, match="empty chapter number"):
        nbs.run_course([""])   # "".zfill(2) == "00": used to run chapter 00
    with pytest.raises(ValueError, match="empty chapter number"):
        nbs.run_course(["01", " "])


def test_course_run_splits_commas_and_refuses_an_empty_argument(monkeypatch, capsys):
    seen = []

    def run_course(chapters, fast, timeout):
        seen.append(chapters)
        return []
    monkeypatch.setattr(nbs, "run_course", run_course)
    monkeypatch.setattr("minillm.cost.report", lambda: ("report", None))
    assert cli.main(["course", "run", "00,01", "3"]) == 0
    assert cli.main(["course", "run"]) == 0
    assert seen == [["00", "01", "3"], None]
    monkeypatch.undo()
    assert cli.main(["course", "run", ""]) == 2
    assert "empty chapter number" in capsys.readouterr().err


def test_course_run_takes_the_quick_pass_from_minillm_fast_too(monkeypatch):
    modes = []
    monkeypatch.setattr(nbs, "run_course", lambda chapters, fast, timeout: modes.append(fast) or [])
    monkeypatch.setattr("minillm.cost.report", lambda: ("report", None))
    for env, argv in (("1", []), ("0", []), ("0", ["--fast"]), (None, [])):
        if env is None:
            monkeypatch.delenv("MINILLM_FAST", raising=False)
        else:
            monkeypatch.setenv("MINILLM_FAST", env)
        assert cli.main(["course", "run", "00", *argv]) == 0
    assert modes == [True, False, True, False]   # MINILLM_FAST=1 without --fast ran the full sizes before


def test_course_run_lists_failures_when_the_report_fails_and_when_nothing_was_saved(monkeypatch, capsys):
    failed = nbs.ChapterRun(path=Path("01_x.ipynb"), ok=False, error="cell 1 (c1: '1/0') raised ZeroDivisionError")

    def broken_report():
        raise OSError(21, "Is a directory", "/runs/report.png")
    monkeypatch.setattr(nbs, "run_course", lambda chapters, fast, timeout: [failed])
    monkeypatch.setattr("minillm.cost.report", broken_report)
    assert cli.main(["course", "run", "01"]) == 1
    out, err = capsys.readouterr()
    assert "the cost report could not be made" in err and "Is a directory" in err
    assert "FAILED 01_x.ipynb: cell 1" in out and "no executed notebook was saved" in out and "None" not in out
    monkeypatch.setattr("minillm.cost.report", lambda: ("report", None))
    monkeypatch.setattr(nbs, "run_course", lambda chapters, fast, timeout: [nbs.ChapterRun(path=Path("00.ipynb"))])
    assert cli.main(["course", "run", "00"]) == 0


# --- course run: chapters that fail ---------------------------------------------------------------------

def test_an_expected_error_earlier_is_not_reported_as_the_failure(tmp_path):
    path = _write_chapter(tmp_path, "96_expected.ipynb", "raise ValueError('expected')", "x = 1",
                          "raise KeyError('real')", tags={0: ["raises-exception"]})
    run = nbs.run_chapter(path, fast=True, timeout=60, out_dir=tmp_path / "out")
    assert not run.ok
    assert run.error.startswith("cell 2 (c2: \"raise KeyError('real')\") raised KeyError"), run.error


def test_a_kernel_that_dies_names_the_cell(tmp_path):
    path = _write_chapter(tmp_path, "95_dies.ipynb", "x = 1", "import os\nos._exit(1)", "y = 2")
    run = nbs.run_chapter(path, fast=True, timeout=60, out_dir=tmp_path / "out")
    assert not run.ok and run.output_path.exists()
    assert "the kernel died while cell 1 (c1: 'import os')" in run.error and "out of memory" in run.error, run.error


def test_run_chapter_sets_the_kernels_environment_not_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_FAST", "yes")
    monkeypatch.delenv("MINILLM_HEADLESS")
    path = _write_chapter(tmp_path, "94_env.ipynb",
                          "import os\nprint(os.environ['MINILLM_FAST'], os.environ['MINILLM_HEADLESS'])")
    run = nbs.run_chapter(path, fast=False, timeout=60, out_dir=tmp_path / "out")
    assert run.ok, run.error
    assert "".join(load(run.output_path)["cells"][0]["outputs"][0]["text"]) == "0 1\n"
    assert os.environ["MINILLM_FAST"] == "yes" and "MINILLM_HEADLESS" not in os.environ


def test_an_unreadable_or_unsavable_chapter_is_reported_and_the_others_still_run(tmp_path):
    bad = tmp_path / "93_bad.ipynb"
    bad.write_text("{not json")
    run = nbs.run_chapter(bad, fast=True, timeout=60, out_dir=tmp_path / "out")
    assert not run.ok and run.error.startswith(f"cannot read {bad}") and run.output_path is None
    path = _write_chapter(tmp_path, "92_ok.ipynb", "x = 1")
    (tmp_path / "out" / path.name).mkdir(parents=True)   # a folder where the executed notebook goes
    run = nbs.run_chapter(path, fast=True, timeout=60, out_dir=tmp_path / "out")
    assert not run.ok and run.output_path is None
    assert f"could not be saved as {tmp_path / 'out' / path.name}" in run.error and ".tmp" not in run.error


def test_course_run_checks_the_output_folder_before_running_anything(tmp_path, monkeypatch):
    solutions = tmp_path / "solutions"
    _write_chapter(solutions, "00_ok.ipynb", "x = 1")
    monkeypatch.setattr(nbs, "solutions_dir", lambda: solutions)
    monkeypatch.setenv("MINILLM_RUNS", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "course").write_text("a file in the way")
    monkeypatch.setattr(nbs, "run_chapter", lambda *a, **k: pytest.fail("ran although nothing could be saved"))
    with pytest.raises(FileExistsError):
        nbs.run_course(["00"], fast=True)
    (tmp_path / "runs" / "course").unlink()
    (tmp_path / "runs" / "course").mkdir()
    for path in solutions.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no chapter notebooks"):
        nbs.run_course(None, fast=True)


def test_a_sigint_to_the_kernel_alone_stops_the_chapter_as_ctrl_c(tmp_path):
    path = _write_chapter(tmp_path, "91_sigint.ipynb", "x = 1",
                          "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nimport time\ntime.sleep(5)", "y = 2")
    with pytest.raises(nbs.ChapterInterrupted) as info:
        nbs.run_chapter(path, fast=True, timeout=60, out_dir=tmp_path / "out")
    run = info.value.run
    assert not run.ok and run.error == "interrupted (Ctrl-C)" and run.output_path.exists()


SCRIPT = """
import sys
from pathlib import Path
from minillm import cli, notebooks
notebooks.solutions_dir = lambda: Path(sys.argv[1])
sys.exit(cli.main(["course", "run", "--fast"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_course_and_keeps_what_ran(tmp_path, sig):
    """nbclient turns Ctrl-C into a failed cell: the course used to go on with the next chapter, exit 1."""
    solutions, started = tmp_path / "solutions", tmp_path / "started"
    _write_chapter(solutions, "00_ok.ipynb", "x = 1")
    _write_chapter(solutions, "01_slow.ipynb",
                   f"import time, pathlib\nprint('before', flush=True)\npathlib.Path({str(started)!r}).touch()\n"
                   "time.sleep(120)", "y = 2")
    _write_chapter(solutions, "02_after.ipynb", "z = 3")
    env = {**os.environ, "MINILLM_RUNS": str(tmp_path / "runs")}
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(solutions)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)  # the cell is in its sleep
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "01_slow.ipynb interrupted; the part that ran is in" in err and "not run: 02" in err, err
    assert "minillm course: interrupted" in err and "02_after" not in out
    saved = load(tmp_path / "runs" / "course" / "01_slow.ipynb")
    assert "before" in "".join(saved["cells"][0]["outputs"][0]["text"])
    assert not (tmp_path / "runs" / "course" / "02_after.ipynb").exists()


# --- notebook_setup, widgets_available ---------------------------------------------------------------

@pytest.mark.parametrize("value, warns", [("yes", True), ("true", True), (" 1", True), ("2", True),
                                          ("1", False), ("0", False), ("false", False), ("", False)])
def test_notebook_setup_warns_about_a_fast_setting_it_does_not_understand(value, warns, monkeypatch, capsys):
    monkeypatch.setenv("MINILLM_FAST", value)
    hardware = nbs.notebook_setup(quiet=True)
    assert isinstance(hardware, dict)
    err = capsys.readouterr().err
    assert ("is neither 1 nor 0" in err) == warns, err
    if warns:
        assert f"MINILLM_FAST={value!r}" in err and "MINILLM_FAST=1 for the quick pass" in err


def test_widgets_available_in_colab_and_not_when_headless(monkeypatch):
    import IPython

    class ZMQInteractiveShell:
        pass

    class Shell(ZMQInteractiveShell):   # google.colab._shell.Shell(zmqshell.ZMQInteractiveShell)
        pass

    class TerminalInteractiveShell:
        pass
    monkeypatch.delenv("MINILLM_HEADLESS", raising=False)
    assert nbs.widgets_available() is False          # plain Python: no shell at all
    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    assert nbs.widgets_available() is True
    monkeypatch.setattr(IPython, "get_ipython", lambda: TerminalInteractiveShell())
    assert nbs.widgets_available() is False
    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    for headless in ("1", "true", "YES", "on"):
        monkeypatch.setenv("MINILLM_HEADLESS", headless)
        assert nbs.widgets_available() is False, headless
    monkeypatch.setenv("MINILLM_HEADLESS", "0")
    assert nbs.widgets_available() is True


def test_load_strip_and_build_leave_the_input_alone():
    nb = load(ROOT / "solutions" / "01_next_word.ipynb")
    before = copy.deepcopy(nb)
    build_student(nb)
    nbs.strip_outputs(nb)
    assert nb == before
