"""The `minillm` command: env, course run, report, build-notebooks, grade."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings

REQUIRED = [("torch", "2.4"), ("numpy", None), ("regex", None), ("matplotlib", None), ("tqdm", None),
            ("ipywidgets", "7.7"), ("jupyterlab", None), ("nbclient", None), ("nbformat", None), ("ipykernel", None)]
OPTIONAL = [("triton", "GPU kernels (chapter 02 onwards); the torch fallbacks run without it"),
            ("pytest", "the test suite"), ("nbval", "notebook tests"), ("hypothesis", "property tests")]


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _check_module(name: str, minimum: str | None) -> tuple[bool, str]:
    try:
        module = importlib.import_module(name)
    except Exception as error:  # a broken install raises more than ImportError
        return False, f"not importable ({type(error).__name__}: {error})"
    version = getattr(module, "__version__", "?")
    if minimum and version != "?" and _version_tuple(version) < _version_tuple(minimum):
        return False, f"{version} is older than the {minimum} the course needs"
    return True, version


def _positive_int(text: str) -> int:
    """argparse type for a count of seconds: nbclient takes 0 or less as "no limit", which no one means by it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 second")
    return value


def check_environment() -> int:
    """Print [OK]/[FAIL] for each dependency and a hardware summary; return the number of failures."""
    from . import __version__
    failures = 0
    ok = sys.version_info >= (3, 10)
    failures += not ok
    print(f"[{'OK' if ok else 'FAIL'}] python {sys.version.split()[0]}" + ("" if ok else " (need 3.10 or newer)"))
    for name, minimum in REQUIRED:
        ok, detail = _check_module(name, minimum)
        failures += not ok
        print(f"[{'OK' if ok else 'FAIL'}] {name} {detail}")
    for name, purpose in OPTIONAL:
        ok, detail = _check_module(name, None)
        print(f"[{'OK' if ok else '--'}] {name} {detail if ok else 'not installed (optional: ' + purpose + ')'}")
    from .cost import format_hardware, probe_hardware
    print(f"minillm {__version__}")
    print(format_hardware(probe_hardware()))
    if failures:
        print(f"{failures} required item(s) failed: run `make course` (it installs what is missing) or "
              "`pip install -e .` in the course folder.")
    return failures


def cmd_env(args) -> int:
    return 1 if check_environment() else 0


def cmd_course(args) -> int:
    from .cost import report
    from .notebooks import run_course
    chapters = []
    for arg in args.chapters:
        # "00,01" or "00 01" in one argument too; an empty one is kept, for run_course to refuse (not "all")
        chapters += [c for c in re.split(r"[\s,]+", arg.strip()) if c] or [arg]
    from .paths import fast_mode
    # --fast, or MINILLM_FAST=1 in the environment (as `make course FAST=1` and the notebooks read it)
    runs = run_course(chapters or None, fast=args.fast or fast_mode(), timeout=args.timeout)
    report_failed = False
    try:   # the chapters' results below still print when the report cannot be made
        text, png = report()
        print(text)
    except (OSError, ValueError) as error:
        report_failed = True
        print(f"minillm course: the cost report could not be made: {error}; `minillm report` makes it again",
              file=sys.stderr)
    failed = [r for r in runs if not r.ok]
    for r in failed:
        where = (f"the executed notebook with the error: {r.output_path}" if r.output_path
                 else "no executed notebook was saved")
        print(f"FAILED {r.path.name}: {r.error}\n  {where}")
    print(f"{len(runs) - len(failed)} of {len(runs)} chapter(s) ran in {sum(r.seconds for r in runs):.0f} s")
    return 1 if failed or report_failed else 0


def cmd_report(args) -> int:
    from pathlib import Path

    from .cost import Ledger, report
    if args.ledger:
        # The default ledger is simply absent until a chapter records something (the report then says it is
        # empty), but a ledger named on the command line that is not there is a mistyped path.
        ledger = Path(args.ledger)
        if ledger.is_dir():
            raise ValueError(f"--ledger {ledger} is a folder; give the ledger file itself, e.g. "
                             f"{ledger / 'ledger.jsonl'}")
        if not ledger.exists():
            raise FileNotFoundError(f"--ledger {ledger} does not exist; check the path, or leave --ledger out "
                                    "to report runs/ledger.jsonl")
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() != ".png" and out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder; give a folder for report.png, or a file "
                             "name ending in .png")
        if out.suffix.lower() == ".png" and out.is_dir():
            raise ValueError(f"--out {out} is a folder, so the plot cannot be written there; give another file "
                             f"name, or {out / 'report.png'}")
    text, png = report(Ledger(args.ledger) if args.ledger else None, out_dir=args.out)
    print(text)
    return 0


def cmd_build(args) -> int:
    from .notebooks import build_notebooks
    problems = build_notebooks(check=args.check)
    for problem in problems:
        print(problem)
    if args.check:
        if problems:
            print("notebooks/ is out of sync with solutions/: run `minillm build-notebooks`")
            return 1
        print("notebooks/ is in sync with solutions/")
    return 0


def cmd_grade(args) -> int:
    from pathlib import Path

    from .grader import GraderError, format_table, grade, write_reports
    out = Path(args.out)   # checked before grading: an unusable --out would lose the whole run's results
    if out.exists() and not out.is_dir():
        print(f"minillm grade: --out {out} is a file; give a folder for grades.csv and grades.json", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"minillm grade: --out {out}: {error}; give a folder you can write to", file=sys.stderr)
        return 2
    if not os.access(out, os.W_OK):
        print(f"minillm grade: --out {out} is not writable; give a folder you can write to", file=sys.stderr)
        return 2
    for name in ("grades.csv", "grades.json"):
        if (out / name).is_dir():
            print(f"minillm grade: {out / name} is a folder, so the grades could not be written there; move it "
                  "away or give another --out", file=sys.stderr)
            return 2
    try:
        submissions = grade(args.submissions, chapter=args.chapter, extra_tests=args.extra_tests,
                            cell_timeout=args.cell_timeout, notebook_timeout=args.notebook_timeout,
                            jobs=args.jobs)
    except GraderError as error:
        print(f"minillm grade: {error}", file=sys.stderr)
        return 2
    print(format_table(submissions))
    try:
        csv_path, json_path = write_reports(submissions, out)
    except OSError as error:   # the disk filled, --out was removed meanwhile: the run's results are not lost
        import tempfile
        rescue = Path(tempfile.mkdtemp(prefix="minillm-grades-"))
        csv_path, json_path = write_reports(submissions, rescue)
        print(f"minillm grade: could not write the grades to {out} ({error}); they are in {rescue} instead",
              file=sys.stderr)
    print(f"wrote {csv_path} and {json_path}")
    errors = [s for s in submissions if s.grader_error]
    if errors:
        print(f"{len(errors)} submission(s) could not be graded (see 'grader error' above)", file=sys.stderr)
    return 2 if errors else 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    parser = argparse.ArgumentParser(prog="minillm", description="the minillm course's command line")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="check the installation ([OK]/[FAIL]) and describe this machine")
    p.set_defaults(func=cmd_env, parser=p)
    p = sub.add_parser("course", help="run the course's chapters headless")
    course = p.add_subparsers(dest="action", required=True)
    p = course.add_parser("run", help="execute chapters with nbclient into runs/course/ and print the report")
    p.add_argument("chapters", nargs="*", help="chapter numbers (default: all), e.g. 00 01")
    p.add_argument("--fast", action="store_true", help="the quick pass: tiny sizes (also when MINILLM_FAST=1 is set)")
    p.add_argument("--timeout", type=_positive_int, default=3600,
                   help="seconds allowed per cell (default 3600; chapter 03's ladder is one long cell)")
    p.set_defaults(func=cmd_course, parser=p)
    p = sub.add_parser("report", help="print the ledger as tables and write a plot")
    p.add_argument("--ledger", help="ledger file (default runs/ledger.jsonl)")
    p.add_argument("--out", help="folder for the plot (default runs/)")
    p.set_defaults(func=cmd_report, parser=p)
    p = sub.add_parser("build-notebooks", help="write notebooks/ (student versions) from solutions/")
    p.add_argument("--check", action="store_true", help="only check that notebooks/ is in sync; exit 1 if not")
    p.set_defaults(func=cmd_build, parser=p)
    p = sub.add_parser("grade", help="grade student notebooks per exercise (see docs/INSTRUCTORS.md)")
    p.add_argument("submissions", nargs="+", help="notebooks, or folders with one notebook or sub-folder per student")
    p.add_argument("--chapter", help="the chapter being graded, e.g. 01 (default: read from the notebooks)")
    p.add_argument("--extra-tests", help="folder of private tests, <grade_id>.py, run after each official check")
    p.add_argument("--cell-timeout", type=float, default=120, help="seconds per cell (default 120)")
    p.add_argument("--notebook-timeout", type=float, default=900, help="seconds per notebook (default 900)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="notebooks graded at once (default: up to 4, one per core)")
    p.add_argument("--out", default="grades", help="folder for grades.csv and grades.json (default ./grades)")
    p.set_defaults(func=cmd_grade, parser=p)
    # parse_args would name an unknown option with the top-level usage ("minillm [-h] {env,...}"); the
    # subcommand's own usage lists the options it does take
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    def format_warning(message, category, filename, lineno, line=None) -> str:
        # one plain line ("minillm report: warning: Ledger ...: skipped 1 corrupt line(s) (line 2)..."), not
        # Python's file:line and source code, which read like a crash to a learner
        return f"minillm {args.command}: warning: {message}\n"
    formatwarning, warnings.formatwarning = warnings.formatwarning, format_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:   # Ctrl-C: the user's choice, not a crash to show a traceback for
        print(f"minillm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        if isinstance(error, FileNotFoundError) and error.errno is not None:   # from the OS: name the path
            return _os_error(args.command, error)
        print(f"minillm {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        return _os_error(args.command, error)
    finally:
        warnings.formatwarning = formatwarning


def _os_error(command: str, error: OSError) -> int:
    """A folder where a file should be, a file in the way of a folder, no permission...: one line, exit 2."""
    # os.replace and os.rename name the destination second: the path the user gave, not a temp file
    path = getattr(error, "filename2", None) or error.filename
    where = f" ({path})" if path else ""
    what = error.strerror or str(error)
    if isinstance(error, (FileExistsError, NotADirectoryError)):  # mkdir or open through a file
        what = f"{what}: a file is where a folder is needed"
    print(f"minillm {command}: {what}{where}; check that path (and its permissions) and run the command again",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
