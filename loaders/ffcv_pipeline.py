"""FFCV internals behind :mod:`loaders.ffcv`: pipelines, a cache of compiled pipelines, a watched epoch iterator.

This module imports FFCV at the top, so only :mod:`loaders.ffcv` imports it, lazily, after FFCV is known to be
installed (and it restores torch's thread count, which ``import ffcv`` sets to 1).

* :func:`image_operations` / :func:`label_operations`: the FFCV pipelines of the loader contract.
* :class:`CompiledPipeline`: one FFCV ``Loader`` used only as "reader + compiled pipeline". Its first batch costs
  ~10 s of numba compilation here, so pipelines are cached per :class:`PipelineConfig` and shared by every
  :class:`loaders.ffcv.FfcvLoader` with the same decoding (other ranks, batch sizes, subsets, orders, repeated runs).
* :class:`WatchedEpochIterator`: FFCV's epoch thread, except that an exception inside it reaches the consumer
  within a fraction of a second instead of leaving ``next()`` blocked forever, and a stalled thread times out.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader as _FfcvBaseLoader
from ffcv.loader import OrderOption
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.pipeline.operation import Operation
from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order import QuasiRandom

from loaders.base import LoaderError
from loaders.ffcv_augment import SeededRandomResizedCropDecoder, SeededTranslateFlip

POLL_SECONDS = 0.2  # how often a waiting consumer checks that FFCV's thread is still alive


class FfcvWorkerError(LoaderError):
    """FFCV's pipeline thread raised or stalled; the message names the batch and the file."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that changes the compiled FFCV pipeline (nothing that only changes the order or batch size)."""

    beton: str  # absolute path
    stamp: tuple[int, int]  # (size, mtime_ns) of the .beton: a rewritten file gets a new pipeline
    train: bool
    resized: bool  # JPEG/variable-size images (ImageNet: crop decoders) vs fixed 32-px arrays (SimpleRGB)
    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    val_ratio: float  # image_size / val_resize: the centre crop's share of the shorter side
    augment: str  # in-memory sets: standard | original | none
    mean: tuple[float, float, float]  # in [0, 255] units
    std: tuple[float, float, float]
    device: str
    normalize_dtype: str  # "float32" | "float16": NormalizeImage inside FFCV; "uint8": the loader normalizes
    workers: int
    os_cache: bool


def cupy_available() -> bool:
    """True when cupy imports (FFCV's GPU ``NormalizeImage`` needs it; the ``gpu`` extra installs it)."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def image_operations(config: PipelineConfig) -> list[Operation]:
    """The image pipeline: decode (+ crop/resize), augment, normalize, to tensor, to device, channels-last.

    On the CPU ``NormalizeImage`` must come BEFORE ``ToTensor``: placed after it, FFCV 1.0.2's ``Loader()``
    loops forever (upstream issue #396). On a GPU it runs after ``ToDevice`` + ``ToTorchImage`` (cupy kernel).
    """
    size = (config.image_size, config.image_size)
    ops: list[Operation]
    # training augmentations draw per sample from (batch, sample id), not from numba's per-thread streams, so a
    # run and its resumed continuation augment alike (loaders.ffcv_augment)
    if config.resized:
        if config.train:
            ops = [
                SeededRandomResizedCropDecoder(size, scale=config.crop_scale, ratio=config.crop_ratio),
                SeededTranslateFlip(padding=0, flip=True),
            ]
        else:
            ops = [CenterCropRGBImageDecoder(size, ratio=config.val_ratio)]
    else:
        ops = [SimpleRGBImageDecoder()]
        if config.train and config.augment == "standard":
            ops += [SeededTranslateFlip(padding=4, flip=True)]  # pad-4 random crop (zero fill) + flip
        elif config.train and config.augment == "original":
            ops += [SeededTranslateFlip(padding=0, flip=True)]
    mean, std = np.array(config.mean), np.array(config.std)
    device = torch.device(config.device)  # ToDevice needs a torch.device, not a string
    if device.type == "cpu":
        if config.normalize_dtype != "uint8":
            ops.append(NormalizeImage(mean, std, np.dtype(config.normalize_dtype).type))
        # no ToDevice on the CPU: it would only copy into another reused buffer
        ops += [ToTensor(), ToTorchImage(channels_last=True)]
    else:
        ops += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
        if config.normalize_dtype != "uint8":
            ops.append(NormalizeImage(mean, std, np.dtype(config.normalize_dtype).type))
    return ops


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: the normalized value of every uint8 level per channel (mean / std in [0, 255] units)."""
    levels = np.arange(256, dtype=np.float64)[None, :]
    return ((levels - np.asarray(mean, np.float64)[:, None]) / np.asarray(std, np.float64)[:, None]).astype(np.float32)


@numba.njit(nogil=True)  # no cache=True: a read-only install would fail at import; compiling takes ~0.3 s
def _normalize_nhwc(src, table, dst):  # pragma: no cover - numba-compiled
    for i in range(src.shape[0]):
        for y in range(src.shape[1]):
            for x in range(src.shape[2]):
                dst[i, y, x, 0] = table[0, src[i, y, x, 0]]
                dst[i, y, x, 1] = table[1, src[i, y, x, 1]]
                dst[i, y, x, 2] = table[2, src[i, y, x, 2]]


def normalize_into(images: torch.Tensor, table: np.ndarray, out: torch.Tensor) -> bool:
    """Normalize a channels-last uint8 CPU batch into ``out`` (channels-last float32) in one pass; False if the
    layouts do not allow it (the caller then uses torch ops).

    On the CPU this replaces FFCV's ``NormalizeImage`` plus the copy out of FFCV's reused buffer: one pass that
    reads 1 byte and writes 4 per value, instead of a float32 pass in FFCV's threads and a float32 copy.
    """
    src, dst = images.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)  # NCHW channels-last -> NHWC views
    if not (src.is_contiguous() and dst.is_contiguous() and src.shape == dst.shape and src.shape[-1] == 3):
        return False
    _normalize_nhwc(src.numpy(), table, dst.numpy())
    return True


def label_operations(config: PipelineConfig) -> list[Operation]:
    """Labels as an (N, 1) int64 tensor on the device (flattened by the loader; no Squeeze: it breaks N=1)."""
    ops: list[Operation] = [IntDecoder(), ToTensor()]
    device = torch.device(config.device)
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


class _LoaderView:
    """The attributes FFCV's epoch iterator and traversal orders read, with per-wrapper overrides.

    One compiled FFCV loader serves many wrappers; each passes its own batch size, prefetch depth and indices
    through a view instead of mutating the shared loader.
    """

    def __init__(self, base: _FfcvBaseLoader, **overrides) -> None:
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(self._base, name)


class CompiledPipeline:
    """A .beton reader with its compiled image + label pipelines (FFCV ``Loader`` used as a code container)."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.first_batch_seconds: float | None = None  # set by the first epoch: includes numba compilation
        self._lock = threading.Lock()
        threads = torch.get_num_threads()
        try:
            image_ops = image_operations(config)
            self.decoder = image_ops[0]  # kept before FFCV pops it out of the list it is given
            pipelines: dict[str, list[Operation] | None] = {
                "image": list(image_ops),
                "label": label_operations(config),
            }
            from ffcv.reader import Reader

            fields = Reader(config.beton).handlers
            check_fields(fields, config.beton)
            for name in fields:
                pipelines.setdefault(name, None)  # extra fields in the file are not decoded
            # order/indices/batch size of the base loader are unused: every epoch passes its own through a view
            self.loader = _FfcvBaseLoader(
                config.beton,
                batch_size=1,
                num_workers=config.workers,
                os_cache=config.os_cache,
                order=OrderOption.SEQUENTIAL,
                drop_last=False,
                pipelines=pipelines,
            )
        finally:
            torch.set_num_threads(threads)  # FFCV's Compiler.set_num_threads also sets torch's
        names = list(self.loader.pipeline_specs)
        self.image_index, self.label_index = names.index("image"), names.index("label")
        self.num_samples = int(self.loader.reader.num_samples)

    @property
    def compiled(self) -> bool:
        return self.first_batch_seconds is not None

    def quasi_random_order(self, indices: np.ndarray, seed: int, batch_size: int) -> QuasiRandom:
        """FFCV's QUASI_RANDOM traversal over ``indices`` (page-local shuffle; single process only)."""
        view = _LoaderView(self.loader, indices=indices, seed=seed, distributed=False, batch_size=batch_size)
        return QuasiRandom(view)

    def epoch(
        self, order: np.ndarray, batch_size: int, batches_ahead: int, timeout: float, resolution: int | None = None
    ) -> WatchedEpochIterator:
        """Start FFCV's thread on ``order`` (uint64 sample ids); yields (images, labels) views of reused buffers."""
        with self._lock:
            if resolution is not None:
                # read by declare_state_and_memory when the epoch allocates its buffers; the compiled code is
                # size-generic, so the 160 -> 192 ramp needs no recompilation (as in ffcv-imagenet)
                self.decoder.output_size = (resolution, resolution)
            view = _LoaderView(self.loader, batch_size=batch_size, batches_ahead=batches_ahead)
            return WatchedEpochIterator(view, np.ascontiguousarray(order, dtype=np.uint64), timeout)


def check_fields(fields: dict, path: str) -> None:
    """The .beton must hold an RGB image field "image" and an integer field "label" (tools/convert.py's layout)."""
    if not isinstance(fields.get("image"), RGBImageField) or not isinstance(fields.get("label"), IntField):
        found = ", ".join(f"{k}: {type(v).__name__}" for k, v in fields.items())
        raise LoaderError(
            f"{path} is not a data set .beton of this project (needs fields image: RGBImageField and "
            f"label: IntField, found {found}); rewrite it with tools/convert.py --format ffcv"
        )


_PIPELINES: dict[PipelineConfig, CompiledPipeline] = {}
_PIPELINES_LOCK = threading.Lock()


def compiled_pipeline(config: PipelineConfig) -> tuple[CompiledPipeline, bool]:
    """The cached pipeline for ``config`` and whether it was built now (its first epoch will compile)."""
    with _PIPELINES_LOCK:
        pipeline = _PIPELINES.get(config)
        if pipeline is not None:
            return pipeline, False
        pipeline = CompiledPipeline(config)
        _PIPELINES[config] = pipeline
        return pipeline, True


def clear_pipeline_cache() -> None:
    """Forget every compiled pipeline (the next loader compiles again)."""
    with _PIPELINES_LOCK:
        _PIPELINES.clear()


class WatchedEpochIterator(EpochIterator):
    """FFCV's epoch thread that cannot hang its consumer.

    Upstream, an exception in the thread (a pipeline operation, a decoder, the compiler) kills it silently and
    ``next()`` then waits forever on its queue. Here the thread records the exception, and the consumer, which
    waits in short slices, checks that the thread is alive: a dead thread raises :class:`FfcvWorkerError` with
    the cause attached within ``POLL_SECONDS``; a live thread that produces nothing for ``timeout`` seconds
    (a deadlock) raises as well.
    """

    def __init__(self, view: _LoaderView, order: Sequence[int], timeout: float) -> None:
        self.failure: BaseException | None = None
        self.timeout = float(timeout)
        self.batches_done = 0
        super().__init__(view, order)  # starts the thread

    def run(self) -> None:
        try:
            self._produce()
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self.failure = error

    def _produce(self) -> None:
        """FFCV 1.0.2's ``EpochIterator.run``, except the thread count: numba's is per thread, torch's is global,
        and FFCV's ``Compiler.set_num_threads`` here would reset the training thread's torch threads mid-epoch."""
        loader = self.loader
        events = [None for _ in self.cuda_streams]
        numba.set_num_threads(max(1, min(loader.num_workers, numba.config.NUMBA_NUM_THREADS)))
        for b_ix, ixes in enumerate(self.iter_ixes):
            slot = self.current_batch_slot
            self.current_batch_slot = (slot + 1) % (loader.batches_ahead + 2)
            result = self.run_pipeline(b_ix, ixes, slot, events[slot])
            while True:
                try:
                    self.output_queue.put((slot, result), block=True, timeout=0.5)
                    break
                except queue.Full:
                    pass
                if self.terminate_event.is_set():
                    return
            if IS_CUDA:
                # the consumer has taken batch (slot - batches_ahead - 1): its buffers are free once the work
                # queued so far on the consumer's stream is done (FFCV's own rule)
                just_finished = (slot - loader.batches_ahead - 1) % (loader.batches_ahead + 2)
                event = torch.cuda.Event()
                event.record(self.current_stream)
                events[just_finished] = event
        self.output_queue.put(None)

    def __next__(self):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                item = self.output_queue.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                pass
            if not self.is_alive():
                try:  # the thread may have queued its last item just before exiting
                    item = self.output_queue.get_nowait()
                    break
                except queue.Empty:
                    self.close()
                    raise self._failure_error() from self.failure
            if time.monotonic() > deadline:
                self.close()
                raise FfcvWorkerError(
                    f"FFCV produced no batch for {self.timeout:.0f} s (batch {self.batches_done} of "
                    f"{self.loader.reader.file_name}); its pipeline thread is stuck. Raise data.ffcv_timeout if "
                    "batches are legitimately this slow."
                )
        if item is None:
            self.close()
            raise StopIteration
        slot, result = item
        if IS_CUDA:
            self.current_stream.wait_stream(self.cuda_streams[slot])  # the copy to the device is done
        self.batches_done += 1
        return result

    def _failure_error(self) -> FfcvWorkerError:
        cause = self.failure
        what = f"{type(cause).__name__}: {cause}" if cause is not None else "the thread ended without a result"
        return FfcvWorkerError(
            f"FFCV's pipeline failed while preparing batch {self.batches_done} of "
            f"{self.loader.reader.file_name}: {what}"
        )


def effective_workers(workers: int) -> int:
    """FFCV's worker (numba thread) count: at least 1, at most numba's limit (the machine's cores)."""
    return max(1, min(int(workers), numba.config.NUMBA_NUM_THREADS))
