"""Writing .beton files safely: FFCV's ``DatasetWriter`` with a watchdog, atomic output, and the array cache.

FFCV 1.0.2's writer waits forever when one of its worker processes dies (it polls a shared counter that stops
moving). :class:`WatchedDatasetWriter` watches the workers' exit codes instead, so an exception in a worker
(a corrupt image, a bug in a data set's ``__getitem__``) becomes one :class:`BetonWriteError` within a fraction of
a second, with the worker's message. :func:`write_beton` writes to a temporary file and renames it into place, so
a reader never sees a half-written file. :func:`cached_array_beton` turns the in-memory data sets (synthetic,
CIFAR-100) into a cached .beton, so ``--loader ffcv`` needs no conversion step for them.

Imports FFCV at the top: import it through :mod:`loaders.ffcv` (which restores torch's thread count).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import time
import traceback
from collections.abc import Mapping
from multiprocessing import Process, Queue, Value
from pathlib import Path
from queue import Empty

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.base import Field
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter

from loaders.base import LoaderError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached .beton layout changes


class BetonWriteError(LoaderError):
    """A worker of FFCV's writer failed; the message carries its exception."""


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


def cached_array_beton(
    dataset: str, split: str, images: np.ndarray, labels: np.ndarray, cache_dir: Path, workers: int = 2
) -> Path:
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
    return write_beton(path, ArraySamples(images, labels), array_fields(), workers=workers, chunksize=1000)
