"""Decode source files in ``--workers`` processes and hand the results back in source order.

Work goes out in chunks of consecutive files. A worker reads each file, decodes it fully
(:func:`tools._convert.images.decode`) and reports either the reason it is unusable or its upright size. When an
output is being written it also builds what that output stores for the file (its :class:`Payload`), so every
expensive step runs in parallel and the parent only copies bytes:

- ``"dali"``: the sample's finished tar members (``<key>.jpg`` and ``<key>.cls``, headers included) with a
  placeholder key; the parent stamps the real key into the headers and appends the bytes to the shard.
- ``"ffcv"``: the image as FFCV's ``RGBImageField`` stores it (resized, then raw RGB pixels or a JPEG encoded
  the way FFCV encodes it, raw-or-JPEG chosen per sample in proportion mode); the parent copies it into the
  ``.beton`` (:class:`loaders.ffcv_writer.OrderedBetonWriter`).

A chunk's payloads travel through a scratch file in /dev/shm: pickling image bytes through the pool's pipes cost
the single parent process 0.2 ms per image (a tenth of a worker's decode). The parent maps the file only to read
or patch what it must (DALI keys, the running sha256 of a shard) and lays the output out; a worker then copies the
chunk's bytes into the output files (:meth:`DecodePool.write_out`), since filling the page cache is itself costly
(~3 ms of kernel time per MB on the 2-core VM) and would otherwise serialise on the parent. That keeps the parent's
share small, which is what lets 2 workers run close to twice as fast as 1.

Results arrive in source order (outputs are written sequentially and deterministically whatever the number of
workers), and at most ``ahead x workers`` chunks are in flight, so a slow disk cannot make results pile up in
memory. The workers run in a ``concurrent.futures`` process pool: a worker that dies (killed for memory, a crash
in a decoder) or raises fails the conversion at once with a clear error instead of leaving the parent waiting for
a result that never comes, and the pool shuts down by telling idle workers to exit (no signals, which a forked
worker may miss). Workers get the default SIGTERM action back, whatever handler the parent installed.

A planted fault for the tests: ``DIVNORM_CONVERT_FAULT=raise:<i>`` or ``kill:<i>`` makes the worker that
processes source file ``i`` raise or SIGKILL itself.
"""

from __future__ import annotations

import collections
import contextlib
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
from typing import Any

from tools._convert.images import BadImage, dali_payload, decode, ffcv_image
from tools._convert.sources import ConvertError

KEY_DIGITS = 8
PLACEHOLDER_KEY = "0" * KEY_DIGITS
_BLOCK = 512
_CHUNK = 16
FAULT_ENV = "DIVNORM_CONVERT_FAULT"

# Set once per worker by the pool initializer (inherited through fork, never pickled)
_STATE: dict = {}


@dataclass(frozen=True)
class Payload:
    """What the workers build for each usable file (see the module docstring); ``None`` instead of a Payload
    makes a validation pass (full decode, no resize, sizes only)."""

    kind: str  # "dali" | "ffcv"
    max_res: int | None
    jpeg_quality: int
    write_mode: str = "raw"  # FFCV only: raw | jpg | proportion
    compress_prob: float = 0.5  # FFCV proportion mode: the share stored as JPEG
    seed: int = 42  # FFCV proportion mode: the choice is a function of (seed, source index)


@dataclass
class Result:
    """What one worker found out about one source file."""

    index: int
    reason: str | None = None  # why the file is skipped; None when usable
    width: int = 0  # upright size before any resize
    height: int = 0
    data: Any = None  # the payload, bytes or a flat uint8 array (worker side: it travels in the scratch file)
    offset: int = 0  # where the payload starts in the chunk's scratch file
    nbytes: int = 0  # its length
    reencoded: bool = False  # DALI: the JPEG was re-encoded
    jpg_size: int = 0  # DALI: size of the .jpg member's data
    cls_header: int = 0  # DALI: offset of the .cls member's header within the payload
    cls_size: int = 0  # DALI: size of the .cls member's data
    mode: str = ""  # FFCV: "jpg" | "raw"
    stored_width: int = 0  # FFCV: size of the stored picture
    stored_height: int = 0


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


def _init(paths, labels, payload: Payload | None, scratch: str | None) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    _STATE.update(paths=paths, labels=labels, payload=payload, scratch=scratch)
    _STATE["fault"] = (fault.split(":")[0], int(fault.split(":")[1])) if ":" in fault else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, no traceback per worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's unwinding handler: SIGTERM ends a worker now


def process_file(index: int) -> Result:
    """Decode one file and build its payload with the worker's settings."""
    fault = _STATE.get("fault")
    if fault and fault[1] == index:
        if fault[0] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"planted fault at source file {index} ({FAULT_ENV})")
    try:
        with open(_STATE["paths"][index], "rb") as f:
            data = f.read()
    except OSError as error:
        return Result(index, reason=f"unreadable ({error.strerror or error})")
    payload: Payload | None = _STATE["payload"]
    try:
        # without a payload to build this is a validation pass: no resize needed, the size is reported as is;
        # only FFCV needs the pixels of every file (a DALI shard keeps a plain JPEG's bytes)
        ffcv = payload is not None and payload.kind == "ffcv"
        decoded = decode(data, payload.max_res if payload else None, pixels=ffcv)
    except BadImage as error:
        return Result(index, reason=str(error))
    width, height = decoded.source_size
    if payload is None:
        return Result(index, width=width, height=height)
    if ffcv:
        mode, pixels, stored = ffcv_image(decoded, index, payload.write_mode, payload.compress_prob,
                                          payload.jpeg_quality, payload.seed)  # fmt: skip
        return Result(index, width=width, height=height, data=stored, nbytes=len(stored), mode=mode,
                      stored_width=pixels.shape[1], stored_height=pixels.shape[0])  # fmt: skip
    stored, reencoded = dali_payload(data, decoded, payload.jpeg_quality)
    label = str(int(_STATE["labels"][index])).encode("ascii")
    jpg = tar_member(f"{PLACEHOLDER_KEY}.jpg", stored)
    members = jpg + tar_member(f"{PLACEHOLDER_KEY}.cls", label)
    return Result(
        index, width=width, height=height, reencoded=reencoded, data=members, nbytes=len(members),
        jpg_size=len(stored), cls_header=len(jpg), cls_size=len(label),
    )  # fmt: skip


def _work(chunk: tuple[int, int]) -> tuple[list[Result], str | None]:
    results = [process_file(i) for i in range(*chunk)]
    if _STATE["payload"] is None:
        return results, None
    path, offset = os.path.join(_STATE["scratch"], f"{chunk[0]}.bin"), 0
    with open(path, "wb") as f:
        for result in results:
            if result.data is not None:
                f.write(result.data)
                result.offset, offset = offset, offset + result.nbytes
                result.data = None  # travels through the scratch file, not the pipe
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


def _outcome(future) -> Any:
    """A task's value, or a ConvertError for a worker that died or raised (one clear line, never a hang)."""
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise ConvertError(
            "a conversion worker process died (killed by the system, e.g. out of memory, or crashed in a decoder); "
            "rerun the same command to resume, with fewer --workers if memory is short"
        ) from error
    except OSError as error:  # a full disk, a vanished output folder, ...
        message = f"a conversion worker failed: {error}; fix it and rerun the same command to resume"
        raise ConvertError(message) from error
    except Exception as error:  # raised inside a worker: a bug, a planted fault
        raise ConvertError(f"a conversion worker failed: {type(error).__name__}: {error}") from error


def _write_out(scratch: str, targets: list[tuple[str, list[tuple[int, int, int]]]]) -> int:
    """Copy payload bytes from a chunk's scratch file into output files, then delete the scratch file. ``targets``:
    ``(path, [(scratch offset, size, file offset), ...])`` per output file. Runs in a worker, so the output's writes
    (allocating page cache costs ~3 ms of kernel time per MB on the 2-core VM) are spread over the pool instead of
    serialising the parent."""
    with open(scratch, "rb") as f:
        data = memoryview(f.read())
    os.remove(scratch)
    total = 0
    for target, moves in targets:
        fd = os.open(target, os.O_WRONLY)
        try:
            for source, size, offset in moves:
                view = data[source : source + size]
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                total += size
        finally:
            os.close(fd)
    return total


@contextlib.contextmanager
def mapped(path: str) -> Iterator[memoryview | None]:
    """A chunk's scratch file mapped read-write (None when empty): edits are seen by a later :meth:`write_out`."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            yield None
            return
        with mmap.mmap(f.fileno(), size) as mapping, memoryview(mapping) as view:
            yield view


class DecodePool:
    """The worker pool of one pass over ``paths[start:]``: chunks of results in source order, and (optionally)
    the writing of their payloads by the workers (:meth:`write_out`). Use as a context manager."""

    def __init__(
        self, paths: Sequence[str], labels: Sequence[int], start: int, workers: int, payload: Payload | None,
        ahead: int = 4,
    ) -> None:  # fmt: skip
        self.paths, self.start, self.workers, self.ahead = paths, start, workers, ahead
        self.scratch = _scratch_dir(Path(tempfile.gettempdir())) if payload else None
        self.executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_init,
            initargs=(paths, labels, payload, self.scratch),
        )  # fmt: skip
        self.writes: collections.deque = collections.deque()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def chunks(self) -> Iterator[tuple[list[Result], str | None]]:
        """Each chunk's results (``data`` not attached) and its scratch file (None without a payload), in order.
        The caller owns the scratch file: :meth:`write_out` it (which deletes it) or leave it to the pool's end."""
        pending: collections.deque = collections.deque()
        for i in range(self.start, len(self.paths), _CHUNK):
            pending.append(self.executor.submit(_work, (i, min(i + _CHUNK, len(self.paths)))))
            if len(pending) >= self.ahead * self.workers:
                yield _outcome(pending.popleft())
        while pending:
            yield _outcome(pending.popleft())

    def results(self) -> Iterator[Result]:
        """Every result in source order (a validation pass: payloads, if any, are left in the scratch files)."""
        for results, _ in self.chunks():
            yield from results

    def write_out(self, scratch: str, targets: list[tuple[str, list[tuple[int, int, int]]]]) -> None:
        """Have a worker copy payloads of a chunk's scratch file into output files and delete it (see
        :func:`_write_out`); at most ``ahead x workers`` such writes wait at a time."""
        self.writes.append(self.executor.submit(_write_out, scratch, targets))
        while self.writes and (self.writes[0].done() or len(self.writes) > self.ahead * self.workers):
            _outcome(self.writes.popleft())

    def wait_writes(self) -> None:
        """Return once every :meth:`write_out` so far is on disk (page cache); raise its error if one failed."""
        while self.writes:
            _outcome(self.writes.popleft())


def decode_files(
    paths: Sequence[str],
    labels: Sequence[int],
    start: int,
    workers: int,
    payload: Payload | None,
    ahead: int = 4,
) -> Iterator[Result]:
    """Results for ``paths[start:]`` in order, computed by ``workers`` processes, ``ahead x workers`` chunks
    in flight (the validation pass; the writers use :class:`DecodePool` itself)."""
    if len(paths) <= start:
        return
    with DecodePool(paths, labels, start, workers, payload, ahead) as pool:
        yield from pool.results()
