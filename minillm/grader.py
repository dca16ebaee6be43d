"""`minillm grade`: score a class's notebooks per exercise, with nbval, without trusting the students' copies.

For each submission the grader
1. copies the notebook (the student's file is never modified),
2. puts the official check cells in (an edited check cell is restored, a deleted or moved one goes after its
   exercise and before the course's next code cell; cells are matched by id, else grade_id, else source, so a
   notebook without cell ids is graded alike), each after a cell that undoes what student code changed in how
   IPython runs cells, and appends the instructor's private tests (`--extra-tests DIR`, one file
   `<grade_id>.py` each) to the check cell they belong to,
3. clears outputs and runs it with `pytest --nbval-lax --nbval-current-env` in fast mode, in its own
   process, with a per-cell timeout and a per-notebook time limit; the pytest plugin (grader_plugin.py)
   records how each cell ended, after every cell, so the checks that ran before a stop still count, signed
   with a key the kernel never holds (a record the notebook's code wrote is a grader error),
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
import hmac
import io
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .notebooks import chapter_paths, dumps, load, strip_outputs
from .paths import atomic_write_text

STATUSES = ("passed", "failed", "error", "timeout", "missing")
RESULTS_ENV = "MINILLM_GRADER_RESULTS"  # read by minillm.grader_plugin
KEY_FD_ENV = "MINILLM_GRADER_KEY_FD"  # the pipe grader_plugin reads the key that signs its results from (see seal)
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
    if nb["nbformat"] > 4:   # no Jupyter writes one: nbval would refuse it after the grader started a run
        return (f"it has nbformat {nb['nbformat']}, which no Jupyter reads; a notebook of format 4 is needed (was "
                "the file's header edited?)")
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
    return folder, (f"several {what}s in {folder} ({which}): add the path of the one to grade to the command (say "
                    f"{matches[0]}): it is graded as {folder.name}{'' if chapter else '; or give --chapter'}")


def find_submissions(inputs: list[str | Path], chapter: str | None = None) -> list[Submission]:
    """Notebook files, or folders holding one notebook (or one sub-folder) per student.

    Hidden files and folders and __MACOSX folders are skipped. When a student's folder holds several
    notebooks, the one of `chapter` is taken. Files given one by one are named by their stem, or by their
    folder when stems clash (`subs/*/01_next_word.ipynb`). A file given together with a folder of students, from
    one student's folder in it (`subs/ subs/bob/01_next_word-Copy1.ipynb`), is that student's notebook.
    """
    found, files = [], []
    folders = {}  # id(submission) -> its student's folder, for the students found in a folder of students
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
                    folders[id(found[-1])] = entry.resolve()
        else:
            raise GraderError(f"{item} does not exist: give notebook files or folders of submissions")
    if not found:
        raise GraderError(f"no notebooks found in {', '.join(map(str, inputs))}")
    for sub in list(files):   # the instructor's choice among a student's notebooks: graded as that student, once
        owner = next((other for other in found if folders.get(id(other)) in sub.path.resolve().parents), None)
        if owner is not None:
            found.remove(sub)
            files.remove(sub)
            found[found.index(owner)] = Submission(student=owner.student, path=sub.path)
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
    """A gradeable copy: the official check cells put in place, private tests appended, no outputs.

    Each official check goes after its exercise (after the student's copy of the check when that is there) and
    before the next code cell of the course notebook that follows the exercise: never after course code that may
    bind the library's version of the answer. Cells are matched to the course notebook by cell id, else by
    nbgrader grade_id, else by identical source, so a notebook without ids (nbformat < 4.5, or ids replaced by
    another tool) is graded the same way. The student's copies of a check keep their code (an identical copy is
    dropped) but not its metadata. Every cell gets a unique id, so each outcome is recorded apart.
    """
    nb = strip_outputs(submission)
    cells = nb["cells"]
    official_cells = official["cells"]
    check_gids = {_grade_id(c) for c in official_cells if _is_check(c)} - {None}
    found = _locate(cells, official_cells)
    inserts: dict[int, list[dict]] = {}  # submission index -> the cells that go before it (len(cells): at the end)
    dropped = set()
    for index, reference in enumerate(official_cells):
        if not _is_check(reference):
            continue
        official_id = reference.get("id")
        copies = [i for i, c in enumerate(cells) if _grade_id(c) == _grade_id(reference)
                  or (official_id is not None and c.get("id") == official_id) or _same_source(c, reference)]
        dropped.update(i for i in copies if _same_source(cells[i], reference))
        slot, note = _check_slot(cells, official_cells, found, index, copies)
        inserts.setdefault(slot, []).extend([_guard_cell(), _restored_check(reference, extra_tests, note)])
    out = []
    for i, cell in enumerate(cells):
        out.extend(inserts.get(i, []))
        if i in dropped:
            continue
        meta = cell.get("metadata", {})
        if _is_check(cell) or _grade_id(cell) in check_gids or "minillm_grade" in meta:
            # A copy of a check, an answer cell that took a check's metadata, a graded cell of the student's own:
            # the code runs, but only the official checks are graded.
            cell = {**cell, "metadata": {k: v for k, v in meta.items() if k not in ("nbgrader", "minillm_grade")}}
        out.append(cell)
    out.extend(inserts.get(len(cells), []))
    restored = [c for cells_here in inserts.values() for c in cells_here]
    nb["cells"] = _unique_ids(out, reserved={c.get("id") for c in official_cells if _is_check(c)},
                              keep={id(c) for c in restored if "minillm_grade" in c["metadata"]})
    if not isinstance(nb.get("nbformat_minor"), int) or nb["nbformat_minor"] < 5:
        nb["nbformat_minor"] = 5  # nbformat 4.5: the version with cell ids
    return nb


# The cell the grader runs before each check: student code ran in this kernel before, so undo what it may have
# changed in how IPython runs a cell (input or AST transformers that rewrite the check, say, wrapping it in a
# try/except) and reports an exception (a handler that hides it). One simple statement a line and no line of
# comment only, so that a transformer that rewrites each line (into a try block, say) still lets every one run.
GUARD = """from IPython.core.inputtransformer2 import TransformerManager as _minillm_grade_transformers  # by minillm
get_ipython().custom_exceptions = ()  # grade: undo what the notebook changed in how IPython runs cells, shows errors
get_ipython().input_transformer_manager = _minillm_grade_transformers()
get_ipython().input_transformers_post = []
get_ipython().ast_transformers = []
del _minillm_grade_transformers"""
# The first line of each restored check: the grading modules as shipped, not as the notebook may have patched them
# (a replaced minillm.grading.check, a checker registered anew). It and the check's last line use no name the
# notebook may have rebound (`list = [...]`, `print = ...`) but those they import: only keywords, `sys` and methods.
FRESH_CHECKS = ("import sys; [sys.modules.pop(name) for name in [*sys.modules] if name == 'minillm.grading' or "
                "name.startswith('minillm.checks.')]; import minillm.grading  # minillm grade: the checks as shipped")
TOKEN_PREFIX = "minillm grade: the check ran to its end "  # its last line prints it with a token of its own


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _same_source(cell, reference) -> bool:
    return cell.get("cell_type") == reference.get("cell_type") and _source(cell).strip() == _source(reference).strip()


def _is_course_code(cell) -> bool:
    """A code cell of the course's own (not an exercise's answer, not a check)."""
    nbgrader = _nbgrader(cell)
    return cell.get("cell_type") == "code" and not nbgrader.get("grade") and not nbgrader.get("solution")


def _locate(cells: list, official_cells: list) -> list[list[int]]:
    """For each cell of the course notebook, where the submission has it: by cell id, else by grade_id, else by
    identical source (when no other course cell has that source, and the submission cell's id is no course id)."""
    official_ids = {c.get("id") for c in official_cells} - {None}
    sources: dict[tuple, int] = {}
    for c in official_cells:
        key = (c.get("cell_type"), _source(c).strip())
        sources[key] = sources.get(key, 0) + 1
    found = []
    for reference in official_cells:
        rid, gid = reference.get("id"), _grade_id(reference)
        key = (reference.get("cell_type"), _source(reference).strip())
        where = [i for i, c in enumerate(cells) if rid is not None and c.get("id") == rid]
        if not where and gid:
            where = [i for i, c in enumerate(cells) if _grade_id(c) == gid]
        if not where and key[1] and sources[key] == 1:
            where = [i for i, c in enumerate(cells)
                     if (c.get("cell_type"), _source(c).strip()) == key and c.get("id") not in official_ids]
        found.append(where)
    return found


def _check_slot(cells: list, official_cells: list, found: list, index: int, copies: list) -> tuple[int, str]:
    """Where the official check official_cells[index] goes (the submission index it goes before), and a note for
    the report when the exercise's cell was not found."""
    earlier = [k for k in range(index - 1, -1, -1) if not _is_check(official_cells[k])]
    exercise = earlier[0] if earlier else None         # the exercise's answer cell, normally
    before = next((k for k in earlier if found[k]), None)
    start = min(found[before]) if before is not None else None
    # The first course code cell after the exercise: a check that ran after it could test the library's version
    # of the answer (cells like `from minillm.cost import copy_bytes as library_copy_bytes` follow the exercises).
    later = [(i, k) for k in range(index + 1, len(official_cells)) if _is_course_code(official_cells[k])
             for i in found[k] if start is None or i > start]
    cap, cap_k = min(later) if later else (None, None)
    inside = [i for i in copies if (start is None or i > start) and (cap is None or i < cap)]
    official_id = official_cells[index].get("id")
    own = [i for i in inside if official_id is not None and cells[i].get("id") == official_id]
    if inside:
        slot = (own or inside)[0] + 1
    elif start is not None:
        slot = start + 1
    elif cap is not None:
        slot = cap
    else:  # at the end it could run after course code that binds the library's answer: better no grade
        raise GraderError(f"cannot place the check {_grade_id(official_cells[index])}: no cell of the course notebook "
                          "was recognized (cell ids, nbgrader metadata and sources all differ); ask the student to "
                          "copy their answers into a fresh copy of the chapter's notebook and grade that")
    note = ""
    if not inside and exercise is not None and before != exercise:
        name = _cell_name(official_cells[exercise])
        where = (f"after the course cell {official_cells[before].get('id')!r}" if before is not None else
                 f"before the course cell {official_cells[cap_k].get('id')!r}")
        note = (f"the check ran {where}: the exercise's cell ({name}) was not found; if the answer is in the "
                "notebook, give its cell that metadata back and grade again")
    return slot, note


def _cell_name(cell) -> str:
    gid = _grade_id(cell)
    return f"cell id {cell.get('id')!r}" + (f", grade_id {gid!r}" if gid else "")


def _guard_cell() -> dict:
    return {"cell_type": "code", "execution_count": None, "id": "minillm-guard", "metadata": {}, "outputs": [],
            "source": GUARD}


def _restored_check(reference: dict, extra_tests: Path | None, note: str) -> dict:
    """The official check cell, with the grading modules reloaded, the instructor's tests, and a last line that
    prints a token of its own: the plugin counts the check as passed only when that line ran (an error hidden
    by the notebook's code stops the cell before it)."""
    restored = copy.deepcopy(reference)
    restored["outputs"], restored["execution_count"] = [], None
    gid = _grade_id(reference)
    token = secrets.token_hex(8)
    source = f"{FRESH_CHECKS}\n{_source(reference)}"
    extra = (extra_tests / f"{gid}.py") if extra_tests else None
    if extra is not None and extra.exists():
        source = f"{source}\n\n# instructor's tests\n{extra.read_text()}"
    restored["source"] = f"{source}\nsys.stdout.write({TOKEN_PREFIX + token + chr(10)!r});"  # the ; shows no Out[]
    restored["metadata"]["minillm_grade"] = {"token": TOKEN_PREFIX + token, **({"note": note} if note else {})}
    return restored


def _unique_ids(cells: list, reserved: set, keep: set) -> list:
    """The cells, each with a valid id of its own. The restored checks (`keep`, by object) keep theirs; any other
    cell without an id, with a duplicate or malformed one, or with an id in `reserved` (the checks') gets a new one."""
    used = {c["id"] for c in cells if id(c) in keep}
    for number, cell in enumerate(cells):
        if id(cell) in keep:
            continue
        cid = cell.get("id")
        if not (isinstance(cid, str) and _VALID_ID.match(cid)) or cid in used or cid in reserved:
            base = "minillm-guard" if cell.get("source") == GUARD else f"minillm-cell-{number}"
            cid, suffix = base, 1
            while cid in used or cid in reserved:
                cid, suffix = f"{base}-{suffix}", suffix + 1
            cell["id"] = cid
        used.add(cid)
    return cells


_VALID_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # nbformat 4.5's rule


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
    log_path = workdir / "pytest.log"
    # The notebook's code can write the results file too (and then stop pytest before the plugin writes it again):
    # the plugin signs what it writes with a key that reaches pytest through a pipe, which it closes before the
    # kernel starts, so the kernel never holds it.
    key = secrets.token_hex(16)
    for _ in range(KERNEL_START_ATTEMPTS):
        results_file.unlink(missing_ok=True)
        note = ""
        key_fd, write_fd = os.pipe()
        os.write(write_fd, key.encode())
        os.close(write_fd)
        with open(log_path, "w", encoding="utf-8") as log:
            # pytest stays in the grader's process group, so a Ctrl-C at the terminal reaches it too (and nbval
            # then shuts the kernel down).
            try:
                process = subprocess.Popen(command, cwd=workdir, env={**env, KEY_FD_ENV: str(key_fd)}, stdout=log,
                                           stderr=subprocess.STDOUT, pass_fds=(key_fd,))
            finally:
                os.close(key_fd)
            try:
                process.wait(timeout=notebook_timeout)
            except subprocess.TimeoutExpired:
                note = f"the notebook ran past the {notebook_timeout:g} s limit"
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        try:
            text = results_file.read_text(encoding="utf-8")
        except (OSError, ValueError):
            text = ""
        results = unseal(key, text) if text else {}
        if results is None:
            raise GraderError("the notebook's code rewrote the grader's record of its results (and stopped pytest "
                              "before it was written again): an attempt to fake a pass, so no check counts; read "
                              "the notebook's cells that use os, signal or files")
        # A kernel that died while starting, before any cell (two kernels started at once can be given the same
        # free port): not the notebook's doing, so start it again.
        if results.get("cells") or note or not _kernel_failed_to_start(log_path):
            break
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


def _mac(key: str, text: str) -> str:
    return hmac.new(key.encode(), text.encode("utf-8"), "sha256").hexdigest()


def seal(key: str, results: dict) -> str:
    """The text of the results file: `results` as JSON, signed with `key` (grader_plugin writes it)."""
    text = json.dumps(results)
    return json.dumps({"results": text, "mac": _mac(key, text)})


def unseal(key: str, text: str) -> dict | None:
    """The results that `text` (a results file) holds, or None when they were not signed with `key`: written by
    something other than grader_plugin, such as the notebook's own code."""
    try:
        sealed = json.loads(text)
        inner, mac = sealed["results"], sealed["mac"]
        if isinstance(inner, str) and isinstance(mac, str) and hmac.compare_digest(mac, _mac(key, inner)):
            return json.loads(inner)
    except (ValueError, TypeError, KeyError):
        pass
    return None


KERNEL_START_ATTEMPTS = 3
_KERNEL_START_FAILURES = ("Kernel died before replying to kernel_info", "Kernel didn't respond in",
                          "Address already in use")


def _kernel_failed_to_start(log_path: Path) -> bool:
    try:
        log = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(failure in log for failure in _KERNEL_START_FAILURES)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (the kernel's), or the process alone if it leads none."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            continue


def score(official: dict, outcomes: dict, note: str, prepared: dict | None = None) -> list[ExerciseResult]:
    """A result per official check, from the outcomes of the cells of `prepared` (the notebook that ran; default:
    the official one), in the order they ran: a cell that timed out costs the next check that ran after it."""
    checks = {c.get("id"): c for c in official["cells"] if _is_check(c)}
    ran: dict[str, tuple] = {}  # check id -> (its outcome, a timeout message, its placement note)
    timeout_message = None  # set when a cell since the last check ran past its timeout
    for cell in (prepared or official)["cells"]:
        outcome = outcomes.get(cell.get("id"))
        if outcome and outcome["status"] == "timeout":
            timeout_message = outcome.get("message") or "a cell of this exercise ran past the per-cell timeout"
        if cell.get("id") not in checks or not _is_check(cell) or cell.get("id") in ran:
            continue
        ran[cell["id"]] = (outcome, timeout_message, cell.get("metadata", {}).get("minillm_grade", {}).get("note"))
        timeout_message = None
    results = []
    for cell_id, cell in checks.items():
        meta = cell["metadata"]["nbgrader"]
        result = ExerciseResult(meta["grade_id"], int(meta.get("points", 1)))
        outcome, timeout_message, placement = ran.get(cell_id, (None, None, None))
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
        if placement and result.status != "passed":
            result.message = f"{result.message} ({placement})" if result.message else placement
        results.append(result)
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
        path.write_text(dumps(prepared), encoding="utf-8")
        outcomes, note = run_submission(path, cell_timeout, notebook_timeout, workdir)
    sub.cell_outcomes = outcomes
    sub.exercises = score(official, outcomes, note, prepared)


def _prepare_one(sub: Submission, nb: dict, chapter, extra, officials) -> tuple[dict, dict]:
    """The official notebook of the submission's chapter, and the notebook to run."""
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
    return official, prepare(nb, official, extra)


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


def _as_text(value):
    """A CSV value a spreadsheet shows as text: a file name or an error message, which students write, that starts
    like a formula (=, +, -, @) would run as one when grades.csv is opened; a ' before it makes it text."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def write_reports(submissions: list[Submission], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report_rows(submissions)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["student", "chapter", "grade_id", "points", "points_possible",
                                                "status", "message"])
    writer.writeheader()
    writer.writerows({key: _as_text(value) for key, value in row.items()} for row in rows)
    csv_path, json_path = out_dir / "grades.csv", out_dir / "grades.json"
    _keep_earlier_grades(submissions, csv_path, json_path)
    atomic_write_text(csv_path, buffer.getvalue())
    summary = [{"student": s.student, "chapter": s.chapter, "path": str(s.path), "points": s.points,
                "points_possible": s.points_possible, "grader_error": s.grader_error or None,
                "exercises": [vars(e) for e in s.exercises]} for s in submissions]
    atomic_write_text(json_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return csv_path, json_path


def _keep_earlier_grades(submissions: list[Submission], csv_path: Path, json_path: Path) -> None:
    """Grades of an earlier run that hold students this run does not (a late submission graded on its own into the
    class's --out) are renamed grades-<time of that run>.csv/.json, with a warning, rather than replaced."""
    try:
        earlier = {str(s["student"]) for s in json.loads(json_path.read_text(encoding="utf-8"))}
    except (OSError, ValueError, TypeError, KeyError):   # no earlier grades, or not a file of this grader's
        return
    gone = sorted(earlier - {s.student for s in submissions})
    if not gone:
        return
    stamp, number = time.strftime("%Y%m%d-%H%M%S", time.localtime(json_path.stat().st_mtime)), 1
    name = f"grades-{stamp}"
    while any(path.with_name(f"{name}{path.suffix}").exists() for path in (csv_path, json_path)):
        number += 1
        name = f"grades-{stamp}-{number}"
    kept = []
    for path in (csv_path, json_path):
        if path.exists():
            kept.append(path.with_name(f"{name}{path.suffix}"))
            os.replace(path, kept[-1])
    names = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
    warnings.warn(f"{json_path} held the grades of {len(gone)} student(s) not graded in this run ({names}): the "
                  f"earlier grades are kept as {' and '.join(str(path) for path in kept)}; grade the whole class into "
                  "one --out, or give a late submission an --out of its own", stacklevel=3)
