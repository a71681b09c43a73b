"""The one atomic-write helper (prosmin_bench/atomic.py): a file is replaced whole or not at all, and no temporary
file outlives a write, whatever stops it (an error, a full disk, Ctrl-C); concurrent writers end with one whole
file. The last test drives a writer that used to leave its temporary file behind through the command line."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch

from prosmin_bench import atomic, config
from prosmin_bench.atomic import PendingFile, atomic_path, atomic_write_bytes, atomic_write_text
from prosmin_bench.paths import record_path
from prosmin_bench.results import ResultRecord, read_record
from test_faults import cards_dir, cli, make_toy  # noqa: F401  (fixtures)


class WriteFailed(Exception):
    """The caller's own error type, made from the OSError of a failed write."""


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_creates_the_folder_and_replaces_the_file_whole(tmp_path):
    dest = tmp_path / "a" / "b" / "page.md"
    assert atomic_write_text(dest, "first é") == dest
    assert dest.read_text(encoding="utf-8") == "first é"
    atomic_write_bytes(dest, b"second")
    assert dest.read_bytes() == b"second" and names(dest.parent) == ["page.md"]


def test_the_temporary_file_is_beside_the_destination_and_hidden(tmp_path):
    dest = tmp_path / "record.json"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.is_file() and tmp.stat().st_size == 0
        assert tmp.name.startswith(".record.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("x")
        assert not dest.exists()  # nothing is visible under the final name before the block ends
    assert dest.read_text() == "x" and not tmp.exists()


@pytest.mark.parametrize("stop", [ValueError("bad value"), KeyboardInterrupt(), SystemExit(143)],
                         ids=["error", "ctrl-c", "exit"])
def test_a_write_stopped_midway_keeps_the_old_file_and_no_temporary(tmp_path, stop):
    dest = tmp_path / "record.json"
    dest.write_text("old")
    with pytest.raises(type(stop)):
        with atomic_path(dest) as tmp:
            tmp.write_text("half of the new")
            raise stop
    assert dest.read_text() == "old" and names(tmp_path) == ["record.json"]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["fsync", "replace"])
@pytest.mark.parametrize("translated", [True, False], ids=["on_error", "plain"])
def test_a_failed_write_becomes_the_callers_error_and_keeps_the_old_file(tmp_path, monkeypatch, where, translated):
    dest = tmp_path / "record.json"
    dest.write_text("old")
    on_error = (lambda exc: WriteFailed(f"{dest.name}: {exc.strerror}")) if translated else None
    with monkeypatch.context() as mp:
        mp.setattr(os, where, _no_space)
        with pytest.raises(WriteFailed if translated else OSError, match="No space left on device$") as got:
            atomic_write_text(dest, "new", on_error=on_error)
    assert not translated or str(got.value) == "record.json: No space left on device"
    assert dest.read_text() == "old" and names(tmp_path) == ["record.json"]


def test_a_failed_removal_of_the_temporary_does_not_hide_the_error(tmp_path, monkeypatch):
    dest = tmp_path / "record.json"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", read_only)
        mp.setattr(os, "unlink", read_only)  # the folder turned read-only: the temporary file cannot go either
        with pytest.raises(WriteFailed, match="^Read-only file system$"):
            atomic_write_text(dest, "new", on_error=lambda exc: WriteFailed(exc.strerror))
    assert not dest.exists()


def test_a_refused_folder_sync_does_not_fail_a_finished_write(tmp_path, monkeypatch):
    real = os.fsync

    def no_folder_sync(fd):  # some file systems refuse fsync on a folder (EINVAL)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to tell a folder's descriptor from a file's")
    monkeypatch.setattr(os, "fsync", no_folder_sync)
    dest = atomic_write_text(tmp_path / "page.md", "done")
    assert dest.read_text() == "done" and names(tmp_path) == ["page.md"]


@pytest.mark.parametrize("sync", [True, False])
def test_a_write_waits_for_the_disk_unless_told_not_to(tmp_path, monkeypatch, sync):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a descriptor's file")
    synced: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dest = atomic_write_text(tmp_path / "entry.json", "{}", sync=sync)
    assert dest.read_text() == "{}" and names(tmp_path) == ["entry.json"]
    if sync:  # the new bytes under their temporary name, then the folder that holds the rename
        assert len(synced) == 2 and synced[0].parent == tmp_path and synced[0].name.endswith(".tmp")
        assert synced[1] == tmp_path
    else:
        assert synced == []


def test_a_pending_file_is_committed_or_discarded_once(tmp_path):
    dest = tmp_path / "entry.npy"
    kept = PendingFile(dest)
    kept.path.write_bytes(b"features")
    assert kept.commit() == dest and dest.read_bytes() == b"features"
    with pytest.raises(ValueError, match="already committed or discarded"):
        kept.commit()
    dropped = PendingFile(dest)
    dropped.path.write_bytes(b"half")
    dropped.discard()
    dropped.discard()
    assert dest.read_bytes() == b"features" and names(tmp_path) == ["entry.npy"]


def test_temporary_names_never_collide(tmp_path, monkeypatch):
    dest = tmp_path / "x.json"
    taken = [bytes(6), bytes(6), b"\x01" * 6]  # the first two draws name the same file
    monkeypatch.setattr(atomic.os, "urandom", lambda n: taken.pop(0))
    first = PendingFile(dest)
    second = PendingFile(dest)  # the second draw is taken: a third name, and the first writer's file is untouched
    assert first.path != second.path and first.path.is_file() and second.path.is_file()
    first.discard()
    second.discard()
    assert names(tmp_path) == []


def test_concurrent_writers_end_with_one_whole_file_and_readers_never_see_a_part(tmp_path):
    dest = tmp_path / "shared.bin"
    payloads = [bytes([i]) * (256 << 10) for i in range(6)]  # large enough that a write takes several syscalls
    atomic_write_bytes(dest, payloads[0])
    seen: list[bytes] = []
    done = threading.Event()

    def write(payload: bytes) -> None:
        for _ in range(8):
            atomic_write_bytes(dest, payload)

    def read() -> None:
        while not done.is_set():
            seen.append(dest.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert dest.read_bytes() in payloads and names(tmp_path) == ["shared.bin"]
    assert seen and all(s in payloads for s in seen)


def test_ctrl_c_while_a_probe_head_is_saved_leaves_no_temporary_file(tmp_path, cards_dir, capsys, monkeypatch):
    """The linear head used to be saved with mkstemp + torch.save + rename and no clean-up: Ctrl-C (or SIGTERM)
    inside torch.save left a ``.tmp`` in the heads cache for good."""
    data, res = make_toy(tmp_path / "data"), tmp_path / "res"
    argv = ["-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "toy_linear", "--seeds", "0",
            "--data-root", str(data), "--num-workers", "0", "--results", str(res)]
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are on disk under the temporary name, not yet renamed
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", interrupted_save)
        code, _, err = cli(capsys, *argv)
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == "prosmin-bench: interrupted; finished results are saved, run again to resume"
    heads = config.heads_dir()
    assert [p.name for p in heads.rglob("*") if p.is_file()] == []
    assert not record_path(res, "random_micro", "toy_linear").exists()
    code, _, err = cli(capsys, *argv)  # run again: the head is trained, saved and used
    assert code == 0, err
    assert [p.suffix for p in heads.rglob("*") if p.is_file()] == [".pt"]
    assert isinstance(read_record(record_path(res, "random_micro", "toy_linear")), ResultRecord)
