"""Writing .beton files safely: FFCV's ``DatasetWriter`` with a watchdog, an ordered in-process writer, atomic
output, and the array cache.

FFCV 1.0.2's writer waits forever when one of its worker processes dies (it polls a shared counter that stops
moving). :class:`WatchedDatasetWriter` watches the workers' exit codes instead, so an exception in a worker
(a corrupt image, a bug in a data set's ``__getitem__``) becomes one :class:`BetonWriteError` within a fraction of
a second, with the worker's message. :func:`write_beton` writes to a temporary file and renames it into place, so
a reader never sees a half-written file. :class:`OrderedBetonWriter` fills an FFCV file from the calling process
in order, with samples that may be encoded elsewhere (``tools/convert.py``'s worker pool): no FFCV worker at all,
byte-identical to FFCV's single-worker writer. :func:`cached_array_beton` turns the in-memory data sets
(synthetic, CIFAR-100) into a cached .beton with it, so ``--loader ffcv`` needs no conversion step for them.

Imports FFCV at the top: import it through :mod:`loaders.ffcv_import` (fast, restores torch's thread count).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import time
import traceback
from collections.abc import Mapping
from multiprocessing import Process, Queue, Value
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.base import Field
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.memory_allocator import MemoryAllocator
from ffcv.utils import align_to_page
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

from loaders.base import LoaderError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached .beton layout changes
DEFAULT_PAGE = 4 * MIN_PAGE_SIZE  # DatasetWriter's default page size (8 MiB)


class BetonWriteError(LoaderError):
    """A worker of FFCV's writer failed; the message carries its exception."""


JPG, RAW = IMAGE_MODES["jpg"], IMAGE_MODES["raw"]  # FFCV's image storage modes (0, 1)


@dataclasses.dataclass
class EncodedImage:
    """An image already in its stored form: a JPEG (``mode == JPG``) or raw uint8 HWC RGB pixels (``mode == RAW``),
    exactly the bytes ``RGBImageField.encode`` would store for it. ``data`` may be left out (``None``) when
    someone else writes the bytes (see :meth:`OrderedBetonWriter.add`); ``nbytes`` is their length."""

    mode: int
    height: int
    width: int
    nbytes: int
    data: memoryview | bytes | np.ndarray | None = None


class OrderedBetonWriter(DatasetWriter):
    """FFCV's ``DatasetWriter`` filled by the calling process, one sample after another, in order.

    The file is FFCV's own: ``prepare()`` writes the header and field descriptors, the sample data is laid out in
    pages by FFCV's allocator rules (a sample never straddles a page; a page is padded with zeros), ``finalize()``
    writes the metadata and the allocation table. What differs is who fills it: instead of forking workers that
    each call the fields' ``encode`` and race for pages, the caller hands samples to :meth:`add` in order. Images
    may come as :class:`EncodedImage` (decoded, resized and JPEG-encoded elsewhere, e.g. by the conversion tool's
    worker pool) with the metadata ``RGBImageField.encode`` would write; any other value goes through its field's
    ``encode``. One writer in a fixed order makes the bytes independent of how many processes prepared the
    samples, and there is no FFCV worker that could die and leave the writer waiting.

    The bytes of an :class:`EncodedImage` without ``data`` are not written here: :meth:`add` returns where they
    go, and the caller writes them into the file (``os.pwrite``; several processes may do so at once) before the
    writer closes. Padding is left as holes, which read as the zeros FFCV writes.

    ``capacity`` bounds the number of samples (their metadata space is reserved before the data region); the
    header records how many :meth:`add` wrote, so samples found unusable on the way simply are not added.
    """

    def __init__(self, fname: str, fields: Mapping[str, Field], *, capacity: int, page_size: int) -> None:
        super().__init__(fname, fields, page_size=page_size, num_workers=1)
        self.capacity, self.count = int(capacity), 0
        self.allocations: list[tuple[int, int, int]] = []  # (sample, file offset, size), FFCV's allocation table
        self.page, self.page_used = -1, 0
        self.fd = -1
        self.run_start, self.run = 0, bytearray()  # bytes this writer holds for one contiguous file range

    def __enter__(self) -> OrderedBetonWriter:
        self.num_samples = self.capacity
        self.prepare()
        self.metadata = np.frombuffer(self.metadata_sm.buf, dtype=self.metadata_type)
        self.data_start = align_to_page(self.data_region_start, self.page_size)
        self.fd = os.open(self.fname, os.O_WRONLY)
        return self

    def add(self, sample: tuple) -> list[tuple[int, int]]:
        """Append one sample (a value per field, in the fields' order); returns ``[(file offset, size)]`` of the
        image data this call did not write (from :class:`EncodedImage` values without ``data``)."""
        if self.count >= self.capacity:
            raise BetonWriteError(f"{self.fname}: more than the {self.capacity} samples it was opened for")
        for attempt in range(2):  # FFCV's rule: a sample whose data overflows its page restarts on a fresh page
            pending: list[tuple[tuple[int, int], Any]] = []
            malloc = functools.partial(self._malloc, pending=pending)
            try:
                for name, field, value in zip(self.metadata_type.names, self.fields.values(), sample):
                    destination = self.metadata[name][self.count : self.count + 1]
                    if isinstance(value, EncodedImage):
                        pending.append((self._store_encoded(destination, value), value.data))
                    else:
                        field.encode(destination, value, malloc)
                break
            except MemoryError:
                if attempt:
                    raise
        external = []
        for (ptr, size), data in pending:
            if data is None:
                external.append((ptr, size))
            else:
                self._write(ptr, data)
        self.count += 1
        return external

    def _store_encoded(self, destination: np.ndarray, image: EncodedImage) -> tuple[int, int]:
        """The metadata the tail of ``RGBImageField.encode`` stores for an image it has encoded; its allocation."""
        if image.mode not in (JPG, RAW):
            raise BetonWriteError(f"unknown FFCV image mode {image.mode}")
        if image.data is not None and len(memoryview(image.data).cast("B")) != image.nbytes:
            raise BetonWriteError(f"image data of {len(memoryview(image.data).cast('B'))} bytes, said {image.nbytes}")
        if image.mode == RAW and image.nbytes != image.height * image.width * 3:
            raise BetonWriteError(f"raw image of {image.height}x{image.width}x3 pixels given {image.nbytes} bytes")
        destination["mode"] = image.mode
        destination["height"], destination["width"] = image.height, image.width
        destination["data_ptr"] = ptr = self._allocate(image.nbytes)
        return ptr, image.nbytes

    def _malloc(self, size: int, pending: list) -> tuple[int, np.ndarray]:
        """A field's ``malloc``: (file offset, buffer the field fills), written by :meth:`add`."""
        buffer = np.zeros(size, np.uint8)
        pending.append(((self._allocate(size), size), buffer))
        return pending[-1][0][0], buffer

    def _allocate(self, size: int) -> int:
        """FFCV's ``MemoryAllocator.malloc`` for one writer: the file offset of ``size`` bytes for this sample."""
        if size > self.page_size:
            raise BetonWriteError(f"a sample of {size} bytes does not fit FFCV's {self.page_size}-byte page")
        if self.page < 0 or size > self.page_size - self.page_used:
            self.page, self.page_used = self.page + 1, 0
            if self.allocations and self.allocations[-1][0] == self.count:
                # part of this sample sits on the previous page (its allocations are the last ones): drop them,
                # the sample restarts on this page
                while self.allocations and self.allocations[-1][0] == self.count:
                    self.allocations.pop()
                raise MemoryError("sample does not fit the rest of the page")
        ptr = self.data_start + self.page * self.page_size + self.page_used
        self.page_used += size
        self.allocations.append((self.count, ptr, size))
        return ptr

    def _write(self, ptr: int, data) -> None:
        """Write ``data`` at ``ptr``, batching contiguous writes into one ``pwrite`` (up to a page: small samples
        would otherwise cost a system call each). Only touching ranges merge, so bytes someone else writes (the
        gaps left for external data) are never covered."""
        if self.run and (ptr != self.run_start + len(self.run) or len(self.run) >= self.page_size):
            self._flush()
        if not self.run:
            self.run_start = ptr
        self.run += memoryview(data).cast("B")

    def _flush(self) -> None:
        if self.run:
            _pwrite_all(self.fd, self.run, self.run_start)
            self.run = bytearray()

    def __exit__(self, error_type, error, trace) -> None:
        try:
            if error_type is None:
                # FFCV writes whole pages: the file ends with the last page (its padding a hole of zeros)
                self._flush()
                os.ftruncate(self.fd, self.data_start + (self.page + 1) * self.page_size)
                self.header["num_samples"] = self.count
                self.finalize(self.allocations)
        finally:
            os.close(self.fd)
            del self.metadata
            self.metadata_sm.close()
            self.metadata_sm.unlink()


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:  # one pwrite() may store less than asked
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _guarded_worker(errors: Queue, work_fn, *args) -> None:
    """Run one FFCV writer worker; report its exception to the parent instead of only printing it."""
    try:
        work_fn(*args)
    except BaseException as error:  # noqa: BLE001 - reported, then the process exits non-zero
        errors.put(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise SystemExit(1) from None


class WatchedDatasetWriter(DatasetWriter):
    """``DatasetWriter`` whose parent process notices dead workers instead of waiting forever.

    ``_write_common`` follows FFCV 1.0.2's (same queues, allocator, finalize) with two changes: the progress loop
    checks the workers' exit codes, and a progress bar is optional.
    """

    def __init__(self, fname: str, fields: Mapping[str, Field], *, progress: bool = False, **kwargs) -> None:
        super().__init__(fname, fields, **kwargs)
        self.progress = progress

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        workqueue: Queue = Queue()
        for todo in queue_content:
            workqueue.put(todo)
        for _ in range(self.num_workers):
            workqueue.put(None)  # one stop token per worker
        allocations_queue: Queue = Queue()
        errors: Queue = Queue()
        done_number = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        worker_args = (
            workqueue,
            self.metadata_sm,
            self.metadata_type,
            self.fields,
            allocator,
            done_number,
            allocations_queue,
            *extra_worker_args,
        )
        processes = [
            Process(target=_guarded_worker, args=(errors, work_fn, *worker_args)) for _ in range(self.num_workers)
        ]
        bar = None
        try:
            for p in processes:
                p.start()
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=num_samples, desc=os.path.basename(self.fname))
            shown = 0
            allocation_list: list = []
            all_exited_at = None
            while len(allocation_list) < len(processes):
                # each worker sends its allocations after its stop token; a crash shows as a non-zero exit code
                with contextlib.suppress(Empty):
                    allocation_list.append(allocations_queue.get(timeout=0.05))
                if bar is not None and done_number.value > shown:
                    bar.update(done_number.value - shown)
                    shown = done_number.value
                self._raise_for_failed_worker(processes, errors)
                if all_exited_at is None and all(p.exitcode == 0 for p in processes):
                    all_exited_at = time.monotonic()
                if all_exited_at is not None and time.monotonic() - all_exited_at > 10:
                    raise BetonWriteError(f"FFCV's writer workers exited without reporting their data ({self.fname})")
            if done_number.value != num_samples:
                raise BetonWriteError(f"FFCV's writer finished {done_number.value} of {num_samples} samples")
            self.finalize(_flatten(allocation_list))
        finally:
            if bar is not None:
                bar.close()
            for p in processes:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=5)
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _raise_for_failed_worker(self, processes: list[Process], errors: Queue) -> None:
        failed = [p for p in processes if p.exitcode not in (None, 0)]
        if not failed:
            return
        try:
            message = errors.get(timeout=1.0)
        except Empty:
            message = f"worker exited with code {failed[0].exitcode} (killed, out of memory?)"
        raise BetonWriteError(f"writing {self.fname} failed in an FFCV writer worker: {message}")


def _flatten(allocation_list: list) -> list:
    """FFCV's ``finalize`` takes the workers' allocation lists concatenated."""
    flat: list = []
    for allocations in allocation_list:
        flat.extend(allocations)
    return flat


def write_beton(
    path: str | os.PathLike,
    dataset,
    fields: Mapping[str, Field],
    *,
    workers: int = 2,
    chunksize: int = 100,
    progress: bool = False,
) -> Path:
    """Write ``dataset`` (indexable, items = one value per field) to ``path`` atomically, failing fast.

    The file appears at ``path`` only when complete (temporary file + ``os.replace``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        writer = WatchedDatasetWriter(str(temporary), fields, progress=progress, num_workers=max(1, int(workers)))
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


class ArraySamples:
    """(uint8 HWC image, int label) pairs of two arrays, as FFCV's writer reads them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def array_fields() -> dict[str, Field]:
    """Fields of a 32-px data set: raw pixels (no JPEG loss), integer label."""
    return {"image": RGBImageField(write_mode="raw"), "label": IntField()}


def cached_array_beton(dataset: str, split: str, images: np.ndarray, labels: np.ndarray, cache_dir: Path) -> Path:
    """The .beton of in-memory arrays under ``cache_dir``, written once and reused (keyed by the content)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise LoaderError(f"{dataset}/{split}: expected uint8 (N, H, W, 3) images and N labels, got {images.shape}")
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{images.shape}".encode())
    digest.update(memoryview(images).cast("B"))
    digest.update(memoryview(labels).cast("B"))
    path = Path(cache_dir) / f"{dataset}-{split}-{len(labels)}-{digest.hexdigest()[:16]}.beton"
    if path.is_file():
        return path
    log.info("ffcv: writing %s/%s (%d samples) to %s once; later runs reuse it", dataset, split, len(labels), path)
    # raw pixels need no encoding: copied in this process, in order (no FFCV worker processes, same bytes every time)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        height, width = images.shape[1:3]
        with OrderedBetonWriter(str(temporary), array_fields(), capacity=len(labels), page_size=DEFAULT_PAGE) as out:
            for image, label in zip(images, labels.tolist()):
                out.add((EncodedImage(RAW, height, width, image.nbytes, image), label))
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
