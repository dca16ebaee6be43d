"""The pytest plugin `minillm grade` loads (`-p minillm.grader_plugin`) into each grading process.

It records how every notebook cell that nbval ran ended, keyed by the cell's id: passed; failed
(AssertionError, a wrong answer); error (any other exception); timeout (nbval's per-cell timeout). The
record is rewritten after every cell (atomically: a temporary file, then a rename) to the JSON file named
by MINILLM_GRADER_RESULTS, with the kernel's process id, so that when the grader stops a notebook at its
time limit the checks that ran before still count and the kernel can be stopped too. It is signed with a key
the grader passes through a pipe, so the notebook's code, which can write that file too, cannot pass a record
of its own off as the plugin's. A check cell passes only
when it printed its "✓ <grade_id>" line and, when the grader restored it, the token its last line prints.
"""
from __future__ import annotations

import os
import re

import pytest

from .grader import KERNEL_STOPPED, KEY_FD_ENV, RESULTS_ENV, seal
from .paths import atomic_write_text

_outcomes: dict[str, dict] = {}
_kernel_pid: list[int | None] = [None]
_key = [""]   # signs the results: the grader trusts only what this plugin wrote
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pytest_configure(config):
    # Read the key from the grader's pipe and close it before nbval starts the kernel, which never holds it.
    fd = os.environ.pop(KEY_FD_ENV, None)
    if fd:
        with os.fdopen(int(fd), "rb") as pipe:
            _key[0] = pipe.read().decode()


def _save() -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    atomic_write_text(path, seal(_key[0], {"kernel_pid": _kernel_pid[0], "cells": _outcomes}))


def _kernel_process_id(item) -> int | None:
    """The pid of the kernel nbval started for this notebook (jupyter_client 7 and 8), or None."""
    manager = getattr(getattr(getattr(item, "parent", None), "kernel", None), "km", None)
    process = getattr(getattr(manager, "provisioner", None), "process", None) or getattr(manager, "kernel", None)
    pid = getattr(process, "pid", None)
    return pid if isinstance(pid, int) else None


def _first_line(text: str) -> str:
    """The informative line of nbval's report: colour codes removed, its generic headline skipped."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    lines = [line for line in lines if line != "Notebook cell execution failed"] or lines
    return lines[0] if lines else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cell = getattr(item, "cell", None)
    if report.when != "call" or cell is None:
        return
    if _kernel_pid[0] is None:
        _kernel_pid[0] = _kernel_process_id(item)
    cell_id = cell.get("id", f"cell-{item.cell_num}")
    error = next((o for o in getattr(item, "test_outputs", None) or [] if o.get("output_type") == "error"), None)
    text = str(report.longrepr or "")
    ename = error.get("ename") if error else None
    meta = cell.get("metadata") or {}
    nbgrader = meta.get("nbgrader") or {}
    unconfirmed = ""
    if report.passed and nbgrader.get("grade") and nbgrader.get("grade_id"):
        # A check passes by printing its own "✓ <grade_id>" line, not merely by raising nothing; and a check the
        # grader restored, by running to its last line, which prints the token in its metadata: an exception that
        # the notebook's code hid from nbval stops the cell before that line.
        printed = "".join(str(o.get("text", "")) for o in getattr(item, "test_outputs", None) or []
                          if o.get("output_type") == "stream")
        token = (meta.get("minillm_grade") or {}).get("token")
        if f"✓ {nbgrader['grade_id']}" not in printed:
            unconfirmed = (f"the check did not print its '✓ {nbgrader['grade_id']}' line, so the answer was not "
                           "confirmed (did the notebook change minillm.grading or how errors are shown?)")
        elif token and token not in printed:
            unconfirmed = ("the check cell stopped before its last line without showing an error, so the answer was "
                           "not confirmed (did the notebook change how errors are shown, or how cells run?)")
    if report.passed and not unconfirmed:
        record = {"status": "passed"}
    elif report.passed:
        record = {"status": "failed", "ename": None, "message": unconfirmed}
    elif "Kernel dead on test start" in text:
        # nbval stops the kernel after a cell it could not interrupt (a kernel that died, or code that
        # ignores Ctrl-C); the cells after that one do not run.
        record = {"status": "error", "ename": KERNEL_STOPPED,
                  "message": "the kernel had stopped before this cell (it died, or an earlier cell could not be "
                             "interrupted at its timeout), so the cell did not run"}
    else:
        if "Timeout of" in text:
            status = "timeout"
        elif ename == "AssertionError":
            status = "failed"
        else:
            status = "error"
        message = f"{ename}: {error.get('evalue')}" if error and status != "timeout" else _first_line(text)
        if status == "timeout":
            # nbval numbers the cell in the grader's prepared copy, not in the student's notebook: name it instead
            limit = re.search(r"Timeout of ([\d.]+) seconds", text)
            source = str(cell.get("source") or "")
            first = next((line.strip() for line in source.splitlines() if line.strip()), "")
            first = first if len(first) <= 60 else first[:57] + "..."
            message = (f"the cell {cell_id!r} ({first!r}) ran past the "
                       f"{limit.group(1) + ' s ' if limit else ''}limit for one cell")
        if "Failed to interrupt kernel" in text:
            message += " (the kernel did not answer: it may have died, e.g. os._exit() or out of memory)"
        record = {"status": status, "ename": ename, "message": message[:500]}
    _outcomes[cell_id] = record
    _save()


def pytest_sessionfinish(session):
    _save()
