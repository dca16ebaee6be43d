"""The pytest plugin `minillm grade` loads (`-p minillm.grader_plugin`) into each grading process.

It records how every notebook cell that nbval ran ended, keyed by the cell's id: passed; failed
(AssertionError, a wrong answer); error (any other exception); timeout (nbval's per-cell timeout). The
results are written as JSON to the file named by MINILLM_GRADER_RESULTS after every cell (atomically), so
the checks that ran still count when the grader stops the notebook at its time limit.

A SIGTERM (the grader's notebook time limit) ends the session as Ctrl-C would, so nbval shuts the kernel
down. A kernel that dies inside a cell (a crash, os._exit, out of memory) is noticed within a second: the
cell is recorded as an error with ename DeadKernelError and the session stops; the checks after it never run.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from .grader import KERNEL_DIED, RESULTS_ENV

_outcomes: dict[str, dict] = {}
_lock = threading.Lock()


def _cell_id(item) -> str:
    return item.cell.get("id", f"cell-{item.cell_num}")


def _save() -> None:
    """Write the outcomes so far: a temporary file, then os.replace, so a reader never sees half a file."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    with _lock:
        temporary = Path(f"{path}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(_outcomes))
        os.replace(temporary, path)


def _record(item, outcome: dict) -> None:
    with _lock:
        _outcomes[_cell_id(item)] = outcome
    _save()


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise KeyboardInterrupt("stopped by the grader")


def pytest_configure(config):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _kernel_process(item):
    """The kernel's subprocess.Popen (jupyter_client 7 and 8), or None when it cannot be found."""
    manager = getattr(getattr(getattr(item, "parent", None), "kernel", None), "km", None)
    process = getattr(getattr(manager, "provisioner", None), "process", None) or getattr(manager, "kernel", None)
    return process if hasattr(process, "poll") else None


def _watch_kernel(item, process, done: threading.Event) -> None:
    while not done.wait(0.5):
        if process.poll() is not None and not done.is_set():
            message = (f"{KERNEL_DIED}: the kernel died while running this cell (exit code {process.returncode}: "
                       "a crash, os._exit() or out of memory); the cells after it did not run")
            _record(item, {"status": "error", "ename": KERNEL_DIED, "message": message})
            # nbval would wait for the dead kernel until the cell timeout: interrupt the main thread now.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            return


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    process = _kernel_process(item) if getattr(item, "cell", None) is not None else None
    done = threading.Event()
    if process is not None:
        threading.Thread(target=_watch_kernel, args=(item, process, done), daemon=True).start()
    try:
        yield
    finally:
        done.set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cell = getattr(item, "cell", None)
    if report.when != "call" or cell is None:
        return
    error = next((o for o in getattr(item, "test_outputs", None) or [] if o.get("output_type") == "error"), None)
    if report.passed:
        _record(item, {"status": "passed"})
        return
    text = str(report.longrepr or "")
    ename = error.get("ename") if error else None
    if "Kernel dead" in text:  # nbval found the kernel dead before running this cell: stop here
        item.session.shouldstop = "the kernel died"
        _record(item, {"status": "error", "ename": KERNEL_DIED,
                       "message": f"{KERNEL_DIED}: the kernel had died before this cell; it did not run"})
        return
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
    _record(item, {"status": status, "ename": ename, "message": message[:500]})


def pytest_sessionfinish(session):
    _save()
