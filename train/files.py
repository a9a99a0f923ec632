"""Atomic file writes and output locks shared by the trainer, its reports and the tools.

Each write goes to a temporary file in the destination folder and is renamed over the target with
``os.replace`` (atomic on POSIX); an interrupted write leaves the old file, or none, never a torn one.
:func:`exclusive_lock` keeps a second process from writing the same output at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class OutputLockedError(RuntimeError):
    """Another live process holds the output's lock (the message names its pid)."""


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` (parent folders created) through a temp file + ``os.replace``."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (parent folders created) through a temp file, fsync + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (non-JSON values as ``str``) atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, what: str, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on ``folder/name`` for the ``with`` block; yields the lock file.

    A second process asking for the same lock gets :class:`OutputLockedError` at once, naming the holder's pid
    and host (written into the lock file after the lock is taken). The kernel drops the lock when its holder
    dies, however it dies, so a lock left by a killed process never blocks: the file stays, the lock does not.
    The file is not removed on release: unlinking it would let a waiting process lock a deleted inode while a
    third one locks a fresh file. ``what`` names the holder in the message ("conversion into /data/out").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's pid must survive a failed try
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown (it is starting)"
            raise OutputLockedError(
                f"another {what} is running ({holder}; lock file {path}); wait for it to finish or stop it, or "
                "write somewhere else"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the only descriptor releases the flock
