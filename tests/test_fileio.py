"""Crash-safe writing (ttl_core.fileio): a failed write keeps the old file, a directory is swapped in whole, files
get the umask's mode, JSON is UTF-8 whatever the locale."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from helpers import run_in_ascii_locale

import ttl_core.fileio as fileio
from ttl_core.errors import DataError


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    fileio.write_json(path, {"n": 1})

    def torn(tmp):
        tmp.write_text('{"n": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write(path, torn)
    assert json.loads(path.read_text()) == {"n": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_files_written_atomically_get_the_mode_of_any_file_the_process_creates(tmp_path, umask, monkeypatch):
    """safetensors creates its files owner-only (0600): a checkpoint's weights were unreadable to the group that
    could read its config and optimizer state. Every file written atomically now gets the umask's mode, whatever
    the writer did, as a file Python opens does, and has it before it is renamed into place."""
    from safetensors.torch import save_file

    modes_renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (modes_renamed.append(os.stat(src).st_mode & 0o777),
                                                         real_replace(src, dst)))
    old = os.umask(umask)
    try:
        assert fileio.process_umask() == umask
        (tmp_path / "plain").write_text("x")
        fileio.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"w": torch.ones(2)}, str(tmp)))
        fileio.write_json(tmp_path / "c.json", {"n": 1})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["plain", "w.safetensors", "c.json"], 0o666 & ~umask)
    assert modes_renamed == [0o666 & ~umask] * 2


def test_json_is_written_in_utf8_whatever_the_locale(tmp_path):
    """A label like NEGÓCIOS is UTF-8 in config.json and results.json under an ASCII locale too (it raised
    UnicodeEncodeError after training; cp1252 on Windows wrote a file transformers cannot read), and a path
    with a byte that is not UTF-8 (a lone surrogate from the command line) reads back as it was given."""
    obj = {"id2label": {"0": "NEGÓCIOS"}, "train": "t\udcff.csv"}
    code = f"from ttl_core.fileio import write_json; write_json({str(tmp_path / 'r.json')!r}, {ascii(obj)})"
    run = run_in_ascii_locale(code)
    assert run.returncode == 0, run.stderr[-500:]
    assert "NEGÓCIOS".encode() in (tmp_path / "r.json").read_bytes()
    assert fileio.read_json(tmp_path / "r.json", ValueError) == obj


def test_a_directory_written_atomically_replaces_the_old_one_after_a_crashed_attempt(tmp_path):
    """The new contents replace the old directory whole (no file of the old one stays), a `.partial` left by
    a crash is cleared first, and neither `.partial` nor `.old` remains."""
    best = tmp_path / "best"
    fileio.write_dir_atomically(best, lambda d: (d / "old.txt").write_text("epoch 1"))
    (tmp_path / ".best.partial").mkdir()
    (tmp_path / ".best.partial" / "torn.bin").write_bytes(b"\0")  # the crashed attempt
    fileio.write_dir_atomically(best, lambda d: (d / "new.txt").write_text("epoch 2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert sorted(p.name for p in best.iterdir()) == ["new.txt"] and (best / "new.txt").read_text() == "epoch 2"


def test_a_directory_write_that_fails_keeps_the_old_directory_and_leaves_no_partial(tmp_path):
    """A write that fails midway (a full disk) leaves the previous directory as it was and gives back the space
    its `.partial` took."""
    best = tmp_path / "best"
    fileio.write_dir_atomically(best, lambda d: (d / "model.txt").write_text("epoch 1"))

    def torn(directory):
        (directory / "model.txt").write_text("epoch 2, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fileio.write_dir_atomically(best, torn)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (best / "model.txt").read_text() == "epoch 1"


def test_a_file_in_the_way_of_a_directory_written_atomically_is_replaced_and_leaves_nothing(tmp_path):
    """A file where the directory goes is swapped out like an old directory; no `.old` file stays behind,
    which would make the next write's swap fail (os.replace of a directory over a file)."""
    best = tmp_path / "best"
    best.write_text("a stray file")
    for epoch in (1, 2):
        fileio.write_dir_atomically(best, lambda d: (d / "model.txt").write_text(f"epoch {epoch}"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
        assert (best / "model.txt").read_text() == f"epoch {epoch}"
    (tmp_path / ".best.old").write_text("left by an earlier version")
    fileio.write_dir_atomically(best, lambda d: (d / "model.txt").write_text("epoch 3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (best / "model.txt").read_text() == "epoch 3"


def test_a_symlink_in_the_way_of_a_directory_written_atomically_is_unlinked_and_its_target_kept(tmp_path):
    """A `best` that is a link to the user's own directory: each swap drops the link (its `.old`), never the
    directory it points to, and no `.best.old` link stays to make the next swap fail (a directory cannot be
    renamed over a link)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    best = tmp_path / "best"
    best.symlink_to(mine, target_is_directory=True)
    for epoch in (1, 2):
        fileio.write_dir_atomically(best, lambda d: (d / "model.txt").write_text(f"epoch {epoch}"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "mine"] and not best.is_symlink()
        assert (best / "model.txt").read_text() == f"epoch {epoch}"
    assert (mine / "notes.txt").read_text() == "the user's"


def test_a_dangling_symlink_in_the_way_of_a_directory_written_atomically_is_replaced(tmp_path):
    """A link whose target is gone (a purged scratch directory) does not exist to `Path.exists`, yet a directory
    cannot be renamed over it: it must be moved aside as a live one is, not end the run at its next save."""
    best = tmp_path / "best"
    best.symlink_to(tmp_path / "purged", target_is_directory=True)
    fileio.write_dir_atomically(best, lambda d: (d / "model.txt").write_text("epoch 1"))
    assert not best.is_symlink() and (best / "model.txt").read_text() == "epoch 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_directory_removed_atomically_clears_an_old_one_a_crashed_removal_left(tmp_path):
    """A `.name.old` left by a removal killed midway does not stop the next removal of that name."""
    (tmp_path / ".step-000001.old").mkdir()
    (tmp_path / ".step-000001.old" / "torn.bin").write_bytes(b"\1")
    (tmp_path / "step-000001").mkdir()
    (tmp_path / "step-000001" / "model.safetensors").write_bytes(b"\2")
    fileio.remove_dir_atomically(tmp_path / "step-000001")
    assert list(tmp_path.iterdir()) == []


def test_every_atomic_swap_is_made_durable_by_fsyncing_its_parent_directory_after_the_rename(tmp_path, monkeypatch):
    """A rename lives in the directory entry: until the parent directory is fsynced a power cut may undo it,
    leaving the old file or no directory at all. The fsyncs and renames each writer makes, in order (what was
    fsynced told by its inode, which a rename keeps)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename to", os.path.basename(dst))),
                                                         real_replace(src, dst)))
    parent = ("fsync", tmp_path.stat().st_ino)

    def made_by(write, *args) -> list:
        events.clear()
        write(*args)
        return events[:]

    assert made_by(fileio.write_json, tmp_path / "c.json", {"n": 1}) == [
        ("fsync", (tmp_path / "c.json").stat().st_ino), ("rename to", "c.json"), parent]
    (tmp_path / "best").mkdir()
    assert made_by(fileio.write_dir_atomically, tmp_path / "best", lambda d: (d / "m.txt").write_text("x")) == [
        ("fsync", (tmp_path / "best").stat().st_ino), ("rename to", ".best.old"), ("rename to", "best"), parent]
    assert made_by(fileio.remove_dir_atomically, tmp_path / "best") == [("rename to", ".best.old"), parent]


def test_a_lone_surrogate_of_either_half_is_refused_naming_file_line_and_field(tmp_path):
    for lone in ("\ud83d", "\ude00"):  # the first half of "😀" without its second, and the second alone
        message = f"a.jsonl:2: 'text' holds a lone surrogate {lone!r} at character 4"
        with pytest.raises(DataError, match=re.escape(message)):
            fileio.refuse_lone_surrogate(tmp_path / "a.jsonl", 2, "text", f"olá {lone}!")
    assert fileio.refuse_lone_surrogate(tmp_path / "a.jsonl", 2, "text", "olá 😀!") == "olá 😀!"
