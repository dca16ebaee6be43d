"""A learner's slips in a real JupyterLab (headless Chromium), on the student twins of chapters 02 and 03.

- Stop (kernel interrupt) pressed while chapter 03 pretrains: train() catches the KeyboardInterrupt and returns
  early, so the cell must stop Run All itself, with a KeyboardInterrupt that says what to do; it used to go on
  (a TypeError on the missing validation loss, or the rest of the chapter on a half-trained model).
- A wrong ex02.1, the cells after it run, then its check cell run again: the check must still fail; a later
  cell used to import the library's function under the learner's name, and the check then passed.

Fast mode (MINILLM_FAST=1). Needs Chromium and the `playwright` package, like tests/test_jupyterlab.py.
"""
import json
import time
from pathlib import Path

import pytest

from jupyterlab_server import CHROMIUM, CHROMIUM_ARGS, CURRENT, KERNEL_IDLE, jupyterlab

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium (CI installs it)")

CELLS = f"""() => {{ const cells = ({CURRENT}).content.model.cells; const out = [];
    for (let i = 0; i < cells.length; i++) {{ const c = cells.get(i);
      out.push({{id: c.id, type: c.type, count: c.type === 'code' ? c.executionCount : null,
                 outputs: c.type === 'code' ? c.outputs.toJSON() : []}}); }}
    return out; }}"""


def twin(chapter: str, solved: set[str], replace: dict[str, str] | None = None) -> str:
    """The student twin of `chapter` with the exercises in `solved` given their solutions (as a learner pastes
    them, without the markers), and the cells in `replace` (id -> source) given that source."""
    nb = json.loads((ROOT / "notebooks" / chapter).read_text())
    solutions = {c["id"]: c for c in json.loads((ROOT / "solutions" / chapter).read_text())["cells"]}
    for cell in nb["cells"]:
        if cell["id"] in (replace or {}):
            cell["source"] = replace[cell["id"]]
        elif cell["metadata"].get("nbgrader", {}).get("grade_id", "").removesuffix("-solution") in solved:
            source = "".join(solutions[cell["id"]]["source"])
            cell["source"] = "\n".join(line for line in source.split("\n") if line.strip() not in (BEGIN, END))
    return json.dumps(nb)


@pytest.fixture
def lab(tmp_path):
    """start(chapter, text) -> a Playwright page with the notebook open and its kernel idle."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
    work = tmp_path / "course"
    (work / "notebooks").mkdir(parents=True)
    (work / "minillm").symlink_to(ROOT / "minillm")  # the bootstrap cell finds minillm by walking up
    handles = []
    with jupyterlab(work, tmp_path) as url:
        def start(chapter: str, text: str):
            (work / "notebooks" / chapter).write_text(text)
            p = playwright.sync_playwright().start()
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            handles.append((p, browser))
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/notebooks/{chapter}", timeout=90_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.wait_for_function(KERNEL_IDLE, timeout=120_000)
            return page

        try:
            yield start
        finally:
            for p, browser in handles:
                browser.close()
                p.stop()


def command(page, name: str) -> None:
    """Run a JupyterLab command without waiting for it (Run All's promise ends only with the last cell)."""
    page.evaluate(f"void window.jupyterapp.commands.execute({json.dumps(name)})")


def cell(page, cell_id: str) -> dict:
    return next(c for c in page.evaluate(CELLS) if c["id"] == cell_id)


def select(page, cell_id: str) -> None:
    index = next(i for i, c in enumerate(page.evaluate(CELLS)) if c["id"] == cell_id)
    page.evaluate(f"({CURRENT}).content.activeCellIndex = {index}")


def wait_for(page, predicate, what: str, timeout: float = 120, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def errors(c: dict) -> list[dict]:
    return [o for o in c["outputs"] if o["output_type"] == "error"]


def text(c: dict) -> str:
    return "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for o in c["outputs"])


def settle(page, seconds: float = 3) -> None:
    """Wait until the kernel has been idle for `seconds` in a row (queued cells start within milliseconds)."""
    quiet = 0.0
    deadline = time.time() + 180
    while quiet < seconds and time.time() < deadline:
        time.sleep(0.5)
        quiet = quiet + 0.5 if page.evaluate(KERNEL_IDLE) else 0.0


def test_stop_during_pretraining_stops_the_chapter(lab):
    chapter = "03_pretraining.ipynb"
    page = lab(chapter, twin(chapter, {"ex03.1", "ex03.2", "ex03.3", "ex03.4"}))
    command(page, "notebook:run-all-cells")
    # Stop as soon as the training loop shows its progress bar (a widget output of the pretraining cell).
    wait_for(page, lambda: cell(page, "pretrain")["outputs"] or cell(page, "pretrain")["count"],
             "the pretraining cell to start", timeout=180)
    if cell(page, "pretrain")["count"]:
        pytest.skip("pretraining finished before the test could press Stop")
    command(page, "kernelmenu:interrupt")
    wait_for(page, lambda: cell(page, "pretrain")["count"], "the interrupted cell to end", timeout=120)
    settle(page)
    cells = page.evaluate(CELLS)
    pretrain = cell(page, "pretrain")
    raised = [o["ename"] for o in errors(pretrain)]
    assert raised == ["KeyboardInterrupt"], \
        f"Stop during pretraining should end the cell with a KeyboardInterrupt, got {raised}: {text(pretrain)[-300:]}"
    assert "run this cell again" in errors(pretrain)[0]["evalue"], errors(pretrain)[0]["evalue"]
    later = cells[[c["id"] for c in cells].index("pretrain") + 1:]
    ran = [c["id"] for c in later if c["type"] == "code" and c["count"]]
    assert not ran, f"Run All went on after Stop was pressed during pretraining: {ran} ran"


def test_a_check_still_fails_after_the_cells_below_ran(lab):
    chapter = "02_gpu_linear_algebra.ipynb"
    wrong = ("def matmul_arithmetic_intensity(m: int, k: int, n: int, bytes_per_element: int) -> float:\n"
             "    return 2 * m * k * n / (m * k + k * n + m * n)   # forgot bytes_per_element")
    page = lab(chapter, twin(chapter, set(), {"ex02-1": wrong}))
    command(page, "notebook:run-all-cells")
    wait_for(page, lambda: errors(cell(page, "check-ex02-1")), "the check of ex02.1 to fail")
    settle(page)
    select(page, "count")
    command(page, "notebook:run-all-below")   # the learner carries on past the failed check
    wait_for(page, lambda: cell(page, "check-ex02-2")["count"], "the cells down to ex02.2's check to run",
             timeout=180)
    settle(page)
    assert cell(page, "roofline-measure")["count"] and not errors(cell(page, "roofline-measure")), \
        "the roofline cell should run with ex02.1 still wrong"
    before = cell(page, "check-ex02-1")["count"]
    select(page, "check-ex02-1")
    command(page, "notebook:run-cell")
    wait_for(page, lambda: cell(page, "check-ex02-1")["count"] != before, "the check of ex02.1 to run again")
    settle(page)
    check = cell(page, "check-ex02-1")
    assert "✓" not in text(check), "the check of a wrong ex02.1 passed once the cells below had run"
    assert [o["ename"] for o in errors(check)] == ["AssertionError"], text(check)
