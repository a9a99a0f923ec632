"""Decode source files in ``--workers`` processes and hand the results back in source order.

Each worker reads one file, decodes it fully (:func:`tools._convert.images.decode`) and returns either the
reason it is unusable or its upright size and, when a DALI shard is being written, the bytes to store. Results
arrive in source order (``imap``), so shards are written sequentially and deterministically whatever the
number of workers.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tools._convert.images import BadImage, dali_payload, decode

# Set once per worker by the pool initializer: (max_res, jpeg_quality, want_payload)
_SETTINGS: tuple[int | None, int, bool] = (None, 90, False)


@dataclass
class Result:
    """What one worker found out about one source file."""

    index: int
    reason: str | None = None  # why the file is skipped; None when usable
    width: int = 0  # upright size before any resize
    height: int = 0
    payload: bytes | None = None  # bytes for the DALI shard (when asked for)
    reencoded: bool = False


def _init(max_res: int | None, jpeg_quality: int, want_payload: bool) -> None:
    global _SETTINGS
    _SETTINGS = (max_res, jpeg_quality, want_payload)


def process_file(index: int, path: str) -> Result:
    """Decode one file with the worker's settings."""
    max_res, quality, want_payload = _SETTINGS
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        return Result(index, reason=f"unreadable ({error.strerror or error})")
    try:
        # without a payload to write this is a validation pass: no resize needed, the size is reported as is
        decoded = decode(data, max_res if want_payload else None)
    except BadImage as error:
        return Result(index, reason=str(error))
    width, height = decoded.source_size
    if not want_payload:
        return Result(index, width=width, height=height)
    payload, reencoded = dali_payload(data, decoded, quality)
    return Result(index, width=width, height=height, payload=payload, reencoded=reencoded)


def _work(item: tuple[int, str]) -> Result:
    return process_file(*item)


def decode_files(
    paths: Sequence[str],
    start: int,
    workers: int,
    max_res: int | None,
    jpeg_quality: int,
    want_payload: bool,
) -> Iterator[Result]:
    """Results for ``paths[start:]`` in order, computed by ``workers`` processes."""
    items = ((i, paths[i]) for i in range(start, len(paths)))
    if len(paths) - start <= 0:
        return
    context = multiprocessing.get_context("fork")
    # small chunks keep the ordered stream flowing; big enough that IPC stays a small part of the cost
    chunksize = max(1, min(16, (len(paths) - start) // (workers * 8) or 1))
    with context.Pool(workers, initializer=_init, initargs=(max_res, jpeg_quality, want_payload)) as pool:
        yield from pool.imap(_work, items, chunksize=chunksize)
