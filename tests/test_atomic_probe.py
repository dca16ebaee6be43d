"""Nothing is lost: the base model cache, checkpoints and downloads under kills, races and odd things on disk."""
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minillm import data, pretrained
from minillm.model import GPT, GPTConfig
from minillm.paths import data_dir, runs_dir
from minillm.tokenizers import BPETokenizer
from minillm.train import load_checkpoint, save_checkpoint

TEXT = "def f(x): return x + x\n" * 20


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_RUNS", str(tmp_path / "runs"))


def tiny_base(seed: int):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=262, block_size=8, n_layer=1, n_head=2, n_embd=16))
    return model, BPETokenizer().train(TEXT, 258 + seed), {"steps": seed}


def assert_same_weights(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def no_training(*args, **kwargs):
    raise AssertionError("trained although the result could not be saved")


# --- what stands where the base model goes is never deleted ----------------------------------------------------

def test_a_file_where_the_base_folder_goes_is_refused_not_deleted(monkeypatch):
    folder = pretrained.base_dir(True)
    folder.parent.mkdir(parents=True)
    folder.write_text("my notes")
    with pytest.raises(FileExistsError, match=r"save_base: .*fast is a file, not a base model folder.*move or rename"):
        pretrained.save_base(*tiny_base(0), fast=True)
    monkeypatch.setattr(pretrained, "train", no_training)
    with pytest.raises(FileExistsError, match="load_or_train_base: .*is a file"):   # before, not after, training
        pretrained.load_or_train_base(fast=True, progress=False)
    assert folder.read_text() == "my notes"


def test_the_users_own_files_in_the_base_folder_are_never_deleted(monkeypatch):
    folder = pretrained.base_dir(True)
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of a saved base model \(notes.txt\)"):
        pretrained.save_base(*tiny_base(0), fast=True)
    monkeypatch.setattr(pretrained, "train", no_training)
    with pytest.raises(FileExistsError, match="load_or_train_base: .*notes.txt"):
        pretrained.load_or_train_base(fast=True, progress=False)
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()   # an empty folder (made by hand) is simply replaced
    pretrained.save_base(*tiny_base(0), fast=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(pretrained.BASE_FILES)


def test_a_file_named_like_the_base_folders_parent_is_explained_before_training(monkeypatch):
    (runs_dir() / "base").write_text("x")
    with pytest.raises(FileExistsError, match=r"save_base: cannot write .*base is a file, not a folder"):
        pretrained.save_base(*tiny_base(0), fast=True)
    monkeypatch.setattr(pretrained, "train", no_training)
    with pytest.raises(FileExistsError, match=r"load_or_train_base: .*base is a file, not a folder"):
        pretrained.load_or_train_base(fast=True, progress=False)


@pytest.mark.parametrize("variable, where", [("MINILLM_RUNS", runs_dir), ("MINILLM_DATA", data_dir)])
def test_an_environment_folder_that_is_a_file_names_the_file_and_the_variable(tmp_path, monkeypatch, variable,
                                                                             where):
    (tmp_path / "taken").write_text("x")
    for folder, error in ((tmp_path / "taken", FileExistsError), (tmp_path / "taken" / "below", NotADirectoryError)):
        monkeypatch.setenv(variable, str(folder))
        with pytest.raises(error, match=rf"{where.__name__}: cannot create the folder .*taken.*\(.*taken is a "
                                        rf"file, not a folder\); move or rename that file, or set .*{variable}"):
            where()


# --- two notebooks at once ------------------------------------------------------------------------------------

def test_load_base_while_another_process_swaps_a_new_save_in_gets_one_whole_save(monkeypatch):
    first, second = tiny_base(0), tiny_base(3)
    pretrained.save_base(*first, fast=True)
    real_load, calls = pretrained.load_checkpoint, []

    def load_then_another_save_lands(path, *args, **kwargs):
        checkpoint = real_load(path, *args, **kwargs)
        if not calls:   # another notebook's save_base swaps its folder in after model.pt was read here
            calls.append(path)
            pretrained.save_base(*second, fast=True)
        return checkpoint

    monkeypatch.setattr(pretrained, "load_checkpoint", load_then_another_save_lands)
    model, tokenizer, info = pretrained.load_base(fast=True)   # used to say "files of different saves"
    assert calls and info["steps"] == 3 and tokenizer.vocab_size == 261
    assert_same_weights(model, second[0])


def test_load_base_waits_out_the_instant_between_the_two_renames_of_a_save():
    pretrained.save_base(*tiny_base(0), fast=True)
    folder = pretrained.base_dir(True)
    aside = folder.with_name(".fast.0123456789ab.old")
    folder.rename(aside)   # another save has moved the old folder aside and is about to move its own in
    timer = threading.Timer(0.2, aside.rename, (folder,))
    timer.start()
    try:
        _, _, info = pretrained.load_base(fast=True)   # used to raise FileNotFoundError (and so train again)
    finally:
        timer.join()
    assert info["steps"] == 0


def test_save_base_clears_the_leftovers_of_killed_saves_but_not_a_running_saves(monkeypatch):
    pretrained.save_base(*tiny_base(0), fast=True)
    base = pretrained.base_dir(True).parent
    for name in (".fast.aaaaaaaaaaaa.tmp", ".fast.bbbbbbbbbbbb.old"):
        (base / name).mkdir()
        (base / name / "model.pt").write_bytes(b"x" * 100)
    pretrained.save_base(*tiny_base(1), fast=True)   # fresh: could be another notebook's save, in progress
    assert len(list(base.iterdir())) == 3
    monkeypatch.setattr(pretrained, "LEFTOVER_AGE_S", 0)   # as if untouched for long
    pretrained.save_base(*tiny_base(2), fast=True)
    assert [p.name for p in base.iterdir()] == ["fast"]
    assert pretrained.load_base(fast=True)[2]["steps"] == 2


KILLED_MID_WRITE = """
import os, sys, time, torch
from minillm.model import GPT, GPTConfig
from minillm.train import save_checkpoint
real_save = torch.save
def half_then_hang(obj, file):
    real_save(obj, file)
    file.truncate(file.tell() // 2)
    file.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = half_then_hang
torch.manual_seed(1)
save_checkpoint(sys.argv[1], GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)), step=9)
"""


def test_a_process_killed_in_the_middle_of_save_checkpoint_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "ck.pt"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(path, model, step=5)
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    loaded = load_checkpoint(path)
    assert loaded["step"] == 5
    assert_same_weights(loaded["model"], model)
    save_checkpoint(path, model, step=6)   # the killed write's temp file is no obstacle
    assert load_checkpoint(path)["step"] == 6


# --- downloads --------------------------------------------------------------------------------------------------

def test_a_download_killed_just_after_it_lands_has_its_digest_recorded(tmp_path, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_text("some text\n" * 50)
    dest = tmp_path / "cache" / "corpus.txt"
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst) == dest:
            raise SystemExit("killed")   # stands for SIGKILL right after the file landed

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(SystemExit):
        data.download_file(source.as_uri(), dest, None)
    record = dest.with_name("corpus.txt.sha256")
    assert record.read_text().split()[0] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_part_files_of_killed_downloads_are_cleared_and_a_running_ones_kept(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("some text\n" * 50)
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh = cache / ".corpus.txt.killed.part", cache / ".corpus.txt.running.part"
    for part in (stale, fresh):
        part.write_bytes(b"x" * 100)
    old = time.time() - 2 * data._STALE_PART_S
    os.utime(stale, (old, old))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    data.download_file(source.as_uri(), cache / "corpus.txt", digest)
    assert not stale.exists() and fresh.exists()
    assert (cache / "corpus.txt").read_bytes() == source.read_bytes()


def test_temp_files_of_killed_atomic_writes_are_cleared_by_the_next_write(tmp_path):
    import os
    import time
    from minillm import paths
    target = tmp_path / "ck.pt"
    old = tmp_path / ".ck.pt.0123456789ab.tmp"      # a write killed long ago
    fresh = tmp_path / ".ck.pt.ba9876543210.tmp"    # another process's write, running now
    other = tmp_path / ".other.pt.0123456789ab.tmp"  # another file's
    for leftover in (old, fresh, other):
        leftover.write_bytes(b"x" * 100)
    long_ago = time.time() - paths.STALE_TEMP_S - 5
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    paths.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert not old.exists() and fresh.exists() and other.exists()
