"""Decode source files in ``--workers`` processes and hand the results back in source order.

Work goes out in chunks of consecutive files. A worker reads each file, decodes it fully
(:func:`tools._convert.images.decode`) and reports either the reason it is unusable or its upright size. When a
DALI shard is being written it also builds the sample's finished tar members (``<key>.jpg`` and ``<key>.cls``,
headers included) with a placeholder key and writes the chunk's members to a scratch file in /dev/shm, so the
parent only maps that file, stamps the real keys into the headers, appends the bytes to the shard and hashes
them. Pickling image bytes through the pool's pipes cost the single parent process 0.2 ms per image (a tenth
of a worker's decode); this keeps its share small, which is what lets 2 workers run close to twice as fast as 1.

Results arrive in source order (shards are written sequentially and deterministically whatever the number of
workers), and at most ``4 x workers`` chunks are in flight, so a slow disk cannot make results pile up in
memory. The workers run in a ``concurrent.futures`` process pool: a worker that dies (killed for memory, a crash
in a decoder) fails the conversion at once with a clear error instead of leaving the parent waiting for a result
that never comes, and the pool shuts down by telling idle workers to exit (no signals, which a forked worker may
miss). Workers get the default SIGTERM action back, whatever handler the parent installed.
"""

from __future__ import annotations

import collections
import mmap
import multiprocessing
import os
import shutil
import signal
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tools._convert.images import BadImage, dali_payload, decode
from tools._convert.sources import ConvertError

KEY_DIGITS = 8
PLACEHOLDER_KEY = "0" * KEY_DIGITS
_BLOCK = 512
_CHUNK = 16

# Set once per worker by the pool initializer (inherited through fork, never pickled)
_STATE: dict = {}


@dataclass
class Result:
    """What one worker found out about one source file."""

    index: int
    reason: str | None = None  # why the file is skipped; None when usable
    width: int = 0  # upright size before any resize
    height: int = 0
    reencoded: bool = False
    members: memoryview | bytearray | None = None  # the sample's tar members (placeholder key), when asked for
    offset: int = 0  # where the members start in the chunk's scratch file (worker side)
    jpg_size: int = 0
    cls_header: int = 0  # offset of the .cls member's header within ``members``
    cls_size: int = 0


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file tar member (USTAR header with fixed mtime / owner / mode, data, zero padding)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + b"\0" * (-len(data) % _BLOCK)


def stamp_key(members: memoryview | bytearray, cls_header: int, key: bytes) -> None:
    """Write ``key`` into both member names of a sample built with the placeholder key, fixing the checksums."""
    delta = sum(key) - sum(PLACEHOLDER_KEY.encode())
    for header in (0, cls_header):
        members[header : header + KEY_DIGITS] = key
        checksum = int(bytes(members[header + 148 : header + 154]), 8) + delta
        members[header + 148 : header + 156] = b"%06o\0 " % checksum


def _init(paths, labels, max_res: int | None, quality: int, payload: bool, scratch: str | None) -> None:
    _STATE.update(paths=paths, labels=labels, max_res=max_res, quality=quality, payload=payload, scratch=scratch)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, no traceback per worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's unwinding handler: SIGTERM ends a worker now


def process_file(index: int) -> Result:
    """Decode one file with the worker's settings."""
    try:
        with open(_STATE["paths"][index], "rb") as f:
            data = f.read()
    except OSError as error:
        return Result(index, reason=f"unreadable ({error.strerror or error})")
    want_payload = _STATE["payload"]
    try:
        # without a payload to write this is a validation pass: no resize needed, the size is reported as is
        decoded = decode(data, _STATE["max_res"] if want_payload else None)
    except BadImage as error:
        return Result(index, reason=str(error))
    width, height = decoded.source_size
    if not want_payload:
        return Result(index, width=width, height=height)
    payload, reencoded = dali_payload(data, decoded, _STATE["quality"])
    label = str(int(_STATE["labels"][index])).encode("ascii")
    jpg = tar_member(f"{PLACEHOLDER_KEY}.jpg", payload)
    members = bytearray(jpg + tar_member(f"{PLACEHOLDER_KEY}.cls", label))
    return Result(
        index, width=width, height=height, reencoded=reencoded, members=members,
        jpg_size=len(payload), cls_header=len(jpg), cls_size=len(label),
    )  # fmt: skip


def _work(chunk: tuple[int, int]) -> tuple[list[Result], str | None]:
    results = [process_file(i) for i in range(*chunk)]
    if not _STATE["payload"]:
        return results, None
    path, offset = os.path.join(_STATE["scratch"], f"{chunk[0]}.bin"), 0
    with open(path, "wb") as f:
        for result in results:
            if result.members is not None:
                f.write(result.members)
                result.offset, offset = offset, offset + len(result.members)
                result.members = None  # travels through the scratch file, not the pipe
    return results, path


def _scratch_dir(fallback: Path) -> str:
    """A private folder for chunk files: /dev/shm when usable, else ``fallback``; stale ones are removed."""
    shm = Path("/dev/shm")
    usable = shm.is_dir() and os.access(shm, os.W_OK)
    if usable:  # containers often mount a 64 MB /dev/shm; the chunks in flight need far less than 1 GiB
        stat = os.statvfs(shm)
        usable = stat.f_bavail * stat.f_frsize >= 1 << 30
    base = shm if usable else fallback
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob("divnorm-convert-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"divnorm-convert-{os.getpid()}-", dir=base)


def _attach(results: list[Result], path: str | None) -> Iterator[Result]:
    """Hand out a chunk's results, with ``members`` as writable views of its mapped scratch file."""
    if path is None:
        yield from results
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), size) if size else None
    os.remove(path)
    view = memoryview(mapped) if mapped is not None else None
    for result in results:
        if result.reason is None:
            result.members = view[result.offset : result.offset + _members_size(result)]
        yield result
        result.members = None  # the consumer is done with it: no view may outlive the mapping
    if mapped is not None:
        view.release()
        mapped.close()


def _members_size(result: Result) -> int:
    return result.cls_header + _BLOCK + result.cls_size + (-result.cls_size % _BLOCK)


def decode_files(
    paths: Sequence[str],
    labels: Sequence[int],
    start: int,
    workers: int,
    max_res: int | None,
    jpeg_quality: int,
    want_payload: bool,
) -> Iterator[Result]:
    """Results for ``paths[start:]`` in order, computed by ``workers`` processes."""
    if len(paths) <= start:
        return
    chunks = ((i, min(i + _CHUNK, len(paths))) for i in range(start, len(paths), _CHUNK))
    context = multiprocessing.get_context("fork")
    scratch = _scratch_dir(Path(tempfile.gettempdir())) if want_payload else None
    initargs = (paths, labels, max_res, jpeg_quality, want_payload, scratch)
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=initargs)
    try:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(executor.submit(_work, chunk))
            if len(pending) >= 4 * workers:
                yield from _attach(*pending.popleft().result())
        while pending:
            yield from _attach(*pending.popleft().result())
    except BrokenProcessPool as error:
        raise ConvertError(
            "a conversion worker process died (killed by the system, e.g. out of memory, or crashed in a decoder); "
            "rerun the same command to resume, with fewer --workers if memory is short"
        ) from error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
