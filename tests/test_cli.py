"""Tests of the command lines (`minillm ...`, `python -m minillm.bench ...`) on bad input: a message, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minillm import cli


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MINILLM_PRICES", raising=False)
    return tmp_path / "runs"


@pytest.mark.parametrize("timeout", ["0", "-5", "abc", "1.5"])
def test_course_run_refuses_a_timeout_that_is_not_positive_seconds(timeout, capsys, monkeypatch):
    import minillm.notebooks

    def run_course(*args, **kwargs):
        raise AssertionError("the course ran although --timeout was bad (nbclient takes 0 or less as no limit)")
    monkeypatch.setattr(minillm.notebooks, "run_course", run_course)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["course", "run", "00", f"--timeout={timeout}"])
    assert exit_info.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_report_warns_about_a_torn_line_in_one_plain_line(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    good = {"time": "2026-11-28", "chapter": "01", "label": "training", "values": {"seconds": 3.0}}
    ledger.write_text(json.dumps(good) + '\n{"chapter": "01", "lab\n', encoding="utf-8")
    # a process of its own: pytest records warnings itself, so only a real run shows what a learner sees
    env = {**os.environ, "MINILLM_RUNS": str(tmp_path / "runs"), "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-m", "minillm.cli", "report", "--ledger", str(ledger),
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "training" in result.stdout
    assert result.stderr.startswith("minillm report: warning: ") and "(line 2)" in result.stderr, result.stderr
    assert "UserWarning" not in result.stderr and "entries()" not in result.stderr  # no file:line, no source


def test_bench_bpe_on_an_empty_corpus_is_a_usage_error(tmp_path, capsys):
    from minillm.bench import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["bpe", "--corpus", str(empty), "--vocab-size", "260"])
    assert exit_info.value.code == 2
    assert "empty" in capsys.readouterr().err


def test_version_and_unknown_options_name_the_subcommand(capsys):
    from minillm import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"minillm {__version__}"
    # an unknown option used to print the top-level usage ("minillm [-h] {env,...}"), not the options there are
    for argv, usage in [(["build-notebooks", "--bogus"], "usage: minillm build-notebooks [-h] [--check]"),
                        (["course", "run", "00", "--bogus"], "usage: minillm course run [-h] [--fast]"),
                        (["env", "extra"], "usage: minillm env [-h]")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(usage), err
        assert "unrecognized arguments: " + argv[-1] in err


def test_interrupts_and_os_file_not_found_are_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_env", interrupted)
    try:
        code = cli.main(["env"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended `minillm env` with a traceback")
    assert code == 130
    assert capsys.readouterr().err == "minillm env: interrupted\n"

    def missing(args):                                    # the OS's error: "[Errno 2] ..." and no advice
        raise FileNotFoundError(2, "No such file or directory", "/gone/report.png")
    monkeypatch.setattr(cli, "cmd_report", missing)
    assert cli.main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm report: No such file or directory (/gone/report.png); check that path"), err
    assert "Errno" not in err
