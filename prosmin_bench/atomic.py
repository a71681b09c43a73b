"""The one way files are written: under a temporary name beside the destination, then renamed over it.

Readers see the old file or the new one, never a half-written one; a crash, a full disk, Ctrl-C or SIGTERM
(which the CLI turns into an exception) leaves the old file as it was and no temporary file behind. The temporary
name is ``.<name>.<random>.tmp`` in the destination's folder (a rename across file systems is not atomic), made
with ``O_EXCL`` so two writers of the same file never share one; the last rename wins, whole.

:class:`PendingFile` is the primitive for a writer that keeps the file open across calls (the feature cache's
memory-mapped entry); :func:`atomic_path`, :func:`atomic_write_bytes` and :func:`atomic_write_text` wrap it for
the usual write-in-one-go.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

#: Turns the OSError of a failed write into the caller's own error (its one-line message for the user).
OnError = Callable[[OSError], BaseException]

#: Longest part of the destination's name kept in the temporary name: with the dot, the random part and ".tmp"
#: it stays under the 255 bytes most file systems allow.
_NAME_KEEP = 200


class PendingFile:
    """A new version of ``dest`` being written at :attr:`path` (an empty file, already created); :meth:`commit`
    puts it in place, :meth:`discard` removes it. Creates ``dest``'s folder as needed.

    ``sync=False`` skips waiting for the disk (fsync) at commit: the rename is still atomic for every reader, but a
    power cut soon after may leave the new name on an empty or partial file. Only for files whose readers verify
    them and rebuild what fails (the feature cache's checksummed entries).
    """

    def __init__(self, dest: str | os.PathLike, *, sync: bool = True) -> None:
        self.dest = Path(dest)
        self.sync = sync
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.path = _create_temp(self.dest)
        self.pending = True  # False once committed or discarded

    def commit(self) -> Path:
        """fsync the temporary file, rename it over ``dest``, fsync the folder; returns ``dest``. On an error the
        temporary file is removed and ``dest`` is as it was."""
        if not self.pending:
            raise ValueError(f"{self.dest}: this pending file was already committed or discarded")
        try:
            if self.sync:
                _fsync_file(self.path)
            os.replace(self.path, self.dest)
        except BaseException:
            self.discard()
            raise
        self.pending = False
        if self.sync:
            _fsync_folder(self.dest.parent)
        return self.dest

    def discard(self) -> None:
        """Remove the temporary file (if still there); never raises an OSError, which would hide the error being
        handled when this runs."""
        if self.pending:
            remove_quietly(self.path)
            self.pending = False


@contextmanager
def atomic_path(dest: str | os.PathLike, *, on_error: OnError | None = None, sync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write to (the file exists, empty); when the block ends normally it
    replaces ``dest``, and on any exception (KeyboardInterrupt included) it is removed and ``dest`` is left as it
    was. An OSError, from the block or from putting the file in place, is raised as ``on_error(exc)`` when given.
    ``sync``: see :class:`PendingFile`.

    >>> import tempfile
    >>> dest = Path(tempfile.mkdtemp()) / "page.md"
    >>> with atomic_path(dest) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> dest.read_text(), [p.name for p in dest.parent.iterdir()]
    ('hello', ['page.md'])
    """
    pending: PendingFile | None = None
    try:
        pending = PendingFile(dest, sync=sync)
        yield pending.path
        pending.commit()
    except OSError as exc:
        if pending is not None:
            pending.discard()
        if on_error is None:
            raise
        raise on_error(exc) from None
    except BaseException:
        if pending is not None:
            pending.discard()
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes, *, on_error: OnError | None = None,
                       sync: bool = True) -> Path:
    """Write ``data`` to ``dest`` atomically (see :func:`atomic_path`); returns ``dest`` as a Path."""
    with atomic_path(dest, on_error=on_error, sync=sync) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str, *, on_error: OnError | None = None,
                      sync: bool = True) -> Path:
    """Write ``text`` as UTF-8 to ``dest`` atomically (see :func:`atomic_path`); returns ``dest`` as a Path."""
    return atomic_write_bytes(dest, text.encode("utf-8"), on_error=on_error, sync=sync)


def _create_temp(dest: Path) -> Path:
    """Create an empty, new file beside ``dest`` and return its path."""
    while True:
        # Named before it exists, so an exception at any point (a signal landing inside os.open after it made the
        # file) is followed by removing a name that is known.
        tmp = dest.with_name(f".{dest.name[:_NAME_KEEP]}.{os.urandom(6).hex()}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue  # another writer's temporary file (a 48-bit name collision): not ours to remove
        except BaseException:
            remove_quietly(tmp)
            raise
        return tmp


def _fsync_file(path: Path) -> None:
    # Without it a crash soon after the rename can leave the new name on an empty or partial file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it. The new file is in place whatever happens
    here, so a refusal (Windows cannot open a folder; some file systems reject fsync on one) is not an error."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        log.debug("cannot open folder %s to sync it: %s", folder, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("cannot sync folder %s: %s", folder, exc)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    """Remove a temporary file on an error path; a failure here (a folder turned read-only) must not replace the
    error being reported."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("could not remove %s: %s", path, exc)
