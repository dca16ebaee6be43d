"""Tests of minillm.paths: atomic writes into folders that cannot be created or written to."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from minillm import paths

WRITERS = {"atomic_write_bytes": lambda path: paths.atomic_write_bytes(path, b"x"),
           "atomic_write_text": lambda path: paths.atomic_write_text(path, "x"),
           "atomic_write_with": lambda path: paths.atomic_write_with(path, lambda f: f.write(b"x"))}


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("below", [("out.bin",), ("sub", "out.bin")])
def test_a_file_where_the_folder_should_be_is_explained(tmp_path, name, below):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    target = blocker.joinpath(*below)
    with pytest.raises(OSError) as info:
        WRITERS[name](target)
    error = info.value
    # Same class and errno as the OSError mkdir raised (FileExistsError or NotADirectoryError), the target as filename.
    assert type(error) is (FileExistsError if len(below) == 1 else NotADirectoryError)
    assert error.errno == (errno.EEXIST if len(below) == 1 else errno.ENOTDIR)
    assert error.filename == str(target)
    message = str(error)
    assert message.startswith(f"[Errno {error.errno}] {name}: cannot write {target} ")
    assert f"the folder {target.parent} cannot be created" in message
    assert f"{blocker} is a file, not a folder" in message and "choose a folder you can write to" in message
    assert blocker.read_text() == "a file, not a folder" and sorted(tmp_path.iterdir()) == [blocker]


def test_a_folder_without_permission_is_explained(tmp_path, monkeypatch):
    target = tmp_path / "locked" / "out.bin"

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refused)   # (the tests may run as root, whom chmod does not stop)
    with pytest.raises(PermissionError, match=r"atomic_write_with: cannot write .*out\.bin \(the folder .*locked "
                       r"cannot be created or written to: Permission denied\); choose a folder") as info:
        paths.atomic_write_with(target, lambda f: f.write(b"x"))
    assert info.value.errno == errno.EACCES and info.value.filename == str(target)


def test_atomic_write_with_names_the_caller_given_as_where(tmp_path):
    (tmp_path / "blocker").write_text("")
    with pytest.raises(FileExistsError, match=r"^\[Errno 17\] save_checkpoint: cannot write .*model\.pt"):
        paths.atomic_write_with(tmp_path / "blocker" / "model.pt", lambda f: f.write(b"x"), where="save_checkpoint")


def test_ensure_writable_folder_creates_the_folder_or_explains(tmp_path):
    paths.ensure_writable_folder(tmp_path / "new" / "deeper" / "run.pt", "train: checkpoint_path")
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())
    (tmp_path / "blocker").write_text("")
    with pytest.raises(NotADirectoryError, match=r"train: checkpoint_path: cannot write .*run\.pt .*blocker is a "
                       "file, not a folder.*choose a folder you can write to"):
        paths.ensure_writable_folder(tmp_path / "blocker" / "sub" / "run.pt", "train: checkpoint_path")


def test_text_that_cannot_be_encoded_touches_no_file(tmp_path):
    with pytest.raises(UnicodeEncodeError):
        paths.atomic_write_text(tmp_path / "new" / "a.txt", "\ud800")
    assert list(tmp_path.iterdir()) == []
