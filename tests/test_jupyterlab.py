"""A learner's path: open a chapter in a real JupyterLab in headless Chromium, run all cells, save.

Every chapter, in fast mode (MINILLM_FAST=1); chapter 04's ipywidgets explorer of the routing must render
as a live widget in a real front end, not its static fallback.

Needs Chromium (Debian: `apt-get install chromium`; `.ci/run` installs it) and the `playwright` package
(the dev extra). The saved notebook is read back from disk: every code cell ran, none raised, and each
check cell printed its ✓ line.
"""
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from jupyterlab_server import CHROMIUM, CHROMIUM_ARGS, CURRENT, KERNEL_IDLE, jupyterlab

ROOT = Path(__file__).resolve().parents[1]
# chapter -> the check lines its solutions print
CHAPTERS = {"00_setup.ipynb": ["ex00.1", "ex00.2"],
            "01_next_word.ipynb": [f"ex01.{i}" for i in range(1, 6)],
            "02_gpu_linear_algebra.ipynb": [f"ex02.{i}" for i in range(1, 5)],
            "03_pretraining.ipynb": [f"ex03.{i}" for i in range(1, 5)],
            "04_mixture_of_experts.ipynb": ["ex04.1", "ex04.2", "ex04.3"]}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium (CI installs it)")


@pytest.fixture(params=list(CHAPTERS))
def lab(tmp_path, request):
    chapter = request.param
    work = tmp_path / "course"
    (work / "solutions").mkdir(parents=True)
    shutil.copy(ROOT / "solutions" / chapter, work / "solutions" / chapter)
    (work / "minillm").symlink_to(ROOT / "minillm")  # the bootstrap cell finds minillm by walking up
    with jupyterlab(work, tmp_path) as url:
        yield url, work / "solutions" / chapter


EXECUTION_COUNTS = f"""() => {{ const cells = ({CURRENT}).content.model.cells; const counts = [];
    for (let i = 0; i < cells.length; i++) {{ const c = cells.get(i);
      if (c.type === 'code') counts.push(c.executionCount); }}
    return counts; }}"""


def test_chapter_runs_in_jupyterlab(lab):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
    url, notebook = lab
    code_cells = sum(1 for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/solutions/{notebook.name}", timeout=90_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        # Drive JupyterLab through its own commands (what the Run menu calls), once the kernel is idle.
        page.wait_for_function(KERNEL_IDLE, timeout=120_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        deadline = time.time() + 240
        counts = []
        while time.time() < deadline:
            time.sleep(2)
            counts = page.evaluate(EXECUTION_COUNTS)
            if all(counts) and page.evaluate(KERNEL_IDLE):
                break
        page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
        time.sleep(2)
        page.screenshot(path=str(notebook.parent / "jupyterlab.png"))
        browser.close()
    assert len(counts) == code_cells and all(counts), f"not every cell ran in JupyterLab: {counts}"
    nb = json.loads(notebook.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in cells), "the notebook saved from JupyterLab lacks executed cells"
    errors = [(c["id"], o.get("ename")) for c in cells for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors, f"cells raised in JupyterLab: {errors}"
    printed = "".join("".join(o.get("text", "")) for c in cells for o in c["outputs"])
    for exercise in CHAPTERS[notebook.name]:
        assert f"✓ {exercise}" in printed, f"{exercise}'s check did not pass in JupyterLab"
    # a check cell prints its ✓ line and nothing else: no Out[n] echo of the points check() returns
    echoed = [c["id"] for c in cells if c["metadata"].get("nbgrader", {}).get("grade")
              for o in c["outputs"] if o.get("output_type") == "execute_result"]
    assert not echoed, f"check cells echo the points they return under the ✓ line: {echoed}"
    if notebook.name.startswith("04"):
        widgets = {c["id"]: "".join(o["data"].get("text/plain", "")) for c in cells for o in c["outputs"]
                   if WIDGET_VIEW in o.get("data", {})}
        assert "widget" in widgets, "chapter 04's routing explorer (cell 'widget') fell back to a static figure"
        assert not re.search(r"Slider\([^)]*\bmax=0\b", widgets["widget"]), \
            f"the routing explorer shows a slider with nowhere to go: {widgets['widget']}"

