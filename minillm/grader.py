"""`minillm grade`: score a class's notebooks per exercise, with nbval, without trusting the students' copies.

For each submission the grader
1. copies the notebook (the student's file is never modified),
2. puts the official check cells back by `grade_id` (an edited check cell is restored, a deleted one is
   re-inserted after its exercise) and appends the instructor's private tests (`--extra-tests DIR`, one
   file `<grade_id>.py` each) to the check cell they belong to,
3. clears outputs and runs it with `pytest --nbval-lax --nbval-current-env` in fast mode, in its own
   process, with a per-cell timeout and a per-notebook time limit; the pytest plugin (grader_plugin.py)
   records how each cell ended, after every cell, so the checks that ran before a stop still count,
4. turns that into a status per exercise: passed, failed (a wrong answer: AssertionError), error (any
   other exception, e.g. an unfinished stub), timeout (a cell timed out, or the notebook reached its limit
   before the check), or missing (no result).

A submission that cannot be read or prepared (not JSON, malformed cells, another chapter) gets a grader
error of its own; the other submissions are graded.

Student code runs with the grader's rights: grade in a throwaway container or user account.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .notebooks import chapter_paths, dumps, load, strip_outputs
from .paths import atomic_write_text

STATUSES = ("passed", "failed", "error", "timeout", "missing")
RESULTS_ENV = "MINILLM_GRADER_RESULTS"  # read by minillm.grader_plugin
KERNEL_STOPPED = "KernelStopped"  # the ename grader_plugin records for cells that found the kernel stopped


class GraderError(Exception):
    """The grader could not grade a submission (unreadable file, wrong chapter): not the student's score."""


@dataclass
class ExerciseResult:
    grade_id: str
    points_possible: int
    points: int = 0
    status: str = "missing"
    message: str = ""


@dataclass
class Submission:
    student: str
    path: Path
    chapter: str | None = None
    exercises: list[ExerciseResult] = field(default_factory=list)
    grader_error: str = ""
    cell_outcomes: dict = field(default_factory=dict)  # cell id -> {"status", "ename", "message"}
    seconds: float = 0.0

    @property
    def points(self) -> int:
        return sum(e.points for e in self.exercises)

    @property
    def points_possible(self) -> int:
        return sum(e.points_possible for e in self.exercises)


# --- finding the official notebook and the submissions ---------------------------------------------

def _nbgrader(cell) -> dict:
    """The cell's nbgrader metadata; {} when it has none or it is malformed (see _shape_problem)."""
    meta = cell.get("metadata") if isinstance(cell, dict) else None
    nbgrader = meta.get("nbgrader") if isinstance(meta, dict) else None
    return nbgrader if isinstance(nbgrader, dict) else {}


def _grade_id(cell) -> str | None:
    gid = _nbgrader(cell).get("grade_id")
    return gid if isinstance(gid, str) else None


def _is_check(cell) -> bool:
    return bool(_nbgrader(cell).get("grade"))


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shape_problem(nb) -> str | None:
    """Why `nb` (parsed JSON) cannot be graded as a notebook, or None when its cells are well formed."""
    if not isinstance(nb, dict):
        return f"it holds {_json_type(nb)}, not a notebook (a JSON object with a list of cells)"
    if not isinstance(nb.get("cells"), list):
        return "it has no list of cells"
    if not isinstance(nb.get("nbformat"), int) or nb["nbformat"] < 4:
        return (f"it has nbformat {nb.get('nbformat')!r}; a Jupyter notebook of format 4 is needed (the file "
                "lost its header, or it was saved by a very old Jupyter)")
    for number, cell in enumerate(nb["cells"], 1):
        if not isinstance(cell, dict):
            return f"cell {number} is {_json_type(cell)}, not a cell (a JSON object)"
        if cell.get("cell_type") not in ("code", "markdown", "raw"):
            kind = f"cell_type {cell['cell_type']!r}" if "cell_type" in cell else "no cell_type"
            return f"cell {number} has {kind}; a cell is 'code', 'markdown' or 'raw'"
        source = cell.get("source", "")
        if not (isinstance(source, str) or isinstance(source, list) and all(isinstance(s, str) for s in source)):
            return f"cell {number}'s source is {_json_type(source)}, not text"
        meta = cell.get("metadata", {})
        if not isinstance(meta, dict):
            return f"cell {number}'s metadata is {_json_type(meta)}, not an object"
        nbgrader = meta.get("nbgrader", {})
        if not isinstance(nbgrader, dict):
            return f"cell {number}'s nbgrader metadata is {_json_type(nbgrader)}, not an object"
        gid = nbgrader.get("grade_id")
        if gid is not None and not isinstance(gid, str):
            return f"cell {number}'s grade_id is {gid!r}, not a string such as 'ex01.3'"
        if "id" in cell and not isinstance(cell["id"], str):
            return f"cell {number}'s id is {cell['id']!r}, not a string"
    return None


def official_notebook(chapter: str) -> tuple[Path, dict]:
    paths = chapter_paths([chapter])
    return paths[0], load(paths[0])


def identify_chapter(nb: dict) -> str | None:
    """The chapter a notebook belongs to, from its exercise ids (robust to renamed files)."""
    chapters = {}
    cells = nb.get("cells") if isinstance(nb, dict) else None
    for cell in cells if isinstance(cells, list) else []:
        gid = _grade_id(cell)
        if gid and gid.startswith("ex") and len(gid) >= 4 and gid[2:4].isdigit():
            chapters[gid[2:4]] = chapters.get(gid[2:4], 0) + 1
    return max(chapters, key=chapters.get) if chapters else None


def _ignored(path: Path) -> bool:
    """Not a submission: hidden files and folders (.ipynb_checkpoints, macOS's ._x.ipynb) and __MACOSX."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


def _chapter_of_file(path: Path) -> str | None:
    try:
        return identify_chapter(load(path))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _pick_notebook(folder: Path, notebooks: list[Path], chapter: str | None) -> tuple[Path, str]:
    """The student's notebook among those in their folder, and a grader error ('' when there is none).

    One notebook: that one. Several: the one of `chapter` (by its exercise ids, else by its file name);
    without a chapter, the one whose exercises say it is a course notebook, when exactly one does.
    """
    if len(notebooks) == 1:
        return notebooks[0], ""
    names = ", ".join(str(p.relative_to(folder)) for p in notebooks)
    chapters = {p: _chapter_of_file(p) for p in notebooks}
    if chapter:
        wanted = chapter.zfill(2)
        matches = [p for p in notebooks if chapters[p] == wanted]
        if len(matches) > 1:  # 01_next_word.ipynb and 01_next_word-Copy1.ipynb: prefer the course's name
            matches = [p for p in matches if p.name.startswith(f"{wanted}_")] or matches
        if not matches:
            matches = [p for p in notebooks if p.name.startswith(f"{wanted}_") and chapters[p] is None]
        what = f"chapter {wanted} notebook"
    else:
        matches = [p for p in notebooks if chapters[p] is not None]
        what = "course notebook"
    if len(matches) == 1:
        return matches[0], ""
    if not matches:
        return folder, f"no {what} in {folder} (it holds {names}): pass the right file, or --chapter"
    which = ", ".join(str(p.relative_to(folder)) for p in matches)
    return folder, f"several {what}s in {folder} ({which}): pass the one to grade{'' if chapter else ', or --chapter'}"


def find_submissions(inputs: list[str | Path], chapter: str | None = None) -> list[Submission]:
    """Notebook files, or folders holding one notebook (or one sub-folder) per student.

    Hidden files and folders and __MACOSX folders are skipped. When a student's folder holds several
    notebooks, the one of `chapter` is taken. Files given one by one are named by their stem, or by their
    folder when stems clash (`subs/*/01_next_word.ipynb`).
    """
    found, files = [], []
    for item in map(Path, inputs):
        if item.is_file():
            sub = Submission(student=item.stem, path=item)
            found.append(sub)
            files.append(sub)
        elif item.is_dir():
            for entry in sorted(item.iterdir()):
                if _ignored(Path(entry.name)):
                    continue
                if entry.is_file() and entry.suffix == ".ipynb":
                    found.append(Submission(student=entry.stem, path=entry))
                elif entry.is_dir():
                    notebooks = sorted(p for p in entry.rglob("*.ipynb") if not _ignored(p.relative_to(entry)))
                    if notebooks:
                        path, error = _pick_notebook(entry, notebooks, chapter)
                        found.append(Submission(student=entry.name, path=path, grader_error=error))
                    else:
                        found.append(Submission(student=entry.name, path=entry,
                                                grader_error=f"no .ipynb file in {entry}"))
        else:
            raise GraderError(f"{item} does not exist: give notebook files or folders of submissions")
    if not found:
        raise GraderError(f"no notebooks found in {', '.join(map(str, inputs))}")
    seen, unique = set(), []
    for sub in found:   # the same notebook named twice (a folder and a file in it): graded once
        key = sub.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(sub)
    kept = {id(sub) for sub in unique}
    found, files = unique, [sub for sub in files if id(sub) in kept]
    stems = [sub.student for sub in files]
    for sub in files:
        if stems.count(sub.student) > 1 and sub.path.parent.name:
            sub.student = sub.path.parent.name
    names = [sub.student for sub in found]
    for sub in found:  # still the same name twice (alice/ and alice.ipynb): tell them apart by path
        if names.count(sub.student) > 1:
            sub.student = str(sub.path.with_suffix("") if sub.path.suffix == ".ipynb" else sub.path)
    return found


# --- preparing one submission --------------------------------------------------------------------

def prepare(submission: dict, official: dict, extra_tests: Path | None = None) -> dict:
    """A gradeable copy: official check cells restored or re-inserted, private tests appended, no outputs."""
    nb = strip_outputs(submission)
    cells = nb["cells"]
    official_cells = official["cells"]
    for index, reference in enumerate(official_cells):
        if not _is_check(reference):
            continue
        gid = _grade_id(reference)
        restored = copy.deepcopy(reference)
        restored["outputs"], restored["execution_count"] = [], None
        # Student code ran in this kernel before: undo an exception handler of theirs that would hide a failing
        # check; and the plugin counts a check as passed only when it printed its own "✓ <id>" line (a replaced
        # minillm.grading.check prints none).
        restored["source"] = f"{CHECK_GUARD}\n{_source(reference)}"
        extra = (extra_tests / f"{gid}.py") if extra_tests else None
        if extra is not None and extra.exists():
            restored["source"] = f"{_source(restored)}\n\n# instructor's tests\n{extra.read_text()}"
        here = [i for i, c in enumerate(cells) if _grade_id(c) == gid or c.get("id") == reference.get("id")]
        # The official check goes where the official cell id is (else where the first cell with its grade_id
        # is). Other cells with that grade_id (a check cell copied elsewhere, a solution cell that took the
        # check's metadata) keep their code but lose the metadata: a copy above the exercise would otherwise
        # be the one restored and run before the answer exists, and deleting one could delete the answer.
        keep = next((i for i in here if cells[i].get("id") == reference.get("id")), here[0] if here else None)
        for other in here:
            if other != keep:
                cells[other] = copy.deepcopy(cells[other])
                cells[other].get("metadata", {}).pop("nbgrader", None)
        if keep is not None:
            cells[keep] = restored
        else:
            cells.insert(_insertion_point(cells, official_cells, index), restored)
    return nb


CHECK_GUARD = "get_ipython().custom_exceptions = ()  # minillm grade: no handler of the student's hides an error"


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _insertion_point(cells: list, official_cells: list, official_index: int) -> int:
    """After the nearest earlier official cell that the submission still has (normally the exercise)."""
    ids = {c.get("id"): i for i, c in enumerate(cells)}
    for reference in reversed(official_cells[:official_index]):
        if reference.get("id") in ids:
            return ids[reference["id"]] + 1
    return len(cells)


# --- running it --------------------------------------------------------------------------------------

def run_submission(path: Path, cell_timeout: float, notebook_timeout: float, workdir: Path) -> tuple[dict, str]:
    """Run a prepared notebook under nbval in its own process; returns {cell id: outcome} and a note.

    The note is '' unless the notebook ran past `notebook_timeout`: then pytest and the notebook's kernel
    (with whatever it started) are killed, and the outcomes of the cells that ran until then, which the
    plugin writes after every cell, are kept.
    """
    results_file = workdir / "results.json"
    env = {**os.environ, RESULTS_ENV: str(results_file), "MINILLM_FAST": "1", "MINILLM_HEADLESS": "1",
           "MINILLM_RUNS": str(workdir / "runs"), "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "pytest", str(path), "--nbval-lax", "--nbval-current-env",
               f"--nbval-cell-timeout={cell_timeout:g}", "-p", "minillm.grader_plugin", "-q",
               "-p", "no:cacheprovider", "--rootdir", str(workdir), "-o", "addopts=", "-o", "testpaths="]
    note = ""
    log_path = workdir / "pytest.log"
    with open(log_path, "w", encoding="utf-8") as log:
        # pytest stays in the grader's process group, so a Ctrl-C at the terminal reaches it too (and nbval
        # then shuts the kernel down).
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=notebook_timeout)
        except subprocess.TimeoutExpired:
            note = f"the notebook ran past the {notebook_timeout:g} s limit"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    try:
        results = json.loads(results_file.read_text())
    except (OSError, ValueError):
        results = {}
    if note and results.get("kernel_pid"):
        # jupyter_client starts the kernel in a process group of its own; it would notice that pytest is gone
        # within a second or so, but not the processes it started (DataLoader workers, say): stop them all.
        _kill_group(results["kernel_pid"])
    outcomes = results.get("cells", {})
    if not outcomes and not note:
        # No cell ran (pytest could not collect the notebook, or nbval could not start a kernel): not the
        # student's doing, so not a score of 0.
        lines = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        raise GraderError(f"nbval could not run the notebook (pytest exit status {process.returncode}): "
                          f"{' | '.join(lines[-3:]) or 'no output'}")
    return outcomes, note


def _kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (the kernel's), or the process alone if it leads none."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            continue


def score(official: dict, outcomes: dict, note: str) -> list[ExerciseResult]:
    results = []
    timeout_message = None  # set when a cell since the last check ran past its timeout
    for cell in official["cells"]:
        outcome = outcomes.get(cell.get("id"))
        if outcome and outcome["status"] == "timeout":
            timeout_message = outcome.get("message") or "a cell of this exercise ran past the per-cell timeout"
        if not _is_check(cell):
            continue
        meta = cell["metadata"]["nbgrader"]
        result = ExerciseResult(meta["grade_id"], int(meta.get("points", 1)))
        if outcome is None:
            result.status, result.message = ("timeout", note) if note else ("missing", "the check cell did not run")
        elif timeout_message is not None:
            # Code that never finishes earns nothing, even when the check after the interrupt passes.
            result.status, result.message = "timeout", timeout_message
        elif outcome.get("ename") == KERNEL_STOPPED:
            result.status, result.message = "missing", outcome.get("message", "")
        elif outcome["status"] == "passed":
            result.status, result.points = "passed", result.points_possible
        else:
            result.status, result.message = outcome["status"], outcome.get("message", "")
        results.append(result)
        timeout_message = None
    return results


def grade(inputs: list[str | Path], chapter: str | None = None, extra_tests: str | Path | None = None,
          cell_timeout: int = 120, notebook_timeout: int = 900, progress: bool = True,
          jobs: int = 1) -> list[Submission]:
    """Grade every submission; `jobs` notebooks run at once (each in its own process)."""
    import importlib.util
    from concurrent.futures import ThreadPoolExecutor
    from threading import Lock

    if importlib.util.find_spec("nbval") is None:
        raise GraderError("grading needs pytest and nbval: pip install -e '.[dev]' (or make test once)")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise GraderError(f"--jobs {jobs}: give 1 or more notebooks to run at once")
    for option, seconds in (("--cell-timeout", cell_timeout), ("--notebook-timeout", notebook_timeout)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
            raise GraderError(f"{option} {seconds}: give a number of seconds above 0")
    if chapter is not None:
        try:
            chapter_paths([chapter])   # an unknown chapter stops here, not once per submission
        except ValueError as error:
            raise GraderError(str(error)) from None
    extra = Path(extra_tests) if extra_tests else None
    if extra is not None:
        _check_extra_tests(extra, chapter)
    submissions = find_submissions(inputs, chapter)
    officials: dict[str, dict] = {}
    done, lock = [0], Lock()

    def one(sub: Submission) -> None:
        start = time.perf_counter()
        if not sub.grader_error:
            try:
                _grade_one(sub, chapter, extra, cell_timeout, notebook_timeout, officials)
            except GraderError as error:
                sub.grader_error = str(error)
        sub.seconds = time.perf_counter() - start
        with lock:
            done[0] += 1
            if progress:
                state = f"ERROR: {sub.grader_error}" if sub.grader_error else f"{sub.points}/{sub.points_possible}"
                print(f"[{done[0]}/{len(submissions)}] {sub.student}: {state} ({sub.seconds:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, submissions))  # list() re-raises a grader bug instead of hiding it
    return submissions


def _check_extra_tests(extra: Path, chapter: str | None) -> None:
    """Every DIR/<grade_id>.py must name a check of the chapter (of any chapter without --chapter)."""
    if not extra.is_dir():
        raise GraderError(f"--extra-tests {extra} is not a folder of <grade_id>.py files")
    try:
        officials = chapter_paths([chapter] if chapter else None)
    except ValueError as error:
        raise GraderError(str(error)) from None
    ids = [_grade_id(c) for path in officials for c in load(path)["cells"] if _is_check(c)]
    unknown = sorted(p.name for p in extra.glob("*.py") if not p.name.startswith(".") and p.stem not in ids)
    if unknown:
        which = f"chapter {chapter.zfill(2)}" if chapter else "any chapter"
        raise GraderError(f"--extra-tests {extra}: no check of {which} has the id of {', '.join(unknown)}, so "
                          f"{'it' if len(unknown) == 1 else 'they'} would never run; name each file "
                          f"<grade_id>.py, with one of: {', '.join(ids)}")


def _grade_one(sub: Submission, chapter, extra, cell_timeout, notebook_timeout, officials) -> None:
    try:
        nb = load(sub.path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise GraderError(f"cannot read {sub.path}: {error}") from None
    problem = _shape_problem(nb)
    if problem:
        raise GraderError(f"cannot read {sub.path}: {problem}; open and save it in Jupyter, or ask for a new copy")
    try:
        official, prepared = _prepare_one(sub, nb, chapter, extra, officials)
    except GraderError:
        raise
    except Exception as error:  # a submission shaped in a way the grader did not foresee: this student only
        raise GraderError(f"cannot prepare {sub.path} for grading: {type(error).__name__}: {error} "
                          "(please report it to the course with the notebook)") from error
    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as tmp:
        workdir = Path(tmp)
        path = workdir / f"{sub.chapter}_submission.ipynb"
        path.write_text(prepared, encoding="utf-8")
        outcomes, note = run_submission(path, cell_timeout, notebook_timeout, workdir)
    sub.cell_outcomes = outcomes
    sub.exercises = score(official, outcomes, note)


def _prepare_one(sub: Submission, nb: dict, chapter, extra, officials) -> tuple[dict, str]:
    """The official notebook of the submission's chapter, and the text of the notebook to run."""
    found = identify_chapter(nb)
    wanted = chapter.zfill(2) if chapter else found
    if wanted is None:
        raise GraderError(f"{sub.path} has no exercises of any chapter; is it a course notebook?")
    if found is not None and found != wanted:
        raise GraderError(f"{sub.path} is chapter {found}'s notebook, but chapter {wanted} is being graded")
    sub.chapter = wanted
    if wanted not in officials:
        try:
            officials[wanted] = official_notebook(wanted)[1]
        except ValueError as error:
            raise GraderError(str(error)) from None
    official = officials[wanted]
    return official, dumps(prepare(nb, official, extra))


# --- reports -----------------------------------------------------------------------------------------

def report_rows(submissions: list[Submission]) -> list[dict]:
    rows = []
    for sub in submissions:
        for ex in sub.exercises:
            rows.append({"student": sub.student, "chapter": sub.chapter, "grade_id": ex.grade_id,
                         "points": ex.points, "points_possible": ex.points_possible, "status": ex.status,
                         "message": ex.message})
        if sub.grader_error:
            rows.append({"student": sub.student, "chapter": sub.chapter, "grade_id": "", "points": 0,
                         "points_possible": 0, "status": "grader-error", "message": sub.grader_error})
    return rows


def format_table(submissions: list[Submission]) -> str:
    ids = []
    for sub in submissions:
        for ex in sub.exercises:
            if ex.grade_id not in ids:
                ids.append(ex.grade_id)
    width = max([7] + [len(s.student) for s in submissions])
    header = f"{'student':<{width}}  " + "  ".join(f"{g:>9}" for g in ids) + f"  {'total':>9}"
    lines = [header, "-" * len(header)]
    for sub in submissions:
        if sub.grader_error:
            lines.append(f"{sub.student:<{width}}  grader error: {sub.grader_error}")
            continue
        by_id = {e.grade_id: e for e in sub.exercises}
        cells = []
        for g in ids:
            e = by_id.get(g)
            cells.append(f"{'-':>9}" if e is None else f"{(str(e.points) if e.status == 'passed' else e.status):>9}")
        lines.append(f"{sub.student:<{width}}  " + "  ".join(cells) + f"  {f'{sub.points}/{sub.points_possible}':>9}")
    return "\n".join(lines)


def write_reports(submissions: list[Submission], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report_rows(submissions)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["student", "chapter", "grade_id", "points", "points_possible",
                                                "status", "message"])
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = out_dir / "grades.csv", out_dir / "grades.json"
    atomic_write_text(csv_path, buffer.getvalue())
    summary = [{"student": s.student, "chapter": s.chapter, "path": str(s.path), "points": s.points,
                "points_possible": s.points_possible, "grader_error": s.grader_error or None,
                "exercises": [vars(e) for e in s.exercises]} for s in submissions]
    atomic_write_text(json_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return csv_path, json_path
