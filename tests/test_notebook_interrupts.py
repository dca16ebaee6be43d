"""Stop (JupyterLab's Stop button, Ctrl-C) during a chapter's training stops the chapter.

train() catches the KeyboardInterrupt, saves a checkpoint and returns a result with .interrupted, so every cell
that trains must raise KeyboardInterrupt itself ("... run this cell again ..."), or Run All carries on with a
half-trained model. A Stop in a cell that trains several models in a loop ends the whole loop, and running the
cell again trains from the start: the same results as a run that was never stopped.

Headless (nbclient), fast mode (MINILLM_FAST=1). A cell injected after the shared first cells makes
minillm.train.lr_at raise KeyboardInterrupt at step 2 of a chosen train() call, where Ctrl-C would land
(tests/test_train.py simulates it the same way), and prints a marker line at the start of every train() call.
The browser version, for chapter 03's pretraining: tests/test_jupyterlab_twins.py.
"""
import json
import os
from pathlib import Path

import pytest

from minillm.notebooks import load

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
MARKER = "[test] train() call"
INJECT = f'''# injected by tests/test_notebook_interrupts.py
import sys as _sys
import minillm.train as _train_module
_stop = {{"calls": 0, "at_call": None}}   # train() calls started since armed; the one to stop at its step 2
_original_lr_at = _train_module.lr_at

def _lr_at_with_stop(step, config):
    if step == 1 and _sys._getframe(1).f_code is _train_module.train.__code__:
        _stop["calls"] += 1
        print("{MARKER}", _stop["calls"])
    if step == 2 and _stop["calls"] == _stop["at_call"]:
        _stop["at_call"] = None
        raise KeyboardInterrupt   # what Ctrl-C (Stop) raises in the training loop
    return _original_lr_at(step, config)

_train_module.lr_at = _lr_at_with_stop'''


def arm(at_call):
    """A cell: stop the `at_call`-th train() call from here on (None: stop nothing)."""
    return f'_stop.update(calls=0, at_call={at_call!r})'


def code_cell(source, cell_id, tags=()):
    cell = nbformat.v4.new_code_cell(source, id=cell_id)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def run(cells, tmp_path, timeout=300):
    """Execute `cells` like Run All in a fresh kernel; (the executed cells, the CellExecutionError or None)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    env = {**os.environ, "MINILLM_FAST": "1", "MINILLM_HEADLESS": "1", "MINILLM_RUNS": str(tmp_path / "runs")}
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                     resources={"metadata": {"path": str(ROOT / "solutions")}})
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as error:
        return nb.cells, error
    return nb.cells, None


def chapter_cells(chapter):
    """A chapter's solution notebook as cells (nbformat nodes): the shared first two, and the rest."""
    path = next((ROOT / "solutions").glob(f"{chapter}_*.ipynb"))
    cells = [nbformat.from_dict(c) for c in load(path)["cells"]]
    return cells[:2], cells[2:]


def errors(cell):
    return [o for o in cell.get("outputs", []) if o["output_type"] == "error"]


def stdout(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def train_calls(cell):
    return sum(line.startswith(MARKER) for line in stdout(cell).splitlines())


# chapter -> the cells that train, in order: (id, the train() call in it that Stop interrupts, an expression for
# results that running the cell again must reproduce, or None). Stop in the last of them must end Run All there.
# Each of the others runs to the end, then is stopped, then runs again (with the same results as the first time).
TRAINING = {
    "01": [("neural", 1, 'val_nll["neural bigram"]'),
           ("mlp", 2, '[val_nll[f"char MLP, context {c}"] for c in CONTEXTS]'),
           ("bpe-mlp", 1, None)],
    "03": [("pretrain", 1, "result.final_val_loss"),
           ("ladder", 2, 'ladder[0]["val_loss"]'),   # the baseline rung: the later ones depend on timings
           ("scaling-runs", 2, None)],
    "04": [("collapse", 2, '[(r["val_loss"], r["late_imbalance"]) for r in runs.values()]'),
           ("dense", 1, None)],
}


def check_stopped(cell, cell_id, at_call):
    raised = [(o["ename"], o["evalue"]) for o in errors(cell)]
    assert len(raised) == 1 and raised[0][0] == "KeyboardInterrupt", \
        f"Stop in {cell_id!r} should end the cell with a KeyboardInterrupt, got {raised}: {stdout(cell)[-300:]}"
    assert "run this cell again" in raised[0][1], raised[0][1]
    assert "Interrupted after step 1/" in stdout(cell), f"{cell_id!r}: train() was not interrupted as planned"
    assert train_calls(cell) == at_call, \
        f"{cell_id!r} started {train_calls(cell)} train() calls: Stop in call {at_call} must end the loop there"


@pytest.mark.parametrize("chapter", sorted(TRAINING))
def test_stop_during_training_stops_the_cell_and_run_all(chapter, tmp_path):
    *earlier, (last_id, last_call, _) = TRAINING[chapter]
    earlier = {cell_id: (at_call, expression) for cell_id, at_call, expression in earlier}
    first, rest = chapter_cells(chapter)
    cells = [*first, code_cell(INJECT, "inject-stop")]
    for cell in rest:
        if cell.id == last_id:
            cells.append(code_cell(arm(last_call), f"{cell.id}-arm"))
        cells.append(cell)
        if cell.id in earlier:
            at_call, expression = earlier[cell.id]
            show = code_cell(f"import json as _json\nprint(_json.dumps({expression}))", f"{cell.id}-results")
            again = code_cell(show.source, f"{cell.id}-results-again")
            cells += [show, code_cell(arm(at_call), f"{cell.id}-arm"),
                      code_cell(cell.source, f"{cell.id}-stopped", tags=["raises-exception"]),
                      code_cell(arm(None), f"{cell.id}-disarm"), code_cell(cell.source, f"{cell.id}-again"), again]
    cells, error = run(cells, tmp_path)
    by_id = {c.id: c for c in cells}
    for cell_id, (at_call, expression) in earlier.items():
        check_stopped(by_id[f"{cell_id}-stopped"], cell_id, at_call)
        assert not errors(by_id[f"{cell_id}-again"]), f"{cell_id!r} failed when run again after a Stop"
        before = json.loads(stdout(by_id[f"{cell_id}-results"]))
        again = json.loads(stdout(by_id[f"{cell_id}-results-again"]))
        assert again == before, \
            f"{cell_id!r} run again after a Stop gave {again}; run to the end without a Stop, {before} ({expression})"
    assert error is not None, f"chapter {chapter} ran to the end although Stop was pressed in {last_id!r}"
    raised = [(c.id, o["ename"]) for c in cells for o in errors(c)
              if "raises-exception" not in c.metadata.get("tags", [])]
    assert [cell_id for cell_id, _ in raised] == [last_id], f"Stop in {last_id!r}, but the cells raised: {raised}"
    check_stopped(by_id[last_id], last_id, last_call)
    later = cells[[c.id for c in cells].index(last_id) + 1:]
    ran = [c.id for c in later if c.cell_type == "code" and c.get("execution_count")]
    assert not ran, f"Run All went on after Stop was pressed in {last_id!r}: {ran} ran"
