"""Where minillm keeps things: the repository, the runs folder (ledger, checkpoints), the data cache.

Every path can be moved with an environment variable, so tests and graders can work in a temp folder:
MINILLM_RUNS (ledger, checkpoints, peaks), MINILLM_DATA (downloaded corpora).
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The course checkout this package lives in, or None when minillm was installed without one."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").exists() and (root / "solutions").is_dir():
        return root
    return None


def fast_mode(fast: bool | None = None) -> bool:
    """The run size: `fast` when given, else the quick pass when MINILLM_FAST=1 (tests, `make course FAST=1`)."""
    return os.environ.get("MINILLM_FAST", "0") == "1" if fast is None else bool(fast)


def _expand_user(text: str) -> Path:
    """A path from an environment variable, "~" meaning the home folder (not expanded by a .env file)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~nobody/x": no such user, so it is a folder named that way
        return Path(text)


def runs_dir() -> Path:
    """Folder for the ledger, checkpoints and cached measurements (created on demand)."""
    env = os.environ.get("MINILLM_RUNS", "").strip()  # "~/runs" from a .env file or a quoted export works too
    if env:
        path = _expand_user(env)
    else:
        root = repo_root()
        path = (root / "runs") if root is not None else Path.cwd() / "runs"
    _make_folder(path, "runs_dir", "MINILLM_RUNS")
    return path


def data_dir() -> Path:
    """Cache folder for downloaded corpora (created on demand)."""
    env = os.environ.get("MINILLM_DATA", "").strip()
    path = _expand_user(env) if env else Path.home() / ".cache" / "minillm" / "data"
    _make_folder(path, "data_dir", "MINILLM_DATA")
    return path


def _make_folder(path: Path, where: str, variable: str) -> None:
    """Create the folder `path` (and its parents) if need be; else an OSError (class and errno kept) naming it,
    why (e.g. the file standing in its way) and `variable`, the environment variable that moves it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:   # a file where the folder should be, no permission, a read-only disk
        blocker = file_in_the_way(path)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else (error.strerror or str(error))
        cure = f"set the environment variable {variable} to a folder you can write to"
        message = f"{where}: cannot create the folder {path} ({reason}); " + (
            f"move or rename that file, or {cure}" if blocker is not None else cure)
        try:
            retold = type(error)(error.errno, message, str(path))
        except TypeError:   # an OSError subclass with a constructor of its own
            retold = OSError(error.errno, message, str(path))
        raise retold from None


def datasets_dir() -> Path:
    """The `minillm/datasets/` folder shipped inside the package (the manifest of downloadable corpora).

    It lives in the package, not the checkout, so a plain `pip install` of minillm can download the
    corpora too."""
    return PACKAGE_DIR / "datasets"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash never leaves a half-written file behind.

    The data goes to a temp file of its own in the same folder, which then replaces `path` in one step;
    several threads or processes may write the same path at once, and the last to finish wins whole.
    A folder that cannot be created or written to raises an OSError of the original class (errno kept)
    that names `path`, its folder and the cure.
    """
    _atomic_write(path, lambda f: f.write(data), "atomic_write_bytes")


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                      where: str = "atomic_write_with") -> None:
    """atomic_write_bytes for a writer that streams into a binary file, e.g. lambda f: torch.save(obj, f).

    `where` (e.g. "save_checkpoint") starts the message of the OSError raised for an unwritable folder.
    """
    _atomic_write(path, write, where)


def atomic_write_text(path: str | os.PathLike, text: str, *, where: str = "atomic_write_text") -> None:
    """atomic_write_bytes for text, encoded as UTF-8; `where` (e.g. "BPETokenizer.save") starts error messages."""
    data = text.encode("utf-8")   # before any file is touched: text that cannot be encoded leaves nothing behind
    _atomic_write(path, lambda f: f.write(data), where)


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file standing at `folder` or at the nearest of its parents that exists, which keeps the folder from
    being created; None when that nearest existing path is a folder (or cannot be looked at)."""
    folder = Path(os.path.abspath(folder))
    try:
        for existing in (folder, *folder.parents):
            if existing.exists():
                return None if existing.is_dir() else existing
    except OSError:   # e.g. no permission to look
        return None
    return None


def unwritable_folder_error(error: OSError, path: str | os.PathLike, where: str,
                            folder: str | os.PathLike | None = None) -> OSError:
    """`error` (from creating `path`'s folder or a file in it) retold: same class and errno, `path` as its
    filename, and a message that starts with `where` and names `path`, the folder and what to do."""
    path = os.fspath(path)
    folder = Path(folder) if folder is not None else Path(path).parent
    reason = error.strerror or str(error)
    blocker = file_in_the_way(folder)   # "File exists" / "Not a directory" say little: name the file
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    message = (f"{where}: cannot write {path} (the folder {folder} cannot be created or written to: "
               f"{reason}); choose a folder you can write to")
    try:
        return type(error)(error.errno, message, path)
    except TypeError:   # an OSError subclass with a constructor of its own
        return OSError(error.errno, message, path)


def ensure_writable_folder(path: str | os.PathLike, where: str) -> None:
    """Create `path`'s folder if need be and check that a file can be created there, before any work is done
    whose result would go to `path` (e.g. a training run's checkpoint); else unwritable_folder_error's OSError."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise unwritable_folder_error(error, path, where, folder) from None


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], where: str) -> None:
    path = Path(path)
    if path.is_dir():   # else the data is written to a temp file, then os.replace fails naming that temp file
        raise IsADirectoryError(errno.EISDIR, f"{where}: {path} is a folder; give the path of a file (inside it, "
                                "say), not of a folder", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:   # a file where a folder should be, no permission, a read-only disk
        raise unwritable_folder_error(error, path, where) from None
    fd, tmp = _create_unique_temp(path, where)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _clear_stale_temps(path)
    except BaseException:
        # Nobody else uses this temp name, so removing it here cannot touch another writer's file.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# A temp file of an atomic write untouched this long was left by a killed process (SIGKILL, a crash): a live
# write finishes in far less, so it is deleted by the next write of the same file.
STALE_TEMP_S = 600


def clear_stale_files(folder: Path, pattern: str, age_s: float) -> None:
    """Delete the files in `folder` matching the glob `pattern` that nothing has written to for `age_s` seconds:
    leftovers of killed processes. A recent one may be another process's write still running, so it is kept."""
    now = time.time()
    for stale in folder.glob(pattern):
        try:
            if now - stale.stat().st_mtime >= age_s:
                stale.unlink()
        except OSError:   # gone already, or not ours to delete
            pass


def _clear_stale_temps(path: Path) -> None:
    """The temp files of earlier atomic writes of `path` that a killed process left (each as big as the file, a
    checkpoint say)."""
    clear_stale_files(path.parent, f".{glob.escape(path.name)}.{'?' * 12}.tmp", STALE_TEMP_S)


def _create_unique_temp(path: Path, where: str = "atomic_write") -> tuple[int, Path]:
    """Create an empty file next to `path` that no other thread or process is using: (open descriptor, path).

    Like tempfile.mkstemp, but created with mode 0o666 so the umask applies: the file that replaces `path`
    gets the permissions a plain open() would have given it, not mkstemp's owner-only 0o600.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # 48 random bits taken already: practically never, try another name
            continue
        except OSError as error:   # name the file the caller asked for, not this temp name
            raise unwritable_folder_error(error, path, where) from None
        return fd, tmp
    raise FileExistsError(f"{where}: could not create a temp file next to {path}; clear out "
                          f"the .{path.name}.*.tmp files there")

