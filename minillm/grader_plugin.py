"""The pytest plugin `minillm grade` loads (`-p minillm.grader_plugin`) into each grading process.

It records how every notebook cell that nbval ran ended, keyed by the cell's id, and writes them as JSON
to the file named by MINILLM_GRADER_RESULTS when the session ends: passed; failed (AssertionError, a
wrong answer); error (any other exception); timeout (nbval's per-cell timeout).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .grader import RESULTS_ENV
_outcomes: dict[str, dict] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cell = getattr(item, "cell", None)
    if report.when != "call" or cell is None:
        return
    error = next((o for o in getattr(item, "test_outputs", None) or [] if o.get("output_type") == "error"), None)
    if report.passed:
        _outcomes[cell.get("id", f"cell-{item.cell_num}")] = {"status": "passed"}
        return
    text = str(report.longrepr or "")
    ename = error.get("ename") if error else None
    if "Timeout of" in text:
        status = "timeout"
    elif ename == "AssertionError":
        status = "failed"
    else:
        status = "error"
    if error:
        message = f"{ename}: {error.get('evalue')}"
    else:
        message = next((line.strip() for line in text.splitlines() if line.strip()), "")
    _outcomes[cell.get("id", f"cell-{item.cell_num}")] = {"status": status, "ename": ename, "message": message[:500]}


def pytest_sessionfinish(session):
    path = os.environ.get(RESULTS_ENV)
    if path:
        Path(path).write_text(json.dumps(_outcomes))
