"""`minillm grade`: score a class's notebooks per exercise, with nbval, without trusting the students' copies.

For each submission the grader
1. copies the notebook (the student's file is never modified),
2. puts the official check cells back by `grade_id` (an edited check cell is restored, a deleted one is
   re-inserted after its exercise) and appends the instructor's private tests (`--extra-tests DIR`, one
   file `<grade_id>.py` each) to the check cell they belong to,
3. clears outputs and runs it with `pytest --nbval-lax --nbval-current-env` in fast mode, in its own
   process, with a per-cell timeout and a per-notebook time limit; the pytest plugin in this module
   records how each check cell ended,
4. turns that into a status per exercise: passed, failed (a wrong answer: AssertionError), error (any
   other exception, e.g. an unfinished stub), timeout, or missing (no result, e.g. the notebook stopped).

Student code runs with the grader's rights: grade in a throwaway container or user account.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
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

def _grade_id(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def _is_check(cell) -> bool:
    return bool(cell.get("metadata", {}).get("nbgrader", {}).get("grade"))


def official_notebook(chapter: str) -> tuple[Path, dict]:
    paths = chapter_paths([chapter])
    return paths[0], load(paths[0])


def identify_chapter(nb: dict) -> str | None:
    """The chapter a notebook belongs to, from its exercise ids (robust to renamed files)."""
    chapters = {}
    for cell in nb.get("cells", []):
        gid = _grade_id(cell)
        if gid and gid.startswith("ex") and len(gid) >= 4 and gid[2:4].isdigit():
            chapters[gid[2:4]] = chapters.get(gid[2:4], 0) + 1
    return max(chapters, key=chapters.get) if chapters else None


def find_submissions(inputs: list[str | Path]) -> list[Submission]:
    """Notebook files, or folders holding one notebook (or one sub-folder) per student."""
    found = []
    for item in map(Path, inputs):
        if item.is_file():
            found.append(Submission(student=item.stem, path=item))
        elif item.is_dir():
            for entry in sorted(item.iterdir()):
                if entry.is_file() and entry.suffix == ".ipynb":
                    found.append(Submission(student=entry.stem, path=entry))
                elif entry.is_dir() and not entry.name.startswith("."):
                    notebooks = sorted(p for p in entry.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
                    if notebooks:
                        found.append(Submission(student=entry.name, path=notebooks[0]))
                    else:
                        found.append(Submission(student=entry.name, path=entry,
                                                grader_error=f"no .ipynb file in {entry}"))
        else:
            raise GraderError(f"{item} does not exist: give notebook files or folders of submissions")
    if not found:
        raise GraderError(f"no notebooks found in {', '.join(map(str, inputs))}")
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
        extra = (extra_tests / f"{gid}.py") if extra_tests else None
        if extra is not None and extra.exists():
            restored["source"] = f"{_source(reference)}\n\n# instructor's tests\n{extra.read_text()}"
        here = [i for i, c in enumerate(cells) if _grade_id(c) == gid or c.get("id") == reference.get("id")]
        for duplicate in reversed(here[1:]):  # a student may have copied a check cell: keep one
            del cells[duplicate]
        if here:
            cells[here[0]] = restored
        else:
            cells.insert(_insertion_point(cells, official_cells, index), restored)
    return nb


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

def run_submission(path: Path, cell_timeout: int, notebook_timeout: int, workdir: Path) -> tuple[dict, str]:
    """Run a prepared notebook under nbval in its own process; returns {cell id: outcome} and a note."""
    results_file = workdir / "results.json"
    env = {**os.environ, RESULTS_ENV: str(results_file), "MINILLM_FAST": "1", "MINILLM_HEADLESS": "1",
           "MINILLM_RUNS": str(workdir / "runs"), "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "pytest", str(path), "--nbval-lax", "--nbval-current-env",
               f"--nbval-cell-timeout={cell_timeout}", "-p", "minillm.grader_plugin", "-q", "-p", "no:cacheprovider",
               "--rootdir", str(workdir), "-o", "addopts=", "-o", "testpaths="]
    note = ""
    try:
        subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=notebook_timeout)
    except subprocess.TimeoutExpired:
        note = f"the notebook ran past the {notebook_timeout} s limit"
    outcomes = json.loads(results_file.read_text()) if results_file.exists() else {}
    return outcomes, note


def score(official: dict, outcomes: dict, note: str) -> list[ExerciseResult]:
    results = []
    timed_out_since_last_check = False
    for cell in official["cells"]:
        outcome = outcomes.get(cell.get("id"))
        if outcome and outcome["status"] == "timeout":
            timed_out_since_last_check = True
        if not _is_check(cell):
            continue
        meta = cell["metadata"]["nbgrader"]
        result = ExerciseResult(meta["grade_id"], int(meta.get("points", 1)))
        if outcome is None:
            result.status, result.message = ("timeout", note) if note else ("missing", "the check cell did not run")
        elif timed_out_since_last_check or outcome["status"] == "timeout":
            # Code that never finishes earns nothing, even when the check after the interrupt passes.
            result.status = "timeout"
            result.message = outcome.get("message") or "a cell of this exercise ran past the per-cell timeout"
        elif outcome["status"] == "passed":
            result.status, result.points = "passed", result.points_possible
        else:
            result.status, result.message = outcome["status"], outcome.get("message", "")
        results.append(result)
        timed_out_since_last_check = False
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
    if jobs < 1:
        raise GraderError(f"--jobs {jobs}: give 1 or more notebooks to run at once")
    submissions = find_submissions(inputs)
    extra = Path(extra_tests) if extra_tests else None
    if extra is not None and not extra.is_dir():
        raise GraderError(f"--extra-tests {extra} is not a folder of <grade_id>.py files")
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


def _grade_one(sub: Submission, chapter, extra, cell_timeout, notebook_timeout, officials) -> None:
    try:
        nb = load(sub.path)
        if not isinstance(nb.get("cells"), list):
            raise ValueError("it has no list of cells")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise GraderError(f"cannot read {sub.path}: {error}") from None
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
    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as tmp:
        workdir = Path(tmp)
        prepared = workdir / f"{wanted}_submission.ipynb"
        prepared.write_text(dumps(prepare(nb, official, extra)), encoding="utf-8")
        outcomes, note = run_submission(prepared, cell_timeout, notebook_timeout, workdir)
    sub.cell_outcomes = outcomes
    sub.exercises = score(official, outcomes, note)


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
