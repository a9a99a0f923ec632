"""Atomic file writes and checksums: nothing half-written ever carries a final name.

Every output goes to ``<name>.tmp`` first and is renamed with :func:`os.replace` once complete and flushed, so a
run killed at any instant leaves either the old complete file, the new complete file, or a ``.tmp`` leftover
that the next run deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import threading
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
_CHUNK = 4 << 20


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, hashed straight from its memory map (no copy; the GIL is released meanwhile)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                for start in range(0, size, _CHUNK):
                    digest.update(view[start : start + _CHUNK])
    return digest.hexdigest()


def finish_hashed(tmp: str | os.PathLike, final: str | os.PathLike) -> dict[str, Any]:
    """:func:`finish` for a large file whose checksum is needed: the flush to disk (waiting on the device) runs in
    a thread while this one hashes the file (CPU), so the two overlap. Returns ``{"bytes", "sha256"}``."""
    with open(tmp, "rb+") as f:
        flush = threading.Thread(target=os.fsync, args=(f.fileno(),))
        flush.start()
        try:
            record = {"bytes": os.fstat(f.fileno()).st_size, "sha256": sha256_file(tmp)}
        finally:
            flush.join()
    os.replace(tmp, final)
    return record


def file_record(path: str | os.PathLike, root: str | os.PathLike, sha256: str | None = None) -> dict[str, Any]:
    """``{"path": <relative to root>, "bytes": ..., "sha256": ...}`` for the manifest's ``files`` list."""
    path = Path(path)
    return {
        "path": path.relative_to(root).as_posix(),
        "bytes": path.stat().st_size,
        "sha256": sha256 or sha256_file(path),
    }


def matches_record(path: str | os.PathLike, record: dict[str, Any] | None) -> bool:
    """Whether ``path`` exists with the byte size and sha256 of ``record`` (``{"bytes", "sha256"}``)."""
    path = Path(path)
    if not record or not path.is_file() or path.stat().st_size != record.get("bytes"):
        return False
    return sha256_file(path) == record.get("sha256")


def finish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Flush ``tmp`` to disk and rename it to ``final`` in one atomic step."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """Write ``value`` as indented, key-sorted JSON (byte-identical for equal values) atomically."""
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (a state file from a killed run)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_quietly(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
