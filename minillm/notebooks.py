"""The course's notebooks: the shared first cells, student twins built from solutions, headless runs.

- `solutions/NN_*.ipynb` is the single source. `build_student(nb)` replaces every region between
  `### BEGIN SOLUTION` and `### END SOLUTION` by a stub that raises NotImplementedError and clears
  outputs; `minillm build-notebooks` writes `notebooks/` and `--check` fails when they are out of sync.
  Anything that would ship a solution by mistake is an error instead: a near-miss marker (`# BEGIN SOLUTION`,
  lowercase, extra text), markers in a markdown or raw cell, a cell flagged `solution: true` without markers.
- `BOOTSTRAP` is the first cell of every chapter (the template lives here, in one place).
- `run_course()` executes chapters headless with nbclient (what `make course` calls).
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import atomic_write_text, fast_mode, repo_root, runs_dir

# The public home of the course, used by the Colab bootstrap and the README badges. Change it here only.
REPO_URL = "https://github.com/minillm-course/minillm"
REPO_BRANCH = "main"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# Anything that looks like a solution marker: any number of '#', any case, anything around it, BEGIN_SOLUTION too.
_MARKER_LIKE = re.compile(r"#*[ \t]*\b(begin|end)[ \t_]+solution\b", re.IGNORECASE)
STUB_LINE = 'raise NotImplementedError("exercise {grade_id}: replace this line with your code")'
# The stub of a region in a cell without an nbgrader grade_id (not "exercise this exercise: ...").
_STUB_LINE_UNNAMED = 'raise NotImplementedError("replace this line with your code")'

# First cell of every chapter. It must run before minillm is importable, so it is plain Python.
BOOTSTRAP = f'''# Set-up: make `minillm` importable, here or on Colab. Run this cell first.
import os, sys, subprocess
from pathlib import Path
if "google.colab" in sys.modules and not Path("minillm-course").exists():
    subprocess.run(["git", "clone", "--depth", "1", "-b", "{REPO_BRANCH}", "{REPO_URL}", "minillm-course"], check=True)
    # --no-deps: Colab already has torch, numpy, regex, matplotlib, tqdm and ipywidgets; never upgrade them there.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "minillm-course"], check=True)
for parent in [Path.cwd(), *Path.cwd().parents, Path("minillm-course").resolve()]:
    if (parent / "minillm" / "__init__.py").exists():
        sys.path.insert(0, str(parent))
        break
import minillm
minillm.notebook_setup();  # the ; keeps Jupyter from echoing the hardware dict it returns'''

PARAMETERS = '''# Run size. `make course FAST=1` and the tests set MINILLM_FAST=1 for the quick pass.
FAST = os.environ.get("MINILLM_FAST", "0") == "1"'''


def solutions_dir() -> Path:
    root = repo_root()
    if root is None:
        raise FileNotFoundError("the course notebooks live in a checkout of the course repository; "
                                f"clone {REPO_URL} and run from there")
    return root / "solutions"


def notebooks_dir() -> Path:
    return solutions_dir().parent / "notebooks"


def chapter_paths(chapters: list[str] | None = None, folder: Path | None = None) -> list[Path]:
    """Solution notebooks in reading order, optionally only the given chapter numbers ('00', '3')."""
    folder = folder or solutions_dir()
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if chapters:
        wanted = {c.zfill(2) for c in chapters}
        unknown = wanted - {p.name[:2] for p in paths}
        if unknown:
            have = ", ".join(p.name[:2] for p in paths)
            raise ValueError(f"no chapter {', '.join(sorted(unknown))} in {folder}; the chapters are: {have}")
        paths = [p for p in paths if p.name[:2] in wanted]
    return paths


# --- student notebooks ------------------------------------------------------------------------------

def _cell_source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def stub_solution_regions(source: str, grade_id: str = "this exercise") -> str:
    """Replace each BEGIN/END SOLUTION region by a stub at the same indentation."""
    stub = STUB_LINE.format(grade_id=grade_id) if grade_id != "this exercise" else _STUB_LINE_UNNAMED
    out, inside, indent = [], False, ""
    for number, line in enumerate(source.split("\n"), 1):
        stripped = line.strip()
        if stripped not in (BEGIN, END) and _MARKER_LIKE.search(line):
            raise ValueError(f"{grade_id}: line {number}: {stripped!r} looks like a solution marker but is not "
                             f"exactly '{BEGIN}' or '{END}' on a line of its own, so the solution would ship "
                             "in the learner notebook; write the marker exactly like that")
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{grade_id}: line {number}: '{BEGIN}' inside another solution region")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(indent + stub)
        elif stripped == END:
            if not inside:
                raise ValueError(f"{grade_id}: line {number}: '{END}' without a '{BEGIN}'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{grade_id}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def _grade_id_of(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def _describe_cell(cell, index: int) -> str:
    return f"cell {index} (id {cell.get('id', '?')}, {cell.get('cell_type', '?')})"


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_shape(nb) -> None:
    """ValueError naming what is malformed, instead of a KeyError or AttributeError deep in build_student."""
    fix = "open and save it in Jupyter, or fix the JSON by hand"
    if not isinstance(nb, dict):
        raise ValueError(f"it holds {_json_type(nb)}, not a notebook (a JSON object with a list of cells); {fix}")
    if not isinstance(nb.get("cells"), list):
        raise ValueError(f"it has no list of cells (nbformat {nb.get('nbformat')!r}; format 4 is needed); {fix}")
    if not isinstance(nb.get("metadata", {}), dict):
        raise ValueError(f"its metadata is {_json_type(nb['metadata'])}, not an object; {fix}")
    for index, cell in enumerate(nb["cells"]):
        if not isinstance(cell, dict):
            raise ValueError(f"cell {index} is {_json_type(cell)}, not a cell (a JSON object); {fix}")
        where = _describe_cell(cell, index)
        if cell.get("cell_type") not in ("code", "markdown", "raw"):
            kind = f"cell_type {cell['cell_type']!r}" if "cell_type" in cell else "no cell_type"
            raise ValueError(f"{where} has {kind}; a cell is 'code', 'markdown' or 'raw'; {fix}")
        source = cell.get("source", "")
        if not (isinstance(source, str) or isinstance(source, list) and all(isinstance(s, str) for s in source)):
            raise ValueError(f"{where}: its source is {_json_type(source)}, not text or a list of lines; {fix}")
        meta = cell.get("metadata", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: its metadata is {_json_type(meta)}, not an object; {fix}")
        nbgrader = meta.get("nbgrader", {})
        if not isinstance(nbgrader, dict):
            raise ValueError(f"{where}: its nbgrader metadata is {_json_type(nbgrader)}, not an object; {fix}")
        grade_id = nbgrader.get("grade_id")
        if grade_id is not None and not isinstance(grade_id, str):
            raise ValueError(f"{where}: its grade_id is {grade_id!r}, not a string such as 'ex01.3'; {fix}")


def build_student(nb: dict) -> dict:
    """The student twin of a solution notebook: solutions stubbed, outputs and widget state cleared, same ids.

    Raises ValueError rather than ship a solution: near-miss markers, markers outside code cells, and cells
    flagged as solutions (nbgrader `solution: true`) that have no markers to stub.
    """
    _check_shape(nb)
    student = copy.deepcopy(nb)
    # Saved widget state can hold a solution's outputs (a slider's value, a plot's data): never ship it.
    student.get("metadata", {}).pop("widgets", None)
    for index, cell in enumerate(student["cells"]):
        source = _cell_source(cell)
        flagged = bool(cell.get("metadata", {}).get("nbgrader", {}).get("solution"))
        if cell["cell_type"] != "code":
            if _MARKER_LIKE.search(source):
                raise ValueError(f"{_describe_cell(cell, index)}: solution markers only work in code cells; in a "
                                 f"{cell['cell_type']} cell the answer would be copied to the learner notebook as "
                                 "is. Move the answer into a code cell or out of the solution notebook")
            if flagged:
                raise ValueError(f"{_describe_cell(cell, index)} is flagged as a solution (nbgrader solution: true) "
                                 "but only code cells are stubbed; unflag it or make it a code cell with markers")
            continue
        if _MARKER_LIKE.search(source):
            grade_id = (_grade_id_of(cell) or "this exercise").removesuffix("-solution")
            try:
                cell["source"] = stub_solution_regions(source, grade_id)
            except ValueError as error:
                raise ValueError(f"{_describe_cell(cell, index)}: {error}") from None
        if flagged and BEGIN not in source:
            raise ValueError(f"{_describe_cell(cell, index)} is flagged as a solution (nbgrader solution: true) but "
                             f"has no '{BEGIN}' / '{END}' region, so it would ship unchanged; put the markers "
                             "around the answer, or unflag the cell if it is not an exercise")
        cell["outputs"] = []
        cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    return student


def strip_outputs(nb: dict) -> dict:
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
            cell.get("metadata", {}).pop("execution", None)
    return nb


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def load(path: Path) -> dict:
    try:
        # utf-8-sig: a notebook saved by an editor that writes a byte-order mark is still a notebook
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid notebook (JSON error: {error})") from None
    except UnicodeDecodeError as error:  # named, with the path: the bare codec error names no file
        raise ValueError(f"{path} is not a valid notebook: it is not UTF-8 text ({error.reason} at byte "
                         f"{error.start}); notebooks are UTF-8 JSON, so save it again as UTF-8") from None


def build_notebooks(check: bool = False, verbose: bool = True, source_dir: Path | None = None,
                    out_dir: Path | None = None) -> list[str]:
    """Write notebooks/ from solutions/ (or, with check=True, list the ones that are out of sync)."""
    source_dir = Path(source_dir) if source_dir else solutions_dir()
    out_dir = Path(out_dir) if out_dir else source_dir.parent / "notebooks"
    problems = []
    solutions = chapter_paths(folder=source_dir)
    if not solutions:  # else --check would say "in sync" about nothing at all
        what = "does not exist" if not source_dir.is_dir() else "has no chapter notebooks (NN_name.ipynb)"
        raise FileNotFoundError(f"{source_dir} {what}, so there is nothing to build notebooks/ from; run "
                                "the command in a checkout of the course, whose solutions/ holds the chapters")
    texts = {}
    for path in solutions:  # build every twin before writing any, so that an error leaves notebooks/ as it was
        nb = load(path)
        try:
            texts[path] = dumps(build_student(nb))
        except ValueError as error:
            raise ValueError(f"{source_dir.name}/{path.name}: {error}") from None
    for path, text in texts.items():
        target = out_dir / path.name
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        if check:
            problems.append(f"{out_dir.name}/{target.name} is {'missing' if current is None else 'out of date'}")
        else:
            atomic_write_text(target, text)
            if verbose:
                print(f"wrote {out_dir.name}/{target.name}")
    names = {p.name for p in solutions}
    for extra in sorted(out_dir.glob("[0-9][0-9]_*.ipynb")):
        if extra.name not in names:
            problems.append(f"{out_dir.name}/{extra.name} has no source in {source_dir.name}/ (delete it, or "
                            f"add {source_dir.name}/{extra.name})")
    return problems


# --- running chapters headless -----------------------------------------------------------------------

@dataclass
class ChapterRun:
    path: Path
    seconds: float = 0.0
    ok: bool = True
    error: str = ""
    output_path: Path | None = None
    cells: int = 0


def _cell_label(cell, index: int) -> str:
    first = _cell_source(cell).strip().splitlines()
    return f"cell {index} ({cell.get('id', '?')}: {first[0][:60] if first else ''!r})"


def _last_started_cell(nb):
    """(index, cell) of the last code cell that started: nbclient numbers a cell (execution_count) as it starts."""
    for index, cell in reversed(list(enumerate(nb.cells))):
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            return index, cell
    return None


def _failed_cell(nb):
    """(index, cell, error output) of the cell that stopped the run, or None.

    nbclient stops at the first error that a cell is not tagged `raises-exception` to expect, so that is the last
    cell with an error output among the untagged ones (an expected error earlier in the notebook is not it).
    """
    for index, cell in reversed(list(enumerate(nb.cells))):
        if "raises-exception" in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, cell, output
    return None


def _describe_failure(nb, error, timeout: float | None = None, running: int | None = None) -> str:
    """One line: the cell and what went wrong. `running`: the index of the cell nbclient sent last, if known."""
    started = (running, nb.cells[running]) if running is not None else _last_started_cell(nb)
    if type(error).__name__ == "CellTimeoutError" and started:
        more = int(2 * timeout) if timeout else 7200
        limit = f"the limit of {timeout:g} s per cell" if timeout else "the per-cell limit"
        return (f"{_cell_label(started[1], started[0])} ran past {limit}. A slower machine needs more time: "
                f"`minillm course run --timeout {more}`, or `make course TIMEOUT={more}`")
    # nbclient's CellExecutionError does not carry the cell, so find the cell with the error output.
    failed = _failed_cell(nb)
    if failed:
        index, cell, output = failed
        return f"{_cell_label(cell, index)} raised {output.get('ename')}: {output.get('evalue')}"
    text = str(error).strip()
    what = f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"
    if type(error).__name__ == "DeadKernelError" and started:
        return (f"the kernel died while {_cell_label(started[1], started[0])} ran ({what}): out of memory, or a crash "
                "in native code; with too little memory, try the quick pass (`minillm course run --fast`)")
    return what


def _interrupted(client, nb, error: BaseException) -> bool:
    """Ctrl-C (or a SIGTERM) during a chapter, which nbclient turns into a failed cell or a dead kernel."""
    if isinstance(error, KeyboardInterrupt):
        return True
    # nbclient's own SIGINT/SIGTERM handler shuts the kernel down and leaves this future behind
    future = getattr(client, "_async_cleanup_kernel_future", None)
    if future is not None:
        if future.done() and not future.cancelled():
            future.exception()  # retrieved: no "Task exception was never retrieved" on the way out
        return True
    if type(error).__name__ == "CellTimeoutError":  # nbclient interrupts the kernel itself on a timeout
        return False
    failed = _failed_cell(nb)   # the kernel alone got the SIGINT
    return failed is not None and failed[2].get("ename") == "KeyboardInterrupt"


class ChapterInterrupted(KeyboardInterrupt):
    """Ctrl-C during a chapter; `run` holds what was executed up to then (saved to run.output_path)."""

    def __init__(self, run: ChapterRun):
        super().__init__(f"{run.path.name} interrupted")
        self.run = run


def run_chapter(path: Path, fast: bool, timeout: int = 3600, out_dir: Path | None = None) -> ChapterRun:
    """Execute one chapter headless and save the executed notebook to out_dir (default runs/course/).

    A failing cell, a cell past `timeout` or a dead kernel is reported in the result (ok=False, error naming the
    cell); Ctrl-C raises ChapterInterrupted once the part that ran is saved.
    """
    import nbclient
    import nbformat

    path = Path(path)
    result = ChapterRun(path=path)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as error:  # one unreadable chapter is reported; the others still run
        result.ok, result.error = False, f"cannot read {path}: {type(error).__name__}: {error}"
        return result
    result.cells = sum(1 for c in nb.cells if c.cell_type == "code")
    # The kernel's environment only: this process's own MINILLM_FAST / MINILLM_HEADLESS stay as they were.
    env = {**os.environ, "MINILLM_FAST": "1" if fast else "0", "MINILLM_HEADLESS": "1"}
    # log_level=ERROR: keeps the kernel's start-up chatter (a TCP-transport warning) out of the course log;
    # errors in cells still come back as cell outputs.
    # The cell sent last is the one that timed out or took the kernel down: a kernel that dies at once may not
    # have numbered it (execution_count) yet.
    running = []
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                     resources={"metadata": {"path": str(path.parent)}},
                                     on_cell_execute=lambda cell, cell_index: running.append(cell_index))
    interrupted = False
    start = time.perf_counter()
    try:
        client.execute(env=env)
    except (Exception, KeyboardInterrupt) as error:  # a failing chapter is reported; the others still run
        interrupted = _interrupted(client, nb, error)
        result.ok = False
        result.error = ("interrupted (Ctrl-C)" if interrupted
                        else _describe_failure(nb, error, timeout, running[-1] if running else None))
    result.seconds = time.perf_counter() - start
    out_dir = Path(out_dir) if out_dir else runs_dir() / "course"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / path.name, nbformat.writes(nb))
        result.output_path = out_dir / path.name
    except OSError as error:  # the run is still reported, and the other chapters still run
        result.ok = False
        saving = (f"the executed notebook could not be saved as {out_dir / path.name} ({error.strerror or error}); "
                  "clear that path or set MINILLM_RUNS to a folder you can write to")
        result.error = f"{result.error}; {saving}" if result.error else saving
    if interrupted:
        raise ChapterInterrupted(result)
    return result


def _check_writable(folder: Path) -> None:
    """Fail before an hour of running, not after it, when the executed notebooks cannot be saved."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".minillm-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as error:
        raise type(error)(error.errno, f"cannot save the executed notebooks in {folder} ({error.strerror}); "
                          "set MINILLM_RUNS to a folder you can write to", str(folder)) from None
    probe.unlink()


def run_course(chapters: list[str] | None = None, fast: bool = False, timeout: int = 3600) -> list[ChapterRun]:
    if chapters and any(not str(c).strip() for c in chapters):
        # "".zfill(2) is "00": an empty argument (an unset shell variable) would quietly run chapter 00
        have = ", ".join(p.name[:2] for p in chapter_paths())
        raise ValueError(f"an empty chapter number was given; name chapters by number, e.g. 00 or 3 "
                         f"(the chapters are: {have})")
    paths = chapter_paths(chapters)
    if not paths:
        raise FileNotFoundError(f"no chapter notebooks (NN_name.ipynb) in {solutions_dir()}; run the course "
                                f"from a complete checkout of {REPO_URL}")
    out_dir = runs_dir() / "course"
    _check_writable(out_dir)
    mode = "fast" if fast else "full"
    print(f"minillm course: {len(paths)} chapter(s), {mode} mode, executed outputs go to {out_dir}")
    runs = []
    for number, path in enumerate(paths, 1):
        print(f"[{number}/{len(paths)}] {path.name} ...", flush=True)
        try:
            run = run_chapter(path, fast=fast, timeout=timeout, out_dir=out_dir)
        except KeyboardInterrupt as interruption:
            run = getattr(interruption, "run", None)
            saved = f"; the part that ran is in {run.output_path}" if run and run.output_path else ""
            skipped = ", ".join(p.name[:2] for p in paths[number:])
            print(f"[{number}/{len(paths)}] {path.name} interrupted{saved}"
                  + (f"; not run: {skipped}" if skipped else ""), file=sys.stderr, flush=True)
            raise
        status = "ok" if run.ok else f"FAILED: {run.error}"
        print(f"[{number}/{len(paths)}] {path.name} {status} ({run.seconds:.1f} s, {run.cells} code cells)", flush=True)
        runs.append(run)
    return runs


def notebook_setup(seed: int = 0, quiet: bool = False) -> dict:
    """What the bootstrap cell calls: one line about the machine, seeds, readable plots."""
    import random

    import numpy as np
    import torch

    from .cost import format_hardware, probe_hardware

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        import matplotlib.pyplot as plt
        plt.rcParams.update({"figure.figsize": (7, 4), "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
    except ImportError:
        pass
    hardware = probe_hardware()
    if not quiet:
        from . import __version__
        print(f"minillm {__version__} | {format_hardware(hardware)} | {'fast' if fast_mode() else 'full'} mode")
    fast = os.environ.get("MINILLM_FAST")
    if fast is not None and fast != "1" and fast.strip().lower() not in _FAST_VALUES_MEANING_FULL:
        # The chapters' FAST is MINILLM_FAST == "1" exactly; "yes" or "true" would quietly mean the full sizes.
        print(f"minillm: MINILLM_FAST={fast!r} is neither 1 nor 0, so this run uses the full sizes; set "
              "MINILLM_FAST=1 for the quick pass (and restart the kernel), or MINILLM_FAST=0", file=sys.stderr)
    return hardware


# Values of MINILLM_FAST that plainly ask for the full run, so they need no warning.
_FAST_VALUES_MEANING_FULL = {"", "0", "false", "no", "off"}


def widgets_available() -> bool:
    """True in a live Jupyter kernel whose front end can show ipywidgets; False in headless runs.

    Headless runs (`minillm course run`, the nbval tests) have a kernel but nobody to move a slider;
    they set MINILLM_HEADLESS=1 and notebooks then show a static figure instead.
    """
    if os.environ.get("MINILLM_HEADLESS", "0").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        from IPython import get_ipython
        importlib.import_module("ipywidgets")   # importable, not merely installed
    except ImportError:
        return False
    shell = get_ipython()
    # Any kernel shell, subclasses too: Colab's is google.colab._shell.Shell(ZMQInteractiveShell), whose own
    # class name is "Shell"; a terminal IPython (TerminalInteractiveShell) has no front end for widgets.
    return shell is not None and any(k.__name__ == "ZMQInteractiveShell" for k in type(shell).__mro__)
