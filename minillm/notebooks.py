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
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import atomic_write_text, fast_mode, repo_root, runs_dir

# The public home of the course, used by the Colab bootstrap and the README badges. Change it here only.
REPO_URL = "https://github.com/minillm-course/minillm"
REPO_BRANCH = "main"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# Anything that looks like a solution marker: any number of '#', any case, anything around it.
_MARKER_LIKE = re.compile(r"#*[ \t]*\b(begin|end)[ \t]+solution\b", re.IGNORECASE)
STUB_LINE = 'raise NotImplementedError("exercise {grade_id}: replace this line with your code")'

# First cell of every chapter. It must run before minillm is importable, so it is plain Python.
BOOTSTRAP = f'''# Set-up: make `minillm` importable, here or on Colab. Run this cell first.
import os, sys, subprocess
from pathlib import Path
if "google.colab" in sys.modules and not Path("minillm-course").exists():
    subprocess.run(["git", "clone", "--depth", "1", "-b", "{REPO_BRANCH}", "{REPO_URL}", "minillm-course"], check=True)
    # --no-deps: Colab already has torch, numpy, matplotlib, tqdm and ipywidgets; never upgrade them there.
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
            out.append(indent + STUB_LINE.format(grade_id=grade_id))
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


def build_student(nb: dict) -> dict:
    """The student twin of a solution notebook: solutions stubbed, outputs and widget state cleared, same ids.

    Raises ValueError rather than ship a solution: near-miss markers, markers outside code cells, and cells
    flagged as solutions (nbgrader `solution: true`) that have no markers to stub.
    """
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
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid notebook (JSON error: {error})") from None


def build_notebooks(check: bool = False, verbose: bool = True, source_dir: Path | None = None,
                    out_dir: Path | None = None) -> list[str]:
    """Write notebooks/ from solutions/ (or, with check=True, list the ones that are out of sync)."""
    source_dir = Path(source_dir) if source_dir else solutions_dir()
    out_dir = Path(out_dir) if out_dir else source_dir.parent / "notebooks"
    problems = []
    solutions = chapter_paths(folder=source_dir)
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
            problems.append(f"{out_dir.name}/{extra.name} has no source in {source_dir.name}/")
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


def _describe_failure(nb, error, timeout: float | None = None) -> str:
    if type(error).__name__ == "CellTimeoutError":
        # nbclient numbers a cell (execution_count) as it starts, so the last numbered cell is the one that ran out.
        for index, cell in reversed(list(enumerate(nb.cells))):
            if cell.cell_type == "code" and cell.get("execution_count") is not None:
                first = _cell_source(cell).strip().splitlines()
                more = int(2 * timeout) if timeout else 7200
                limit = f"the limit of {timeout:g} s per cell" if timeout else "the per-cell limit"
                return (f"cell {index} ({cell.get('id', '?')}: {first[0][:60] if first else ''!r}) ran past "
                        f"{limit}. A slower machine needs more time: `minillm course run --timeout {more}`, "
                        f"or `make course TIMEOUT={more}`")
    # nbclient's CellExecutionError does not carry the cell, so find the first cell with an error output.
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first = _cell_source(cell).strip().splitlines()
                return (f"cell {index} ({cell.get('id', '?')}: {first[0][:60] if first else ''!r}) raised "
                        f"{output.get('ename')}: {output.get('evalue')}")
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"


def run_chapter(path: Path, fast: bool, timeout: int = 3600, out_dir: Path | None = None) -> ChapterRun:
    import nbclient
    import nbformat

    result = ChapterRun(path=path)
    nb = nbformat.read(path, as_version=4)
    result.cells = sum(1 for c in nb.cells if c.cell_type == "code")
    os.environ["MINILLM_FAST"] = "1" if fast else "0"
    os.environ["MINILLM_HEADLESS"] = "1"
    # log_level=ERROR: keeps the kernel's start-up chatter (a TCP-transport warning) out of the course log;
    # errors in cells still come back as cell outputs.
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    except Exception as error:  # a failing chapter is reported; the others still run
        result.ok, result.error = False, _describe_failure(nb, error, timeout)
    result.seconds = time.perf_counter() - start
    out_dir = out_dir or runs_dir() / "course"
    out_dir.mkdir(parents=True, exist_ok=True)
    result.output_path = out_dir / path.name
    atomic_write_text(result.output_path, nbformat.writes(nb))
    return result


def run_course(chapters: list[str] | None = None, fast: bool = False, timeout: int = 3600) -> list[ChapterRun]:
    paths = chapter_paths(chapters)
    mode = "fast" if fast else "full"
    print(f"minillm course: {len(paths)} chapter(s), {mode} mode, executed outputs go to {runs_dir() / 'course'}")
    runs = []
    for number, path in enumerate(paths, 1):
        print(f"[{number}/{len(paths)}] {path.name} ...", flush=True)
        run = run_chapter(path, fast=fast, timeout=timeout)
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
    return hardware


def widgets_available() -> bool:
    """True in a live Jupyter kernel whose front end can show ipywidgets; False in headless runs.

    Headless runs (`minillm course run`, the nbval tests) have a kernel but nobody to move a slider;
    they set MINILLM_HEADLESS=1 and notebooks then show a static figure instead.
    """
    if os.environ.get("MINILLM_HEADLESS", "0") == "1":
        return False
    try:
        from IPython import get_ipython
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
